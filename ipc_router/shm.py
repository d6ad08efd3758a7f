"""The sidecar's side of the shared-memory fast path (docs/shm.md): one mmapped file holding the config
blob, the route slots and the completion rings.

The sidecar is the only writer of the header, the config blob and the slots (seqlocks: sequence odd
while writing), and the only consumer of the rings (SPSC: each ring has one Lua state producing into
it). Nothing here needs atomics: on x86-64 (TSO) stores become visible in program order and loads are
not reordered with older loads, which is all a single-writer seqlock and an SPSC ring need. Every value
read back from the file is validated: a corrupt segment is replaced, a corrupt ring is skipped and
counted, nothing read from the file can make this module raise anything but a clear error at open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import platform
import secrets
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

# --- layout (docs/shm.md; the Lua module ipc_router_shm.lua has the same constants) -------------------
MAGIC = b"IPCRSHM1"
VERSION = 1
STATE_ACTIVE = 1
STATE_STOPPED = 2
HEADER_SIZE = 4096

# header field offsets
OFF_MAGIC = 0  # u64 ("IPCRSHM1")
OFF_VERSION = 8  # u32
OFF_STATE = 12  # u32
OFF_INSTANCE = 16  # u64
OFF_TOTAL = 24  # u64
OFF_HEADER_SIZE = 32  # u32
OFF_GENERATION = 36  # u32
OFF_CONFIG_SEQ = 40  # u32
OFF_FLAGS = 44  # u32 (0, reserved)
OFF_BLOB_OFF = 48  # u64
OFF_BLOB_LEN = 56  # u64 (written under the config seqlock)
OFF_BLOB_CAP = 64  # u64
OFF_SLOTS_OFF = 72  # u64
OFF_SLOT_COUNT = 80  # u32
OFF_SLOT_SIZE = 84  # u32
OFF_RINGS_OFF = 88  # u64
OFF_RING_COUNT = 96  # u32
OFF_RING_HDR = 100  # u32
OFF_RING_BYTES = 104  # u64
HEADER_USED = 112

# route slots
SLOT_SIZE = 256
SLOT_KEY_MAX = 240
SLOT_PROBES = 4
# slot: seq u32, generation u32, hash u32, key_len u16, rule_index u16, key bytes
_SLOT_FIELDS = struct.Struct("<IIHH")  # generation, hash, key_len, rule_index at slot + 4

# rings
RING_HDR = 192
RING_WRITE = 0  # u64, written only by the producer (Lua)
RING_READ = 64  # u64, written only by the consumer (this module)
RING_DROPS = 128  # u64, written only by the producer
RING_PAD = 0xFFFFFFFF
MAX_RINGS = 4096

# An OFD write lock on this byte (far past the end: lock ranges need not lie inside the file) says
# "a sidecar owns this segment"; ring i is claimed by a lock on byte i (held by the Lua states).
OWNER_LOCK_BYTE = 1 << 40

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on x86-64 Linux (32 bytes)


class SegmentError(Exception):
    """A segment cannot be opened (in use by another sidecar, no space, bad parameters)."""


def supported() -> bool:
    """The fast path is correct only on x86-64 Linux (TSO; see docs/shm.md)."""
    return sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")


def route_key(key_headers: Sequence[str], headers: Mapping[str, str]) -> bytes | None:
    """The route-slot key of a request: per name in key_headers, b"\\1" if the header is absent, else
    b"\\0" + value. None when a value holds \\0 or \\1 (such requests are never cached). `headers` are
    the request's headers as the filter's header_map() joins them, with the model header's value
    replaced by the body's model."""
    parts: list[bytes] = []
    for name in key_headers:
        value = headers.get(name)
        if value is None:
            parts.append(b"\x01")
            continue
        raw = value.encode("utf-8", "surrogateescape")
        if b"\x00" in raw or b"\x01" in raw:
            return None
        parts.append(b"\x00")
        parts.append(raw)
    return b"".join(parts)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Geometry:
    """Sizes and offsets of one segment, computed from the parameters (canonical layout) or read back
    from a file and checked."""

    __slots__ = ("blob_cap", "blob_off", "ring_bytes", "rings", "rings_off", "slots", "slots_off", "total")

    def __init__(self, slots: int, rings: int, ring_bytes: int, blob_cap: int) -> None:
        self.slots = slots
        self.rings = rings
        self.ring_bytes = ring_bytes
        self.blob_cap = blob_cap
        self.blob_off = HEADER_SIZE
        self.slots_off = self.blob_off + blob_cap
        self.rings_off = self.slots_off + slots * SLOT_SIZE
        self.total = _round_up(self.rings_off + rings * (RING_HDR + ring_bytes), mmap.PAGESIZE)

    @classmethod
    def checked(cls, slots: int, rings: int, ring_bytes: int, blob_cap: int) -> _Geometry:
        if not (_pow2(slots) and 16 <= slots <= 1 << 20):
            raise ValueError(f"slots must be a power of two in [16, 2**20], not {slots}")
        if not 1 <= rings <= MAX_RINGS:
            raise ValueError(f"rings must be in [1, {MAX_RINGS}], not {rings}")
        if not (_pow2(ring_bytes) and 4096 <= ring_bytes <= 1 << 30):
            raise ValueError(f"ring_bytes must be a power of two in [4096, 2**30], not {ring_bytes}")
        if not (blob_cap % 4096 == 0 and 4096 <= blob_cap <= 1 << 30):
            raise ValueError(f"blob_bytes must be a multiple of 4096 in [4096, 2**30], not {blob_cap}")
        return cls(slots, rings, ring_bytes, blob_cap)

    def ring_off(self, i: int) -> int:
        return self.rings_off + i * (RING_HDR + self.ring_bytes)

    def same(self, other: _Geometry) -> bool:
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


