"""The shared-memory fast path (ipc_router/shm.py + ipc_router/lua/ipc_router_shm.lua, docs/shm.md).

The Lua side runs in lupa's LuaJIT with the JIT on, and the loops that matter are checked to have been
compiled (a finished trace started in them): the memory-ordering argument is about compiled code.
The other side is always another process (tests/support/shm_proc.py), so the two sides share only the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc_router import shm
from tests.support.shm_lua import ShmLua
from tests.support.shm_proc import N_KEYS, blob_of, key_of, rule_of

HERE = Path(__file__).resolve().parent
PROC = str(HERE / "support" / "shm_proc.py")

pytestmark = pytest.mark.skipif(not shm.supported(), reason="shm fast path is x86-64 Linux only")


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    p = os.path.join(base, f"ipcr-test-{os.getpid()}-{random.getrandbits(32):08x}.shm")
    yield p
    for leftover in [p] + [os.path.join(base, n) for n in os.listdir(base) if n.startswith(os.path.basename(p))]:
        with contextlib.suppress(OSError):
            os.unlink(leftover)


class Proc:
    """A helper process (tests/support/shm_proc.py ROLE ...), killed at teardown."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, PROC, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 30.0) -> str:
        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"no output from {self.p.args} within {timeout}s")
        out = self.p.stdout.readline()
        if not out:
            err = self.p.stderr.read() if self.p.stderr else ""
            raise AssertionError(f"{self.p.args} exited ({self.p.wait()}): {err}")
        return out.strip()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f:
                f.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def start(procs: list[Proc], *args: str) -> Proc:
    p = Proc(*args)
    procs.append(p)
    return p


@pytest.fixture
def lua() -> ShmLua:
    return ShmLua()


def lua_open(lua: ShmLua, path: str) -> Any:
    seg, *err = lua.open(path)
    assert seg is not None, err
    return seg


# --- Python-only parts -----------------------------------------------------------------------------


def test_route_key_layout() -> None:
    key = shm.route_key(["x-user", "x-model", "x-tier"], {"x-model": "gpt-4", "x-user": "ü"})
    assert key == b"\x00" + "ü".encode() + b"\x00gpt-4" + b"\x01"
    assert shm.route_key(["a"], {"a": "has\x00nul"}) is None
    assert shm.route_key(["a"], {"a": "has\x01soh"}) is None
    assert shm.route_key([], {"a": "b"}) == b""


def test_parameters_and_publish_are_checked(path: str) -> None:
    with pytest.raises(ValueError, match="slots"):
        shm.Segment.open(path, slots=1000)
    with pytest.raises(ValueError, match="ring_bytes"):
        shm.Segment.open(path, ring_bytes=5000)
    seg, recs = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    assert recs == [] and seg.generation == 0
    assert os.stat(path).st_mode & 0o777 == 0o660
    assert not seg.put_route(b"\x00k", 1), "no config published yet: nothing is cached"
    with pytest.raises(ValueError, match="exceeds"):
        seg.publish(1, b"x" * 4097)
    seg.publish(5, b"cfg")
    with pytest.raises(ValueError, match="generation"):
        seg.publish(5, b"cfg")
    assert seg.put_route(b"\x00k", 1)
    assert not seg.put_route(b"k" * 241, 1)
    assert not seg.put_route(b"\x00k", 1 << 16)
    assert not seg.put_route(b"\x00k", 1, generation=4), "decided in an older generation"
    with pytest.raises(shm.SegmentError, match="another running sidecar"):
        shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    seg.stop()
    assert not os.path.exists(path)


# --- crc32 and lookups, compiled -----------------------------------------------------------------


def test_crc32_matches_zlib_compiled(lua: ShmLua) -> None:
    rnd = random.Random(7)
    data = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(300)]
    loop = lua.fn("function(m, t, n) local out = {} for i = 1, n do out[i] = m.crc32(t[i]) end return out end")
    out = lua.call(loop, lua.m, lua.table(data), len(data))[0]
    assert [out[i + 1] for i in range(len(data))] == [zlib.crc32(d) for d in data]
    assert lua.compiled(loop) >= 1 and lua.compiled(lua.m.crc32) >= 1


