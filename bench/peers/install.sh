#!/usr/bin/env bash
# Install the benchmark's peers, each into its own venv (bench/peers/<peer>/.venv), from its pinned
# requirements.txt. Run by `make bench` (never by `make test`). A peer that fails to install is recorded in
# bench/peers/<peer>/install-failed.txt (the suite then skips it with that note) and does not stop the others.
# Re-running is cheap: a venv whose requirements did not change is left alone.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
ROOT=$(cd ../.. && pwd)
for dir in */; do
  peer=${dir%/}
  req=$peer/requirements.txt
  [ -f "$req" ] || continue
  stamp=$peer/.venv/.installed
  if [ -f "$stamp" ] && [ "$stamp" -nt "$req" ] && [ "$stamp" -nt "$ROOT/pyproject.toml" ]; then
    echo "peer $peer: installed"
    continue
  fi
  echo "peer $peer: installing $(grep -v '^#' "$req" | tr '\n' ' ')"
  rm -f "$peer/install-failed.txt"
  extra=()
  # ext_proc runs ipc_router's own routing: ipc_router from this checkout, without the envoy extra.
  [ "$peer" = ext_proc ] && extra=(-e "$ROOT")
  if { [ -x "$peer/.venv/bin/python" ] || "$PYTHON" -m venv "$peer/.venv"; } \
      && "$peer/.venv/bin/python" -m pip install -q --upgrade pip >"$peer/install.log" 2>&1 \
      && "$peer/.venv/bin/python" -m pip install -q -r "$req" "${extra[@]}" >>"$peer/install.log" 2>&1; then
    touch "$stamp"
  else
    { grep -E "^ERROR" "$peer/install.log" || tail -3 "$peer/install.log"; } | tail -3 >"$peer/install-failed.txt"
    echo "peer $peer: install FAILED (see bench/peers/$peer/install.log); the suite will skip it"
  fi
done