def _read_geometry(mm: mmap.mmap, size: int) -> tuple[_Geometry | None, str]:
    """The geometry a file claims, if it is a well-formed segment of this layout; else (None, why)."""
    if size < HEADER_SIZE:
        return None, f"truncated ({size} bytes)"
    if mm[OFF_MAGIC : OFF_MAGIC + 8] != MAGIC:
        return None, "foreign file (bad magic)"
    version = _U32.unpack_from(mm, OFF_VERSION)[0]
    if version != VERSION:
        return None, f"layout version {version}, not {VERSION}"
    total = _U64.unpack_from(mm, OFF_TOTAL)[0]
    if total != size:
        return None, f"size {size} != header's {total}"
    if (
        _U32.unpack_from(mm, OFF_HEADER_SIZE)[0] != HEADER_SIZE
        or _U32.unpack_from(mm, OFF_SLOT_SIZE)[0] != SLOT_SIZE
        or _U32.unpack_from(mm, OFF_RING_HDR)[0] != RING_HDR
    ):
        return None, "unknown header/slot/ring-header size"
    try:
        geo = _Geometry.checked(
            _U32.unpack_from(mm, OFF_SLOT_COUNT)[0],
            _U32.unpack_from(mm, OFF_RING_COUNT)[0],
            _U64.unpack_from(mm, OFF_RING_BYTES)[0],
            _U64.unpack_from(mm, OFF_BLOB_CAP)[0],
        )
    except ValueError as e:
        return None, f"bad geometry: {e}"
    if (
        _U64.unpack_from(mm, OFF_BLOB_OFF)[0] != geo.blob_off
        or _U64.unpack_from(mm, OFF_SLOTS_OFF)[0] != geo.slots_off
        or _U64.unpack_from(mm, OFF_RINGS_OFF)[0] != geo.rings_off
        or geo.total != size
    ):
        return None, "offsets do not match the layout"
    return geo, ""


def _store_state(mm: mmap.mmap, state: int) -> None:
    """One aligned 4-byte store (see Segment._u32 on why not struct.pack_into)."""
    view = memoryview(mm)[OFF_STATE : OFF_STATE + 4].cast("I")
    view[0] = state
    view.release()


