#!/usr/bin/env bash
# Against a running server (scripts/run.sh in another terminal):
#   scripts/run-payment-test.sh [--url http://127.0.0.1:8000] [--payments 100]
# Creates orders, holds waits, fires callbacks; prints the timeline and how many
# wait requests each payment took; fails if a wait answered >1 s after its callback.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/payment_test.py" "$@"
