"""Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``) so that ``pytest bench`` runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]) -> None:
    """Keep the JSON of `make bench` small enough to commit: the statistics, not every timing (~30 MB)."""
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
