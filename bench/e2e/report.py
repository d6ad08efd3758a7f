"""From the suite's raw runs to what a person reads: medians over rounds, added latency over the floor, the
issue's ratios with goal met / not met, bench/results/latest.md and latest.png.

Pairing: a configuration's added latency in a round is its c=1 p50 minus Envoy direct's in the same round; the
figure reported is the median over rounds. Throughput ratios are likewise per round, then the median. Latency
goals compare those medians (a ratio of two small differences is noisier per round than of their medians).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOOR = "direct"


def _per_round(result: dict[str, Any], key: str, c: int, field: str) -> dict[int, float]:
    return {r["round"]: r[field] for r in result["runs"] if r["config"] == key and r["c"] == c}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per configuration that ran: medians over rounds at c=1 and c=N, added latency and throughput vs the floor."""
    hi = result["params"]["concurrency"][1]
    out: dict[str, Any] = {}
    floor_p50 = _per_round(result, FLOOR, 1, "p50_us")
    floor_p99 = _per_round(result, FLOOR, 1, "p99_us")
    floor_rps = _per_round(result, FLOOR, hi, "rps")
    for c in result["configurations"]:
        key = c["key"]
        if c["status"] != "ran":
            continue
        row: dict[str, Any] = {"number": c["number"], "label": c["label"]}
        for name, conc in (("c1", 1), ("cN", hi)):
            row[name] = {
                f: _median(list(_per_round(result, key, conc, f).values())) for f in ("p50_us", "p99_us", "rps")
            }
        p50, p99 = _per_round(result, key, 1, "p50_us"), _per_round(result, key, 1, "p99_us")
        rps = _per_round(result, key, hi, "rps")
        added = [p50[r] - floor_p50[r] for r in p50 if r in floor_p50]
        row["added_p50_us"] = _median(added) if key != FLOOR else None
        row["added_p50_range_us"] = [min(added), max(added)] if added and key != FLOOR else None
        row["added_p99_us"] = _median([p99[r] - floor_p99[r] for r in p99 if r in floor_p99]) if key != FLOOR else None
        row["rps_vs_direct"] = _median([rps[r] / floor_rps[r] for r in rps if floor_rps.get(r)])
        cpu: dict[str, list[float]] = {}
        for r in result["runs"]:
            if r["config"] == key and r["c"] == hi:
                for role, us in r["cpu_us_per_request"].items():
                    if us is not None:
                        cpu.setdefault(role, []).append(us)
        row["cpu_us_per_request_cN"] = {role: statistics.median(v) for role, v in cpu.items()}
        out[key] = row
    return out


def _rps_ratio(result_runs: list[dict[str, Any]], a: str, b: str, hi: int) -> float | None:
    ra = {r["round"]: r["rps"] for r in result_runs if r["config"] == a and r["c"] == hi}
    rb = {r["round"]: r["rps"] for r in result_runs if r["config"] == b and r["c"] == hi}
    return _median([ra[k] / rb[k] for k in ra if rb.get(k)])


def goals(summary: dict[str, Any], runs: list[dict[str, Any]] | None = None, hi: int = 16) -> list[dict[str, Any]]:
    """The issue's ratios (goals, not timed tests)."""

    def added(key: str) -> float | None:
        row = summary.get(key)
        return None if row is None else row["added_p50_us"]

    def latency_ratio(a: str, b: str) -> tuple[float | None, str | None]:
        x, y = added(a), added(b)
        if x is None or y is None:
            return None, f"{a if x is None else b} did not run"
        if y <= 0:
            return None, f"{b}'s added latency ({y:.0f} µs) is within the noise"
        return x / y, None

    def rps_ratio(a: str, b: str) -> tuple[float | None, str | None]:
        if a not in summary or b not in summary:
            return None, f"{a if a not in summary else b} did not run"
        return (_rps_ratio(runs, a, b, hi) if runs is not None else None), None

    specs: list[tuple[str, Callable[[], tuple[float | None, str | None]], str, float]] = [
        ("ipc_router (socket): added p50 / httpCall floor's added p50", lambda: latency_ratio("ipc_router", "httpcall"),
         "<=", 1.25),
        ("ipc_router (socket): req/s / httpCall floor's req/s", lambda: rps_ratio("ipc_router", "httpcall"), ">=", 0.8),
        ("ipc_router (shm): req/s / inline Lua's req/s", lambda: rps_ratio("ipc_router_shm", "inline_lua"), ">=", 0.9),
        ("ipc_router (shm): added p50 / httpCall floor's added p50",
         lambda: latency_ratio("ipc_router_shm", "httpcall"), "<=", 0.5),
        ("Python ext_proc added p50 / ipc_router (socket) added p50", lambda: latency_ratio("ext_proc", "ipc_router"),
         ">=", 8.0),
        ("LiteLLM added p50 / ipc_router (socket) added p50", lambda: latency_ratio("litellm", "ipc_router"),
         ">=", 100.0),
        ("Python ext_proc added p50 / ipc_router (shm) added p50",
         lambda: latency_ratio("ext_proc", "ipc_router_shm"), ">=", 8.0),
        ("LiteLLM added p50 / ipc_router (shm) added p50", lambda: latency_ratio("litellm", "ipc_router_shm"),
         ">=", 100.0),
    ]  # fmt: skip
    out = []
    for text, compute, op, target in specs:
        value, note = compute()
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out.append({"goal": f"{text} {op} {target:g}", "value": value, "target": target, "op": op, "met": met,
                    "note": note})  # fmt: skip
    return out


