#!/usr/bin/env bash
# `buf breaking` (FILE rules): on a branch, against main; on main itself, the newest commit that changed
# proto/ against the commit before it, so every landed proto change is checked against what was there.
# Skipped, with a line saying so, when history is shallow or main has no protos yet.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=test
cd "$COWHERD_ROOT"
if [[ "$(git rev-parse --is-shallow-repository 2>/dev/null)" == "true" ]]; then
  say "buf breaking skipped: shallow clone (needs full history)"
  exit 0
fi
branch="$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo HEAD)"
if [[ "$branch" != "main" ]] && git rev-parse --verify -q main >/dev/null; then
  against="main"
else
  last="$(git log -1 --format=%H -- proto/cowherd 2>/dev/null || true)"
  against="$(git rev-parse -q --verify "${last}^" 2>/dev/null || true)"
  if [[ -z "$last" || -z "$against" ]] || ! git cat-file -e "$against:buf.yaml" 2>/dev/null || [[ -z "$(git ls-tree -r --name-only "$against" -- proto/cowherd)" ]]; then
    say "buf breaking skipped: no earlier commit with protos to compare with"
    exit 0
  fi
fi
step "buf breaking against $against" npx --no-install buf breaking --against ".git#ref=$against"
