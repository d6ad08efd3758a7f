"""Where the sidecar's time goes under load: one configuration at the saturating concurrency, py-spy on its
sidecar, the top functions by own and by inclusive samples, and the CPU per request of each process.

``.venv/bin/python -m bench.e2e.profile [--config ipc_router] [--seconds 8] [--concurrency 16]``; py-spy comes with
the ``bench`` extra (``make bench`` installs it). Writes bench/results/profile-<config>.txt (collapsed stacks next
to it, for a flame graph tool).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ipc_router.tools.stack import stop_process

from .configs import CONFIGURATIONS, STARTERS, World
from .configs import write_config as write_ipc_config
from .load import run_wrk
from .mix import request_mix, wrk_script
from .suite import RESULTS, build_responder, start_backend

_LINE = re.compile(r":\d+\)$")


def top(collapsed: Path, n: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]  # per function, not per line
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    out = [f"{total} samples"]
    for title, counter in (("own time", own), ("inclusive time", incl)):
        out.append(f"\n{title}:")
        out += [f"{100 * c / total:6.1f}%  {f}" for f, c in counter.most_common(n)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", default="ipc_router")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 1
    c = next(x for x in CONFIGURATIONS if x.key == args.config)
    workdir = Path(tempfile.mkdtemp(prefix="ib10p", dir="/tmp"))
    responder = build_responder()
    backend, ports = start_backend(responder, workdir)
    mix = request_mix()
    script = workdir / "mix.lua"
    script.write_text(wrk_script(mix))
    running = STARTERS[c.kind](c, World(workdir, ports, write_ipc_config(workdir, ports), responder))
    RESULTS.mkdir(exist_ok=True)
    collapsed = RESULTS / f"profile-{c.key}.collapsed"
    try:
        run_wrk(running.url, str(script), args.concurrency, 2, {})  # warm-up
        target = running.processes.get("sidecar") or running.processes.get("litellm")
        if target is None:
            print(f"{c.key} has no Python process to profile", file=sys.stderr)
            return 1
        cmd = [pyspy, "record", "--pid", str(target), "--duration", str(args.seconds - 1), "--rate", "250"]
        cmd += ["--format", "raw", "--nonblocking", "--output", str(collapsed)]
        spy = threading.Thread(target=subprocess.run, args=(cmd,), kwargs={"capture_output": True})
        spy.start()
        procs = {**running.processes, "backend": backend.pid}
        res = run_wrk(running.url, str(script), args.concurrency, args.seconds, procs)
        spy.join()
    finally:
        running.stop()
        stop_process(backend)
        shutil.rmtree(workdir, ignore_errors=True)
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_us_per_request"].items() if v is not None)
    report = f"{c.label}, c={args.concurrency}, {res['rps']:.0f} req/s (under py-spy), CPU µs/request: {cpu}\n" + top(
        collapsed
    )
    (RESULTS / f"profile-{c.key}.txt").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