def test_lookup_hits_misses_and_generations(path: str, lua: ShmLua) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=1, ring_bytes=4096, blob_bytes=4096)
    try:
        seg.publish(1, b"config-1")
        keys = [key_of(j) for j in range(40)]  # more keys than slots: probing and eviction
        stored = [k for j, k in enumerate(keys) if seg.put_route(k, rule_of(j, 1))]
        assert len(stored) == len(keys)
        s = lua_open(lua, path)
        refresh = lua.fn("function(s) return s:refresh() end")
        assert lua.call(refresh, s) == [True] and s.blob == b"config-1" and s.generation == 1
        assert lua.call(refresh, s) == [False]
        lookup = lua.fn("function(s, k) return s:lookup(k) end")
        answers = {j: lua.call(lookup, s, k)[0] for j, k in enumerate(keys)}
        hits = {j: r for j, r in answers.items() if r is not None}
        assert all(r == rule_of(j, 1) for j, r in hits.items())
        assert len(hits) >= 16 - 4, "evicted keys miss, the rest hit"
        assert lua.call(lookup, s, b"\x00nope")[0] is None
        seg.publish(2, b"config-2")  # a reload: every slot of generation 1 is a miss now
        assert lua.call(refresh, s) == [True] and s.blob == b"config-2"
        assert all(lua.call(lookup, s, k)[0] is None for k in keys)
        seg.put_route(keys[0], 9)
        assert lua.call(lookup, s, keys[0])[0] == 9
    finally:
        seg.stop()


def test_refresh_decodes_with_the_callers_decoder(path: str, lua: ShmLua) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=1, ring_bytes=4096, blob_bytes=4096)
    try:
        seg.publish(1, b"ok")
        s = lua_open(lua, path)
        f = lua.fn("function(s, b) return s:refresh(function(blob) if blob == b then return {v = blob} end"
                   " return nil, 'bad blob' end) end")
        assert lua.call(f, s, b"ok") == [True] and s.config.v == b"ok"
        seg.publish(2, b"garbage")
        assert lua.call(f, s, b"ok") == [True] and s.config is None
        assert s.config_error == b"bad config: bad blob" and s.valid is False
        assert lua.call(f, s, b"ok") == [False]
        assert lua.call(lua.fn("function(s) return s:lookup('x') end"), s) == [None]
        assert lua.call(lua.fn("function(s) return s:lookup(nil) end"), s) == [None]
    finally:
        seg.stop()


@pytest.mark.parametrize("mode", ["put_route", "adversarial"])
def test_concurrent_writer_never_yields_a_torn_or_stale_answer(
    path: str, lua: ShmLua, procs: list[Proc], mode: str
) -> None:
    """A sidecar process rewrites 64 keys into 16 slots in a tight loop (evicting each other) and bumps
    the generation every 97 writes; the rule of key j in generation g is rule_of(j, g). The compiled Lua
    loop accepts an answer only if it is exactly what the writer published for that key in the
    generation whose config blob the reader holds (the blob is checked too). In "adversarial" mode
    every write leaves a complete entry with a wrong rule in the slot while its sequence is odd: a
    reader whose sequence checks were compiled away or skipped returns wrong answers here."""
    writer = start(procs, "writer", path, mode)
    assert writer.line() == "ready"
    s = lua_open(lua, path)
    keys = lua.table([key_of(j) for j in range(N_KEYS)], base=0)
    loop = lua.fn(
        """function(s, keys, nkeys, iters)
        local hits, misses, wrong, gens, torn_blob = 0, 0, 0, 0, 0
        local example
        for i = 1, iters do
            local changed = s:refresh()
            if changed == true then
                gens = gens + 1
                local g = s.generation
                if s.blob ~= string.rep("gen=" .. g .. ";", 1 + g % 50) then
                    torn_blob = torn_blob + 1
                end
            end
            local j = i % nkeys
            local r = s:lookup(keys[j])
            if r then
                if r == (j * 7919 + s.generation * 104729) % 65536 then
                    hits = hits + 1
                else
                    wrong = wrong + 1
                    example = example or (j .. ":" .. r .. "@" .. s.generation)
                end
            else
                misses = misses + 1
            end
        end
        return hits, misses, wrong, gens, torn_blob, example
    end"""
    )
    totals = [0, 0, 0, 0, 0]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        out = lua.call(loop, s, keys, N_KEYS, 200_000)
        assert out[2] == 0, f"wrong answer {out[5]!r}"
        totals = [a + b for a, b in zip(totals, out[:5], strict=True)]
    hits, misses, wrong, gens, torn_blob = totals
    assert wrong == 0 and torn_blob == 0
    assert hits > 1000 and misses > 0 and gens > 10, totals
    assert lua.compiled(loop) >= 1, "the reader loop must run compiled"
    assert lua.compiled(lua.method("lookup")) >= 1 and lua.compiled(lua.method("refresh")) >= 1
    assert blob_of(1).startswith(b"gen=1;")  # the same blob formula as the Lua check above


# --- rings --------------------------------------------------------------------------------------------


def check_record(rec: bytes) -> tuple[int, int]:
    pid, seq = struct.unpack_from("<HI", rec)
    assert zlib.crc32(rec[:-4]) == struct.unpack_from("<I", rec, len(rec) - 4)[0], "damaged record"
    return pid, seq


