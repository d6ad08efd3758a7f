"""Run the end-to-end configurations side by side, in interleaved rounds, and report ratios.

``python -m bench.e2e.suite`` (``make bench``): every available configuration, ``--rounds`` rounds; in each round
the configurations run in rotated order, each at c=1 (latency) and at c=``--concurrency`` (throughput) for
``--seconds`` each. Results: bench/results/latest.{json,md,png}.

``python -m bench.e2e.suite --smoke`` (``make bench-smoke``, part of ``make test``): one short round, no files
written except under bench/build/; fails when a configuration that should run does not route right or errors
under load. Peers that are not installed, and pending configurations, are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ipc_router.tools.stack import free_port, stop_process

from .configs import BENCH, CONFIGURATIONS, STARTERS, Running, SetupError, World, baseline, unavailable
from .configs import write_config as write_ipc_config
from .load import LoadError, Run, check_routing, run_wrk, wrk_binary
from .mix import MODELS, request_mix, wrk_script
from .report import goals, same_job, summarise, write_markdown, write_plot

BUILD = BENCH / "build"
RESULTS = BENCH / "results"
SOURCE = BENCH / "e2e" / "responder.c"


def build_responder() -> Path:
    """Compile the C responder into bench/build/ (again when its source is newer)."""
    out = BUILD / "responder"
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SetupError("no C compiler (gcc) to build bench/e2e/responder.c")
    BUILD.mkdir(exist_ok=True)
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(SOURCE)], check=True)
    return out


def start_backend(responder: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {m: free_port() for m in MODELS}
    args = [str(responder), "backend"] + [x for m, p in ports.items() for x in (str(p), m)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=(workdir / "backend.log").open("wb"))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"listening":
        stop_process(proc)
        raise SetupError(f"the mock backend did not start: {(workdir / 'backend.log').read_text()}")
    return proc, ports


def machine() -> dict[str, Any]:
    from bench.e2e_latency import machine as e2e_machine  # the same description as the latency bench

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(BENCH.parent), *args], capture_output=True, text=True).stdout.strip()

    commit = git("log", "-1", "--format=%h")
    if commit and git("status", "--porcelain", "--", "ipc_router"):
        commit += " + uncommitted changes in ipc_router/"
    return {**e2e_machine(), "commit": commit or None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [
        c
        for c in CONFIGURATIONS
        if (c.key in args.only if args.only else not c.split or args.split) and not (c.split and args.smoke)
    ]
    if args.only and args.split:
        wanted += [c for c in CONFIGURATIONS if c.split and c not in wanted]
    if args.baseline:
        wanted.append(baseline(args.baseline))
    notes: dict[str, str] = {}
    responder = build_responder()
    workdir = Path(tempfile.mkdtemp(prefix="ib10", dir="/tmp"))
    mix = request_mix()
    script = workdir / "mix.lua"
    script.write_text(wrk_script(mix))
    running: dict[str, Running] = {}
    backend: subprocess.Popen[bytes] | None = None
    runs: list[Run] = []
    failures: list[str] = []
    host = machine()
    try:
        backend, ports = start_backend(responder, workdir)
        world = World(workdir, ports, write_ipc_config(workdir, ports), responder)
        for c in wanted:
            why = unavailable(c)
            if why is not None:
                notes[c.key] = why
                print(f"skip {c.number} {c.key}: {why}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                r = STARTERS[c.kind](c, world)
            except SetupError as e:
                if c.peer is None:  # ours: a bug to fix, not a configuration to skip
                    raise
                notes[c.key] = f"failed to start: {str(e)[-400:]}"
                print(f"skip {c.number} {c.key}: {notes[c.key]}", flush=True)
                continue
            try:
                check_routing(c, r.url, mix)
            except LoadError as e:
                logs = r.logs()[-2000:]
                r.stop()
                if c.peer is None:
                    raise LoadError(f"{e}\n{logs}") from None
                notes[c.key] = f"does not route the mix right: {str(e)[-400:]}"
                print(f"skip {c.number} {c.key}: {notes[c.key]}", flush=True)
                continue
            running[c.key] = r
            r.processes["backend"] = backend.pid
            print(f"ready {c.number} {c.key} ({time.perf_counter() - t0:.1f}s): routes the mix right", flush=True)
        active = [c for c in wanted if c.key in running]
        levels = (args.concurrency,) if args.throughput_only else (1, args.concurrency)
        for c in active:  # warm-up (JIT, connection pools, caches), not recorded
            run_wrk(running[c.key].url, str(script), args.concurrency, args.warmup, {})
        for rnd in range(args.rounds):
            for i in range(len(active)):
                c = active[(rnd + i) % len(active)]
                for conc in levels if rnd % 2 == 0 else reversed(levels):
                    try:
                        res = run_wrk(running[c.key].url, str(script), conc, args.seconds, running[c.key].processes)
                    except LoadError as e:  # one bad run is a problem to report, not the end of the suite
                        failures.append(f"{c.key} c={conc} round {rnd + 1}: {e}")
                        print(f"round {rnd + 1}/{args.rounds} {c.key:<15} c={conc:<3} FAILED: {e}", flush=True)
                        continue
                    runs.append(Run(c.key, conc, rnd, args.seconds, res))
                    print(
                        f"round {rnd + 1}/{args.rounds} {c.key:<15} c={conc:<3} p50 {res['p50_us']:>6} µs  "
                        f"p99 {res['p99_us']:>6} µs  {res['rps']:>9.0f} req/s  errors {res['errors']}",
                        flush=True,
                    )
    finally:
        with _signals_held():
            for r in reversed(running.values()):
                r.stop()
            stop_process(backend)
            shutil.rmtree(workdir, ignore_errors=True)
    problems = failures + [
        f"{r.config} c={r.concurrency} round {r.round + 1}: {r.result['errors']} errors "
        f"(status {r.result['status']}, read {r.result['read']}, timeout {r.result['timeout']})"
        for r in runs
        if r.result["errors"] or not r.result["requests"]
    ]
    result = {
        "machine": host,
        "params": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "concurrency": list((1, args.concurrency)),
            "warmup": args.warmup,
            "smoke": args.smoke,
            "mix": f"{len(mix)} requests: {len(MODELS)} models x (non-streaming, streaming) x 1-4 KiB bodies",
        },
        "configurations": [
            {
                "key": c.key,
                "number": c.number,
                "label": c.label,
                "why": c.why,
                "status": "ran" if c.key in running else "skipped",
                "note": notes.get(c.key),
            }
            for c in wanted
        ],
        # A run that served nothing is reported as a problem and kept out of the figures.
        "runs": [r.as_dict() for r in runs if r.result["requests"]],
        "problems": problems,
    }
    result["summary"] = summarise(result)
    result["goals"] = goals(result["summary"], result["runs"], args.concurrency)
    result["same_job"] = same_job(result["summary"], result["runs"], args.concurrency)
    return result


@contextlib.contextmanager
def _signals_held() -> Any:
    """Let the clean-up finish; a SIGINT/SIGTERM meanwhile raises KeyboardInterrupt afterwards."""
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise KeyboardInterrupt


def print_summary(result: dict[str, Any]) -> None:
    conc = result["params"]["concurrency"][1]
    print(f"\n{'configuration':<16}{'c=1 p50':>9}{'p99':>8}{'added p50':>11}{f'c={conc} req/s':>13}{'x floor':>9}")
    for key, s in result["summary"].items():
        added = s.get("added_p50_us")
        ratio = s.get("rps_vs_direct")
        p50, p99 = s["c1"]["p50_us"], s["c1"]["p99_us"]
        print(
            f"{key:<16}{'' if p50 is None else f'{p50:.0f}':>9}{'' if p99 is None else f'{p99:.0f}':>8}"
            f"{'' if added is None else f'{added:+.0f}':>11}{s['cN']['rps']:>13.0f}"
            f"{'' if ratio is None else f'{ratio:.2f}':>9}"
        )
    for g in result["goals"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        value = "—" if g["value"] is None else f"{g['value']:.2f}"
        print(f"goal: {g['goal']}: {value} ({verdict}{'; ' + g['note'] if g.get('note') else ''})")
    for r in result.get("same_job") or []:
        print(f"context: {r['text']}: {'—' if r['value'] is None else format(r['value'], '.2f')}")
    for c in result["configurations"]:
        if c["note"]:
            print(f"note: {c['number']} {c['key']}: {c['note']}")
    for p in result["problems"]:
        print(f"PROBLEM: {p}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--smoke", action="store_true", help="one short round, checks only (make bench-smoke)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="wrk duration of one run (whole seconds)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16, help="the saturating concurrency (default 16)")
    p.add_argument("--only", nargs="*", help="configuration keys to run (default: all)")
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the saturating runs (CPU per request, req/s): no c=1 latency",
    )
    p.add_argument(
        "--split",
        action="store_true",
        help="add the diagnostic variants of the fast path (configurations 50-61) and the native-recording "
        "probes (71-73), bench/README.md",
    )
    p.add_argument("--baseline", metavar="REV", help="add configuration 5 with the filter of git revision REV")
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.{json,md,png} go (not in --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.warmup = 1, 1.0, 1.0
    if args.only and "direct" not in args.only:
        args.only.append("direct")  # the floor every ratio needs
    if wrk_binary() is None:
        print("bench: wrk is not installed (apt-get install wrk): end-to-end benchmarks SKIPPED")
        return 0

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (SetupError, LoadError, subprocess.CalledProcessError) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    print_summary(result)
    if args.smoke:
        return 1 if result["problems"] else 0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = result["machine"]["date"].replace(":", "").replace("-", "")[:15]
    for name in ("latest.json", f"run-{stamp}.json"):
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "latest.md")
    note = write_plot(result, args.out / "latest.png")
    print(f"\nwrote {args.out}/latest.md, latest.json, run-{stamp}.json" + (f"; {note}" if note else ", latest.png"))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
