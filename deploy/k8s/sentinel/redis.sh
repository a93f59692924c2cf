#!/bin/sh
# Starts this pod's Redis: the primary if the sentinels name this pod (or, before any of them
# knows one, if it is $FIRST_PRIMARY), otherwise a replica of the primary they name.
set -eu
here=$(dirname "$0")
self="$HOSTNAME.$REDIS_SERVICE"
primary=$(sh "$here/primary.sh")
# The password on the command line, as compose passes it: Redis hides its arguments from ps.
set -- "$here/redis.conf" --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
    --replica-announce-ip "$self"
if [ "${primary% *}" != "$self" ]; then
    set -- "$@" --replicaof "${primary% *}" "${primary#* }"
fi
exec redis-server "$@"
