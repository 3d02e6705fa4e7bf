# Shared by scripts/*: make sure the machine has what Postern's tests and demo need.
# Sourced, not run. Idempotent, non-interactive, quiet when everything is already there.

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Rust toolchain, database servers and clients, curl (the demo scrapes /metrics).
ensure_packages() {
  command -v cargo >/dev/null || { log "cargo is missing: install Rust with rustup first"; return 1; }
  local missing=()
  command -v psql >/dev/null || missing+=(postgresql-client)
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] || missing+=(postgresql)
  command -v mariadb >/dev/null || missing+=(mariadb-client)
  command -v mariadb-install-db >/dev/null || missing+=(mariadb-server)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v g++ >/dev/null || missing+=(g++)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
}

# The machine's own PostgreSQL (127.0.0.1:5432, trust auth) and MariaDB (127.0.0.1:3306,
# root without password) are used by tests that need no special server settings.
ensure_services() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    log "starting the machine's PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL on 127.0.0.1:5432 is not answering"; return 1; }
  if ! mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1; then
    log "starting the machine's MariaDB"
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    for _ in $(seq 50); do mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  # The PostgreSQL tests use database `test` as user `postgres`.
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test'
}
