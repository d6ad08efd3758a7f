-- ipc_router: the Envoy side of the ipc_router sidecar protocol (docs/protocol.md).
--
-- Loaded by the generated bootstrap as
--
--   package.preload["ipc_router"] = function(...) <this file> end
--   local filter = require("ipc_router").new({ ...conf... })
--   function envoy_on_request(handle) filter:on_request(handle) end
--   function envoy_on_response(handle) filter:on_response(handle) end
--
-- Request phase: strip the route/backend headers a client may have sent; for LLM paths, buffer
-- the body, POST it (msgpack) to the sidecar's /route, then apply the decision: `set` headers and
-- re-match the route, or `respond` immediately; on any sidecar failure apply the failure policy.
-- Response phase: for requests routed by us, stream the body through (never buffered by Envoy),
-- keep a bounded copy (the tail for SSE), and fire an asynchronous POST /complete at the end.
--
-- Envoy facts this relies on (checked against Envoy 1.40):
--   * wrappers such as handle:headers() die when the script yields (body(), httpCall(),
--     bodyChunks()); they are fetched again after every yield.
--   * httpCall(cluster, headers, body, {timeout_ms = n, asynchronous = bool}) returns the answer
--     headers and body (nil when empty). A connect failure comes back as 503 and a timeout as 504,
--     both with a text/plain body made by Envoy; an unknown cluster raises a Lua error.
--   * yielding inside pcall() works (LuaJIT), so every step runs under pcall.
--   * envoy_on_response also runs for respond() and direct responses; they carry no id here.
--
-- Monotonic time: clock_gettime(CLOCK_MONOTONIC) through the LuaJIT FFI, in nanoseconds, written
-- exactly (msgpack uint64). Decoded 64-bit integers become Lua numbers (exact up to 2^53). Without
-- the FFI the times are left out and the sidecar uses its own clock.
--
-- This file, top to bottom: messages (the msgpack decoder for what the sidecar sends; the pieces
-- the filter writes its own messages with: it has no general encoder), configuration (new()), the
-- shared-memory fast path (docs/shm.md), the request phase (decide(), on_request), the response
-- phase (on_response), and which functions the JIT leaves alone.

local type = type
local pairs = pairs
local next = next
local pcall = pcall
local error = error
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local require = require
local str_byte = string.byte
local str_char = string.char
local str_sub = string.sub
local str_find = string.find
local str_lower = string.lower
local str_format = string.format
local str_gsub = string.gsub
local tbl_concat = table.concat
local math_floor = math.floor
local math_huge = math.huge
local math_ldexp = math.ldexp

local tbl_clear
do
    local ok, mod = pcall(require, "table.clear") -- LuaJIT 2.1
    tbl_clear = ok and mod or function(t)
        for k in pairs(t) do
            t[k] = nil
        end
    end
end

local _M = { _VERSION = "0.1.0" }

local METADATA_NAMESPACE = "ipc_router"
_M.METADATA_NAMESPACE = METADATA_NAMESPACE

local MAX_DEPTH = 64
local TWO32 = 4294967296
local TWO52 = 4503599627370496
local TWO53 = 9007199254740992
local TWO64 = 18446744073709551616

-- FFI (LuaJIT): the monotonic clock. Everything works without it.
local ffi
do
    local ok, mod = pcall(require, "ffi")
    if ok then
        ffi = mod
    end
end

local now_ns = function() return nil end
local clock_parts -- () -> seconds, nanoseconds as Lua numbers; nil without the FFI clock
local uint64_t
if ffi then
    uint64_t = ffi.typeof("uint64_t")
    -- cdef can run only once per Lua state (and another script may have declared these already).
    pcall(ffi.cdef, "struct timespec { long tv_sec; long tv_nsec; };")
    pcall(ffi.cdef, "int clock_gettime(int clk_id, struct timespec *tp);")
    local ok_ts, ts = pcall(ffi.new, "struct timespec")
    local ok_fn, clock_gettime = pcall(function() return ffi.C.clock_gettime end)
    if ok_ts and ok_fn and pcall(clock_gettime, 1, ts) then
        local NS_PER_S = uint64_t(1000000000)
        local CLOCK_MONOTONIC = 1
        now_ns = function()
            clock_gettime(CLOCK_MONOTONIC, ts)
            return ts.tv_sec * NS_PER_S + ts.tv_nsec
        end
        clock_parts = function()
            clock_gettime(CLOCK_MONOTONIC, ts)
            return tonumber(ts.tv_sec), tonumber(ts.tv_nsec)
        end
    end
end
_M.now_ns = now_ns

---------------------------------------------------------------------------------------------------
-- messages: the msgpack the filter reads (the sidecar's answers, the fast path's config) and
-- the pieces it writes its own messages with
---------------------------------------------------------------------------------------------------

local decode_value

local function dec_float32(a, b, c, d)
    local sign = a >= 128 and -1 or 1
    local exp = (a % 128) * 2 + math_floor(b / 128)
    local frac = (b % 128) * 65536 + c * 256 + d
    if exp == 255 then
        if frac == 0 then
            return sign * math_huge
        end
        return 0 / 0
    elseif exp == 0 then
        return sign * math_ldexp(frac, -149)
    end
    return sign * math_ldexp(frac + 8388608, exp - 150)
end

local function dec_float64(a, b, c, d, e, f, g, h)
    local sign = a >= 128 and -1 or 1
    local exp = (a % 128) * 16 + math_floor(b / 16)
    local frac = ((((((b % 16) * 256 + c) * 256 + d) * 256 + e) * 256 + f) * 256 + g) * 256 + h
    if exp == 2047 then
        if frac == 0 then
            return sign * math_huge
        end
        return 0 / 0
    elseif exp == 0 then
        return sign * math_ldexp(frac, -1074)
    end
    return sign * math_ldexp(frac + TWO52, exp - 1075)
end

-- Reads an n-byte big-endian unsigned integer at pos (n <= 4).
local function read_uint(s, pos, len, n)
    if pos + n - 1 > len then
        return nil
    end
    local a, b, c, d = str_byte(s, pos, pos + n - 1)
    local v = a
    if n >= 2 then
        v = v * 256 + b
    end
    if n == 4 then
        v = (v * 256 + c) * 256 + d
    end
    return v
end

local function dec_str(s, pos, len, n)
    local last = pos + n - 1
    if last > len then
        return nil, "truncated"
    end
    return last + 1, str_sub(s, pos, last)
end

local function dec_array(s, pos, len, n, depth)
    if n > len - pos + 1 then
        return nil, "truncated"
    end
    local arr = {}
    local v
    for i = 1, n do
        pos, v = decode_value(s, pos, len, depth + 1)
        if not pos then
            return nil, v
        end
        arr[i] = v
    end
    return pos, arr
