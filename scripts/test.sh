#!/usr/bin/env bash
# The README's test command (`npm test`, also what .ci/run runs): installs what the machine lacks, starts
# the private libvirtd the integration tests use, then checks everything: types, import boundaries, formatting,
# proto lint, generated code up to date, no breaking proto change, unit tests, integration tests against real
# nats-server, libvirtd, qemu-img and a Python gRPC client. Exits non-zero on the first failing stage.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=test
COWHERD_LOG="$COWHERD_LOG_DIR/test.log"
: >"$COWHERD_LOG"

bash "$COWHERD_ROOT/scripts/install.sh"
cd "$COWHERD_ROOT"

started_libvirtd=0
cleanup() {
  if ((started_libvirtd)); then bash scripts/libvirtd.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
if ! bash scripts/libvirtd.sh status >/dev/null 2>&1; then
  step "start libvirtd (private mount namespace, TCG)" bash scripts/libvirtd.sh start
  started_libvirtd=1
fi

step "type check (tsc --noEmit)" npx --no-install tsc --noEmit -p .
step "import boundaries (.dependency-cruiser.cjs; npm run check:imports)" bash scripts/check-imports.sh
step "format check (biome.json; npm run format writes it)" npx --no-install biome format
step "buf lint (STANDARD + comments)" npx --no-install buf lint
bash scripts/check-generated.sh
bash scripts/check-breaking.sh

# One run of node's test runner for unit and integration tests, so its closing summary counts them all.
# Files run one at a time: integration tests start real daemons and the machine has two cores.
say "unit and integration tests (real nats-server, libvirtd, qemu-img, Python gRPC client)"
node --import tsx --test --test-concurrency=1 --test-timeout=300000 --test-reporter=spec test/unit/*.test.ts test/integration/*.test.ts
