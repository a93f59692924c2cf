#!/usr/bin/env bash
# Make a headless browser and its WebDriver available for the playground test: Debian's chromium
# and chromium-driver when missing and running as root.
set -euo pipefail
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver from the Debian packages..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
    exit 0
fi
cat >&2 <<'MSG'
chromium and chromedriver are not installed and this script cannot install them (it needs root
and apt-get). Install them with your package manager (Debian: sudo apt-get install chromium
chromium-driver; Ubuntu: the chromium snap, or Google Chrome with its chromedriver).
MSG
exit 1
