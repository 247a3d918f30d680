#!/usr/bin/env bash
# The gateway's instructions per push, counted by valgrind's callgrind: a figure that does
# not move with the machine's load, for comparing two builds of the gateway's own code on a
# machine too noisy for req/s or CPU seconds to tell a few per cent apart.
#
#   bench/instructions.sh                       # PostgreSQL, the release build
#   BENCH_BIN=/tmp/old bench/instructions.sh    # another build, to compare
#   BENCH_BACKEND=sqlite bench/instructions.sh
#   BENCH_LOADGEN_ARGS=--unique-biz-no bench/instructions.sh   # each push with an out_biz_no
#
# Starts the simulator and one gateway under callgrind (unicast app, test mode, JSON logs at
# info, as bench/run.sh configures it), sends BENCH_CLIENTS (16) clients' unicast pushes
# for BENCH_SECS (25 s), zeroes the counters after BENCH_SKIP (6 s) and dumps them
# BENCH_WINDOW (15 s) later. Prints one JSON line: the pushes finished in that window (rows
# that left `pending`), the instructions the gateway executed in it (user space, every
# thread; not the kernel's, nor PostgreSQL's), and their quotient. Under callgrind the
# gateway runs about 50 times slower, so batches are those of a slow gateway: compare
# builds with this script, not with bench/run.sh's figures. Runs of one build agree to
# about 1%; the callgrind file is kept (BENCH_KEEP, default a temporary directory).
#
# Two things the count overstates. Work done on a clock rather than per push runs about 50
# times as often per push as it does at full speed: on SQLite, the checkpoint every 25 ms
# is about a tenth of the count (`walCheckpoint`, `walMerge`). And valgrind's CPU has no
# SHA extensions, so SHA-256 (the fingerprint, the token check) takes sha2's portable code,
# several times dearer than on a CPU with them.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

BIN=${BENCH_BIN:-$ROOT/target/release/umeng-push-gateway}
LOADGEN=$ROOT/target/release/examples/loadgen
BACKEND=${BENCH_BACKEND:-postgres}
CLIENTS=${BENCH_CLIENTS:-16}
read -r -a LOADGEN_ARGS <<<"${BENCH_LOADGEN_ARGS:-}"
SECS=${BENCH_SECS:-25}
SKIP=${BENCH_SKIP:-6}
WINDOW=${BENCH_WINDOW:-15}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
SIM_PORT=${BENCH_SIM_PORT:-18090}
GW_PORT=${BENCH_GW_PORT:-18080}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/umgw-instr.XXXXXX")
KEEP=${BENCH_KEEP:-$WORK}

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
[[ -x $LOADGEN ]] || cargo build --release --locked --example loadgen >&2

KEY=5f00000000000000000b0001
SECRET=instr$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
TOKEN=instr$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
PG_DB=umgw_instr_$$
if [[ $BACKEND == postgres ]]; then
    DB_URL=$PG_URL/$PG_DB
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
else
    DB_URL=sqlite://$WORK/gateway.db
fi

SIM_PID=
GW_PID=
LOAD_PID=
cleanup() {
    set +e
    for pid in $LOAD_PID $GW_PID $SIM_PID; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    [[ $BACKEND == postgres ]] && psql "$PG_URL/postgres" -qX -c "drop database if exists $PG_DB" >/dev/null 2>&1
    [[ $KEEP == "$WORK" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# Pushes no longer pending.
finished() {
    local sql="select count(*) from pushes where status <> 'pending'"
    if [[ $BACKEND == postgres ]]; then
        psql "$DB_URL" -tAXq -c "$sql"
    else
        python3 -c "import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True, timeout=5); print(c.execute(sys.argv[2]).fetchone()[0])" "$WORK/gateway.db" "$sql"
    fi
}

cat >"$WORK/gateway.toml" <<EOC
[server]
listen = "127.0.0.1:$GW_PORT"

[database]
url = "$DB_URL"
max_connections = 16

[umeng]
base_url = "http://127.0.0.1:$SIM_PORT"

[log]
format = "json"
level = "info"

[[apps]]
name = "bench-unicast"
platform = "android"
appkey = "$KEY"
master_secret = "$SECRET"

[[clients]]
name = "bench"
token_sha256 = "$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)"
scopes = ["send", "read"]
EOC

"$BIN" simulator --listen "127.0.0.1:$SIM_PORT" --app "$KEY:$SECRET:android" \
    --task-step-ms 60000 2>"$WORK/simulator.log" &
SIM_PID=$!
valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
    "$BIN" --config "$WORK/gateway.toml" serve 2>"$WORK/gateway.log" &
GW_PID=$!
for _ in $(seq 1 240); do
    curl -fsS -o /dev/null "http://127.0.0.1:$GW_PORT/healthz" 2>/dev/null && break
    kill -0 "$GW_PID" 2>/dev/null || { echo "the gateway exited; see $WORK/gateway.log" >&2; exit 1; }
    sleep 0.5
done

LOADGEN_TOKEN=$TOKEN "$LOADGEN" run --mode gateway --target "http://127.0.0.1:$GW_PORT" \
    --app bench-unicast --concurrency "$CLIENTS" --duration "$SECS" --warmup 1 "${LOADGEN_ARGS[@]}" >/dev/null &
LOAD_PID=$!
sleep "$SKIP"
before=$(finished)
callgrind_control -z "$GW_PID" >/dev/null
sleep "$WINDOW"
callgrind_control -d "$GW_PID" >/dev/null
after=$(finished)
wait "$LOAD_PID" || true
LOAD_PID=

pushes=$((after - before))
dump=$WORK/callgrind.out.1
instructions=$(callgrind_annotate "$dump" 2>/dev/null |
    awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
[[ $KEEP == "$WORK" ]] || cp "$dump" "$KEEP/"
printf '{"kind":"instructions","backend":"%s","clients":%s,"loadgen_args":"%s","bin":"%s","pushes":%s,"instructions":%s,"per_push":%s,"profile":"%s"}\n' \
    "$BACKEND" "$CLIENTS" "${BENCH_LOADGEN_ARGS:-}" "$BIN" "$pushes" "$instructions" \
    "$((pushes > 0 ? instructions / pushes : 0))" "$KEEP/$(basename "$dump")"
