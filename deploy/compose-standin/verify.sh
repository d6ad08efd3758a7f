#!/bin/bash
# The checks of docs/deploy.md "Verified with a Docker engine", from the repository root, with the stand-in
# images of build.sh (offline verification only; see README.md). Leaves the stack running: `docker compose down -v`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
stats() { docker compose exec -T sidecar python - < "$here/stats.py"; }
chat() { # model [x-tenant] [stream]: prints "model tenant stream status x-mock-backend"
    local h=() s=false
    [ -n "${2:-}" ] && h=(-H "x-tenant: $2")
    [ -n "${3:-}" ] && s=true
    curl -s -o /dev/null -D - localhost:10000/v1/chat/completions -H 'content-type: application/json' "${h[@]}" \
        -d "{\"model\": \"$1\", \"stream\": $s, \"stream_options\": {\"include_usage\": $s},
             \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}" \
        | tr -d '\r' | awk -v m="$1" -v t="${2:--}" -v s="$s" \
            '/^HTTP/{c=$2} /^x-mock-backend/{b=$2} END{print m, "tenant=" t, "stream=" s, c, b}'
}
traffic() { # $1 rounds of 5 concurrent requests, then one unknown model; counts by route
    for _ in $(seq "$1"); do
        chat llama3.3 & chat gpt-4o-mini & chat mistral-7b & chat llama3.3 premium & chat llama3.3 "" 1 & wait
    done | sort | uniq -c
    chat unknown-model
}
summary() {
    stats | python3 -c 'import json, sys; d = json.load(sys.stdin); f = d["fast_path"] or {}
print("route calls:", d["requests"].get("route"), "| records:", d["records"], "| expired:", d["expired"],
      "| usage_missing:", d["usage_missing"], "| plugin_errors:", d["plugin_errors"], "| fallbacks:", d["fallbacks"])
print("fast_path:", {k: f.get(k) for k in ("path", "drained", "drops", "corrupt", "claimed")})'
}

docker compose down -v
docker compose up --build -d --wait
echo "== traffic"; traffic "${ROUNDS:-20}"
echo "== sidecar /stats"; summary
for svc in sidecar envoy; do
    echo "== $svc: the socket and the segment"
    docker compose exec -T "$svc" sh -c 'ls -ln /run/ipc-router/sidecar.sock /run/ipc-router-shm/*.shm;
        ls -ldn /run/ipc-router /run/ipc-router-shm; grep " /run/ipc-router" /proc/mounts'
done
echo "== envoy's process: its user, and how it maps the segment"
docker compose exec -T -u envoy envoy sh -c 'grep -E "^(Uid|Gid|Groups)" /proc/1/status; grep "\.shm" /proc/1/maps'
curl -s localhost:9901/server_info | python3 -c 'import json, sys; d = json.load(sys.stdin)
print("envoy", d["version"].split("/")[1], "workers:", d["command_line_options"]["concurrency"])'
echo "== three sidecar restarts (docker compose restart sidecar), traffic after each"
for i in 1 2 3; do
    docker compose restart sidecar > /dev/null 2>&1
    docker compose up -d --wait sidecar > /dev/null 2>&1
    sleep 1.5  # the filter re-opens a stopped segment at most once a second
    traffic 4 > /dev/null
    echo "restart $i: $(docker compose exec -T sidecar df -k /run/ipc-router-shm | tail -1)" \
        "| retired segments still mapped by envoy: $(docker compose exec -T -u envoy envoy grep -c 'shm (deleted)' /proc/1/maps || true)"
    summary | tail -1
done
