#!/usr/bin/env bash
# Set up everything the tests need on this machine, then run them: scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv requirements-dev.txt
ensure_redis
ensure_postgres
ensure_chromium
ensure_pgbouncer
ensure_openssl
ensure_zbar
ensure_promtool

export PATH="$VENV/bin:$PATH"
exec python -m pytest "$@"
