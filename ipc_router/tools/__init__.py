"""Tools to try and measure the gateway on one machine; the sidecar never imports them.

* :mod:`ipc_router.tools.mock_backend`: a mock OpenAI-compatible LLM backend (``ipc-router mock-backend``);
* :mod:`ipc_router.tools.stack`: the sidecar and a real Envoy as child processes (the demo, the benchmarks and
  the end-to-end tests start their gateways with it).
"""
