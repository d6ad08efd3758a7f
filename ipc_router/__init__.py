"""ipc_router: routing and GenAI metrics for an Envoy LLM gateway, decided by a Python sidecar.

Extension points are in :mod:`ipc_router.x`; the config model in :mod:`ipc_router.filterapi`.
"""

__version__ = "0.1.0"