end

local function dec_map(s, pos, len, n, depth)
    if 2 * n > len - pos + 1 then
        return nil, "truncated"
    end
    local map = {}
    local k, v
    for _ = 1, n do
        pos, k = decode_value(s, pos, len, depth + 1)
        if not pos then
            return nil, k
        end
        if k == nil or k ~= k then
            return nil, "invalid map key"
        end
        pos, v = decode_value(s, pos, len, depth + 1)
        if not pos then
            return nil, v
        end
        map[k] = v
    end
    return pos, map
end

-- Returns next_pos, value; or nil, err.
decode_value = function(s, pos, len, depth)
    if depth > MAX_DEPTH then
        return nil, "nesting too deep"
    end
    if pos > len then
        return nil, "truncated"
    end
    local b = str_byte(s, pos)
    pos = pos + 1
    if b < 0x80 then
        return pos, b
    elseif b >= 0xe0 then
        return pos, b - 256
    elseif b < 0x90 then
        return dec_map(s, pos, len, b - 0x80, depth)
    elseif b < 0xa0 then
        return dec_array(s, pos, len, b - 0x90, depth)
    elseif b < 0xc0 then
        return dec_str(s, pos, len, b - 0xa0)
    elseif b == 0xc0 then
        return pos, nil
    elseif b == 0xc2 then
        return pos, false
    elseif b == 0xc3 then
        return pos, true
    elseif b == 0xc4 or b == 0xd9 then
        local n = read_uint(s, pos, len, 1)
        if not n then
            return nil, "truncated"
        end
        return dec_str(s, pos + 1, len, n)
    elseif b == 0xc5 or b == 0xda then
        local n = read_uint(s, pos, len, 2)
        if not n then
            return nil, "truncated"
        end
        return dec_str(s, pos + 2, len, n)
    elseif b == 0xc6 or b == 0xdb then
        local n = read_uint(s, pos, len, 4)
        if not n then
            return nil, "truncated"
        end
        return dec_str(s, pos + 4, len, n)
    elseif b == 0xca then
        if pos + 3 > len then
            return nil, "truncated"
        end
        return pos + 4, dec_float32(str_byte(s, pos, pos + 3))
    elseif b == 0xcb then
        if pos + 7 > len then
            return nil, "truncated"
        end
        return pos + 8, dec_float64(str_byte(s, pos, pos + 7))
    elseif b == 0xcc or b == 0xd0 then
        local v = read_uint(s, pos, len, 1)
        if not v then
            return nil, "truncated"
        end
        if b == 0xd0 and v >= 128 then
            v = v - 256
        end
        return pos + 1, v
    elseif b == 0xcd or b == 0xd1 then
        local v = read_uint(s, pos, len, 2)
        if not v then
            return nil, "truncated"
        end
        if b == 0xd1 and v >= 32768 then
            v = v - 65536
        end
        return pos + 2, v
    elseif b == 0xce or b == 0xd2 then
        local v = read_uint(s, pos, len, 4)
        if not v then
            return nil, "truncated"
        end
        if b == 0xd2 and v >= 2147483648 then
            v = v - TWO32
        end
        return pos + 4, v
    elseif b == 0xcf or b == 0xd3 then
        if pos + 7 > len then
            return nil, "truncated"
        end
        local hi = read_uint(s, pos, len, 4)
        local lo = read_uint(s, pos + 4, len, 4)
        if b == 0xd3 and hi >= 2147483648 then
            hi = hi - TWO32
        end
        return pos + 8, hi * TWO32 + lo
    elseif b == 0xdc or b == 0xdd then
        local w = b == 0xdc and 2 or 4
        local n = read_uint(s, pos, len, w)
        if not n then
            return nil, "truncated"
        end
        return dec_array(s, pos + w, len, n, depth)
    elseif b == 0xde or b == 0xdf then
        local w = b == 0xde and 2 or 4
        local n = read_uint(s, pos, len, w)
        if not n then
            return nil, "truncated"
        end
        return dec_map(s, pos + w, len, n, depth)
    elseif b == 0xc1 then
        return nil, "invalid byte 0xc1"
    end
    -- 0xc7..0xc9 ext8/16/32, 0xd4..0xd8 fixext
    return nil, "ext types are not supported"
end

-- msgpack string -> value | nil, err  (bin and str both decode to Lua strings)
function _M.msgpack_decode(s)
    if type(s) ~= "string" then
        return nil, "not a string"
    end
    local len = #s
    local pos, v = decode_value(s, 1, len, 1)
    if not pos then
        return nil, v
    end
    if pos <= len then
        return nil, "trailing bytes"
    end
    return v
end

local msgpack_decode = _M.msgpack_decode

local function be16(v)
    return math_floor(v / 256), v % 256
end

local function be32(v)
    local b0 = v % 256
    v = (v - b0) / 256
    local b1 = v % 256
    v = (v - b1) / 256
    local b2 = v % 256
    return (v - b2) / 256, b2, b1, b0
end

local function enc_u64_parts(tag, hi, lo)
    local a, b, c, d = be32(hi)
    local e, f, g, h = be32(lo)
    return str_char(tag, a, b, c, d, e, f, g, h)
end

-- A non-negative integer (a status from Envoy, a generation from the sidecar: nothing else is
-- written) in its smallest msgpack form; anything else is written as 0.
local function enc_uint(v)
    if type(v) ~= "number" or v < 0 or v ~= math_floor(v) or v >= TWO64 then
        return "\0"
    elseif v < 128 then
        return str_char(v)
    elseif v < 256 then
        return str_char(0xcc, v)
    elseif v < 65536 then
        return str_char(0xcd, be16(v))
    elseif v < TWO32 then
        return str_char(0xce, be32(v))
    end
    local hi = math_floor(v / TWO32)
    return enc_u64_parts(0xcf, hi, v - hi * TWO32)
end

-- The current monotonic time as msgpack (a uint64 of nanoseconds, smallest form), nil without the
-- FFI clock. The filter runs interpreted (see the end of this file), where uint64 cdata arithmetic
-- is slow; with Lua numbers, ns = sec * 1e9 + nsec is split exactly into hi * 2^32 + lo (every
-- intermediate stays below 2^53 for any ns < 2^64).
local function now_msgpack()
    if not clock_parts then
        return nil
    end
    local sec, nsec = clock_parts()
    local sec_hi = math_floor(sec / 65536)
    local x = sec_hi * 1e9 -- ns = x * 2^16 + y
    local y = (sec - sec_hi * 65536) * 1e9 + nsec
    local hi = math_floor(x / 65536)
    local lo = (x - hi * 65536) * 65536 + y
    local carry = math_floor(lo / TWO32)
    hi, lo = hi + carry, lo - carry * TWO32
    if hi == 0 then
        return enc_uint(lo)
    end
    return enc_u64_parts(0xcf, hi, lo)
