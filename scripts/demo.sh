#!/usr/bin/env bash
# Run the local demo swarm with the real default model (installs what it needs first).
# Extra args go to `molink-swarm demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/molink-swarm demo "$@"
