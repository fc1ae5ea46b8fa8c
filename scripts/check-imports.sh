#!/usr/bin/env bash
# The import-boundary check (`npm run check:imports`, a step of `npm test`): every import under services/ and
# deploy/ against the rules in .dependency-cruiser.cjs (no service imports another, common imports no service,
# the agent's rooms only through their index.ts, the CLI only gen, common and the launcher, deploy only common
# and gen, generated code imports nothing hand-written, no cycles). Prints one line per violation, naming the
# rule, and exits non-zero when there is any. Extra arguments go to the checker, e.g. `--output-type err-long`
# to print each broken rule's reason too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec npx --no-install depcruise --config .dependency-cruiser.cjs --output-type err "$@" services deploy