def test_lua_producers_in_other_processes_deliver_every_record_once_in_order(path: str, procs: list[Proc]) -> None:
    """Two Lua producer processes push 6000 records each (sizes 10..914 bytes) through 4 KiB rings
    (so they wrap every few records and are often full); this process drains. Every record arrives
    exactly once, in order, intact; each "full" was counted as a drop and nothing blocked."""
    seg, _ = shm.Segment.open(path, slots=16, rings=4, ring_bytes=4096, blob_bytes=4096)
    try:
        count = 6000
        workers = [start(procs, "producer", path, str(pid), str(count), str(pid * 31)) for pid in (1, 2)]
        got: dict[int, list[int]] = {1: [], 2: []}
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while len(results) < 2 or sum(map(len, got.values())) < 2 * count:
            assert time.monotonic() < deadline, (len(got[1]), len(got[2]), results)
            for rec in seg.drain():
                pid, seq = check_record(rec)
                got[pid].append(seq)
            for w in workers:
                if w not in [r["w"] for r in results] and select.select([w.p.stdout], [], [], 0)[0]:
                    results.append({"w": w, **json.loads(w.line())})
            time.sleep(0.0005)
        for pid in (1, 2):
            assert got[pid] == list(range(count)), f"producer {pid}: lost, duplicated or reordered"
        assert all(r["error"] is None for r in results), results
        assert all(r["compiled"] >= 1 for r in results), "the producer loop must run compiled"
        assert {r["ring"] for r in results} == {0, 1}
        stats = seg.ring_stats()
        assert stats["drops"] == sum(r["fulls"] for r in results) > 0
        assert stats["drained"] == 2 * count and stats["corrupt"] == 0
    finally:
        seg.stop()


def test_full_ring_drops_and_counts_without_blocking(path: str, lua: ShmLua) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=1, ring_bytes=4096, blob_bytes=4096)
    try:
        s = lua_open(lua, path)
        fill = lua.fn(
            """function(s, n)
            local ok_n, full_n = 0, 0
            for i = 1, n do
                local ok, err = s:write(string.rep("r", 100) .. i)
                if ok then ok_n = ok_n + 1 elseif err == "full" then full_n = full_n + 1 else return nil, err end
            end
            return ok_n, full_n
        end"""
        )
        ok_n, full_n = lua.call(fill, s, 500)
        # 4096-byte ring, 112-byte records (4 + 100..103 payload, to 8): 36 fit, the rest are dropped.
        assert ok_n == 4096 // 112 and full_n == 500 - ok_n
        assert seg.ring_stats()["drops"] == full_n
        recs = seg.drain()
        assert recs == [b"r" * 100 + str(i).encode() for i in range(1, ok_n + 1)]
        assert lua.call(fill, s, 10) == [10, 0], "space is reusable once drained"
        assert len(seg.drain()) == 10
        too_big = lua.call(lua.fn("function(s) return s:write(string.rep('x', 1025)) end"), s)
        assert too_big == [None, b"too large"]
        assert lua.call(lua.fn("function(s) return s:write({}) end"), s) == [None, b"record is not a string"]
    finally:
        seg.stop()


# --- ring claims ----------------------------------------------------------------------------------------


def test_ring_claims_across_processes_and_after_a_kill(path: str, procs: list[Proc]) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=4, ring_bytes=4096, blob_bytes=4096)
    try:
        a, b = start(procs, "claim", path), start(procs, "claim", path)
        ring_a, ring_b = a.line().split(), b.line().split()
        assert ring_a[0] == ring_b[0] == "ring" and ring_a[1] != ring_b[1]
        assert seg.ring_stats()["claimed"] == 2
        a.kill()  # SIGKILL: the kernel drops its OFD lock
        assert seg.ring_stats()["claimed"] == 1
        c = start(procs, "claim", path)
        assert c.line().split() == ["ring", ring_a[1]], "the killed claimant's ring is free again"
        assert sorted(seg.drain()) == [b"hello"] * 3
    finally:
        seg.stop()


def test_two_lua_states_in_one_process_get_their_own_rings(path: str) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    try:
        states = [ShmLua() for _ in range(3)]
        segs = [lua_open(L, path) for L in states]
        write = [L.fn("function(s, r) return s:write(r) end") for L in states]
        assert states[0].call(write[0], segs[0], b"a") == [True]
        assert states[1].call(write[1], segs[1], b"b") == [True]
        assert {segs[0].ring_index, segs[1].ring_index} == {0, 1}
        assert states[2].call(write[2], segs[2], b"c") == [None, b"no ring"]
        segs[0].close(segs[0])  # closing the fd releases the claim
        assert seg.ring_stats()["claimed"] == 1
        assert sorted(seg.drain()) == [b"a", b"b"]
    finally:
        seg.stop()


# --- restart, adoption, replacement -------------------------------------------------------------


