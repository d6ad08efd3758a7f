# One image for the ipc_router containers of docker-compose.yaml: the sidecar (`ipc-router serve`), the init job
# that writes the Envoy bootstrap (`ipc-router envoy-config`) and the mock providers
# (`python -m ipc_router.tools.mock_backend`). Envoy itself runs from the envoyproxy/envoy image.
#
#   docker build -t ipc-router:local .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the repository as a package (its dependencies, the `ipc-router` command), then drop the sources: at run
# time ipc_router is imported from site-packages, not from a checkout.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ipc_router ./ipc_router
# The Lua filter is package data (ipc_router/lua/). Check from /
# (not /src, whose ipc_router/ would shadow the installed package) that `ipc-router envoy-config` will find it.
RUN pip install . \
    && cd / \
    && python -c 'from ipc_router.envoy_config import lua_filter_source; lua_filter_source()' \
    && rm -rf /src

# The demo's plugins and configs: `--router examples.custom_router:...` imports from /app.
WORKDIR /app
COPY examples ./examples
COPY deploy/config.compose.yaml ./deploy/config.compose.yaml
ENV PYTHONPATH=/app

# Run as an unprivileged user. Its group (10001) owns the sidecar's socket (mode 0660): the envoy container joins
# it (ENVOY_GID in docker-compose.yaml). The two directories are mount points of named volumes; a new volume takes
# over the owner of the directory it is first mounted on, so the sidecar and the init job can write there.
RUN groupadd --system --gid 10001 ipc-router \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
           --shell /usr/sbin/nologin ipc-router \
    && mkdir -p /run/ipc-router /etc/ipc-router/envoy \
    && chown ipc-router:ipc-router /run/ipc-router /etc/ipc-router/envoy \
    && chmod 0750 /run/ipc-router
USER ipc-router

CMD ["ipc-router", "--help"]
