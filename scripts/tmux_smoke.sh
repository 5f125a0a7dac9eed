#!/usr/bin/env bash
# Start Parley in a real terminal (tmux) on the tiny model in a temporary PARLEY_HOME,
# open the Assistant, type a message, and check the captured screen shows it and a finished reply.
# Then the keys as terminals really send them (raw bytes through `send-keys -H`): F6/F7, ctrl+g N, ESC-prefixed
# alt+1, the option/8-bit characters "¡" and "²", ctrl+w, the persona editor (F3, tab, ctrl+s); then quit,
# start again, and check the open tabs came back.
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
cat > "$PARLEY_HOME/personas/otto.toml" <<'TOML'
id = "otto"
name = "Otto"
description = "A second persona for switching tabs."

[sampling]
temperature = 0.0
max_tokens = 4
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

wait_gone() {  # wait_gone TEXT SECONDS
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if ! capture | grep -qF -- "$1"; then return 0; fi
        sleep 0.2
    done
    echo "tmux_smoke: '$1' is still on the screen. Screen:" >&2
    capture >&2
    return 1
}
bytes() { tmux send-keys -t "$SESSION" -H "$@"; }  # raw bytes, exactly as a terminal would send them
start_app() {
    tmux new-session -d -s "$SESSION" -x 120 -y 36 \
        "cd '$ROOT' && PARLEY_HOME='$PARLEY_HOME' TERM=xterm-256color '$PY' -m app --model '$MODEL'; echo PARLEY-EXITED \$?; sleep 30"
}
start_app

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

# -- keys, as the bytes terminals send with default settings --------------------------------------------
bytes 06                        # ctrl+f: the persona filter
tmux send-keys -t "$SESSION" -l "otto"
sleep 0.5
bytes 0d                        # enter opens Otto
wait_for "Otto —" 15
bytes 1b 5b 31 37 7e            # F6 (ESC [ 1 7 ~): previous tab
wait_for "Assistant —" 10
bytes 1b 5b 31 38 7e            # F7 (ESC [ 1 8 ~): next tab
wait_for "Otto —" 10
bytes 1b 31                     # alt+1 as tmux/VTE/Windows Terminal send it: ESC 1
wait_for "Assistant —" 10
bytes 07                        # ctrl+g, then 2: go to tab 2
sleep 0.3
bytes 32
wait_for "Otto —" 10
bytes c2 a1                     # "¡": option+1 in the macOS Terminal / iTerm2 (UTF-8)
wait_for "Assistant —" 10
bytes c2 b2                     # "²": alt+2 from an 8-bit-meta xterm
wait_for "Otto —" 10
if capture | grep -qE "¡|²"; then echo "tmux_smoke: a tab-switch character was typed into the box" >&2; capture >&2; exit 1; fi
bytes 17                        # ctrl+w: close the tab
wait_gone "Otto —" 10
wait_for "Assistant —" 10
# the persona editor: F3 (ESC O R), a name, tab (to the id), tab, a description, ctrl+s twice (no system prompt: warned)
bytes 1b 4f 52
wait_for "New persona" 10
tmux send-keys -t "$SESSION" -l "Pirate Pete"
bytes 09
bytes 09
tmux send-keys -t "$SESSION" -l "A jolly pirate"
sleep 0.3
bytes 13
wait_for "no system prompt" 10
bytes 13
wait_for "Pirate Pete —" 15
grep -qF 'description = "A jolly pirate"' "$PARLEY_HOME/personas/pirate-pete.toml" \
    || { echo "tmux_smoke: the persona file is wrong:" >&2; cat "$PARLEY_HOME"/personas/pirate-pete*.toml >&2; exit 1; }

tmux send-keys -t "$SESSION" C-q
wait_for "PARLEY-EXITED 0" 20

# -- a second start: the open tabs (Assistant, Pirate Pete; Pirate Pete active) come back ------------------
tmux kill-session -t "$SESSION" 2>/dev/null || true
start_app
wait_for "Pirate Pete —" 30
wait_for "Assistant" 5
bytes 1b 5b 31 37 7e            # F6: to the Assistant, whose conversation is there
wait_for "Hello from tmux" 10
tmux send-keys -t "$SESSION" C-q
wait_for "PARLEY-EXITED 0" 20
echo "tmux_smoke: ok"
[[ "${SHOW:-0}" == 1 ]] && echo "$screen"
exit 0
