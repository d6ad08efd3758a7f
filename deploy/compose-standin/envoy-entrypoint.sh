#!/bin/sh
# The behaviour of the official image's /docker-entrypoint.sh that docker-compose.yaml relies on (a rewrite, not
# a copy): arguments starting with "-" are Envoy's; $loglevel appends --log-level; run as root with ENVOY_UID not 0,
# the user `envoy` takes uid ENVOY_UID and its group gid ENVOY_GID (when set), and Envoy runs as that user with
# that primary group (the official image uses su-exec; setpriv from util-linux does the same here).
set -e
case "$1" in -*) set -- envoy "$@" ;; esac
if [ "$1" = envoy ] && [ -n "${loglevel:-}" ]; then
    set -- "$@" --log-level "$loglevel"
fi
if [ "${ENVOY_UID:-}" != 0 ] && [ "$(id -u)" = 0 ]; then
    [ -z "${ENVOY_UID:-}" ] || usermod -u "$ENVOY_UID" envoy
    [ -z "${ENVOY_GID:-}" ] || groupmod -g "$ENVOY_GID" envoy
    chown envoy:envoy /dev/stdout /dev/stderr
    exec setpriv --reuid=envoy --regid=envoy --init-groups "$@"
fi
exec "$@"
