#!/usr/bin/env bash
# The README's start command (`npm start`): installs what the machine lacks, starts the local fleet on the
# embedded default (NATS with JetStream, the four services and two local agents, mutual TLS everywhere), shows
# that every process answers health on both of its ports, tells the story on the first start (a master image
# published, distributed to the second agent and cloned there; services/launcher/story.ts), and keeps the fleet
# running until Ctrl-C. Arguments go to `cowherd fleet up` (--no-story, --story-name <name>, ...).
# State (CA, credentials, NATS data, logs, story.json) lives in $COWHERD_STATE_DIR/fleet, default
# <repo>/.state/fleet; the guest kit in $COWHERD_STATE_DIR/guest, shared with the tests.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=start

bash "$COWHERD_ROOT/scripts/install.sh"
# The local agents drive this machine's libvirt: a private libvirtd (see scripts/libvirtd.sh), left running.
bash "$COWHERD_ROOT/scripts/libvirtd.sh" start
cd "$COWHERD_ROOT"
# The story's guest kit is cached in $COWHERD_STATE_DIR/guest, beside the tests' (a later --guest-state-dir wins).
guest_state_dir="$COWHERD_STATE_DIR"
export COWHERD_STATE_DIR="$COWHERD_STATE_DIR/fleet"
# exec: Ctrl-C and SIGTERM go straight to the fleet, which stops every process it started, in order. Those run in
# process groups of their own (services/launcher/local-fleet.ts): a terminal's Ctrl-C reaches the fleet alone.
exec node --import tsx services/cli/main.ts fleet up --guest-state-dir "$guest_state_dir" "$@"
