#!/usr/bin/env bash
# Benchmark of umeng-push-gateway on this machine, in one command:
#
#   bench/run.sh
#
# Builds the release binary and the load generator (examples/loadgen.rs), starts the
# Umeng simulator, then measures at each concurrency level:
#   1. direct: signed unicast sends straight to the simulator;
#   2. gateway + SQLite and 3. gateway + PostgreSQL (a fresh database, dropped afterwards):
#      the same unicast as POST /v1/pushes (test mode, so no quota), without and with a
#      unique out_biz_no per request, the gateway forwarding to the same simulator;
#   4. pgbench: one INSERT of a ~1.5 KB history row per transaction, same clients;
# and the quota path: unicast pushes of one app alone, then during a flood of production
# groupcasts of another app (quota 5/minute: almost all 429). Prints a markdown table.
#
# Settings (environment): BENCH_CLIENTS ("16"; e.g. "1 16 64"), BENCH_DURATION (10 s),
# BENCH_WARMUP (2 s), BENCH_FLOOD_RATE (1000 req/s), BENCH_PG_URL (server URL without a
# database; postgres://postgres@127.0.0.1:5432), BENCH_SIM_PORT (18090), BENCH_GW_PORT
# (18080), BENCH_OUT (results file; default bench/results/<time>.jsonl), BENCH_SKIP_BUILD=1.
# Everything runs on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

CLIENTS=${BENCH_CLIENTS:-16}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
FLOOD_RATE=${BENCH_FLOOD_RATE:-1000}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
SIM_PORT=${BENCH_SIM_PORT:-18090}
GW_PORT=${BENCH_GW_PORT:-18080}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-$ROOT/bench/results/$STAMP.jsonl}

BIN=$ROOT/target/release/umeng-push-gateway
LOADGEN=$ROOT/target/release/examples/loadgen
WORK=$(mktemp -d "${TMPDIR:-/tmp}/umgw-bench.XXXXXX")
SIM_URL=http://127.0.0.1:$SIM_PORT
GW_URL=http://127.0.0.1:$GW_PORT

# Apps: one for unicast load, one to flood with groupcasts.
UNICAST_KEY=5f00000000000000000b0001
UNICAST_SECRET=bench$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
FLOOD_KEY=5f00000000000000000b0002
FLOOD_SECRET=bench$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
TOKEN=bench$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
TOKEN_SHA=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
export LOADGEN_TOKEN=$TOKEN

PG_DB=umgw_bench_$$
PGB_DB=umgw_pgbench_$$
SIM_PID=
GW_PID=
PIDS=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_pid() {
    local pid=$1
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    stop_pid "$GW_PID"
    stop_pid "$SIM_PID"
    psql "$PG_URL/postgres" -qX -c "drop database if exists $PG_DB" >/dev/null 2>&1
    psql "$PG_URL/postgres" -qX -c "drop database if exists $PGB_DB" >/dev/null 2>&1
    if [[ $rc -ne 0 ]]; then
        log "failed (exit $rc); logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() {
    local port=$1 pid=$2
    for _ in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited while starting"
            return 1
        fi
        if ! port_free "$port"; then
            return 0
        fi
        sleep 0.1
    done
    log "nothing listens on port $port after 15 s"
    return 1
}

# CPU seconds (user + system) used so far by process $1.
cpu_secs() {
    awk '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / 100 }' "/proc/$1/stat"
}

machine_facts() {
    local cpu pg
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    pg=$(psql "$PG_URL/postgres" -qXAt -c 'show server_version' 2>/dev/null || echo '?')
    printf '{"kind":"machine","nproc":%s,"cpu":"%s","postgres":"%s","load":"%s","date":"%s","commit":"%s"}\n' \
        "$(nproc)" "$cpu" "$pg" "$(cut -d' ' -f1-3 /proc/loadavg)" "$STAMP" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
}

# ---------------------------------------------------------------------------------------
for port in "$SIM_PORT" "$GW_PORT"; do
    port_free "$port" || { log "port $port is in use (set BENCH_SIM_PORT / BENCH_GW_PORT)"; exit 1; }
done
command -v pgbench >/dev/null || PATH=$PATH:/usr/lib/postgresql/15/bin
command -v pgbench >/dev/null || { log "pgbench not found"; exit 1; }
psql "$PG_URL/postgres" -qXAt -c 'select 1' >/dev/null || { log "PostgreSQL at $PG_URL is not reachable"; exit 1; }

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release --locked --bin umeng-push-gateway --example loadgen >&2
fi

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
machine_facts >>"$OUT"

log "starting the simulator on $SIM_URL"
"$BIN" simulator --listen "127.0.0.1:$SIM_PORT" \
    --app "$UNICAST_KEY:$UNICAST_SECRET:android" --app "$FLOOD_KEY:$FLOOD_SECRET:android" \
    --task-step-ms 60000 2>"$WORK/simulator.log" &
