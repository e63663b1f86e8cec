#!/usr/bin/env bash
# Run the slow suites (soak, churn, long fuzzing, WAN) that the default test command skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -m slow "$@"