def test_records_written_while_no_sidecar_runs_are_drained_by_the_next(
    path: str, lua: ShmLua, procs: list[Proc]
) -> None:
    sidecar = start(procs, "sidecar", path)
    _, instance, gen = sidecar.line().split()
    s = lua_open(lua, path)
    refresh = lua.fn("function(s) return s:refresh() end")
    lookup = lua.fn("function(s, k) return s:lookup(k) end")
    write = lua.fn("function(s, r) return s:write(r) end")
    assert lua.call(refresh, s) == [True] and lua.call(lookup, s, b"\x00gpt") == [3]
    sidecar.kill()
    assert lua.call(lookup, s, b"\x00gpt") == [3], "cached routes keep being served"
    for i in range(5):
        assert lua.call(write, s, b"rec%d" % i) == [True]
    seg, recs = shm.Segment.open(path, slots=16, rings=4, ring_bytes=4096, blob_bytes=4096)
    try:
        assert recs == [b"rec%d" % i for i in range(5)]
        assert seg.generation == int(gen) + 1 and seg.instance_id != int(instance)
        # The filter notices the new generation; no config is published yet: everything misses.
        assert lua.call(refresh, s) == [True] and s.blob is None and s.generation == seg.generation
        assert lua.call(lookup, s, b"\x00gpt") == [None]
        assert not seg.put_route(b"\x00gpt", 4)
        seg.publish(seg.generation + 1, b"config")
        assert lua.call(refresh, s) == [True]
        assert lua.call(lookup, s, b"\x00gpt") == [None], "the old generation's slot is a miss"
        assert seg.put_route(b"\x00gpt", 4) and lua.call(lookup, s, b"\x00gpt") == [4]
        assert lua.call(write, s, b"after") == [True] and seg.drain() == [b"after"]
        stopped = seg.stop()
        assert stopped == [] and not os.path.exists(path)
        assert lua.call(refresh, s) == [None, b"stopped"] and s.dead == b"stopped"
        assert lua.call(write, s, b"late") == [None, b"stopped"]
    finally:
        seg.stop()


@pytest.mark.parametrize("kind", ["foreign", "truncated", "empty", "bad-version"])
def test_a_foreign_or_corrupt_file_is_replaced(path: str, kind: str) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    img = Path(path).read_bytes()
    seg._close(mark_stopped=False, unlink=True)
    data = {
        "foreign": random.Random(3).randbytes(len(img)),
        "truncated": img[:5000],
        "empty": b"",
        "bad-version": img[:8] + struct.pack("<I", 99) + img[12:],
    }[kind]
    Path(path).write_bytes(data)
    keep = os.open(path, os.O_RDONLY)  # the old inode, to check that it was not written to
    try:
        seg, recs = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
        assert recs == [] and Path(path).read_bytes()[:8] == shm.MAGIC
        old = os.pread(keep, len(data) + 1, 0)
        if data[:8] == shm.MAGIC:  # ours, but unusable: told STOPPED so filters mapping it re-open
            assert struct.unpack_from("<I", old, shm.OFF_STATE)[0] == shm.STATE_STOPPED
        else:
            assert old == data
        seg.stop()
    finally:
        os.close(keep)


def test_another_geometry_is_drained_then_replaced(path: str, lua: ShmLua) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    s = lua_open(lua, path)
    assert lua.call(lua.fn("function(s) return s:write('pending') end"), s) == [True]
    seg._close(mark_stopped=False, unlink=False)  # a sidecar that died
    new, recs = shm.Segment.open(path, slots=32, rings=2, ring_bytes=4096, blob_bytes=4096)
    try:
        assert recs == [b"pending"]
        assert lua.call(lua.fn("function(s) return s:refresh() end"), s) == [None, b"stopped"]
        s2 = lua_open(lua, path)
        assert s2.slot_count == 32
    finally:
        new.stop()


def test_lua_reader_on_random_truncated_and_adversarial_segments(tmp_path: Path) -> None:
    """2000 seeded cases: random bytes, truncations, header fields set to offsets past the end, huge
    lengths, wrong versions, damaged slots and ring indices. Opening, refreshing, looking up and
    writing never raise, never crash the process (a separate one), and every region an accepted
    segment uses lies inside the file."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    d = os.path.join(base, f"ipcr-fuzz-{os.getpid()}-{random.getrandbits(24):06x}")
    os.mkdir(d)
    try:
        out = subprocess.run(
            [sys.executable, PROC, "fuzz", "12", "2000", d], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
    finally:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)
    assert summary["cases"] == 2000 and summary["raised"] == 0, summary.get("raise_examples")
    assert summary["out_of_bounds"] == 0
    assert summary["opened"] > 100 and summary["rejected"] > 100, summary
    for err in ("bad magic", "size mismatch", "bad ring region", "bad slot region", "bad config blob region"):
        assert any(e.startswith(err) for e in summary["errors"]), (err, summary["errors"])
