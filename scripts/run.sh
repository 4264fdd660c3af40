#!/usr/bin/env bash
# Serve the app on the embedded defaults: SQLite, in-process hub, sandbox PayHero.
# Any variable of the README's configuration table may be set to override them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_venv requirements.txt
export PATH="$VENV/bin:$PATH"
export PORT="${PORT:-8000}"

flask --app wsgi db upgrade
flask --app wsgi seed-demo >/dev/null
say "checkout: http://127.0.0.1:$PORT/events/test-this-end-to-end/checkout"
exec gunicorn -c gunicorn.conf.py wsgi:app
