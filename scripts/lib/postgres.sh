# Shared by scripts/*: a throwaway PostgreSQL with TLS and client-certificate auth, as a
# self-hosted database behind Postern is set up. Sourced, not run. Needs machine.sh.

# start_tls_postgres DIR PORT CRT KEY CAS: initdb into DIR/data, ssl=on with the given
# server certificate, key and client CA, `hostssl all all 127.0.0.1/32 cert` and nothing
# else over TCP; the superuser `postgres` over the Unix socket in DIR.
start_tls_postgres() {
  local dir=$1 port=$2 crt=$3 key=$4 cas=$5 run=()
  if [ "$(id -u)" = 0 ]; then run=(runuser -u postgres --); chown postgres "$dir"; fi
  "${run[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
  install -m 0600 "$crt" "$dir/data/server.crt"
  install -m 0600 "$key" "$dir/data/server.key"
  install -m 0600 "$cas" "$dir/data/client_ca.crt"
  cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'client_ca.crt'
ssl_min_protocol_version = 'TLSv1.2'
CONF
  printf 'local all all trust\nhostssl all all 127.0.0.1/32 cert\n' >"$dir/data/pg_hba.conf"
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir/data"; fi
  "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 start >/dev/null
}

# stop_postgres DIR
stop_postgres() {
  local dir=$1 run=()
  if [ "$(id -u)" = 0 ]; then run=(runuser -u postgres --); fi
  [ -f "$dir/data/postmaster.pid" ] && "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
}

# free_port: a TCP port on 127.0.0.1 that is free now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
