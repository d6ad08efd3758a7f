#!/bin/sh
# Builds the stand-in base images docker-compose.yaml needs where no image can be pulled (offline verification
# only; see README.md): standin/debian:bookworm from debootstrap, then python:3.11-slim and
# envoyproxy/envoy:v1.40-latest on top. Run as root on a Debian host with dockerd running and debootstrap
# installed; needs Debian's mirror and PyPI. ROOTFS= reuses an existing debootstrap directory.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
rootfs=${ROOTFS:-/tmp/compose-standin-rootfs}
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,bash,procps \
        bookworm "$rootfs" http://deb.debian.org/debian
fi
# The host's CA bundle, so that pip inside the builds trusts what the host trusts (a proxy's CA, if any).
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
tar -C "$rootfs" -c . | docker import - standin/debian:bookworm
docker build -t python:3.11-slim -f "$here/python.Dockerfile" "$here"
docker build -t envoyproxy/envoy:v1.40-latest -f "$here/envoy.Dockerfile" "$here"
# The observability profile: Prometheus only (Grafana has no Debian or PyPI package to stand in for it).
docker build -t prom/prometheus:v3.5.0 -f "$here/prometheus.Dockerfile" "$here"
