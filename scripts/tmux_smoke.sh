#!/usr/bin/env bash
# Start Parley in a real terminal (tmux) on the tiny model in a temporary PARLEY_HOME,
# open the Assistant, type a message, and check the captured screen shows it and a finished reply.
# Exit 0 on success; prints the last captured screen on failure. Needs tmux.
# Usage: scripts/tmux_smoke.sh   (PARLEY_PYTHON overrides the interpreter; KEEP=1 keeps the temp folder)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PARLEY_PYTHON:-$ROOT/.venv/bin/python}
command -v tmux >/dev/null || { echo "tmux_smoke: tmux is not installed" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/parley-smoke.XXXXXX")
SESSION="parley-smoke-$$"
export PARLEY_HOME="$WORK/home"
mkdir -p "$PARLEY_HOME/personas"
cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    [[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# The tiny random-weight model, and a short-spoken Assistant (a user file overrides the shipped one).
MODEL=$("$PY" -c "import sys; from app import fastblas; fastblas.preload(); from pathlib import Path; from app.model.tiny import build_tiny_model; print(build_tiny_model(Path(sys.argv[1])))" "$WORK/model")
cat > "$PARLEY_HOME/personas/assistant.toml" <<'TOML'
id = "assistant"
name = "Assistant"
description = "A plain, helpful assistant."
greetings = ["Hello! How can I help you today?"]

[sampling]
temperature = 0.0
max_tokens = 12
TOML

capture() { tmux capture-pane -p -t "$SESSION" 2>/dev/null || true; }
wait_for() {  # wait_for TEXT SECONDS
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if capture | grep -qF -- "$1"; then return 0; fi
        sleep 0.2
    done
    echo "tmux_smoke: timed out waiting for '$1'. Screen:" >&2
    capture >&2
    return 1
}

tmux new-session -d -s "$SESSION" -x 120 -y 36 \
    "cd '$ROOT' && PARLEY_HOME='$PARLEY_HOME' TERM=xterm-256color '$PY' -m app --model '$MODEL'; echo PARLEY-EXITED \$?; sleep 30"

wait_for "Filter personas" 30
tmux send-keys -t "$SESSION" -l "assist"
sleep 0.5
tmux send-keys -t "$SESSION" Enter
wait_for "Hello! How can I help you today?" 15
tmux send-keys -t "$SESSION" -l "Hello from tmux"
sleep 0.3
tmux send-keys -t "$SESSION" Enter
wait_for "ttft" 30
screen=$(capture)
for expected in "Hello from tmux" "You" "prefilled" "cache none" "Cache RAM"; do
    if ! grep -qF -- "$expected" <<<"$screen"; then
        echo "tmux_smoke: '$expected' is not on the screen:" >&2
        echo "$screen" >&2
        exit 1
    fi
done
tmux send-keys -t "$SESSION" C-q
wait_for "PARLEY-EXITED 0" 20
echo "tmux_smoke: ok"
[[ "${SHOW:-0}" == 1 ]] && echo "$screen"
exit 0
