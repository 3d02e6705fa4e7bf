# Shared by scripts/bench: the packages it needs, a client CA for the connections that do
# not go through Postern, PgBouncer with TLS on both sides, PostgreSQL restarts.
# Sourced, not run. Needs machine.sh and postgres.sh.

# ensure_bench_packages: PostgreSQL server and client (pgbench), PgBouncer, OpenSSL, curl,
# python3. Installing Debian's pgbouncer enables its system service on port 6432: stop
# and disable it (the benchmark runs its own instance on a free port).
ensure_bench_packages() {
  command -v cargo >/dev/null || { log "cargo is missing: install Rust with rustup first"; return 1; }
  local missing=()
  command -v psql >/dev/null || missing+=(postgresql-client)
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pgbench" ] || missing+=(postgresql postgresql-contrib)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  local new_pgbouncer=0
  command -v pgbouncer >/dev/null || { missing+=(pgbouncer); new_pgbouncer=1; }
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  if [ "$new_pgbouncer" = 1 ]; then
    if [ -d /run/systemd/system ]; then
      as_root systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    else
      as_root service pgbouncer stop >/dev/null 2>&1 || true
      as_root update-rc.d pgbouncer disable >/dev/null 2>&1 || true
    fi
  fi
  command -v pgbench >/dev/null || [ -x "$PG_BIN/pgbench" ] || { log "pgbench is missing"; return 1; }
}

# make_client_ca DIR USER: DIR/ca.crt (a throwaway CA, ECDSA P-256 like Postern's) and
# DIR/USER.crt, DIR/USER.key (CN=USER, for PostgreSQL's `cert` auth and PgBouncer's).
make_client_ca() {
  local dir=$1 user=$2
  mkdir -p "$dir"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench client CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$user" \
    -keyout "$dir/$user.key" -out "$dir/$user.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/$user.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/ext.cnf" -out "$dir/$user.crt" 2>/dev/null
  chmod 600 "$dir/$user.key" "$dir/ca.key"
}

# restart_postgres DIR: after `alter system` changes that need a restart.
restart_postgres() {
  local dir=$1 run=()
  if [ "$(id -u)" = 0 ]; then run=(runuser -u postgres --); fi
  "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -m fast -w -t 60 restart >/dev/null
}

# start_pgbouncer DIR PORT DB_PORT DBNAME USER MAX_CLIENTS SERVER_CRT SERVER_KEY CLIENT_CA
#                 UPSTREAM_CA UPSTREAM_CRT UPSTREAM_KEY
# Session pooling on 127.0.0.1:PORT for database DBNAME at localhost:DB_PORT. Clients: TLS
# required, certificate checked against CLIENT_CA, CN must equal the user (`auth_type =
# cert`; PgBouncer 1.18 still wants each user in auth_file, with an empty password).
# Server side: verify-full TLS against UPSTREAM_CA, presenting UPSTREAM_CRT/KEY, so
# PostgreSQL's `hostssl ... cert` admits PgBouncer as USER. Runs as `postgres` when root
# (PgBouncer refuses root); its pid is in DIR/pgbouncer.pid.
start_pgbouncer() {
  local dir=$1 port=$2 db_port=$3 dbname=$4 user=$5 max_clients=$6
  mkdir -p "$dir"
  install -m 0644 "$7" "$dir/server.crt"
  install -m 0600 "$8" "$dir/server.key"
  install -m 0644 "$9" "$dir/client_ca.crt"
  install -m 0644 "${10}" "$dir/upstream_ca.crt"
  install -m 0644 "${11}" "$dir/upstream.crt"
  install -m 0600 "${12}" "$dir/upstream.key"
  printf '"%s" ""\n' "$user" >"$dir/users.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
$dbname = host=localhost port=$db_port dbname=$dbname

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
pidfile = $dir/pgbouncer.pid
logfile = $dir/pgbouncer.log
auth_type = cert
auth_file = $dir/users.txt
pool_mode = session
max_client_conn = $max_clients
default_pool_size = 32
client_tls_sslmode = verify-full
client_tls_ca_file = $dir/client_ca.crt
client_tls_cert_file = $dir/server.crt
client_tls_key_file = $dir/server.key
server_tls_sslmode = verify-full
server_tls_ca_file = $dir/upstream_ca.crt
server_tls_cert_file = $dir/upstream.crt
server_tls_key_file = $dir/upstream.key
INI
  local run=()
  if [ "$(id -u)" = 0 ]; then run=(runuser -u postgres --); chown -R postgres "$dir"; fi
  "${run[@]}" pgbouncer -d -q "$dir/pgbouncer.ini"
  for _ in $(seq 100); do [ -s "$dir/pgbouncer.pid" ] && break; sleep 0.1; done
  [ -s "$dir/pgbouncer.pid" ] || { log "pgbouncer did not start; its log:"; tail -n 20 "$dir/pgbouncer.log" >&2; return 1; }
}

# stop_pgbouncer DIR: immediate shutdown (SIGTERM), waits for the process to go.
stop_pgbouncer() {
  local dir=$1 pid
  [ -s "$dir/pgbouncer.pid" ] || return 0
  pid=$(cat "$dir/pgbouncer.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$dir/pgbouncer.pid"
}

# rss_kib PID: resident set size in KiB.
rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}
