"""The other side of tests/test_shm.py, run as a separate process: `python tests/support/shm_proc.py ROLE ...`.

writer PATH MODE the sidecar's slot/config writer in a tight loop (until killed); MODE put_route
                 or adversarial (a wrong entry visible while the slot's sequence is odd)
sidecar PATH     opens (creates) the segment, publishes one config and route, then waits to be killed
producer PATH ID COUNT SEED   a Lua state (lupa, JIT on) writing COUNT records into its ring
claim PATH       a Lua state that claims a ring with one record, prints its index, waits
fuzz SEED N DIR  the Lua reader on N random/truncated/adversarial segments; prints a JSON summary
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time
import zlib
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shm_lua import ShmLua

from ipc_router import shm

N_KEYS = 64
MOD = 65536


def key_of(j: int) -> bytes:
    """Keys of varied lengths (3..~240 bytes) that share prefixes, so a torn copy would mix them."""
    return b"\x00m" + (b"%d:" % j) * (1 + (j * 13) % 60)


def rule_of(j: int, generation: int) -> int:
    return (j * 7919 + generation * 104729) % MOD


def blob_of(generation: int) -> bytes:
    return (b"gen=%d;" % generation) * (1 + generation % 50)


def adversarial_put(seg: shm.Segment, key: bytes, rule: int) -> None:
    """The slot protocol with the worst legal order: while the sequence is odd the slot holds a
    complete, well-formed entry for `key` with a WRONG rule (and the generation of the moment), which
    a reader that does not honour the seqlock accepts."""
    mm = seg._mm
    assert mm is not None
    h = zlib.crc32(key)
    off = seg._geo.slots_off + (h & (seg._geo.slots - 1)) * shm.SLOT_SIZE
    u32 = seg._u32  # atomic 4-byte stores, as Segment does them
    seq = u32[off // 4] | 1
    u32[off // 4] = seq  # odd: writing
    mm[off + 4 : off + 16 + len(key)] = struct.pack("<IIHH", seg.generation, h, len(key), rule ^ 0x5A5A) + key
    for _ in range(20):  # keep the wrong entry there a while
        struct.pack_into("<H", mm, off + 14, rule ^ 0x5A5A)
    struct.pack_into("<H", mm, off + 14, rule)
    u32[off // 4] = (seq + 1) & 0xFFFFFFFF  # even: done


def writer(path: str, mode: str) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=1, ring_bytes=4096, blob_bytes=4096)
    gen = seg.generation + 1
    seg.publish(gen, blob_of(gen))
    print("ready", flush=True)
    rnd = random.Random(1)
    while True:
        for _ in range(97):
            j = rnd.randrange(N_KEYS)
            if mode == "adversarial":
                adversarial_put(seg, key_of(j), rule_of(j, gen))
            else:
                seg.put_route(key_of(j), rule_of(j, gen))
        gen += 1
        seg.publish(gen, blob_of(gen))


def sidecar(path: str) -> None:
    seg, _ = shm.Segment.open(path, slots=16, rings=4, ring_bytes=4096, blob_bytes=4096)
    seg.publish(seg.generation + 1, b"config")
    seg.put_route(b"\x00gpt", 3)
    print("ready", seg.instance_id, seg.generation, flush=True)
    time.sleep(3600)


PRODUCER_LOOP = """function(seg, recs, n)
    local fulls, i = 0, 1
    while i <= n do
        local ok, err = seg:write(recs[i])
        if ok then
            i = i + 1
        elseif err == "full" then
            fulls = fulls + 1
        else
            return nil, err
        end
    end
    return fulls
