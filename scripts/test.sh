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
# Two groups, the quick one first: everything but the load and storm smoke tests (marker `load`),
# then those.  TEST_GROUPS=quick runs only the first (the loop while working); any pytest arguments
# apply to both.  A group that selects nothing (exit 5) is no failure.
status=0
for group in ${TEST_GROUPS:-quick load}; do
    case "$group" in
        quick) marks="not load" ;;
        load) marks="load" ;;
        *) say "TEST_GROUPS: unknown group '$group' (quick, load)"; exit 2 ;;
    esac
    say "tests: $group group (-m '$marks')"
    python -m pytest -m "$marks" "$@" || { rc=$?; [ "$rc" = 5 ] || status=$rc; }
done
exit "$status"
