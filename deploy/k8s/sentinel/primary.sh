#!/bin/sh
# Prints the primary ("host port") of $T2I_REDIS_SENTINEL_MASTER as the first sentinel of
# $T2I_REDIS_SENTINELS that knows it says, or $FIRST_PRIMARY when none does (the set's first start).
set -eu
for address in $(echo "$T2I_REDIS_SENTINELS" | tr ',' ' '); do
    reply=$(timeout 3 redis-cli -h "${address%:*}" -p "${address##*:}" --raw \
        sentinel get-master-addr-by-name "$T2I_REDIS_SENTINEL_MASTER" 2>/dev/null) || continue
    host=$(echo "$reply" | sed -n 1p)
    port=$(echo "$reply" | sed -n 2p)
    case "$port" in
        '' | *[!0-9]*) continue ;;
    esac
    echo "$host $port"
    exit 0
done
echo "$FIRST_PRIMARY"
