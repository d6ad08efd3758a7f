"""The "where the fast path's time goes" table from a suite result (``--split`` runs, bench/README.md).

``python -m bench.e2e.split [bench/results/latest.json]``: per configuration that ran, Envoy's CPU µs per request at
c=N (median over rounds; its worker thread's scheduler-counted run time where the result has it, else the whole
process's user + system time), its difference from configuration 5's (the fast path as shipped; per round, then the
median), c=N req/s over inline
Lua's and over configuration 5's (per round, then the median), and the added c=1 p50 over the httpCall floor's.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import _rps_ratio, summarise

SHIPPED, INLINE, FLOOR_CALL = "ipc_router_shm", "inline_lua", "httpcall"


def cpu_field(result: dict[str, Any]) -> str:
    """``envoy_worker`` when every c=N run of Envoy has it (suites since 2026-12-01 15:00), else ``envoy``."""
    hi = result["params"]["concurrency"][1]
    runs = [r for r in result["runs"] if r["c"] == hi and r["cpu_us_per_request"].get("envoy") is not None]
    return "envoy_worker" if runs and all("envoy_worker" in r["cpu_us_per_request"] for r in runs) else "envoy"


def _envoy_by_round(result: dict[str, Any], key: str, hi: int) -> dict[int, float]:
    field = cpu_field(result)
    return {
        r["round"]: r["cpu_us_per_request"][field]
        for r in result["runs"]
        if r["config"] == key and r["c"] == hi and r["cpu_us_per_request"].get(field) is not None
    }


def paired_delta(result: dict[str, Any], key: str, base: str, hi: int) -> float | None:
    """Median over rounds of key's Envoy µs/request minus base's in the same round (steadier than a difference of
    medians on a machine whose speed drifts between rounds)."""
    a, b = _envoy_by_round(result, key, hi), _envoy_by_round(result, base, hi)
    deltas = [a[r] - b[r] for r in a if r in b]
    return statistics.median(deltas) if deltas else None


def paired_quartiles(result: dict[str, Any], key: str, base: str, hi: int) -> tuple[float, float] | None:
    """The first and third quartiles of those per-round differences: the noise gauge."""
    a, b = _envoy_by_round(result, key, hi), _envoy_by_round(result, base, hi)
    deltas = sorted(a[r] - b[r] for r in a if r in b)
    if len(deltas) < 2:
        return None
    q = statistics.quantiles(deltas, n=4)
    return q[0], q[2]


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    summary = result.get("summary") or summarise(result)
    hi = result["params"]["concurrency"][1]
    runs = result["runs"]
    floor_added = summary.get(FLOOR_CALL, {}).get("added_p50_us")
    out = []
    field = cpu_field(result)
    for key, s in summary.items():
        envoy = s["cpu_us_per_request_cN"].get(field)
        added = s["added_p50_us"]
        out.append({
            "number": s["number"], "key": key, "label": s["label"], "envoy_us": envoy,
            "vs_shipped_us": paired_delta(result, key, SHIPPED, hi),
            "vs_shipped_q": paired_quartiles(result, key, SHIPPED, hi) if key != SHIPPED else None,
            "rps_vs_inline": _rps_ratio(runs, key, INLINE, hi) if INLINE in summary else None,
            "rps_vs_shipped": _rps_ratio(runs, key, SHIPPED, hi) if SHIPPED in summary else None,
            "added_p50_us": added,
            "added_vs_httpcall": None if added is None or not floor_added or floor_added <= 0 else added / floor_added,
        })  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    what = "Envoy worker µs/request" if cpu_field(result) == "envoy_worker" else "Envoy µs/request"
    lines = [
        f"| # | configuration | {what} | vs 5 (quartiles) | req/s / inline Lua's | req/s / 5's | added p50 µs "
        "| / httpCall floor's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(result):
        q = f" ({r['vs_shipped_q'][0]:+.1f}…{r['vs_shipped_q'][1]:+.1f})" if r["vs_shipped_q"] else ""
        lines.append(
            f"| {r['number']} | {r['label']} | {f(r['envoy_us'], '.1f')} | {f(r['vs_shipped_us'], '+.1f')}{q} "
            f"| {f(r['rps_vs_inline'], '.2f')} | {f(r['rps_vs_shipped'], '.2f')} | {f(r['added_p50_us'], '+.0f')} "
            f"| {f(r['added_vs_httpcall'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "results" / "latest.json"
    print(markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
