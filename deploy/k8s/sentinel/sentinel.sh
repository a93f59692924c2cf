#!/bin/sh
# Starts this pod's sentinel from its config file ($1), kept across container restarts; a new pod
# writes it from sentinel.conf, watching the primary the other sentinels name.
set -eu
here=$(dirname "$0")
conf=$1
if [ ! -s "$conf" ]; then
    primary=$(sh "$here/primary.sh")
    {
        sed "s/^sentinel monitor \([^ ]*\) PRIMARY /sentinel monitor \1 $primary /" "$here/sentinel.conf"
        echo "sentinel announce-ip $HOSTNAME.$SENTINEL_SERVICE"
        echo "sentinel auth-pass $T2I_REDIS_SENTINEL_MASTER $REDIS_PASSWORD"
    } >"$conf.new"
    mv "$conf.new" "$conf"
fi
exec redis-server "$conf" --sentinel
