-- luacheck configuration for ipc_router/lua/ (run: luacheck ipc_router/lua/)
-- ipc_router.lua is a module: it reads only the LuaJIT standard library and defines no globals
-- (envoy_on_request/envoy_on_response are defined by the bootstrap's loader, not here).
std = "luajit"
max_line_length = 100
allow_defined = false
allow_defined_top = false
globals = {}
read_globals = {}
