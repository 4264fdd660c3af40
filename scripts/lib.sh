# Shared by run.sh and test.sh: set up what a fresh machine lacks.  Sourced, not run.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

say() { printf '==> %s\n' "$*" >&2; }

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        say "need $* but not root: install it yourself (apt-get install $*)"; return 1
    fi
    if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; _APT_UPDATED=1; fi
    say "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ensure_venv REQUIREMENTS_FILE: a virtualenv with those packages, reinstalled when the file changes.
ensure_venv() {
    local requirements="$ROOT/$1" stamp="$VENV/.installed-$(basename "$1")"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv in .venv"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip 2>/dev/null
    fi
    if [ ! -f "$stamp" ] || ! cmp -s "$requirements" "$stamp"; then
        say "installing $1"
        "$VENV/bin/pip" install -q -r "$requirements" 2>&1 | grep -v "^WARNING: Location" || true
        "$VENV/bin/python" -c "import flask, gevent, redis, psycopg" # fail here, not later, if the install did
        cp "$requirements" "$stamp"
    fi
}

redis_up() { "$VENV/bin/python" -c "import redis,sys; redis.Redis(host='127.0.0.1', port=${1:-6379}, socket_connect_timeout=1).ping()" 2>/dev/null; }

ensure_redis() {
    redis_up && return 0
    command -v redis-server >/dev/null || apt_install redis-server
    say "starting redis-server on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/eventi.log
    for _ in $(seq 50); do redis_up && return 0; sleep 0.1; done
    say "redis did not come up"; return 1
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
    if ! command -v pg_isready >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        apt_install postgresql
    fi
    if ! pg_up; then
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
        for _ in $(seq 100); do pg_up && break; sleep 0.1; done
    fi
    pg_up || { say "PostgreSQL did not come up"; return 1; }
    # A fresh Debian install asks for a password on TCP: give postgres the one the tests use.
    if ! PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1" >/dev/null 2>&1; then
        say "setting the postgres password for local tests"
        su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
    fi
}

ensure_chromium() {
    command -v chromium >/dev/null || apt_install chromium
}

# The fault tests start their own PgBouncer and a TLS redis-server (certificate made by openssl).
ensure_pgbouncer() {
    command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || apt_install pgbouncer
}

ensure_openssl() {
    command -v openssl >/dev/null || apt_install openssl
}

# The browser tests decode the success page's QR codes with pyzbar, which loads Debian's libzbar.
ensure_zbar() {
    ldconfig -p 2>/dev/null | grep -q 'libzbar\.so\.0' || apt_install libzbar0
}

# The alert rules (deploy/prometheus) are checked with Debian's promtool, from the prometheus package.
ensure_promtool() {
    command -v promtool >/dev/null || apt_install prometheus
}