def _worker_ratio(runs: list[dict[str, Any]], a: str, b: str, hi: int) -> float | None:
    """Per round, b's Envoy worker µs per request over a's, then the median: the throughput ratio of a to b that
    Envoy's worker alone would allow (the machine's other processes left out)."""

    def worker(key: str) -> dict[int, float]:
        return {
            r["round"]: r["cpu_us_per_request"]["envoy_worker"]
            for r in runs
            if r["config"] == key and r["c"] == hi and r.get("cpu_us_per_request", {}).get("envoy_worker")
        }

    wa, wb = worker(a), worker(b)
    return _median([wb[k] / wa[k] for k in wa if k in wb])


def same_job(summary: dict[str, Any], runs: list[dict[str, Any]] | None = None, hi: int = 16) -> list[dict[str, Any]]:
    """The fast path against Lua: against configuration 10 (routing and usage reading, the same job) and, by
    Envoy's worker time alone, against 2 (routing only): context for the goals, which compare req/s with 2."""
    a, b, inline = "ipc_router_shm", "inline_lua_usage", "inline_lua"
    out: list[dict[str, Any]] = []
    if a not in summary:
        return out
    if b in summary:
        x, y = summary[a]["added_p50_us"], summary[b]["added_p50_us"]
        out += [
            {"text": "ipc_router (shm): req/s / inline Lua with usage reading's req/s",
             "value": _rps_ratio(runs, a, b, hi) if runs is not None else None},
            {"text": "ipc_router (shm): added p50 / inline Lua with usage reading's added p50",
             "value": x / y if x is not None and y is not None and y > 0 else None},
        ]  # fmt: skip
    for other, name in ((inline, "inline Lua's"), (b, "inline Lua with usage reading's")):
        value = _worker_ratio(runs, a, other, hi) if runs is not None and other in summary else None
        if value is not None:
            out.append({"text": f"ipc_router (shm): {name} Envoy worker µs/request / ipc_router's", "value": value})
    return out


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def write_markdown(result: dict[str, Any], path: Path) -> None:
    m, p, s = result["machine"], result["params"], result["summary"]
    hi = p["concurrency"][1]
    busy = m.get("cpu_busy_before_pct")
    lines = [
        "# ipc_router benchmark: end to end, side by side",
        "",
        f"{m['date']} · {m['nproc']} CPUs ({m['cpu']}) · Python {m['python']} · Envoy {m['envoy']} "
        f"`--concurrency 1` · wrk -t1 · {p['rounds']} interleaved rounds x {p['seconds']:g} s per run"
        + (f" · ipc_router {m['commit']}" if m.get("commit") else "")
        + (f" · CPU busy before the run: {busy:.0f}%" if busy is not None else ""),
        "",
        f"Mix: {p['mix']}; the same C mock backend for all. Shared, noisy machine: absolute figures move between "
        "runs, ratios of interleaved runs much less. Medians over rounds; added = p50 minus Envoy direct's p50 in "
        "the same round (range over rounds in brackets).",
        "",
        f"| # | configuration | c=1 p50 µs | c=1 p99 µs | added p50 µs | added p99 µs | c={hi} req/s | req/s / floor's "
        f"| c={hi} CPU µs/request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in s.values():
        rng = row["added_p50_range_us"]
        added = _f(row["added_p50_us"], "{:+.0f}") + (f" ({rng[0]:+.0f}…{rng[1]:+.0f})" if rng else "")
        cpu = ", ".join(f"{role} {us:.0f}" for role, us in row["cpu_us_per_request_cN"].items())
        lines.append(
            f"| {row['number']} | {row['label']} | {_f(row['c1']['p50_us'])} | {_f(row['c1']['p99_us'])} | {added} | "
            f"{_f(row['added_p99_us'], '{:+.0f}')} | {_f(row['cN']['rps'])} | {_f(row['rps_vs_direct'], '{:.2f}')} "
            f"| {cpu} |"
        )
    backend, direct = s.get("backend"), s.get(FLOOR)
    if backend and direct and backend["cN"]["rps"] and direct["cN"]["rps"]:
        share = direct["cpu_us_per_request_cN"].get("backend")
        lines += [
            "",
            f"The backend is not the bottleneck: alone it serves {backend['cN']['rps']:,.0f} req/s at c={hi}, "
            f"{backend['cN']['rps'] / direct['cN']['rps']:.1f}x Envoy direct's"
            + (f", and costs {share:.1f} µs of CPU per request behind Envoy." if share is not None else "."),
        ]
    lines += ["", "## Goals (from issue #10; goals, not timed tests)", "", "| goal | measured | verdict |"]
    lines.append("|---|---|---|")
    for g in result["goals"]:
        verdict = {True: "met", False: "**not met**", None: "n/a"}[g["met"]]
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"| {g['goal']} | {_f(g['value'], '{:.2f}')} | {verdict}{note} |")
    same = result.get("same_job") or []
    if same:
        lines += ["", "## Against Lua (configuration 10 does the same job; context, not a goal)", ""]
        lines += ["| ratio | measured |", "|---|---|"]
        lines += [f"| {r['text']} | {_f(r['value'], '{:.2f}')} |" for r in same]
    skipped = [c for c in result["configurations"] if c["status"] != "ran"]
    if skipped:
        lines += ["", "## Not run", ""]
        lines += [f"- {c['number']} {c['label']}: {c['note']}" for c in skipped]
    if result["problems"]:
        lines += ["", "## Problems", ""] + [f"- {x}" for x in result["problems"]]
    lines += [
        "",
        "CPU µs/request: CPU time of each process of the configuration (and its children) during the saturating "
        "runs, divided by the requests served; `backend` is the shared mock. Raw runs: latest.json. "
        "How to read and rerun: bench/README.md.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> str | None:
    """Two panels: added p50 latency at c=1 and req/s at the saturating concurrency, per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no latest.png"
    s = result["summary"]
    hi = result["params"]["concurrency"][1]
    rows = [(k, r) for k, r in s.items() if k != "backend"]
    labels = [f"{r['number']} {r['label']}" for _, r in rows][::-1]
    added = [max(r["added_p50_us"] or 0.0, 1.0) for _, r in rows][::-1]
    rps = [r["cN"]["rps"] or 0.0 for _, r in rows][::-1]
    colors = ["#d62728" if k.startswith("ipc_router") else "#7f7f7f" for k, _ in rows][::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 1.8), sharey=True)
    ax1.barh(labels, added, color=colors)
    ax1.set_xscale("log")
    ax1.set_xlabel("added p50 latency over Envoy direct at c=1 (µs, log; lower is better)")
    for i, (v, (_, r)) in enumerate(zip(added, rows[::-1], strict=True)):
        a = r["added_p50_us"]
        text = "floor" if a is None else (f"{a / 1000:+.1f} ms" if abs(a) >= 1000 else f"{a:+.0f} µs")
        ax1.text(v, i, f" {text}", va="center", fontsize=9)
    ax1.set_xlim(1, max(added) * 20)
    ax2.barh(labels, rps, color=colors)
    ax2.set_xscale("log")
    ax2.set_xlabel(f"throughput at c={hi} (req/s, log; higher is better)")
    for i, (v, (_, r)) in enumerate(zip(rps, rows[::-1], strict=True)):
        ratio = r["rps_vs_direct"]
        ax2.text(v, i, f" {v:,.0f}" + (f" ({ratio:.2f}x floor)" if ratio is not None else ""), va="center", fontsize=9)
    for ax in (ax1, ax2):
        ax.margins(x=0.35)
        ax.grid(axis="x", which="both", alpha=0.25)
    backend = s.get("backend")
    ceiling = f"; the mock alone serves {backend['cN']['rps']:,.0f} req/s" if backend else ""
    m = result["machine"]
    pending = [f"{c['number']} {c['label']}: {c['note']}" for c in result["configurations"] if c["status"] != "ran"]
    if pending:
        fig.text(0.01, 0.01, "not run: " + "; ".join(pending), fontsize=8, color="#555555")
    fig.suptitle(
        f"ipc_router vs alternatives, Envoy {m['envoy']} --concurrency 1, {m['nproc']} CPUs, "
        f"{result['params']['rounds']} interleaved rounds, {m['date'][:10]}{ceiling}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05 if pending else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
