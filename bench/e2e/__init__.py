"""The end-to-end benchmark suite of bench/README.md: configurations, load, report (``python -m bench.e2e.suite``)."""
