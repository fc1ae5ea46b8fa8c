#!/usr/bin/env bash
# Fails when services/gen or proto/cowherd.binpb is not exactly what `npm run generate` makes from proto/.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=test
cd "$COWHERD_ROOT"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
npx --no-install buf generate --output "$scratch" >/dev/null
npx --no-install buf build -o "$scratch/cowherd.binpb"
if ! diff -r "$scratch/services/gen" services/gen >/dev/null || ! cmp -s "$scratch/cowherd.binpb" proto/cowherd.binpb; then
  diff -r "$scratch/services/gen" services/gen | head -20 >&2 || true
  die "generated code is stale: run 'npm run generate' and commit services/gen and proto/cowherd.binpb"
fi
say "generated code matches proto/ ... ok"