end"""


def record(pid: int, seq: int, rnd: random.Random) -> bytes:
    body = rnd.randbytes(rnd.choice((0, 1, 3, 7, 8, 60, 200, 555, 900)))
    head = struct.pack("<HI", pid, seq) + body
    return head + struct.pack("<I", zlib.crc32(head))


def producer(path: str, pid: int, count: int, seed: int) -> None:
    lua = ShmLua()
    rnd = random.Random(seed)
    recs = lua.table([record(pid, i, rnd) for i in range(count)])
    seg, *errs = lua.open(path)
    if seg is None:
        print(json.dumps({"error": errs[0].decode()}), flush=True)
        return
    loop = lua.fn(PRODUCER_LOOP)
    fulls, err = [*lua.call(loop, seg, recs, count), None, None][:2]
    print(
        json.dumps(
            {
                "fulls": fulls,
                "error": err and err.decode(),
                "ring": seg.ring_index,
                "compiled": min(lua.compiled(loop), lua.compiled(lua.method("write"))),
            }
        ),
        flush=True,
    )


def claim(path: str) -> None:
    lua = ShmLua()
    seg, *errs = lua.open(path)
    if seg is None:
        print("error", errs[0].decode(), flush=True)
        return
    ok = lua.call(lua.fn("function(s) return s:write('hello') end"), seg)
    print("ring" if ok[0] else "error", seg.ring_index if ok[0] else ok[1].decode(), flush=True)
    sys.stdin.readline()  # hold the claim until the test closes stdin (or kills us)


# --- fuzz -----------------------------------------------------------------------------------------

FUZZ_BODY = """function(m, path, keys, recs)
    local seg, err = m.open(path)
    if not seg then
        return "rejected", err
    end
    -- the geometry this reader will use, for the caller to check against the file size
    local geo = {
        tonumber(ffi_cast("uint8_t *", seg.slots) - seg.base), seg.slot_count,
        tonumber(seg.rings_base - seg.base), seg.ring_count, seg.ring_bytes,
        tonumber(seg.blob_ptr - seg.base), seg.blob_cap, seg.size,
    }
    local res = { "opened" }
    for _ = 1, 3 do
        local ok, e = seg:refresh()
        res[#res + 1] = tostring(ok) .. ":" .. tostring(e)
        for i = 1, #keys do
            res[#res + 1] = tostring(seg:lookup(keys[i]))
        end
        for i = 1, #recs do
            local w, we = seg:write(recs[i])
            res[#res + 1] = tostring(w) .. ":" .. tostring(we)
        end
    end
    seg:close()
    return table.concat(res, ","), geo
end"""


def _valid_image(rnd: random.Random, path: str) -> bytes:
    seg, _ = shm.Segment.open(path, slots=16, rings=2, ring_bytes=4096, blob_bytes=4096)
    seg.publish(seg.generation + 1, rnd.randbytes(rnd.randrange(1, 200)))
    for j in range(20):
        seg.put_route(key_of(j), j)
    with open(path, "rb") as f:
        img = f.read()
    seg._close(mark_stopped=False, unlink=True)
    return img


def _mutate(rnd: random.Random, img: bytes) -> tuple[str, bytes]:
    b = bytearray(img)
    kind = rnd.choice(("random", "truncate", "field", "field", "field", "bytes", "ring", "slot"))
    if kind == "random":
        return kind, rnd.randbytes(rnd.choice((0, 7, 4095, 4096, 8192, len(img))))
    if kind == "truncate":
        return kind, bytes(b[: rnd.randrange(len(b))])
    if kind == "field":
        # a header field set to an adversarial value (offsets past the end, huge lengths, ...)
        fields = [(o, 8) for o in (0, 16, 24, 48, 56, 64, 72, 88, 104)]
        fields += [(o, 4) for o in (8, 12, 32, 36, 40, 80, 84, 96, 100)]
        off, size = rnd.choice(fields)
        n = len(img)
        val = rnd.choice((0, 1, 2, 3, 4095, 4096, 4097, n, n - 1, n + 8, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1))
        val = rnd.randrange(2 ** (8 * size)) if rnd.random() < 0.2 else val % 2 ** (8 * size)
        b[off : off + size] = val.to_bytes(size, "little")
        return f"field@{off}", bytes(b)
    if kind == "bytes":
        for _ in range(rnd.randrange(1, 20)):
            i = rnd.randrange(len(b))
            b[i] = rnd.randrange(256)
        return kind, bytes(b)
    if kind == "ring":
        # ring 0's indices (write/read/drops) set to nonsense
        base = struct.unpack_from("<Q", b, 88)[0]
        o = base + rnd.choice((0, 64, 128))
        b[o : o + 8] = rnd.choice((2**64 - 8, 4096 * 3, 5, rnd.randrange(2**64))).to_bytes(8, "little")
        return kind, bytes(b)
    slots = struct.unpack_from("<Q", b, 72)[0]
    o = slots + 256 * rnd.randrange(16)
    b[o : o + 256] = rnd.randbytes(256)
    return kind, bytes(b)


def fuzz(seed: int, n: int, directory: str) -> None:
    rnd = random.Random(seed)
    lua = ShmLua()
    lua.rt.execute(b"ffi_cast = require('ffi').cast")
    body = lua.fn(FUZZ_BODY)
    keys = lua.table([key_of(j) for j in range(6)] + [b"", b"x" * 241])
    recs = lua.table([b"", b"r" * 100, b"s" * 2000])
    path = os.path.join(directory, "fuzz.shm")
    img = _valid_image(rnd, path)
    out: dict[str, Any] = {"cases": 0, "opened": 0, "rejected": 0, "raised": 0, "out_of_bounds": 0, "errors": {}}
    safe = lua.fn("function(f, ...) local r = { pcall(f, ...) } return r[1], r[2], r[3] end")
    for _ in range(n):
        kind, data = _mutate(rnd, img)
        with open(path, "wb") as f:
            f.write(data)
        ok, what, detail = safe(body, lua.m, path.encode(), keys, recs)
        out["cases"] += 1
        if not ok:
            out["raised"] += 1
            out.setdefault("raise_examples", []).append(f"{kind}: {what!r}")
            continue
        if what == b"rejected":
            out["rejected"] += 1
            err = detail.decode().split(" (")[0].split(":")[0]
            out["errors"][err] = out["errors"].get(err, 0) + 1
            continue
        out["opened"] += 1
        g = [detail[i] for i in range(1, 9)]
        slots_off, slot_count, rings_off, ring_count, ring_bytes, blob_off, blob_cap, size = g
        regions = [
            (slots_off, slot_count * shm.SLOT_SIZE),
            (rings_off, ring_count * (shm.RING_HDR + ring_bytes)),
            (blob_off, blob_cap),
        ]
        if size != len(data) or any(o < shm.HEADER_SIZE or o + ln > len(data) for o, ln in regions):
            out["out_of_bounds"] += 1
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "writer":
        writer(args[0], args[1])
    elif role == "sidecar":
        sidecar(args[0])
    elif role == "producer":
        producer(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif role == "claim":
        claim(args[0])
    elif role == "fuzz":
        fuzz(int(args[0]), int(args[1]), args[2])
    else:
        raise SystemExit(f"unknown role {role}")