end

local function enc_len(len, fix_base, fix_max, tag16, tag32)
    if len <= fix_max then
        return str_char(fix_base + len)
    elseif len < 65536 then
        return str_char(tag16, be16(len))
    elseif len < TWO32 then
        return str_char(tag32, be32(len))
    end
    return nil, "too long"
end

-- The heads of str and bin values shorter than 256 bytes and of maps of up to 15 entries, made
-- once: a table index is cheaper than a string.char() call (and makes no string), and the filter
-- runs interpreted.
local STR_HEAD, BIN_HEAD, MAP_HEAD = {}, {}, {}
for len = 0, 255 do
    STR_HEAD[len] = len < 32 and str_char(0xa0 + len) or str_char(0xd9, len)
    BIN_HEAD[len] = str_char(0xc4, len)
end
for len = 0, 15 do
    MAP_HEAD[len] = str_char(0x80 + len)
end

-- The head of a str / bin value of `len` bytes; nil, err when too long.
local function str_head(len)
    local head = STR_HEAD[len] or enc_len(len, 0, -1, 0xda, 0xdb)
    if not head then
        return nil, "string too long"
    end
    return head
end

local function bin_head(len)
    local head = BIN_HEAD[len] or enc_len(len, 0, -1, 0xc5, 0xc6)
    if not head then
        return nil, "string too long"
    end
    return head
end

-- The /route, /complete and record bodies are written straight into msgpack, in the smallest forms
-- and keys in a fixed order (the tests decode them in Python), from these pieces.
local K_ID = "\162id"
local K_T = "\161t"
local K_PATH = "\164path"
local K_HEADERS = "\167headers"
local K_BODY = "\164body"
local K_STATUS = "\166status"
local K_T_FIRST = "\167t_first"
local K_T_END = "\165t_end"
local K_STREAM = "\166stream"
local K_TRUNCATED = "\169truncated"
local TRUE, FALSE = "\195", "\194"

-- Scratch space for building a message, shared by all requests of this Lua state: the filter runs
-- one coroutine per request and per response, and they interleave only at yields, so code that
-- fills `buf` and concatenates it without yielding in between has it to itself. Slots past the
-- current message may keep strings of an earlier one alive until overwritten.
local buf = {}
local seen = {} -- request header name -> index in `buf` of its value's head

-- Request headers as a map; repeated headers joined with "," (cookies with "; ").
-- Takes an iterator triple: header_map(pairs(handle:headers())). (The filter itself encodes the
-- headers while iterating them, the same way: see route_body_head().)
local function header_map(iter, state, ctl)
    local map = {}
    for k, v in iter, state, ctl do
        local prev = map[k]
        if prev then
            map[k] = prev .. (k == "cookie" and "; " or ",") .. v
        else
            map[k] = v
        end
    end
    return map
end
_M.header_map = header_map

local new_fast_path -- (conf.shm_path) -> fast path state; defined with the fast path below

---------------------------------------------------------------------------------------------------
-- configuration
---------------------------------------------------------------------------------------------------

local DEFAULTS = {
    cluster = "ipc_router_sidecar",
    authority = "ipc-router",
    timeout_ms = 250,
    complete_timeout_ms = 2000,
    failure_mode = "fail_closed",
    fallback_route = false, -- false: unset
    route_header = "x-ai-eg-selected-route",
    backend_header = "x-ai-eg-selected-backend",
    llm_paths = false, -- false: { "/v1/chat/completions" }
    max_response_body = 1048576,
    stream_tail_bytes = 16384,
    shm_path = false, -- false: no shared-memory fast path (every request asks the sidecar)
    pending_timeout_s = 600, -- how long a fast-path response may take to end and still be recorded
    -- The header naming the Envoy cluster (the sidecar sets it; a client never may).
    cluster_header = "x-ai-eg-selected-cluster",
    -- Added by Envoy on failover routes: the backend that answered. Read, then removed.
    served_header = "x-ai-eg-served-backend",
    -- The token budgets' request headers. Envoy's rate limit filter keys a check by a header's
    -- first value while the charge sees the values joined, so a request that repeats one of them
    -- is refused (400).
    budget_headers = false, -- false: none
    -- The fast path's per-stream token: set on the request (never taken from a client), read back
    -- in the response phase through handle:requestHeaders() (see remember()).
    token_header = "x-ipc-router-rec",
}

local function check_string(conf, key)
    local v = conf[key]
    if type(v) ~= "string" or v == "" then
        error("ipc_router: conf." .. key .. " must be a non-empty string", 3)
    end
end

local function check_int(conf, key, min)
    local v = conf[key]
    if type(v) ~= "number" or v ~= math_floor(v) or v < min or v >= TWO53 then
        error("ipc_router: conf." .. key .. " must be an integer >= " .. min, 3)
    end
end

local mt = {}
mt.__index = mt