SIM_PID=$!
wait_port "$SIM_PORT" "$SIM_PID"

run_load() { # label, then loadgen run arguments
    local label=$1
    shift
    "$LOADGEN" run --label "$label" --duration "$DURATION" --warmup "$WARMUP" "$@" | tee -a "$OUT" >&2
}

for c in $CLIENTS; do
    log "direct, $c clients"
    LOADGEN_SECRET=$UNICAST_SECRET run_load "direct-c$c" --mode direct --target "$SIM_URL" \
        --appkey "$UNICAST_KEY" --concurrency "$c"
done

write_config() { # backend, database url
    cat >"$WORK/gateway-$1.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"

[database]
url = "$2"
max_connections = 16

[umeng]
base_url = "$SIM_URL"

[log]
format = "json"
level = "info"

[[apps]]
name = "bench-unicast"
platform = "android"
appkey = "$UNICAST_KEY"
master_secret = "$UNICAST_SECRET"

[[apps]]
name = "bench-flood"
platform = "android"
appkey = "$FLOOD_KEY"
master_secret = "$FLOOD_SECRET"

[[clients]]
name = "bench"
token_sha256 = "$TOKEN_SHA"
scopes = ["send", "read"]
EOF
}

bench_gateway() { # backend, database url
    local backend=$1 before after c biz label flood_pid
    write_config "$backend" "$2"
    log "starting the gateway on $backend"
    "$BIN" --config "$WORK/gateway-$backend.toml" serve 2>"$WORK/gateway-$backend.log" &
    GW_PID=$!
    wait_port "$GW_PORT" "$GW_PID"
    for c in $CLIENTS; do
        for biz in no yes; do
            label="$backend-c$c-biz$biz"
            log "gateway + $backend, $c clients, out_biz_no: $biz"
            local extra=()
            [[ $biz == yes ]] && extra=(--unique-biz-no)
            before=$(cpu_secs "$GW_PID")
            run_load "$label" --mode gateway --target "$GW_URL" --app bench-unicast \
                --backend "$backend" --concurrency "$c" "${extra[@]}"
            after=$(cpu_secs "$GW_PID")
            printf '{"kind":"cpu","label":"%s","cpu_secs":%s}\n' "$label" \
                "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a - b }')" >>"$OUT"
        done
    done

    log "quota path on $backend: unicast alone, then with a groupcast flood of another app"
    run_load "$backend-quota-alone" --mode gateway --target "$GW_URL" --app bench-unicast \
        --backend "$backend" --scenario quota-alone --concurrency 16
    "$LOADGEN" run --label "$backend-flood" --mode groupcast-flood --target "$GW_URL" \
        --app bench-flood --backend "$backend" --scenario flood --concurrency 16 \
        --rate "$FLOOD_RATE" --duration "$DURATION" --warmup "$WARMUP" >"$WORK/flood.json" &
    flood_pid=$!
    PIDS+=("$flood_pid")
    run_load "$backend-quota-flood" --mode gateway --target "$GW_URL" --app bench-unicast \
        --backend "$backend" --scenario quota-flood --concurrency 16
    wait "$flood_pid"
    tee -a "$OUT" <"$WORK/flood.json" >&2

    printf '{"kind":"rss","backend":"%s","vmhwm_kib":%s}\n' "$backend" \
        "$(awk '/^VmHWM:/ { print $2 }' "/proc/$GW_PID/status")" | tee -a "$OUT" >&2
    stop_pid "$GW_PID"
    GW_PID=
}

bench_gateway sqlite "sqlite://$WORK/gateway.db"

psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
bench_gateway postgres "$PG_URL/$PG_DB"
psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null

# The floor: one durable INSERT of a history row like the gateway's per transaction.
log "pgbench reference"
psql "$PG_URL/postgres" -qX -c "create database $PGB_DB" >/dev/null
write_config pgbench "$PG_URL/$PGB_DB"
"$BIN" --config "$WORK/gateway-pgbench.toml" migrate >/dev/null
cp "$ROOT/bench/history-insert.sql" "$WORK/insert.sql"
for c in $CLIENTS; do
    log "pgbench, $c clients"
    threads=$((c < 2 ? 1 : 2))
    (cd "$WORK" && rm -f pgb_log* && pgbench -n -M prepared -c "$c" -j "$threads" -T "$DURATION" \
        -f insert.sql -l --log-prefix=pgb_log "$PG_URL/$PGB_DB" >"$WORK/pgbench-c$c.txt" 2>&1)
    "$LOADGEN" pgbench --label "pgbench-c$c" --concurrency "$c" --duration "$DURATION" \
        "$WORK"/pgb_log* | tee -a "$OUT" >&2
done
psql "$PG_URL/postgres" -qX -c "drop database $PGB_DB" >/dev/null

log "results: $OUT"
echo
"$LOADGEN" report "$OUT"
