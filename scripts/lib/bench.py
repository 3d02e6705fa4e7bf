#!/usr/bin/env python3
"""Helpers for scripts/bench; standard library only (python3 >= 3.9).

  bench.py hold --count N --ready FILE --stop FILE
      Opens N PostgreSQL sessions to PGHOST:PGPORT as PGUSER/PGDATABASE over TLS with the
      client certificate PGSSLCERT/PGSSLKEY, verifying the server against PGSSLROOTCERT (SSLRequest,
      verify-full, StartupMessage, wait for ReadyForQuery), one after another, writes
      "N" to the ready file, waits until the stop file exists, then ends each session
      with a Terminate message.

  bench.py latency LOG...
      Per-transaction pgbench logs (--log) in, "COUNT P50 P99" out: nearest-rank
      percentiles of the latency column (microseconds).

  bench.py report --results TSV --meta JSON [--out FILE]
      Medians across repetitions, ratios, goals; a text table on stdout and the same
      as markdown in FILE.
"""

import argparse
import json
import math
import os
import resource
import socket
import ssl
import statistics
import struct
import sys
import time

SSL_REQUEST = 80877103
PROTOCOL_3_0 = 196608


def read_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def open_session(args, context):
    raw = socket.create_connection((args.host, int(args.port)), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.sendall(struct.pack("!ii", 8, SSL_REQUEST))
    answer = read_exact(raw, 1)
    if answer != b"S":
        raise ConnectionError(f"the server refused TLS (answered {answer!r})")
    tls = context.wrap_socket(raw, server_hostname=args.host)
    params = b"".join(
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in (("user", args.user), ("database", args.dbname), ("application_name", "bench-hold"))
    ) + b"\0"
    tls.sendall(struct.pack("!ii", 8 + len(params), PROTOCOL_3_0) + params)
    while True:
        kind = read_exact(tls, 1)
        (length,) = struct.unpack("!i", read_exact(tls, 4))
        body = read_exact(tls, length - 4)
        if kind == b"E":
            fields = dict((f[:1], f[1:].decode(errors="replace")) for f in body.split(b"\0") if f)
            raise ConnectionError(f"server error {fields.get(b'C', '?')}: {fields.get(b'M', '?')}")
        if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise ConnectionError("the server asked for a password; expected certificate auth")
        if kind == b"Z":
            tls.settimeout(None)
            return tls


def hold(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    context = ssl.create_default_context(cafile=args.root)
    context.load_cert_chain(args.cert, args.key)
    sessions = []
    started = time.monotonic()
    for i in range(args.count):
        try:
            sessions.append(open_session(args, context))
        except Exception as error:  # report which session failed, then give up
            print(f"bench.py hold: session {i + 1} of {args.count}: {error}", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started
    with open(args.ready + ".tmp", "w") as f:
        f.write(f"{len(sessions)} {elapsed:.3f}\n")
    os.rename(args.ready + ".tmp", args.ready)
    while not os.path.exists(args.stop):
        time.sleep(0.1)
    for tls in sessions:
        try:
            tls.sendall(b"X\0\0\0\x04")
            tls.close()
        except OSError:
            pass
    return 0


def percentile(sorted_values, p):
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency(args):
    values = []
    for path in args.logs:
        with open(path) as f:
            for line in f:
                fields = line.split()
                # client_id transaction_no time script_no time_epoch time_us [lag]
                if len(fields) >= 6 and fields[2].isdigit():
                    values.append(int(fields[2]))
    if not values:
        print("bench.py latency: no transactions in the logs", file=sys.stderr)
        return 1
    values.sort()
    print(len(values), percentile(values, 50), percentile(values, 99))
    return 0


TARGETS = ("direct", "pgbouncer", "postern")

# (metric, label, unit, better, decimals)
ROWS = [
    ("so1_tps", "select-only, 1 client", "TPS", "higher", 0),
    ("so1_p50", "select-only, 1 client, latency p50", "µs", "lower", 0),
    ("so1_p99", "select-only, 1 client, latency p99", "µs", "lower", 0),
    ("so16_tps", "select-only, 16 clients", "TPS", "higher", 0),
    ("so16_p50", "select-only, 16 clients, latency p50", "µs", "lower", 0),
    ("so16_p99", "select-only, 16 clients, latency p99", "µs", "lower", 0),
    ("so1_switches", "select-only, 1 client: Postern's context switches per transaction", "", "lower", 1),
    ("so1_cpu_us", "select-only, 1 client: Postern's CPU per transaction", "µs", "lower", 1),
    ("so16_switches", "select-only, 16 clients: Postern's context switches per transaction", "", "lower", 1),
    ("so16_cpu_us", "select-only, 16 clients: Postern's CPU per transaction", "µs", "lower", 1),
    ("tpcb_tps", "TPC-B, 16 clients", "TPS", "higher", 0),
    ("conn_cps", "new connection per transaction (-C -S), 16 clients", "conn/s", "higher", 0),
    ("conn_switches", "new connection: Postern's context switches per connection", "", "lower", 0),
    ("conn_cpu_us", "new connection: Postern's CPU per connection", "µs", "lower", 0),
    ("copy_mbs", "COPY TO STDOUT through psql", "MB/s", "higher", 1),
    ("mem_before_mib", "RSS before the idle sessions", "MiB", "lower", 1),
    ("mem_after_mib", "RSS with the idle sessions open", "MiB", "lower", 1),
    ("mem_per_session_kib", "memory per idle session", "KiB", "lower", 1),
]


def load_results(path):
    values = {}
    loads = {}
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                continue
            rep, target, metric, value = fields
            if target == "load":
                loads.setdefault(metric, []).append(float(value))
            else:
                values.setdefault((target, metric), []).append(float(value))
    return values, loads


def fmt(value, decimals):
    if value is None:
        return "—"
    return f"{value:,.{decimals}f}"


def with_unit(value, decimals, unit):
    return "—" if value is None else f"{fmt(value, decimals)}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def report(args):
    values, loads = load_results(args.results)
    with open(args.meta) as f:
        meta = json.load(f)
    median = {key: statistics.median(v) for key, v in values.items()}
    reps = {key: len(v) for key, v in values.items()}

    header = ["figure", "unit", "direct", "PgBouncer", "Postern", "Postern/direct", "Postern/PgBouncer"]
    # An A/B run (scripts/bench --targets ...,postern-b): B's figures and B/A beside them.
    with_b = any(target == "postern-b" for target, _ in median)
    if with_b:
        header += ["Postern B", "B/A"]
    rows = []
    for metric, label, unit, _better, decimals in ROWS:
        if metric == "copy_mbs":
            label = f"{label} ({meta['copy_mib']} MiB table)"
        if metric.startswith("mem_"):
            label = f"{label} ({meta['sessions']} sessions)"
        cells = [median.get((t, metric)) for t in TARGETS]
        rows.append(
            [label, unit]
            + [fmt(c, decimals) for c in cells]
            + [fmt(ratio(cells[2], cells[0]), 2), fmt(ratio(cells[2], cells[1]), 2)]
        )
        if with_b:
            b = median.get(("postern-b", metric))
            rows[-1] += [fmt(b, decimals), fmt(ratio(b, cells[2]), 2)]

    def get(target, metric):
        return median.get((target, metric))

    goals = []

    def goal(text, measured, ok):
        verdict = "—" if ok is None else ("met" if ok else "NOT met")
        goals.append([text, measured, verdict])

    r = ratio(get("postern", "so16_tps"), get("pgbouncer", "so16_tps"))
    goal("select-only, 16 clients: ≥ 1.0× PgBouncer", with_unit(r, 2, "×"), None if r is None else r >= 1.0)
    r = ratio(get("postern", "tpcb_tps"), get("pgbouncer", "tpcb_tps"))
    goal("TPC-B, 16 clients: ≥ 1.0× PgBouncer", with_unit(r, 2, "×"), None if r is None else r >= 1.0)
    a, b = get("postern", "so1_p50"), get("direct", "so1_p50")
    added = None if a is None or b is None else a - b
    goal("1 client: added latency p50 ≤ 100 µs", with_unit(added, 0, " µs"), None if added is None else added <= 100)
    r = ratio(get("postern", "conn_cps"), get("direct", "conn_cps"))
    goal("connections/s: ≥ 50% of direct", with_unit(None if r is None else 100 * r, 0, "%"), None if r is None else r >= 0.5)
    r = ratio(get("postern", "copy_mbs"), get("direct", "copy_mbs"))
    goal("COPY: ≥ 80% of direct", with_unit(None if r is None else 100 * r, 0, "%"), None if r is None else r >= 0.8)
    m = get("postern", "mem_per_session_kib")
    goal("memory per idle session: ≤ 64 KiB", with_unit(m, 1, " KiB"), None if m is None else m <= 64)

    def load_text(name):
        v = loads.get(name)
        if not v:
            return "—"
        if len(v) == 1:
            return f"{v[0]:.2f}"
        return f"median {statistics.median(v):.2f}, max {max(v):.2f} ({len(v)} samples)"

    rep_counts = sorted(set(reps.values()))
    machine = [
        ("machine", f"{meta['nproc']} CPUs ({meta['cpu']}), {meta['ram']} RAM, {meta['kernel']}"),
        ("software", f"{meta['postgres']}; {meta['pgbouncer']}; postern {meta['postern']} (release build)"),
        ("settings", f"{meta['duration']} s per pgbench run, "
                     + (f"{meta['reps']} repetitions (each figure the median of "
                        f"{'/'.join(str(c) for c in rep_counts)} values)" if meta["reps"] > 1 else "1 repetition")
                     + f", pgbench scale {meta['scale']}, {meta['sessions']} idle sessions, "
                     f"COPY of {meta['copy_mib']} MiB"),
        ("load average (1 min)", f"before {load_text('before')}; during {load_text('during')}; after {load_text('after')}"),
        ("started", meta["started"]),
        ("command", meta["command"]),
    ]
    notes = [
        "Latency percentiles are nearest-rank over every transaction in pgbench's per-transaction logs.",
        "Memory: Postern is one all-in-one process (auth, proxy and agent), so its RSS includes the auth "
        "service; PgBouncer's is its one process. Direct has no middle process (—). Idle PgBouncer clients "
        "in session mode hold no server connection until their first query; Postern's hold one each.",
        "MB/s are 10^6 bytes of COPY text output per second of psql's wall time.",
    ]

    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    out = []
    out.append("  ".join(h.ljust(widths[i]) if i < 2 else h.rjust(widths[i]) for i, h in enumerate(header)))
    for row in rows:
        out.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)))
    out.append("")
    gw = max(len(g[0]) for g in goals)
    mw = max(len(g[1]) for g in goals)
    out.append("Goals (issue 8):")
    for text, measured, verdict in goals:
        out.append(f"  {text.ljust(gw)}  {measured.rjust(mw)}  {verdict}")
    out.append("")
    for key, value in machine:
        out.append(f"{key}: {value}")
    print("\n".join(out))

    if args.out:
        md = []
        md.append("| " + " | ".join(header) + " |")
        md.append("|" + "|".join(["---", "---"] + ["---:"] * 5) + "|")
        for row in rows:
            md.append("| " + " | ".join(row) + " |")
        md.append("")
        md.append("| goal (issue 8) | measured | |")
        md.append("|---|---:|---|")
        for text, measured, verdict in goals:
            md.append(f"| {text} | {measured} | {verdict} |")
        md.append("")
        for key, value in machine:
            if key == "command":
                md.append(f"- {key}: `{value}`")
            else:
                md.append(f"- {key}: {value}")
        md.append("")
        for note in notes:
            md.append(f"- {note}")
        with open(args.out, "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hold")
    for name, env in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"), ("dbname", "PGDATABASE"),
                      ("root", "PGSSLROOTCERT"), ("cert", "PGSSLCERT"), ("key", "PGSSLKEY")):
        h.add_argument("--" + name, default=os.environ.get(env), required=env not in os.environ)
    h.add_argument("--ready", required=True)
    h.add_argument("--stop", required=True)
    h.add_argument("--count", type=int, required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("logs", nargs="+")
    rep = sub.add_parser("report")
    rep.add_argument("--results", required=True)
    rep.add_argument("--meta", required=True)
    rep.add_argument("--out")
    args = parser.parse_args()
    return {"hold": hold, "latency": latency, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
