-- ipc_router_shm: the filter's side of the shared-memory fast path (docs/shm.md).
--
-- Maps the sidecar's segment, reads its config blob and route slots under seqlocks, and writes
-- completion records into a ring of its own (claimed lazily: an OFD lock on byte i of the file).
-- All of it is meant to run compiled (no jit.off): it calls no Envoy function.
--
-- Memory ordering (why this is correct under LuaJIT's optimiser, docs/shm.md has the proof):
-- * every read of a field the sidecar may change while we look (sequence numbers, the consumer's
--   read index, the state) is a "fresh read": ffi.copy of a constant 4 or 8 bytes into private
--   memory. ffi.copy is recorded by crec_copy() (lj_crecord.c), which ends every raw copy with an
--   IR_XBAR; lj_opt_fwd_xload() and lj_opt_dse_xstore() (lj_opt_mem.c) never forward or eliminate
--   across an XBAR, so no later load can reuse this one and it cannot be hoisted out of a loop.
-- * a slot is copied with ffi.copy of 256 constant bytes, more than CREC_COPY_MAXLEN (128): it is
--   a call to memcpy (then XBAR), never unrolled loads that could be CSE'd.
-- * the two sequence reads of a seqlock land in two different private cells, so even a load fused
--   late into the comparison (asm_fuseload, lj_asm_x86.h) reads the value copied before the data.
-- * a ring record is published by storing the write index after ffi.copy of the payload (XBAR):
--   LuaJIT emits stores in IR order and x86-64 keeps store order (TSO).
-- On anything but x86-64 Linux, open() refuses: there the JIT emits no fences and this is wrong.

local _M = {}

local type, tonumber, tostring, pcall = type, tonumber, tostring, pcall

local have_ffi, ffi = pcall(require, "ffi")
local have_bit, bit = pcall(require, "bit")
local jit_info = jit

-- Layout constants (the same as ipc_router/shm.py).
local MAGIC = "IPCRSHM1"
local VERSION = 1
local STATE_ACTIVE = 1
local HEADER_SIZE = 4096
local SNAP_BYTES = 256 -- > CREC_COPY_MAXLEN: a memcpy call
local SLOT_SIZE = 256
local SLOT_KEY_MAX = 240
local SLOT_PROBES = 4
local RING_HDR = 192
local RING_PAD = 0xFFFFFFFF
local MAX_RINGS = 4096
local MAX_SIZE = 2 ^ 40
local OFF_STATE = 12
local OFF_CONFIG_SEQ = 40
local RING_WRITE, RING_READ, RING_DROPS = 0, 64, 128

_M.layout = {
    magic = MAGIC, version = VERSION, header_size = HEADER_SIZE, slot_size = SLOT_SIZE,
    slot_key_max = SLOT_KEY_MAX, slot_probes = SLOT_PROBES, ring_hdr = RING_HDR,
}

-- Linux x86-64 values.
local O_RDWR, O_CLOEXEC = 2, 0x80000
local SEEK_END = 2
local PROT_READ, PROT_WRITE, MAP_SHARED = 1, 2, 1
local F_OFD_SETLK, F_WRLCK, F_UNLCK = 37, 1, 2
local CLAIM_RETRY_WRITES = 1024 -- after "no ring", try to claim again only this many writes later

local C, copy, cast
local hdr_ptr_t, slot_ptr_t, u32_ptr_t, u64_ptr_t, u8_ptr_t
local snap, scratch, cell_a, cell_b, cell_r, flock
local crc_table
local band, bxor, bnot, rshift

local setup_err
if not (have_ffi and have_bit and jit_info) then
    setup_err = "no LuaJIT FFI"
elseif jit_info.arch ~= "x64" or jit_info.os ~= "Linux" then
    setup_err = "shared memory fast path not supported on " .. tostring(jit_info.os) .. "/"
        .. tostring(jit_info.arch)
else
    -- cdef can run only once per name and Lua state (another script may have declared these).
    for _, decl in ipairs({
        [[typedef struct {
            uint64_t magic; uint32_t version, state; uint64_t instance_id, total_size;
            uint32_t header_size, generation, config_seq, flags;
            uint64_t blob_off, blob_len, blob_cap, slots_off; uint32_t slot_count, slot_size;
            uint64_t rings_off; uint32_t ring_count, ring_hdr; uint64_t ring_bytes;
            uint8_t reserved[144];
        } ipcr_shm_hdr_t;]],
        [[typedef struct {
            uint32_t seq, generation, hash; uint16_t key_len, rule; uint8_t key[240];
        } ipcr_shm_slot_t;]],
        [[typedef struct {
            short l_type, l_whence; int64_t l_start, l_len; int l_pid;
        } ipcr_shm_flock_t;]],
        "int open(const char *path, int flags, ...);",
        "int close(int fd);",
        "int64_t lseek(int fd, int64_t offset, int whence);",
        "void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t offset);",
        "int munmap(void *addr, size_t len);",
        "int fcntl(int fd, int cmd, ...);",
        "int memcmp(const void *a, const void *b, size_t n);",
    }) do
        pcall(ffi.cdef, decl)
    end
    local ok, err = pcall(function()
        C, copy, cast = ffi.C, ffi.copy, ffi.cast
        for _, name in ipairs({ "open", "close", "lseek", "mmap", "munmap", "fcntl", "memcmp" }) do
            assert(C[name]) -- resolves now, so a missing symbol is a clear error, not a raise later
        end
        hdr_ptr_t = ffi.typeof("ipcr_shm_hdr_t *")
        slot_ptr_t = ffi.typeof("ipcr_shm_slot_t *")
        u32_ptr_t = ffi.typeof("uint32_t *")
        u64_ptr_t = ffi.typeof("uint64_t *")
        u8_ptr_t = ffi.typeof("uint8_t *")
        assert(ffi.sizeof("ipcr_shm_slot_t") == SLOT_SIZE and ffi.sizeof("ipcr_shm_flock_t") == 32
            and ffi.sizeof("ipcr_shm_hdr_t") == SNAP_BYTES)
        -- Private buffers live as long as the functions that use them (upvalues): never keep only
        -- a pointer cast from a cdata (the GC would free the buffer under it).
        snap = ffi.new("ipcr_shm_hdr_t[1]")
        scratch = ffi.new("ipcr_shm_slot_t[1]")
        cell_a, cell_b = ffi.new("uint32_t[2]"), ffi.new("uint32_t[2]")
        cell_r = ffi.new("uint64_t[1]")
        flock = ffi.new("ipcr_shm_flock_t")
    end)
    if not ok then
        setup_err = "ffi setup: " .. tostring(err)
    end
    band, bxor, bnot, rshift = bit.band, bit.bxor, bit.bnot, bit.rshift
end

---------------------------------------------------------------------------------------------------
-- crc32 (zlib's: reflected, polynomial 0xEDB88320), table driven
---------------------------------------------------------------------------------------------------

if not setup_err then
    crc_table = ffi.new("int32_t[256]")
    for i = 0, 255 do
        local c = i
        for _ = 1, 8 do
            if band(c, 1) ~= 0 then
                c = bxor(rshift(c, 1), -306674912) -- 0xEDB88320 as int32
            else
                c = rshift(c, 1)
            end
        end
        crc_table[i] = c
    end
end

local function crc32(s)
    local n = #s
    local p = cast(u8_ptr_t, s)
    local c = -1
    local i = 0
    while i + 4 <= n do -- 4 bytes per iteration: fewer loop guards
        c = bxor(rshift(c, 8), crc_table[band(bxor(c, p[i]), 255)])
        c = bxor(rshift(c, 8), crc_table[band(bxor(c, p[i + 1]), 255)])
        c = bxor(rshift(c, 8), crc_table[band(bxor(c, p[i + 2]), 255)])
        c = bxor(rshift(c, 8), crc_table[band(bxor(c, p[i + 3]), 255)])
        i = i + 4
    end
    while i < n do
        c = bxor(rshift(c, 8), crc_table[band(bxor(c, p[i]), 255)])
        i = i + 1
    end
    c = bnot(c)
    if c < 0 then
        c = c + 4294967296
    end
    return c
end

function _M.crc32(s)
    if setup_err then
        return nil, setup_err
    end
    if type(s) ~= "string" then
        return nil, "crc32: not a string"
    end
    return crc32(s)
end

---------------------------------------------------------------------------------------------------
-- open
---------------------------------------------------------------------------------------------------

local Seg = {}
local Seg_mt = { __index = Seg }
_M._Seg = Seg -- for tests (which functions got compiled)

local function is_pow2(n)
    return n >= 1 and n % 1 == 0 and band(n, n - 1) == 0 and n <= 2 ^ 30
end

-- Checks the header of a mapping of `size` bytes; returns the geometry (Lua numbers) or nil, err.
local function check_header(base, size)
    if ffi.string(base, 8) ~= MAGIC then
        return nil, "bad magic"
    end
    local h = cast(hdr_ptr_t, base)
    if h.version ~= VERSION then
        return nil, "layout version " .. tostring(h.version) .. " (want " .. VERSION .. ")"
    end
    if h.state ~= STATE_ACTIVE then
        return nil, "stopped"
    end
    if tonumber(h.total_size) ~= size then
        return nil, "size mismatch (header " .. tostring(h.total_size) .. ", file " .. size .. ")"
    end
    if h.header_size ~= HEADER_SIZE or h.slot_size ~= SLOT_SIZE or h.ring_hdr ~= RING_HDR then
        return nil, "unknown header/slot/ring-header size"
    end
    local g = {
        blob_off = tonumber(h.blob_off), blob_cap = tonumber(h.blob_cap),
        slots_off = tonumber(h.slots_off), slot_count = h.slot_count,
        rings_off = tonumber(h.rings_off), ring_count = h.ring_count,
        ring_bytes = tonumber(h.ring_bytes),
    }
    -- Every region must lie inside [HEADER_SIZE, size) and be 8-aligned; regions must not overlap.
    local function region(off, len, align)
        return off >= HEADER_SIZE and off % align == 0 and len >= 0 and off + len <= size
    end
    if not (g.blob_cap <= 2 ^ 30 and region(g.blob_off, g.blob_cap, 8)) then
        return nil, "bad config blob region"
    end
    if not (is_pow2(g.slot_count) and g.slot_count <= 2 ^ 20
            and region(g.slots_off, g.slot_count * SLOT_SIZE, 8)) then
        return nil, "bad slot region"
    end
    if not (g.ring_count <= MAX_RINGS and is_pow2(g.ring_bytes) and g.ring_bytes >= 4096
            and region(g.rings_off, g.ring_count * (RING_HDR + g.ring_bytes), 8)) then
        return nil, "bad ring region"
    end
    local spans = {
        { g.blob_off, g.blob_cap }, { g.slots_off, g.slot_count * SLOT_SIZE },
        { g.rings_off, g.ring_count * (RING_HDR + g.ring_bytes) },
    }
    for i = 1, 3 do
        for j = i + 1, 3 do
            local a, b = spans[i], spans[j]
            if a[1] < b[1] + b[2] and b[1] < a[1] + a[2] then
                return nil, "overlapping regions"
            end
        end
    end
    return g
end

-- shm.open(path) -> seg | nil, err. Never raises.
function _M.open(path)
    if setup_err then
        return nil, setup_err
    end
    if type(path) ~= "string" or path == "" then
        return nil, "open: bad path"
    end
    local fd = C.open(path, O_RDWR + O_CLOEXEC)
    if fd < 0 then
        return nil, "open " .. path .. ": errno " .. ffi.errno()
    end
    local size = tonumber(C.lseek(fd, 0, SEEK_END))
    if size < HEADER_SIZE or size > MAX_SIZE then
        C.close(fd)
        return nil, "bad segment size " .. size
    end
    local p = C.mmap(nil, size, PROT_READ + PROT_WRITE, MAP_SHARED, fd, 0)
    if cast("intptr_t", p) == -1 then
        local e = ffi.errno()
        C.close(fd)
        return nil, "mmap: errno " .. e
    end
    local base = cast(u8_ptr_t, p)
    local g, err = check_header(base, size)
    if not g then
        C.munmap(p, size)
        C.close(fd)
        return nil, err
    end
    local h = cast(hdr_ptr_t, base)
    local seg = setmetatable({
        path = path, fd = fd, base = base, size = size, hdr = h,
        instance_id = h.instance_id, -- a uint64 cdata (a copy)
        generation = -1, -- the generation of self.blob / self.config; -1: none read yet
        valid = false, -- lookups may hit (a config of self.generation is loaded)
        blob = nil, config = nil, dead = nil,
        seq_ptr = cast(u32_ptr_t, base + OFF_CONFIG_SEQ),
        state_ptr = cast(u32_ptr_t, base + OFF_STATE),
        blob_ptr = base + g.blob_off, blob_cap = g.blob_cap, blob_buf = nil, blob_buf_len = 0,
        slots = cast(slot_ptr_t, base + g.slots_off), mask = g.slot_count - 1,
        slot_count = g.slot_count,
        rings_base = base + g.rings_off, ring_count = g.ring_count, ring_bytes = g.ring_bytes,
        rec_max = g.ring_bytes / 4,
        ring = nil, ring_index = nil, ring_data = nil, w = 0, drops = 0, claim_wait = 0,
    }, Seg_mt)
    seg.gc = ffi.gc(ffi.new("int[1]"), function()
        C.munmap(p, size)
        C.close(fd)
    end)
    return seg
end

function Seg:close()
    if self.gc then
        local gc = self.gc
        self.gc = nil
        ffi.gc(gc, nil)
        C.munmap(self.base, self.size)
        C.close(self.fd)
    end
    self.dead, self.valid, self.ring = "closed", false, nil
end

---------------------------------------------------------------------------------------------------
-- config
---------------------------------------------------------------------------------------------------

-- seg:refresh([decode]) -> changed | nil, err. Per request. On a new generation copies the config
-- blob under the seqlock into seg.blob (nil: no config published yet) and seg.generation, with
-- seg.config = decode(blob) when decode is given (seg.config_error when it fails), and returns
-- true; false when unchanged (or while the sidecar is writing it: lookups miss meanwhile).
-- nil, err only when the segment is gone for good (stopped, corrupt, closed; seg.dead says which):
-- take the socket path and re-open later (rate-limited).
function Seg:refresh(decode)
    if self.dead then
        return nil, self.dead
    end
    copy(snap, self.base, SNAP_BYTES)
    if snap[0].state ~= STATE_ACTIVE then
        self.dead, self.valid = "stopped", false
        return nil, "stopped"
    end
    if snap[0].generation == self.generation then
        return false
    end
    for _ = 1, 4 do
        copy(cell_a, self.seq_ptr, 4) -- seq before the data
        local s1 = cell_a[0]
        if s1 % 2 == 0 then
            copy(snap, self.base, SNAP_BYTES)
            local gen, len = snap[0].generation, tonumber(snap[0].blob_len)
            local fits = len <= self.blob_cap
            if fits and len > self.blob_buf_len then
                self.blob_buf = ffi.new("uint8_t[?]", len)
                self.blob_buf_len = len
            end
            if fits and len > 0 then
                copy(self.blob_buf, self.blob_ptr, len) -- memcpy: a call and an XBAR
            end
            copy(cell_b, self.seq_ptr, 4) -- seq after the data, in another cell
            if cell_b[0] == s1 then
                if not fits then
                    self.dead, self.valid = "corrupt config length", false
                    return nil, self.dead
                end
                self.generation, self.valid, self.config, self.config_error = gen, false, nil, nil
                if len == 0 then -- "no config yet" (a sidecar that just adopted the file)
                    self.blob = nil
                    return true
                end
                local blob = ffi.string(self.blob_buf, len)
                self.blob = blob
                if decode then
                    local ok, cfg, derr = pcall(decode, blob)
                    if not ok or cfg == nil then
                        self.config_error = "bad config: " .. tostring(ok and derr or cfg)
                        return true -- lookups stay off for this generation
                    end
                    self.config = cfg
                end
                self.valid = true
                return true
            end
        end
    end
    -- The sidecar is writing: miss until a later request sees the new config complete (the
    -- generation we hold is unchanged, so the next call tries again).
    self.valid = false
    return false
end

---------------------------------------------------------------------------------------------------
-- route lookup
---------------------------------------------------------------------------------------------------

-- seg:lookup(key [, hash]) -> rule_index | nil: a hit in the generation of the loaded config.
-- One probe of one slot: rule | nil (not here) | false (the copy was torn: worth one retry).
-- Straight-line code (no loop) so that a hit compiles to one trace without loop exits.
local function probe(slot, key, n, h, gen)
    copy(cell_a, slot, 4) -- seq before the copy (fresh read)
    local s1 = cell_a[0]
    if s1 % 2 ~= 0 then
        return nil -- being written: not here for now
    end
    copy(scratch, slot, SLOT_SIZE) -- memcpy: 256 > CREC_COPY_MAXLEN
    copy(cell_b, slot, 4) -- seq after the copy, in another cell
    if cell_b[0] ~= s1 then
        return false
    end
    local sc = scratch[0]
    if sc.hash == h and sc.generation == gen and sc.key_len == n
            and C.memcmp(sc.key, key, n) == 0 then
        return sc.rule
    end
    return nil
end

local function probe_retry(slot, key, n, h, gen)
    local r = probe(slot, key, n, h, gen)
    if r == false then
        r = probe(slot, key, n, h, gen)
    end
    return r or nil
end

-- seg:lookup(key [, hash]) -> rule_index | nil: a hit in the generation of the loaded config.
-- Probes h, h+1, h+2, h+3 (SLOT_PROBES); a torn copy is retried once, then is a miss.
function Seg:lookup(key, h)
    if not self.valid or type(key) ~= "string" then
        return nil
    end
    local n = #key
    if n > SLOT_KEY_MAX then
        return nil
    end
    h = h or crc32(key)
    local slots, mask, gen = self.slots, self.mask, self.generation
    local r = probe_retry(slots + band(h, mask), key, n, h, gen)
    if r then
        return r
    end
    r = probe_retry(slots + band(h + 1, mask), key, n, h, gen)
    if r then
        return r
    end
    r = probe_retry(slots + band(h + 2, mask), key, n, h, gen)
    if r then
        return r
    end
    return probe_retry(slots + band(h + 3, mask), key, n, h, gen)
end

---------------------------------------------------------------------------------------------------
-- completion records
---------------------------------------------------------------------------------------------------

local function ring_at(self, i)
    return self.rings_base + i * (RING_HDR + self.ring_bytes)
end

local function lock_byte(fd, i, kind)
    flock.l_type, flock.l_whence, flock.l_start, flock.l_len, flock.l_pid = kind, 0, i, 1, 0
    return C.fcntl(fd, F_OFD_SETLK, flock) == 0
end

-- Claims the first free ring: an OFD lock on byte i of the file through this state's own fd (the
-- kernel drops it when the process dies). A ring whose indices make no sense is left alone.
local function claim(self)
    for i = 0, self.ring_count - 1 do
        if lock_byte(self.fd, i, F_WRLCK) then
            local ring = ring_at(self, i)
            copy(cell_r, ring + RING_WRITE, 8)
            local w = tonumber(cell_r[0])
            copy(cell_r, ring + RING_READ, 8)
            local r = tonumber(cell_r[0])
            if w % 8 == 0 and w - r >= 0 and w - r <= self.ring_bytes and w < 2 ^ 52 then
                self.ring, self.ring_index, self.ring_data = ring, i, ring + RING_HDR
                self.w = w
                self.drops = tonumber(cast(u64_ptr_t, ring + RING_DROPS)[0])
                return true
            end
            lock_byte(self.fd, i, F_UNLCK)
        end
    end
    self.claim_wait = CLAIM_RETRY_WRITES
    return false
end

-- seg:write(record) -> true | nil, err ("full" | "no ring" | "too large" | "stopped" | ...)
function Seg:write(rec)
    if self.dead then
        return nil, self.dead
    end
    if type(rec) ~= "string" then
        return nil, "record is not a string"
    end
    copy(cell_a, self.state_ptr, 4)
    if cell_a[0] ~= STATE_ACTIVE then
        self.dead, self.valid = "stopped", false
        return nil, "stopped"
    end
    local ring = self.ring
    if ring == nil then
        if self.claim_wait > 0 then
            self.claim_wait = self.claim_wait - 1
            return nil, "no ring"
        end
        if not claim(self) then
            return nil, "no ring"
        end
        ring = self.ring
    end
    local n = #rec
    if n > self.rec_max then
        return nil, "too large"
    end
    local size = self.ring_bytes
    local total = n + 4 -- u32 length + payload, to a multiple of 8
    if total % 8 ~= 0 then
        total = total + 8 - total % 8
    end
    copy(cell_r, ring + RING_READ, 8) -- the consumer's index: a fresh read
    local w = self.w
    local used = w - tonumber(cell_r[0])
    if used < 0 or used > size then
        return nil, "corrupt ring"
    end
    local pos = w % size
    local pad = 0
    if pos + total > size then
        pad = size - pos
    end
    if pad + total > size - used then
        local drops = self.drops + 1
        self.drops = drops
        cast(u64_ptr_t, ring + RING_DROPS)[0] = drops
        return nil, "full"
    end
    local data = self.ring_data
    if pad > 0 then
        cast(u32_ptr_t, data + pos)[0] = RING_PAD
        pos = 0
    end
    cast(u32_ptr_t, data + pos)[0] = n
    copy(data + pos + 4, rec, n) -- payload first (a barrier) ...
    w = w + pad + total
    self.w = w
    cast(u64_ptr_t, ring + RING_WRITE)[0] = w -- ... then publish it
    return true
end

return _M
