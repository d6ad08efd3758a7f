"""ipc_router: routing and GenAI metrics for an Envoy LLM gateway, decided by a Python sidecar.

Extension points are in :mod:`ipc_router.extensions` (also importable as ``ipc_router.x``, the AI Gateway's
name); the config model in :mod:`ipc_router.config` (also ``ipc_router.filterapi``).
"""

__version__ = "0.1.0"