def _lock(fd: int, byte: int) -> bool:
    """Takes an OFD write lock on one byte; False when another open file description holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked_by_other(fd: int, byte: int) -> bool:
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


class Segment:
    """The sidecar's segment. Single writer: one Segment per file (an OFD lock enforces it)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, geo: _Geometry) -> None:
        self.path = path
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._geo = geo
        # Every field the other side reads or writes concurrently is accessed through these native
        # (little-endian on x86-64) views: an item get/set is one aligned 4/8-byte load/store
        # (memoryobject.c copies a fixed-size scalar). struct.pack_into/unpack_from with "<Q" go
        # byte by byte here (measured: a concurrent reader saw 0 between 0xF8 and 0x100), which
        # would tear indices and sequence numbers.
        self._u32 = memoryview(mm).cast("I")
        self._u64 = memoryview(mm).cast("Q")
        self.instance_id = self._u64[OFF_INSTANCE // 8]
        self.generation = self._u32[OFF_GENERATION // 4]
        self._drained = [0] * geo.rings
        self._corrupt = [0] * geo.rings
        self._evict = 0
        self._blob_len = self._u64[OFF_BLOB_LEN // 8]

    # --- open / create / adopt --------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        slots: int = 8192,
        rings: int = 64,
        ring_bytes: int = 1 << 20,
        mode: int = 0o660,
        blob_bytes: int = 1 << 20,
    ) -> tuple[Segment, list[bytes]]:
        """Adopts the segment at `path` if it is a valid one of this layout and geometry (draining the
        records its rings hold), else writes a new one and renames it over `path` (records in a valid
        segment of another geometry are drained first; a foreign or corrupt file is replaced
        untouched). Raises SegmentError when another sidecar owns the segment."""
        want = _Geometry.checked(slots, rings, ring_bytes, blob_bytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return cls._create(path, want, mode, 0), []
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise SegmentError(f"cannot open {path}: {e}") from e
            return cls._create(path, want, mode, 0), []  # a symlink: replace it, never follow it
        old: Segment | None = None
        try:
            if not _lock(fd, OWNER_LOCK_BYTE):
                raise SegmentError(f"{path} is owned by another running sidecar")
            size = os.fstat(fd).st_size
            if size >= HEADER_SIZE:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                geo, _why = _read_geometry(mm, size)
                if geo is not None:
                    old = cls(path, fd, mm, geo)
                else:
                    if mm[OFF_MAGIC : OFF_MAGIC + 8] == MAGIC:
                        # Ours but damaged: tell filters still mapping it to re-open. (A foreign
                        # file is never written to, only replaced.)
                        _store_state(mm, STATE_STOPPED)
                    mm.close()
        finally:
            if old is None:
                os.close(fd)
        if old is None:  # truncated, foreign or damaged: replaced
            return cls._create(path, want, mode, 0), []
        next_gen = (old.generation + 1) & 0xFFFFFFFF or 1
        if old._geo.same(want):
            records = old.drain(limit=1 << 62)
            old._adopt(next_gen)
            return old, records
        # Valid, but another geometry: STOPPED first (producers check the state before each write,
        # so records stop coming), then its records are saved; filters re-open the new file.
        old._u32[OFF_STATE // 4] = STATE_STOPPED
        records = old.drain(limit=1 << 62)
        new = cls._create(path, want, mode, next_gen)
        records += old.drain(limit=1 << 62)  # a write that saw ACTIVE just before the store
        old._close(mark_stopped=False, unlink=False)
        return new, records

    @classmethod
    def _create(cls, path: str, geo: _Geometry, mode: int, generation: int) -> Segment:
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as e:
            raise SegmentError(f"cannot create {tmp}: {e}") from e
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask: the filter's user must read and write
            try:
                # Reserve the memory now: a sparse file on a full tmpfs would SIGBUS on first touch.
                os.posix_fallocate(fd, 0, geo.total)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise SegmentError(f"cannot reserve {geo.total} bytes for {tmp}: {e}") from e
                os.ftruncate(fd, geo.total)
            mm = mmap.mmap(fd, geo.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            h = {
                OFF_VERSION: (_U32, VERSION),
                OFF_INSTANCE: (_U64, secrets.randbits(64)),
                OFF_TOTAL: (_U64, geo.total),
                OFF_HEADER_SIZE: (_U32, HEADER_SIZE),
                OFF_GENERATION: (_U32, generation),
                OFF_BLOB_OFF: (_U64, geo.blob_off),
                OFF_BLOB_CAP: (_U64, geo.blob_cap),
                OFF_SLOTS_OFF: (_U64, geo.slots_off),
                OFF_SLOT_COUNT: (_U32, geo.slots),
                OFF_SLOT_SIZE: (_U32, SLOT_SIZE),
                OFF_RINGS_OFF: (_U64, geo.rings_off),
                OFF_RING_COUNT: (_U32, geo.rings),
                OFF_RING_HDR: (_U32, RING_HDR),
                OFF_RING_BYTES: (_U64, geo.ring_bytes),
            }
            for off, (st, value) in h.items():
                st.pack_into(mm, off, value)
            mm[OFF_MAGIC : OFF_MAGIC + 8] = MAGIC
            _U32.pack_into(mm, OFF_STATE, STATE_ACTIVE)
            if not _lock(fd, OWNER_LOCK_BYTE):
                raise SegmentError(f"cannot lock {tmp}")
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return cls(path, fd, mm, geo)

    def _adopt(self, generation: int) -> None:
        self.instance_id = secrets.randbits(64)
        self._u64[OFF_INSTANCE // 8] = self.instance_id
        # The new generation comes with an empty blob ("no config yet"): the old rules are not this
        # sidecar's and every slot of the old generation is a miss from now on.
        self._write_config(generation, b"")
        self._u32[OFF_STATE // 4] = STATE_ACTIVE

    # --- config and route slots -------------------------------------------------------------------

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"segment {self.path} is closed")
        return self._mm

    def _write_config(self, generation: int, blob: bytes) -> None:
        mm = self._map()
        u32 = self._u32
        seq = u32[OFF_CONFIG_SEQ // 4]
        odd = (seq + (1 if seq % 2 == 0 else 2)) & 0xFFFFFFFF
        # Store order is the protocol (x86-64 keeps it): seq odd, data, seq even.
        u32[OFF_CONFIG_SEQ // 4] = odd
        off = self._geo.blob_off
        mm[off : off + len(blob)] = blob
        self._u64[OFF_BLOB_LEN // 8] = len(blob)
        u32[OFF_GENERATION // 4] = generation
        u32[OFF_CONFIG_SEQ // 4] = (odd + 1) & 0xFFFFFFFF
        self.generation = generation
        self._blob_len = len(blob)

    def publish(self, generation: int, blob: bytes) -> None:
        """Publishes a config blob as `generation`, which must be greater than self.generation (a
        generation never repeats for one file: older slots become misses)."""
        if not self.generation < generation <= 0xFFFFFFFF:
            raise ValueError(f"generation {generation} must be in ({self.generation}, 2**32)")
        if len(blob) > self._geo.blob_cap:
            raise ValueError(f"config blob of {len(blob)} bytes exceeds the segment's {self._geo.blob_cap}")
        self._write_config(generation, blob)

    def put_route(self, key: bytes, rule_index: int, generation: int | None = None) -> bool:
        """Caches rule_index for key in the current generation. False when not stored: key too long,
        rule_index out of range, no config published yet, or `generation` (the one the decision was made
        in) is not current."""
        if generation is not None and generation != self.generation:
            return False
        if len(key) > SLOT_KEY_MAX or not 0 <= rule_index <= 0xFFFF or self._blob_len == 0:
            return False
        mm = self._map()
        geo = self._geo
        h = zlib.crc32(key)
        mask = geo.slots - 1
        target = -1
        free = -1
        for i in range(SLOT_PROBES):
            off = geo.slots_off + ((h + i) & mask) * SLOT_SIZE
            gen, sh, klen, _rule = _SLOT_FIELDS.unpack_from(mm, off + 4)
            if gen != self.generation:
                if free < 0:
                    free = off
            elif sh == h and klen == len(key) and mm[off + 16 : off + 16 + klen] == key:
                target = off
                break
        if target < 0:
            if free >= 0:
                target = free
            else:  # all probes live: evict one, round robin (a cache; the evicted key misses once)
                self._evict = (self._evict + 1) % SLOT_PROBES
                target = geo.slots_off + ((h + self._evict) & mask) * SLOT_SIZE
        u32 = self._u32
        seq = u32[target // 4]
        odd = (seq + (1 if seq % 2 == 0 else 2)) & 0xFFFFFFFF
        u32[target // 4] = odd
        mm[target + 4 : target + 16 + len(key)] = _SLOT_FIELDS.pack(self.generation, h, len(key), rule_index) + key
        u32[target // 4] = (odd + 1) & 0xFFFFFFFF
        return True

    # --- rings --------------------------------------------------------------------------------------

    def drain(self, limit: int = 65536) -> list[bytes]:
        """Record payloads from all rings (in order per ring), at most `limit`. A ring whose indices or
        records are inconsistent is skipped to its write index and counted (ring_stats()['corrupt'])."""
        mm = self._map()
        u64 = self._u64
        geo = self._geo
        size = geo.ring_bytes
        mask = size - 1
        out: list[bytes] = []
        for i in range(geo.rings):
            if len(out) >= limit:
                break
            base = geo.ring_off(i)
            data = base + RING_HDR
            w = u64[(base + RING_WRITE) // 8]  # first: then the payloads it covers
            r = u64[(base + RING_READ) // 8]
            if r == w:
                continue
            if not (0 < w - r <= size and w % 8 == 0 and r % 8 == 0):
                self._corrupt[i] += 1
                u64[(base + RING_READ) // 8] = w
                continue
            n = 0
            while r < w and len(out) < limit:
                pos = r & mask
                length = _U32.unpack_from(mm, data + pos)[0]
                if length == RING_PAD:
                    r += size - pos
                    continue
                total = (4 + length + 7) & ~7
                if total > w - r or pos + total > size:
                    self._corrupt[i] += 1
                    r = w
                    break
                out.append(mm[data + pos + 4 : data + pos + 4 + length])
                r += total
                n += 1
            if r > w:  # a pad marker past the write index: corrupt
                self._corrupt[i] += 1
                r = w
            self._drained[i] += n
            u64[(base + RING_READ) // 8] = r  # last: the producer may now reuse the space
        return out

    def ring_stats(self) -> dict[str, Any]:
        """Per ring: used bytes, drops (counted by the producer), records drained, corrupt events,
        whether a Lua state holds its claim; and totals."""
        self._map()
        u64 = self._u64
        geo = self._geo
        rings = []
        for i in range(geo.rings):
            base = geo.ring_off(i)
            w = u64[(base + RING_WRITE) // 8]
            r = u64[(base + RING_READ) // 8]
            rings.append(
                {
                    "used": (w - r) if 0 <= w - r <= geo.ring_bytes else -1,
                    "drops": u64[(base + RING_DROPS) // 8],
                    "drained": self._drained[i],
                    "corrupt": self._corrupt[i],
                    "claimed": _locked_by_other(self._fd, i),
                }
            )
        return {
            "rings": rings,
            "drops": sum(r["drops"] for r in rings),
            "drained": sum(self._drained),
            "corrupt": sum(self._corrupt),
            "claimed": sum(1 for r in rings if r["claimed"]),
        }

    # --- stop -------------------------------------------------------------------------------------

    def stop(self) -> list[bytes]:
        """Clean stop: STOPPED (filters stop using it), final drain, unlink, close. Idempotent."""
        if self._mm is None:
            return []
        self._u32[OFF_STATE // 4] = STATE_STOPPED
        records = self.drain(limit=1 << 62)
        self._close(mark_stopped=False, unlink=True)
        return records

    def _close(self, *, mark_stopped: bool, unlink: bool) -> None:
        if self._mm is None:
            return
        if mark_stopped:
            self._u32[OFF_STATE // 4] = STATE_STOPPED
        if unlink:
            # Only our own file: a newer one renamed over the path belongs to someone else.
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.unlink(self.path)
        self._u32.release()
        self._u64.release()
        self._mm.close()
        self._mm = None
        os.close(self._fd)
