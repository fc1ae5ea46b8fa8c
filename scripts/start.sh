#!/usr/bin/env bash
# The README's start command (`npm start`): installs what the machine lacks, starts the local fleet on the
# embedded default (NATS with JetStream, the four services and a local agent, mutual TLS everywhere), shows
# that every process answers health on both of its ports, and keeps the fleet running until Ctrl-C.
# State (CA, credentials, NATS data, logs) lives in $COWHERD_STATE_DIR/fleet, default <repo>/.state/fleet.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=start

bash "$COWHERD_ROOT/scripts/install.sh"
# The local agent drives this machine's libvirt: a private libvirtd (see scripts/libvirtd.sh), left running.
bash "$COWHERD_ROOT/scripts/libvirtd.sh" start
cd "$COWHERD_ROOT"
export COWHERD_STATE_DIR="$COWHERD_STATE_DIR/fleet"
# exec: Ctrl-C and SIGTERM go straight to the fleet, which stops every process it started.
exec node --import tsx services/cli/main.ts fleet up "$@"