-- conf (all optional) -> filter object with :on_request(handle) and :on_response(handle).
function _M.new(conf)
    if conf ~= nil and type(conf) ~= "table" then
        error("ipc_router: conf must be a table", 2)
    end
    local c = {}
    for k, v in pairs(conf or {}) do
        if DEFAULTS[k] == nil then
            error("ipc_router: unknown conf key " .. tostring(k), 2)
        end
        c[k] = v
    end
    for k, v in pairs(DEFAULTS) do
        if c[k] == nil and v ~= false then
            c[k] = v
        end
    end
    check_string(c, "cluster")
    check_string(c, "authority")
    check_string(c, "route_header")
    check_string(c, "backend_header")
    check_string(c, "cluster_header")
    check_string(c, "served_header")
    check_string(c, "token_header")
    check_int(c, "timeout_ms", 1)
    check_int(c, "complete_timeout_ms", 0)
    check_int(c, "max_response_body", 0)
    check_int(c, "stream_tail_bytes", 0)
    if type(c.pending_timeout_s) ~= "number" or c.pending_timeout_s <= 0 then
        error("ipc_router: conf.pending_timeout_s must be a positive number", 2)
    end
    if c.failure_mode ~= "fail_closed" and c.failure_mode ~= "fail_open" then
        error('ipc_router: conf.failure_mode must be "fail_closed" or "fail_open"', 2)
    end
    if c.failure_mode == "fail_open" then
        check_string(c, "fallback_route")
    elseif c.fallback_route ~= nil and type(c.fallback_route) ~= "string" then
        error("ipc_router: conf.fallback_route must be a string", 2)
    end
    c.route_header = str_lower(c.route_header)
    c.backend_header = str_lower(c.backend_header)
    c.cluster_header = str_lower(c.cluster_header)
    c.served_header = str_lower(c.served_header)
    c.token_header = str_lower(c.token_header)
    if c.shm_path ~= nil and type(c.shm_path) ~= "string" then
        error("ipc_router: conf.shm_path must be a string (the sidecar's segment file)", 2)
    end

    local budget_headers = {}
    if c.budget_headers ~= nil then
        if type(c.budget_headers) ~= "table" then
            error("ipc_router: conf.budget_headers must be a list of strings", 2)
        end
        for i, h in ipairs(c.budget_headers) do
            if type(h) ~= "string" or h == "" then
                error("ipc_router: conf.budget_headers must be a list of strings", 2)
            end
            budget_headers[i] = str_lower(h)
        end
    end

    local paths = {}
    local llm_paths = c.llm_paths or { "/v1/chat/completions" }
    if type(llm_paths) ~= "table" then
        error("ipc_router: conf.llm_paths must be a list of strings", 2)
    end
    for _, p in pairs(llm_paths) do
        if type(p) ~= "string" then
            error("ipc_router: conf.llm_paths must be a list of strings", 2)
        end
        paths[p] = true
    end

    -- Immutable tables handed to every httpCall (Envoy only reads them).
    local self = {
        conf = c,
        paths = paths,
        budget_headers = budget_headers,
        route_headers = {
            [":method"] = "POST",
            [":path"] = "/route",
            [":authority"] = c.authority,
            ["content-type"] = "application/msgpack",
        },
        route_options = { timeout_ms = c.timeout_ms },
        complete_headers = {
            [":method"] = "POST",
            [":path"] = "/complete",
            [":authority"] = c.authority,
            ["content-type"] = "application/msgpack",
        },
        complete_options = { asynchronous = true, timeout_ms = c.complete_timeout_ms },
        record_headers = {
            [":method"] = "POST",
            [":path"] = "/record",
            [":authority"] = c.authority,
            ["content-type"] = "application/msgpack",
        },
    }
    if c.shm_path then
        self.fast = new_fast_path(c.shm_path, c.pending_timeout_s)
    end
    return setmetatable(self, mt)
end

---------------------------------------------------------------------------------------------------
-- shared-memory fast path: the sidecar's published config, the per-worker backend pick, keys and
-- completion records (docs/shm.md). The segment itself is ipc_router_shm's business.
---------------------------------------------------------------------------------------------------

local RETRY_OPEN_S = 1 -- a missing, stopped or bad segment is opened again at most this often

local function now_s()
    if clock_parts then
        local sec, nsec = clock_parts()
        return sec + nsec * 1e-9
    end
    return 0
end

local function gcd(a, b)
    while b > 0 do
        a, b = b, a % b
    end
    return a
end

