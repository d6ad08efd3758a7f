# Stand-in for prom/prometheus:v3.5.0 (offline verification only; see README.md): Debian 12's Prometheus (2.42),
# with the official image's entrypoint, default flags, user and data directory. docker-compose.yaml only mounts
# deploy/prometheus.yml at /etc/prometheus/prometheus.yml and publishes :9090.
FROM standin/debian:bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
