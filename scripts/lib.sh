# shellcheck shell=bash
# Shared helpers for cowherd's shell scripts. Source it, do not run it:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets COWHERD_ROOT (the repo), COWHERD_STATE_DIR (default <repo>/.state) and COWHERD_LOG_DIR
# (<state>/logs), and offers one-line-per-step output with the full output of each step in a log file.

COWHERD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COWHERD_STATE_DIR="${COWHERD_STATE_DIR:-$COWHERD_ROOT/.state}"
mkdir -p "$COWHERD_STATE_DIR"
# Absolute, so that daemons and pid files do not depend on the caller's working directory.
COWHERD_STATE_DIR="$(cd "$COWHERD_STATE_DIR" && pwd)"
COWHERD_LOG_DIR="$COWHERD_STATE_DIR/logs"
mkdir -p "$COWHERD_LOG_DIR"
export COWHERD_ROOT COWHERD_STATE_DIR COWHERD_LOG_DIR

# The log file that `step` appends to; scripts set their own before the first step.
COWHERD_LOG="${COWHERD_LOG:-$COWHERD_LOG_DIR/scripts.log}"

# Prefix for every line a script prints, e.g. "install".
COWHERD_TAG="${COWHERD_TAG:-cowherd}"

say() { printf '%s: %s\n' "$COWHERD_TAG" "$*"; }
warn() { printf '%s: warning: %s\n' "$COWHERD_TAG" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$COWHERD_TAG" "$*" >&2
  exit 1
}

# Milliseconds since the epoch (bash 5 has EPOCHREALTIME; no fork).
now_ms() {
  local t="${EPOCHREALTIME/./}"
  printf '%s' "$((t / 1000))"
}

# Seconds with one decimal between two now_ms values.
elapsed() {
  local ms=$(($2 - $1))
  printf '%d.%ds' "$((ms / 1000))" "$(((ms % 1000) / 100))"
}

# step DESCRIPTION COMMAND [ARGS...]
# Runs the command with stdin from /dev/null and all of its output appended to $COWHERD_LOG, then prints one
# line: "<tag>: DESCRIPTION ... ok (1.2s)". On failure prints the last lines of the log and exits with the
# command's status.
step() {
  local desc="$1"
  shift
  local start rc=0
  start="$(now_ms)"
  printf '\n=== %s: %s (%s)\n$ %s\n' "$(date -u +%FT%TZ)" "$desc" "$COWHERD_TAG" "$*" >>"$COWHERD_LOG"
  "$@" </dev/null >>"$COWHERD_LOG" 2>&1 || rc=$?
  if ((rc != 0)); then
    printf '%s: %s ... FAILED (exit %d, %s); last lines of %s:\n' \
      "$COWHERD_TAG" "$desc" "$rc" "$(elapsed "$start" "$(now_ms)")" "$COWHERD_LOG" >&2
    tail -n 30 "$COWHERD_LOG" | sed 's/^/    /' >&2
    exit "$rc"
  fi
  say "$desc ... ok ($(elapsed "$start" "$(now_ms)"))"
}

require_root() {
  if [[ "$(id -u)" != 0 ]]; then
    die "$1 needs root (run it as root; CI and the dev machines are root)"
  fi
}

# pid_alive PID [COMM]: true if the process exists (and, given COMM, its /proc/PID/comm is COMM).
pid_alive() {
  local pid="$1" comm="${2:-}"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  # A zombie is as good as gone. Builtins only: this runs for every process when scanning /proc.
  local line state=""
  {
    while IFS= read -r line; do
      if [[ "$line" == State:* ]]; then
        state="${line#State:}"
        state="${state#"${state%%[![:space:]]*}"}"
        state="${state:0:1}"
        break
      fi
    done <"/proc/$pid/status"
  } 2>/dev/null || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
  if [[ -n "$comm" ]]; then
    local actual=""
    { read -r actual <"/proc/$pid/comm"; } 2>/dev/null || return 1
    [[ "$actual" == "$comm" ]] || return 1
  fi
  return 0
}

# read_pid FILE: prints the pid in FILE, or nothing.
read_pid() {
  [[ -s "$1" ]] || return 0
  local pid
  pid="$(tr -dc '0-9' <"$1")"
  printf '%s' "$pid"
}

# pids_by_comm NAME: every live pid whose /proc/PID/comm is NAME (no procps needed).
pids_by_comm() {
  local dir pid
  for dir in /proc/[0-9]*; do
    pid="${dir#/proc/}"
    pid_alive "$pid" "$1" && printf '%s\n' "$pid"
  done
  return 0
}

# wait_gone PID SECONDS: waits until PID has exited; false if it is still there after SECONDS.
wait_gone() {
  local pid="$1" deadline=$(($(now_ms) + $2 * 1000))
  while pid_alive "$pid"; do
    (($(now_ms) < deadline)) || return 1
    sleep 0.05
  done
  return 0
}