-- The sidecar's WeightedPicker, per Lua state: a smooth weighted round-robin cycle (nginx's) of
-- backend names for small integer weights, a weighted random pick otherwise; weight 0 never.
local MAX_CYCLE = 4096
local function new_picker(backends)
    local names, weights = {}, {}
    for _, b in pairs(backends) do
        local w = b.weight
        if type(b.name) ~= "string" or type(w) ~= "number" or w ~= math_floor(w) or w < 0 then
            return nil, "bad backend"
        end
        if w > 0 then
            names[#names + 1], weights[#weights + 1] = b.name, w
        end
    end
    local n = #names
    if n == 0 then
        return { cycle = nil }
    elseif n == 1 then
        return { cycle = { names[1] }, pos = 0, len = 1 }
    end
    local g = weights[1]
    for i = 2, n do
        g = gcd(g, weights[i])
    end
    local total = 0
    for i = 1, n do
        weights[i] = weights[i] / g
        total = total + weights[i]
    end
    if total > MAX_CYCLE then
        return { names = names, weights = weights, total = total }
    end
    local cycle, current = {}, {}
    for i = 1, n do
        current[i] = 0
    end
    for k = 1, total do
        local best = 1
        for i = 1, n do
            current[i] = current[i] + weights[i]
            if current[i] > current[best] then
                best = i
            end
        end
        current[best] = current[best] - total
        cycle[k] = names[best]
    end
    return { cycle = cycle, pos = 0, len = total }
end

local math_random = math.random
local function pick(picker)
    local cycle = picker.cycle
    if cycle then
        local pos = picker.pos % picker.len + 1
        picker.pos = pos
        return cycle[pos]
    end
    if not picker.names then
        return nil
    end
    local r = math_random() * picker.total
    local names, weights = picker.names, picker.weights
    for i = 1, #names do
        r = r - weights[i]
        if r < 0 then
            return names[i]
        end
    end
    return names[#names]
end
_M.new_picker, _M.pick = new_picker, pick

local function str_list(t)
    if type(t) ~= "table" then
        return nil
    end
    local out = {}
    for i = 1, #t do
        if type(t[i]) ~= "string" then
            return nil
        end
        out[i] = t[i]
    end
    return out
end

-- The decoded config blob -> what a request needs, or nil, err. Built once per generation.
local function fast_config(blob)
    if type(blob) ~= "table" or type(blob.rules) ~= "table" then
        return nil, "bad config blob"
    end
    local key_headers = str_list(blob.key_headers)
    local model_header, route_header = blob.model_header, blob.route_header
    local backend_header, path_header = blob.backend_header, blob.path_header
    if not key_headers or type(model_header) ~= "string" or type(route_header) ~= "string"
        or type(backend_header) ~= "string" or type(path_header) ~= "string" then
        return nil, "bad config blob"
    end
    local record_headers = blob.record_headers
    if record_headers ~= true then
        record_headers = str_list(record_headers)
        if not record_headers then
            return nil, "bad config blob"
        end
    end
    -- Envoy joins repeated headers with "," where the sidecar joins cookies with "; ": a key on the
    -- cookie header could not be rebuilt exactly here, so such a router always asks the sidecar.
    local cacheable = blob.cacheable == true
    for i = 1, #key_headers do
        if key_headers[i] == "cookie" then
            cacheable = false
        end
    end
    local rules = {}
    for i = 1, #blob.rules do
        local r = blob.rules[i]
        if type(r) ~= "table" or type(r.name) ~= "string" or type(r.backends) ~= "table" then
            return nil, "bad config blob"
        end
        local picker, err = new_picker(r.backends)
        if not picker then
            return nil, err
        end
        local clusters = {}
        for _, b in pairs(r.backends) do
            if type(b.cluster) == "string" then
                clusters[b.name] = b.cluster
            end
        end
        rules[i] = { name = r.name, picker = picker, clusters = clusters }
    end
    -- The usual key (the default router's: the model header alone) and an empty record_headers list
    -- are common enough to skip the general loops for them (fast_key, record_headers_map).
    local key_is_model = #key_headers == 1 and key_headers[1] == model_header
    return {
        key_is_model = key_is_model,
        gen_mp = enc_uint(blob.generation or 0), -- the record's "gen" value, encoded once
        cacheable = cacheable,
        key_headers = key_headers,
        model_header = model_header,
        route_header = route_header,
        backend_header = backend_header,
        path_header = path_header,
        cluster_header = type(blob.cluster_header) == "string" and blob.cluster_header or nil,
        record_headers = record_headers,
        rules = rules,
        generation = blob.generation,
    }
end
_M.fast_config = fast_config

function new_fast_path(path, pending_s)
    local fast = {
        path = path,
        pending_s = pending_s,
        seg = nil, -- the mapped segment (ipc_router_shm), nil until opened
        cfg = nil, -- fast_config() of its current generation
        retry_at = 0,
        last_err = nil,
        -- Per-request state between request and response phase, by token (a string kept in the
        -- request header conf.token_header, see remember()). Two tables swapped every
        -- conf.pending_timeout_s (600 s, as the sidecar's --request-ttl): a response may end that
        -- long after its request; nothing outlives two swaps, and what a swap drops is reported as
        -- incomplete.
        pending = {},
        pending_old = {},
        swap_at = 0,
        token = 0,
    }
    if not ffi or not clock_parts or not jit or jit.arch ~= "x64" then
        -- The reader's memory ordering is proven for x86-64 only (docs/shm.md).
        fast.disabled = "shared memory needs LuaJIT's FFI on x86-64"
    else
        local ok, shm = pcall(require, "ipc_router_shm")
        local ok2, json = pcall(require, "ipc_router_json")
        if not ok or not ok2 then
            fast.disabled = "modules ipc_router_shm / ipc_router_json not found"
        else
            fast.shm, fast.json = shm, json
        end
    end
    return fast
end

-- The fast path's config for this request, or nil (then the request asks the sidecar as before),
-- plus an error to log when something changed for the worse.
local function fast_refresh(fast)
    if fast.disabled then
        local err = fast.disabled
        fast.disabled = true
        return nil, err ~= true and err or nil
    end
    local seg = fast.seg
    if not seg then
        local t = now_s()
        if t < fast.retry_at then
            return nil
        end
        fast.retry_at = t + RETRY_OPEN_S
        local err
        seg, err = fast.shm.open(fast.path)
        if not seg then
            if err == fast.last_err then
                return nil
            end
            fast.last_err = err
            return nil, "shared memory off: " .. tostring(err)
        end
        fast.seg, fast.cfg = seg, nil
    end
    local changed, err = seg:refresh()
    if changed == nil then
        -- Unmap it now, not when the Lua GC gets to it: a retired segment (the sidecar restarted)
        -- stays allocated on its tmpfs while mapped, and the new sidecar needs that room.
        seg:close()
        fast.seg, fast.cfg = nil, nil
        fast.retry_at = now_s() + RETRY_OPEN_S
        fast.last_err = err
        return nil, "shared memory off: " .. tostring(err)
    end
    if changed or fast.cfg == nil then
        local cfg, cerr = fast_config(msgpack_decode(seg.blob or ""))
        fast.cfg = cfg or false -- false: a bad blob; the socket path until the next one
        if not cfg then
            return nil, "shared memory config: " .. tostring(cerr)
        end
        fast.last_err = nil
    end
    return fast.cfg or nil
end

-- The cache key of a request: for each key header, "\1" when absent, else "\0" .. value, the
-- model header's value being the body's model (as the sidecar sets it). nil: not cacheable.
local function fast_key(cfg, headers, model)
    if cfg.key_is_model then
        return "\0" .. model
    end
    local parts = {}
    local key_headers = cfg.key_headers
    for i = 1, #key_headers do
        local name = key_headers[i]
        local v
        if name == cfg.model_header then
            v = model
        else
            v = headers:get(name)
        end
        parts[i] = v and ("\0" .. v) or "\1"
    end
    return tbl_concat(parts)
end

-- The request headers a completion record carries, as a msgpack map.
local function record_headers_map(cfg, headers)
    local names = cfg.record_headers
    if names ~= true and #names == 0 then
        return MAP_HEAD[0]
    end
    local map
    if names == true then
        map = header_map(pairs(headers))
    else
        map = {}
        for i = 1, #names do
            local v = headers:get(names[i])
            if v then
                map[names[i]] = v
            end
        end
    end
    local parts, n, count = {}, 1, 0
    for k, v in pairs(map) do
        count = count + 1
        parts[n + 1], parts[n + 2], parts[n + 3], parts[n + 4] = str_head(#k), k, str_head(#v), v
        n = n + 4
    end
    parts[1] = MAP_HEAD[count] or enc_len(count, 0x80, 15, 0xde, 0xdf)
    return tbl_concat(parts, "", 1, n)
end

local K_MODEL = "\165model"
local K_RULE = "\164rule"
local K_GEN = "\163gen"
local K_BACKEND = "\167backend"
local K_RING = "\164ring"
local K_SERVED = "\166served"

-- The request half of a completion record: msgpack map entries (without the map head) and their
-- count. `t` is already msgpack.
local function record_head(cfg, headers_map, t, model, rule, backend)
    -- (t, model, rule, gen, headers [, backend]): one concatenation, no table
    local n, last = 5, ""
    if backend then
        n, last = 6, K_BACKEND .. str_head(#backend) .. backend
    end
    return { n = n, pairs = K_T .. t .. K_MODEL .. str_head(#model) .. model .. K_RULE
        .. str_head(#rule) .. rule .. K_GEN .. cfg.gen_mp .. K_HEADERS .. headers_map .. last }
end

-- A whole record: the request half plus what the response phase knows.
local function record_body(head, status, t_first, t_end, stream, kept, truncated, served)
    local body_head, err = bin_head(#kept)
    if not body_head then
        return nil, err
    end
    local n = head.n + 5
    local first, last = "", ""
    if t_first then
        first = K_T_FIRST .. t_first
        n = n + 1
    end
    if served then
        last = K_SERVED .. str_head(#served) .. served
        n = n + 1
    end
    -- One concatenation (plus the optional pairs): no table, the record made once.
    return (MAP_HEAD[n] or enc_len(n, 0x80, 15, 0xde, 0xdf)) .. head.pairs .. K_T_END .. t_end
        .. K_STATUS .. enc_uint(status or 0) .. K_STREAM .. (stream and TRUE or FALSE)
        .. K_TRUNCATED .. (truncated and TRUE or FALSE) .. first .. last .. K_BODY .. body_head
        .. kept
end
_M.record_body, _M.record_head = record_body, record_head

-- The record of a request whose response phase never ran (the client or the backend reset the
-- stream): the sidecar counts it as expired, as the socket path counts a /complete that never came.
local K_INCOMPLETE = "\170incomplete"
local function report_incomplete(fast, heads)
    local seg = fast.seg
    if not seg or next(heads) == nil then
        return
    end
    local tail = K_T_END .. (now_msgpack() or "\0") .. K_STATUS .. "\0" .. K_INCOMPLETE .. TRUE
    for _, head in pairs(heads) do
        local n = head.n + 3
        seg:write((MAP_HEAD[n] or enc_len(n, 0x80, 15, 0xde, 0xdf)) .. head.pairs .. tail)
    end
end

-- Keeps a record head until the response phase; returns the token to store in the stream. The
-- token goes into a request header (conf.token_header), which the response phase reads back with
-- handle:requestHeaders(): ~2 µs of Envoy CPU less per request than the stream's dynamic metadata
-- (a Struct set, two wrappers, and a Struct made into a table on the way back; bench/README.md).
-- Safe because the header's value is always ours: on_request removes one a client (or an
-- upstream ipc_router) sent before anything else, and the tokens count up per Lua state, which
-- runs both phases of a stream. The backend sees the header, as it sees the route headers.
local function remember(fast, head)
    local t = now_s()
    if t >= fast.swap_at then
        local dropped = fast.pending_old
        fast.pending_old, fast.pending = fast.pending, {}
        fast.swap_at = t + fast.pending_s
        report_incomplete(fast, dropped)
    end
    local n = fast.token + 1
    fast.token = n
    local token = tostring(n)
    fast.pending[token] = head
    return token
end

local function peek(fast, token)
    return fast.pending[token] or fast.pending_old[token]
end

local function forget(fast, token)
    fast.pending[token], fast.pending_old[token] = nil, nil
end


---------------------------------------------------------------------------------------------------
-- request phase
---------------------------------------------------------------------------------------------------

-- decisions (pure): the sidecar's answer, or its failure, as an action

local function json_escape(s)
    return (str_gsub(s, '[%c"\\]', function(c)
        return str_format("\\u%04x", str_byte(c))
    end))
end

local function is_str_map(t)
    if type(t) ~= "table" then
        return false
    end
    for k, v in pairs(t) do
        if type(k) ~= "string" or type(v) ~= "string" then
            return false
        end
    end
    return true
end

-- The action for a sidecar failure: a 503 JSON answer (fail_closed) or the fallback route.
function _M.failure_action(conf, reason)
    if conf.failure_mode == "fail_open" then
        return { action = "fallback", route = conf.fallback_route, reason = reason }
    end
    return {
        action = "respond",
        status = 503,
        headers = { [":status"] = "503", ["content-type"] = "application/json" },
        body = '{"error":{"message":"routing sidecar unavailable: ' .. json_escape(reason)
            .. '","type":"server_error","code":"sidecar_unavailable"}}',
        reason = reason,
    }
end
local failure_action = _M.failure_action

-- The /route answer (status as a string or number, raw body or nil) -> an action table:
--   { action = "set", headers = {..}, id = str|nil }
--   { action = "respond", status = n, headers = {..}, body = str }
--   { action = "fallback", route = str, reason = str }     (fail_open)
-- Failures carry `reason`, one of a fixed set of words (plus a status number).
function _M.decide(status, body, conf)
    status = tonumber(status)
    if status ~= 200 then
        local reason
        if status == 504 then
            reason = "timeout"
        elseif status == 503 then
            reason = "unreachable"
        elseif status then
            reason = "status " .. status
        else
            reason = "no answer"
        end
        return failure_action(conf, reason)
    end
    local answer = msgpack_decode(body or "")
    if type(answer) ~= "table" then
        return failure_action(conf, "bad answer")
    end
    local set, respond = answer.set, answer.respond
    if set ~= nil and respond == nil then
        if not is_str_map(set) then
            return failure_action(conf, "bad answer")
        end
        local id = answer.id
        return { action = "set", headers = set, id = type(id) == "string" and id or nil }
    elseif respond ~= nil and set == nil and type(respond) == "table" then
        local rstatus, rheaders, rbody = respond.status, respond.headers, respond.body
        if type(rstatus) ~= "number" or rstatus ~= math_floor(rstatus) or rstatus < 200
            or rstatus > 599 or (rheaders ~= nil and not is_str_map(rheaders))
            or (rbody ~= nil and type(rbody) ~= "string") then
            return failure_action(conf, "bad answer")
        end
        local out = {}
        if rheaders then
            for k, v in pairs(rheaders) do
                if str_byte(k, 1) ~= 58 then -- drop pseudo-headers; ":status" is ours
                    out[k] = v
                end
            end
        end
        out[":status"] = tostring(rstatus)
        return { action = "respond", status = rstatus, headers = out, body = rbody or "" }
    end
    return failure_action(conf, "bad answer")
end
local decide = _M.decide

-- Applies an action from decide()/failure_action(). May not return (respond() yields for good).
local function apply(self, handle, action)
    local kind = action.action
    if action.reason then
        handle:logWarn("ipc_router: routing sidecar unavailable: " .. action.reason
            .. (kind == "fallback" and " (fail_open)" or " (fail_closed)"))
    end
    if kind == "set" then
        local headers = handle:headers()
        for k, v in pairs(action.headers) do
            headers:replace(k, v)
        end
        if action.token then -- the fast path's record head, kept until the response phase
            headers:replace(self.conf.token_header, action.token)
        end
        handle:clearRouteCache()
        if action.id and not action.token then
            handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, "id", action.id)
        end
    elseif kind == "respond" then
        handle:respond(action.headers, action.body)
    elseif kind == "fallback" then
        handle:headers():replace(self.conf.route_header, action.route)
        handle:clearRouteCache()
    end
end

-- The /route body up to the request body's bytes: "t" (`t`, already msgpack, or nil), "path",
-- "headers", "id" (x-request-id) and the "body" key. The headers are encoded while iterated,
-- without a header_map() table or a second pass. Must not yield (see `buf`).
local function route_body_head(headers, path, t, ring)
    tbl_clear(seen) -- here rather than after: an error midway must not leave stale entries
    local keys = 3 -- path, headers, body
    local n = 1 -- buf[1]: the map head, once `keys` is known
    if t then
        keys = keys + 1
        buf[2], buf[3] = K_T, t
        n = 3
    end
    if ring then
        keys = keys + 1
        buf[n + 1], buf[n + 2] = K_RING, TRUE
        n = n + 2
    end
    buf[n + 1], buf[n + 2], buf[n + 3] = K_PATH, str_head(#path), path
    buf[n + 4] = K_HEADERS
    local map_at = n + 5 -- the headers' map head, once their count is known
    n = n + 5
    local count = 0
    for k, v in pairs(headers) do
        local at = seen[k]
        if at then -- a repeated header: joined like header_map() does
            v = buf[at + 1] .. (k == "cookie" and "; " or ",") .. v
            buf[at], buf[at + 1] = str_head(#v), v
        else
            count = count + 1
            buf[n + 1] = STR_HEAD[#k] or str_head(#k)
            buf[n + 2] = k
            buf[n + 3] = STR_HEAD[#v] or str_head(#v)
            buf[n + 4] = v
            seen[k] = n + 3
            n = n + 4
        end
    end
    buf[map_at] = MAP_HEAD[count] or enc_len(count, 0x80, 15, 0xde, 0xdf)
    local id_at = seen["x-request-id"]
    if id_at then
        keys = keys + 1
        buf[n + 1], buf[n + 2], buf[n + 3] = K_ID, buf[id_at], buf[id_at + 1]
        n = n + 3
    end
    if count > 64 then
        seen = {} -- do not keep clearing a big table for every request
    end
    buf[1] = MAP_HEAD[keys]
    buf[n + 1] = K_BODY
    return tbl_concat(buf, "", 1, n + 1)
end

local function route(self, handle, headers, path)
    -- Before the body() yield: `headers` dies with it.
    local head = route_body_head(headers, path, now_msgpack())
    local body = handle:body()
    local raw = body and body:getBytes(0, body:length()) or ""
    local raw_head, err = bin_head(#raw)
    if not raw_head then
        return failure_action(self.conf, "encode error"), err
    end
    local payload = head .. raw_head .. raw
    local answer_headers, answer_body =
        handle:httpCall(self.conf.cluster, self.route_headers, payload, self.route_options)
    return decide(answer_headers and answer_headers[":status"], answer_body, self.conf)
end

-- The fast path's request phase: the model from the body, the key, the shared-memory cache; on a
-- hit the headers are set here, on a miss the sidecar decides (and fills the cache). Either way
-- the completion will be a record (see on_response). Returns an action like route() does.
local function route_fast(self, handle, cfg, path)
    local fast = self.fast
    local t = now_msgpack()
    local body = handle:body()
    local raw = body and body:getBytes(0, body:length()) or ""
    local headers = handle:headers() -- again: the wrapper died with the body() yield
    -- body() yielded: meanwhile other requests of this worker may have refreshed the segment to a
    -- new generation (lookup() then compares slots with that one) or dropped it. A rule index
    -- must be read with the rules of the generation it was found in: take both as they are now.
    local seg, now = fast.seg, fast.cfg
    local model = seg and now and now.cacheable and fast.json.top_level_string(raw, "model")
    if model and model ~= "" then
        cfg = now
        local index = seg:lookup(fast_key(cfg, headers, model))
        local rule = index and cfg.rules[index + 1]
        if rule then
            local backend = pick(rule.picker)
            headers:replace(cfg.model_header, model)
            headers:replace(cfg.route_header, rule.name)
            if backend then
                headers:replace(cfg.backend_header, backend)
                local cluster = cfg.cluster_header and rule.clusters[backend]
                if cluster then
                    headers:replace(cfg.cluster_header, cluster)
                end
            end
            headers:replace(cfg.path_header, path)
            handle:clearRouteCache()
            local rec_headers = record_headers_map(cfg, headers)
            local rec = record_head(cfg, rec_headers, t, model, rule.name, backend)
            headers:replace(self.conf.token_header, remember(fast, rec))
            return nil
        end
    end
    -- A miss: what the socket path sends, flagged so that the sidecar keeps no state for it.
    local rec_headers = record_headers_map(cfg, headers)
    local head = route_body_head(headers, path, t, true)
    local raw_head, err = bin_head(#raw)
    if not raw_head then
        return failure_action(self.conf, "encode error"), err
    end
    local answer_headers, answer_body = handle:httpCall(self.conf.cluster, self.route_headers,
        head .. raw_head .. raw, self.route_options)
    local action = decide(answer_headers and answer_headers[":status"], answer_body, self.conf)
    if action.action == "set" then
        local set = action.headers
        local rule, m = set[cfg.route_header], set[cfg.model_header]
        if rule and m then
            local rec = record_head(cfg, rec_headers, t, m, rule, set[cfg.backend_header])
            action.token = remember(fast, rec)
        end
    end
    return action
end

function mt:on_request(handle)
    local conf = self.conf
    local headers = handle:headers()
    -- A client must never pick its own backend.
    if headers:get(conf.route_header) then
        headers:remove(conf.route_header)
    end
    if headers:get(conf.backend_header) then
        headers:remove(conf.backend_header)
    end
    if headers:get(conf.cluster_header) then
        headers:remove(conf.cluster_header)
    end
    local fast = self.fast
    if fast and headers:get(conf.token_header) then -- only ours may name a kept record
        headers:remove(conf.token_header)
    end
    local path = headers:get(":path")
    if not path then
        return
    end
    local q = str_find(path, "?", 1, true)
    if not self.paths[q and str_sub(path, 1, q - 1) or path] then
        return
    end
    local budget_headers = self.budget_headers
    for i = 1, #budget_headers do
        local name = budget_headers[i]
        if headers:getNumValues(name) > 1 then
            return apply(self, handle, {
                action = "respond",
                headers = { [":status"] = "400", ["content-type"] = "application/json" },
                body = '{"error":{"message":"the ' .. json_escape(name)
                    .. ' header is repeated: a token budget is keyed by one value",'
                    .. '"type":"invalid_request_error","code":"repeated_header"}}',
            })
        end
    end
    local ok, action, err
    local cfg
    if fast then
        ok, cfg, err = pcall(fast_refresh, fast)
        if not ok then
            cfg, err = nil, cfg
        end
        if err then
            handle:logWarn("ipc_router: " .. tostring(err))
        end
    end
    if cfg then
        ok, action, err = pcall(route_fast, self, handle, cfg, path)
        if ok and action == nil then
            return -- a cache hit: done
        end
    else
        ok, action, err = pcall(route, self, handle, headers, path)
    end
    if not ok then
        err = action
        action = failure_action(conf, "internal error")
    end
    if err then
        handle:logErr("ipc_router: " .. tostring(err))
    end
    ok, err = pcall(apply, self, handle, action)
    if not ok then
        handle:logErr("ipc_router: " .. tostring(err))
        if action.action ~= "respond" or action.reason == nil then
            apply(self, handle, failure_action(conf, "internal error"))
        end
    end
end

---------------------------------------------------------------------------------------------------
-- response phase
---------------------------------------------------------------------------------------------------

-- The /complete body; t_first and t_end are already msgpack (or nil). nil, err when `kept` is
-- too long.
local function complete_body(id, status, t_first, t_end, stream, kept, truncated, served)
    local body_head, err = bin_head(#kept)
    if not body_head then
        return nil, err
    end
    -- Must not yield until the concat (see `buf`).
    local keys = 4 -- id, stream, truncated, body
    buf[2], buf[3], buf[4] = K_ID, str_head(#id), id
    local n = 4
    if status then
        keys = keys + 1
        buf[n + 1], buf[n + 2] = K_STATUS, enc_uint(status)
        n = n + 2
    end
    if t_first then
        keys = keys + 1
        buf[n + 1], buf[n + 2] = K_T_FIRST, t_first
        n = n + 2
    end
    if t_end then
        keys = keys + 1
        buf[n + 1], buf[n + 2] = K_T_END, t_end
        n = n + 2
    end
    if served then
        keys = keys + 1
        buf[n + 1], buf[n + 2], buf[n + 3] = K_SERVED, str_head(#served), served
        n = n + 3
    end
    buf[1] = MAP_HEAD[keys]
    buf[n + 1], buf[n + 2] = K_STREAM, stream and TRUE or FALSE
    buf[n + 3], buf[n + 4] = K_TRUNCATED, truncated and TRUE or FALSE
    buf[n + 5], buf[n + 6] = K_BODY, body_head
    -- The body, possibly large, is concatenated outside `buf`: not kept alive by it.
    return tbl_concat(buf, "", 1, n + 6) .. kept
end

function mt:on_response(handle)
    local conf = self.conf
    local fast = self.fast
    local id, record, token
    if fast then
        token = handle:requestHeaders():get(conf.token_header)
    end
    if token then
        -- Looked at now, forgotten only once the record is built: a stream reset while the body
        -- is read ends this coroutine for good, and the request stays to be reported incomplete.
        record = peek(fast, token)
        if not record then
            return -- forgotten (a response after minutes): nothing to add to
        end
    else -- the socket path: the sidecar's id in the stream's dynamic metadata
        local md = handle:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
        id = md and md.id
        if type(id) ~= "string" then
            return
        end
    end
    local headers = handle:headers()
    local status = tonumber(headers:get(":status"))
    local served = headers:get(conf.served_header) -- a failover route: who answered
    if served then
        headers:remove(conf.served_header)
        if served == "" then
            served = nil
        end
    end
    local ctype = headers:get("content-type")
    local stream = ctype ~= nil and str_find(str_lower(ctype), "text/event-stream", 1, true) == 1
    local limit = stream and conf.stream_tail_bytes or conf.max_response_body

    -- Keep the last `limit` bytes: parts[first..n], `total` bytes in them.
    local parts, first, n, total = {}, 1, 0, 0
    local truncated = false
    local t_first
    for chunk in handle:bodyChunks() do
        local len = chunk:length()
        if len > 0 then
            if not t_first then
                t_first = now_msgpack()
            end
            if len >= limit then -- this chunk's end replaces everything kept so far
                truncated = truncated or len > limit or total > 0
                for i = first, n do
                    parts[i] = nil
                end
                first, n, total = 1, 0, 0
                if limit > 0 then
                    parts[1], n, total = chunk:getBytes(len - limit, limit), 1, limit
                end
            else
                n = n + 1
                parts[n] = chunk:getBytes(0, len)
                total = total + len
                while total - #parts[first] >= limit do -- drop parts wholly before the tail
                    total = total - #parts[first]
                    parts[first] = nil
                    first = first + 1
                    truncated = true
                end
                if first > 32 then -- move the queue back to the table's start (SSE: many chunks)
                    for i = first, n do
                        parts[i - first + 1], parts[i] = parts[i], nil
                    end
                    first, n = 1, n - first + 1
                end
            end
        end
    end
    local t_end = now_msgpack()

    local kept = ""
    if n == first then
        kept = parts[n] -- a body in one chunk (the usual non-streaming answer): no copy
    elseif n > first then
        kept = tbl_concat(parts, "", first, n)
    end
    if #kept > limit then
        kept = str_sub(kept, -limit)
        truncated = true
    end

    if record then
        forget(fast, token)
        local payload, err = record_body(record, status, t_first, t_end, stream, kept, truncated,
            served)
        local seg = self.fast.seg
        if payload and seg then
            local ok, werr = seg:write(payload)
            if ok then
                return
            end
            err = werr
        end
        if payload then -- no ring took it: the same record over the socket, never lost quietly
            local ok, cerr = pcall(handle.httpCall, handle, conf.cluster, self.record_headers,
                payload, self.complete_options)
            if ok then
                return
            end
            err = cerr
        end
        handle:logWarn("ipc_router: completion record not sent: " .. tostring(err))
        return
    end
    local payload, err = complete_body(id, status, t_first, t_end, stream, kept, truncated, served)
    if payload then
        local ok
        ok, err = pcall(handle.httpCall, handle, conf.cluster, self.complete_headers, payload,
            self.complete_options)
        if ok then
            return
        end
    end
    handle:logWarn("ipc_router: /complete not sent: " .. tostring(err))
end

---------------------------------------------------------------------------------------------------
-- JIT
---------------------------------------------------------------------------------------------------

-- The functions that call into Envoy run interpreted. Measured in Envoy 1.40 (Envoy's CPU time
-- per request, bench/e2e_latency.py's lua+instant setup): compiled, LuaJIT's traces around
-- Envoy's C functions (headers' pairs() iterator above all) cost far more than they save,
-- ~30 µs per request for iterating 10 headers; interpreted, the same loop takes ~5 µs. All in
-- all, interpreted saves ~40 µs of Envoy CPU per request (compiled on_response alone: +15 µs).
-- The pure Lua parts (the msgpack decoder, decide()) stay compiled.
if jit then
    for _, f in pairs({ route_body_head, route, route_fast, apply, mt.on_request, mt.on_response,
        fast_refresh, fast_key, record_headers_map, remember }) do
        jit.off(f)
    end
end

return _M
