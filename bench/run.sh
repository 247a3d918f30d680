#!/usr/bin/env bash
# Benchmark of umeng-push-gateway on this machine, in one command:
#
#   bench/run.sh                                  # the main scenario, about 3 minutes
#   BENCH_SCENARIOS="upstream replicas" bench/run.sh
#   BENCH_SCENARIOS=all bench/run.sh              # main, async, upstream, parts and replicas
#   BENCH_SCENARIOS=purge bench/run.sh            # the retention purge of 1M pushes
#
# Builds the release binary and the load generator (examples/loadgen.rs), starts the
# Umeng simulator, then runs the scenarios named in BENCH_SCENARIOS (default "main"):
#
# main: at each concurrency level of BENCH_CLIENTS
#   1. direct: signed unicast sends straight to the simulator;
#   2. gateway + SQLite and 3. gateway + PostgreSQL (a fresh database, dropped afterwards):
#      the same unicast as POST /v1/pushes (test mode, so no quota), without and with a
#      unique out_biz_no per request, the gateway forwarding to the same simulator;
#   4. gateway + PostgreSQL with `database.outcome_commit = "relaxed"` (a fresh database):
#      the same unicast without out_biz_no; outcome records commit without waiting for the
#      WAL flush, admissions still wait;
#   5. pgbench: one INSERT of a ~1.5 KB history row per transaction, same clients;
#   and the quota path: unicast pushes of one app alone, then during a flood of production
#   groupcasts of another app (quota 5/minute: almost all 429).
# upstream: a realistic Umeng. The simulator answers every /api/send after
#   BENCH_UPSTREAM_MS (80 ms; a latency fault set through POST /_sim/faults); at each level
#   of BENCH_UPSTREAM_CLIENTS ("64 256") direct calls, then gateway + PostgreSQL. The
#   gateway should reach 0.9x direct: nothing in it may serialise the calls (at 256 clients
#   and 80 ms direct calls make 3,200 req/s, which needs the CPU to carry them too).
# async: asynchronous intake on SQLite and PostgreSQL: BENCH_CLIENTS clients send the main
#   scenario's unicast with `Prefer: respond-async` for BENCH_DURATION; the gateway's delivery
#   worker drains the queue to the simulator. Reports 202s per second (and × the main
#   scenario's synchronous rate, when both ran), the drain (pushes accepted by Umeng per
#   second from the first 202 until the queue is empty), the queue's peak depth (sampled
#   every 0.25 s), the worker's pushes per claim (from `delivery_claims_total`; over the
#   intake and the drain, or the intake alone with a slow upstream) and the gateway's peak
#   RSS. Then the intake again with the simulator answering sends after BENCH_UPSTREAM_MS,
#   as Umeng does: the worker's sends then take the time they take in production instead
#   of competing with the intake for the CPU at full speed (that run's queue drains
#   afterwards with the latency removed, unmeasured).
# parts: one request for a large audience, on SQLite and PostgreSQL: a listcast of
#   BENCH_PARTS_AUDIENCE (10,000) tokens (20 parts of 500) and a customizedcast of as many
#   aliases, each sent BENCH_PARTS_REPEAT (5) times, synchronously and one at a time: wall
#   time per request, the Umeng calls the simulator received, the gateway's peak RSS.
# replicas: BENCH_REPLICAS ("1 2 4") gateway processes on one PostgreSQL database, on ports
#   BENCH_GW_PORT, +1, +2, ...; the load generator spreads its connections round robin over
#   them, at each level of BENCH_REPLICA_CLIENTS ("16 64").
# purge: the retention purge of BENCH_PURGE_ROWS (1,000,000) pushes 100-110 days old on
#   PostgreSQL (a quarter with an out_biz_no, so with an idempotency key): a gateway starts
#   with retention_days = 90 and its first purge round deletes them, batch after batch.
#   Seconds from its start to its "old rows purged" line, WAL written, the size of pushes
#   before and after, gateway and PostgreSQL CPU seconds. Not in `all` (filling takes
#   minutes).
#
# Every run also records the CPU seconds per request of the process under test (the
# simulator for direct runs, all gateway replicas for gateway runs) and of the PostgreSQL
# backends serving the run's database, over the measured window (warm-up left out), and
# the peak RSS during the run (VmHWM, reset
# through /proc/PID/clear_refs before each run; the largest replica's). Prints markdown
# tables and the issue-13 targets.
#
# Settings (environment): BENCH_SCENARIOS, BENCH_CLIENTS ("16"; e.g. "1 16 64"),
# BENCH_DURATION (10 s), BENCH_WARMUP (2 s), BENCH_FLOOD_RATE (1000 req/s),
# BENCH_UPSTREAM_MS, BENCH_UPSTREAM_CLIENTS, BENCH_REPLICAS, BENCH_REPLICA_CLIENTS,
# BENCH_DB_POOL (database.max_connections per gateway; 16), BENCH_PG_URL (server URL
# without a database; postgres://postgres@127.0.0.1:5432), BENCH_SIM_PORT (18090),
# BENCH_GW_PORT (18080), BENCH_OUT (results file; default bench/results/<time>.jsonl),
# BENCH_SKIP_BUILD=1, BENCH_BIN (the gateway binary measured, e.g. a copy of an earlier
# build for a before/after comparison on the same machine state; default
# target/release/umeng-push-gateway). Everything runs on 127.0.0.1; every process started here is stopped
# on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SCENARIOS=" ${BENCH_SCENARIOS:-main} "
CLIENTS=${BENCH_CLIENTS:-16}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
FLOOD_RATE=${BENCH_FLOOD_RATE:-1000}
UPSTREAM_MS=${BENCH_UPSTREAM_MS:-80}
UPSTREAM_CLIENTS=${BENCH_UPSTREAM_CLIENTS:-64 256}
REPLICAS=${BENCH_REPLICAS:-1 2 4}
REPLICA_CLIENTS=${BENCH_REPLICA_CLIENTS:-16 64}
PARTS_AUDIENCE=${BENCH_PARTS_AUDIENCE:-10000}
PARTS_REPEAT=${BENCH_PARTS_REPEAT:-5}
PURGE_ROWS=${BENCH_PURGE_ROWS:-1000000}
DB_POOL=${BENCH_DB_POOL:-16}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
SIM_PORT=${BENCH_SIM_PORT:-18090}
GW_PORT=${BENCH_GW_PORT:-18080}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-$ROOT/bench/results/$STAMP.jsonl}

BIN=${BENCH_BIN:-$ROOT/target/release/umeng-push-gateway}
LOADGEN=$ROOT/target/release/examples/loadgen
WORK=$(mktemp -d "${TMPDIR:-/tmp}/umgw-bench.XXXXXX")
SIM_URL=http://127.0.0.1:$SIM_PORT

# Apps: one for unicast load, one to flood with groupcasts.
UNICAST_KEY=5f00000000000000000b0001
UNICAST_SECRET=bench$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
FLOOD_KEY=5f00000000000000000b0002
FLOOD_SECRET=bench$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
TOKEN=bench$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
TOKEN_SHA=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
export LOADGEN_TOKEN=$TOKEN

PG_DB=umgw_bench_$$
OUTCOME_COMMIT=durable # the gateways started from here on (the main scenario sets "relaxed" for one)
PGB_DB=umgw_pgbench_$$
SIM_PID=
GW_PIDS=()
GW_URLS=
PIDS=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

has_scenario() {
    [[ $SCENARIOS == *" $1 "* || ($1 != purge && $SCENARIOS == *" all "*) ]]
}

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
    for pid in "${PIDS[@]}" "${GW_PIDS[@]}"; do
        stop_pid "$pid"
    done
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

# "PID CPU-seconds" (user + system) of each process given.
cpu_of_pids() {
    local pid
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] || continue
        awk -v pid="$pid" '{ sub(/^.*\) /, ""); printf "%s %.2f\n", pid, ($12 + $13) / 100 }' \
            "/proc/$pid/stat" 2>/dev/null || true
    done
}

# PIDs of the PostgreSQL backends connected to database $1.
pg_backends() {
    local dir cmd
    [[ -n $1 ]] || return 0
    for dir in /proc/[0-9]*; do
        cmd=$({ tr '\0' ' ' <"$dir/cmdline"; } 2>/dev/null) || continue
        [[ $cmd == "postgres: "*" $1 "* ]] && echo "${dir#/proc/}"
    done
    return 0
}

machine_facts() {
    local cpu pg
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    pg=$(psql "$PG_URL/postgres" -qXAt -c 'show server_version' 2>/dev/null || echo '?')
    printf '{"kind":"machine","nproc":%s,"cpu":"%s","postgres":"%s","load":"%s","date":"%s","commit":"%s","scenarios":"%s"}\n' \
        "$(nproc)" "$cpu" "$pg" "$(cut -d' ' -f1-3 /proc/loadavg)" "$STAMP" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "$(echo $SCENARIOS)"
}

# ---------------------------------------------------------------------------------------
MAX_REPLICAS=1
if has_scenario replicas; then
    for n in $REPLICAS; do ((n > MAX_REPLICAS)) && MAX_REPLICAS=$n; done
fi
for port in "$SIM_PORT" $(seq "$GW_PORT" $((GW_PORT + MAX_REPLICAS - 1))); do
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

# One measured run: label, the process kind ("gateway" or "simulator"), the database whose
# backends to count (or ""), then loadgen run arguments. The processes measured are
# MEASURED_PIDS (set by the caller). The load generator counts their CPU seconds (and the
# database backends') over the measured window, warm-up left out, into its run line; the
# `cpu` line written here holds the peak RSS.
measure() {
    local label=$1 proc=$2 db=$3 pid rss pids
    shift 3
    for pid in "${MEASURED_PIDS[@]}"; do
        echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true # resets VmHWM
    done
    pids=$(IFS=,; echo "${MEASURED_PIDS[*]}")
    run_load "$label" --cpu-pids "$pids" ${db:+--cpu-pg-db "$db"} "$@"
    rss=0
    for pid in "${MEASURED_PIDS[@]}"; do
        rss=$(awk -v m="$rss" '/^VmHWM:/ { print ($2 > m ? $2 : m) }' "/proc/$pid/status")
    done
    printf '{"kind":"cpu","label":"%s","proc":"%s","procs":%s,"rss_kib":%s}\n' \
        "$label" "$proc" "${#MEASURED_PIDS[@]}" "$rss" | tee -a "$OUT" >&2
}

write_config() { # file, database url, port
    cat >"$1" <<EOC
[server]
listen = "127.0.0.1:$3"

[database]
url = "$2"
max_connections = $DB_POOL
outcome_commit = "$OUTCOME_COMMIT"

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
EOC
}

# Starts $2 gateway replicas on database url $1 (ports GW_PORT, GW_PORT+1, ...); the first
# applies the migrations before the others start. Sets GW_PIDS and GW_URLS.
start_gateways() {
    local url=$1 count=$2 i port name
    GW_PIDS=()
    GW_URLS=
    for ((i = 0; i < count; i++)); do
        port=$((GW_PORT + i))
        name=$(basename "${url%%\?*}" | tr -c 'A-Za-z0-9_\n' '_')-$port
        write_config "$WORK/gateway-$name.toml" "$url" "$port"
        "$BIN" --config "$WORK/gateway-$name.toml" serve 2>>"$WORK/gateway-$name.log" &
        GW_PIDS+=("$!")
        wait_port "$port" "$!"
        GW_URLS+="${GW_URLS:+,}http://127.0.0.1:$port"
    done
}

stop_gateways() {
    local pid
    for pid in "${GW_PIDS[@]}"; do
        stop_pid "$pid"
    done
    GW_PIDS=()
    GW_URLS=
}

bench_gateway() { # backend, database url
    local backend=$1 db=
    local c biz label flood_pid
    [[ $backend == postgres ]] && db=$PG_DB
    log "starting the gateway on $backend"
    start_gateways "$2" 1
    MEASURED_PIDS=("${GW_PIDS[@]}")
    for c in $CLIENTS; do
        for biz in no yes; do
            label="$backend-c$c-biz$biz"
            log "gateway + $backend, $c clients, out_biz_no: $biz"
            local extra=()
            [[ $biz == yes ]] && extra=(--unique-biz-no)
            measure "$label" gateway "$db" --mode gateway --target "$GW_URLS" \
                --app bench-unicast --backend "$backend" --concurrency "$c" "${extra[@]}"
        done
    done

    log "quota path on $backend: unicast alone, then with a groupcast flood of another app"
    measure "$backend-quota-alone" gateway "$db" --mode gateway --target "$GW_URLS" \
        --app bench-unicast --backend "$backend" --scenario quota-alone --concurrency 16
    "$LOADGEN" run --label "$backend-flood" --mode groupcast-flood --target "$GW_URLS" \
        --app bench-flood --backend "$backend" --scenario flood --concurrency 16 \
        --rate "$FLOOD_RATE" --duration "$DURATION" --warmup "$WARMUP" >"$WORK/flood.json" &
    flood_pid=$!
    PIDS+=("$flood_pid")
    measure "$backend-quota-flood" gateway "$db" --mode gateway --target "$GW_URLS" \
        --app bench-unicast --backend "$backend" --scenario quota-flood --concurrency 16
    wait "$flood_pid"
    tee -a "$OUT" <"$WORK/flood.json" >&2
    stop_gateways
}

if has_scenario main; then
    MEASURED_PIDS=("$SIM_PID")
    for c in $CLIENTS; do
        log "direct, $c clients"
        LOADGEN_SECRET=$UNICAST_SECRET measure "direct-c$c" simulator "" --mode direct \
            --target "$SIM_URL" --appkey "$UNICAST_KEY" --concurrency "$c"
    done

    bench_gateway sqlite "sqlite://$WORK/gateway.db"

    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    bench_gateway postgres "$PG_URL/$PG_DB"
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null

    # Outcome records that do not wait for their WAL flush (admissions still do).
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    OUTCOME_COMMIT=relaxed
    log "starting the gateway on postgres, relaxed outcome commits"
    start_gateways "$PG_URL/$PG_DB" 1
    OUTCOME_COMMIT=durable
    MEASURED_PIDS=("${GW_PIDS[@]}")
    for c in $CLIENTS; do
        log "gateway + postgres, relaxed outcome commits, $c clients"
        measure "postgres-relaxed-c$c-bizno" gateway "$PG_DB" --mode gateway \
            --target "$GW_URLS" --app bench-unicast --backend postgres-relaxed --concurrency "$c"
    done
    stop_gateways
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null

    # The floor: one durable INSERT of a history row like the gateway's per transaction.
    log "pgbench reference"
    psql "$PG_URL/postgres" -qX -c "create database $PGB_DB" >/dev/null
    write_config "$WORK/gateway-pgbench.toml" "$PG_URL/$PGB_DB" "$GW_PORT"
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
fi

if has_scenario upstream; then
    log "upstream: the simulator answers sends after $UPSTREAM_MS ms"
    curl -fsS -o /dev/null -X POST "$SIM_URL/_sim/faults" -H 'content-type: application/json' \
        -d "{\"path\":\"/api/send\",\"kind\":{\"kind\":\"latency\",\"ms\":$UPSTREAM_MS}}"
    MEASURED_PIDS=("$SIM_PID")
    for c in $UPSTREAM_CLIENTS; do
        log "direct, $c clients, upstream $UPSTREAM_MS ms"
        LOADGEN_SECRET=$UNICAST_SECRET measure "direct-up$UPSTREAM_MS-c$c" simulator "" \
            --mode direct --target "$SIM_URL" --appkey "$UNICAST_KEY" --concurrency "$c" \
            --scenario upstream --upstream-ms "$UPSTREAM_MS"
    done
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    start_gateways "$PG_URL/$PG_DB" 1
    MEASURED_PIDS=("${GW_PIDS[@]}")
    for c in $UPSTREAM_CLIENTS; do
        log "gateway + postgres, $c clients, upstream $UPSTREAM_MS ms"
        measure "postgres-up$UPSTREAM_MS-c$c" gateway "$PG_DB" --mode gateway \
            --target "$GW_URLS" --app bench-unicast --backend postgres --concurrency "$c" \
            --scenario upstream --upstream-ms "$UPSTREAM_MS"
    done
    stop_gateways
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null
    curl -fsS -o /dev/null -X DELETE "$SIM_URL/_sim/faults"
fi

# The one number query $3 answers, on the database at $2 (backend $1: sqlite or postgres).
db_count() { # backend, database url or file, query
    if [[ $1 == postgres ]]; then
        psql "$2" -tAXq -c "$3"
    else
        python3 -c "import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True, timeout=5); print(c.execute(sys.argv[2]).fetchone()[0])" "$2" "$3"
    fi
}

# The queue of asynchronous pushes not final yet.
QUEUE_DEPTH_SQL="select count(*) from pushes where status in ('awaiting_send', 'pending')"

# The queue's depth now (-1 when it cannot be read).
queue_depth() { # backend, database url or file
    db_count "$1" "$2" "$QUEUE_DEPTH_SQL" 2>/dev/null || echo -1
}

# Prints the queue depth every 0.25 s on one connection until killed (run it in the
# background). A psql or python3 started for each sample cost the gateway a fifth of its
# asynchronous intake.
queue_depth_sampler() { # backend, database url or file
    if [[ $1 == postgres ]]; then
        # exec: the caller's $! is psql itself; the loop ends on its next write after psql.
        exec psql "$2" -tAXq 2>/dev/null < <(while sleep 0.25; do echo "$QUEUE_DEPTH_SQL;"; done)
    else
        exec python3 -c "
import sqlite3, sys, time
c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True, timeout=5)
while True:
    time.sleep(0.25)
    try:
        # fetchall ends the statement: an open one would hold back the checkpoint
        print(c.execute(sys.argv[2]).fetchall()[0][0], flush=True)
    except sqlite3.Error:
        print(-1, flush=True)
" "$2" "$QUEUE_DEPTH_SQL"
    fi
}

# Asynchronous pushes Umeng accepted.
accepted_async() { # backend, database url or file
    db_count "$1" "$2" "select count(*) from pushes where delivery = 'async' and status = 'accepted'"
}

# The claims of the first gateway's delivery worker that took pushes, so far (empty when
# the build has no such counter).
claims_took() {
    # awk reads to the end: leaving early would fail curl's write (and the pipeline).
    { curl -fsS "http://127.0.0.1:$GW_PORT/metrics" 2>/dev/null || true; } \
        | awk '/^delivery_claims_total\{result="took"\}/ && !n { n = $2 } END { print n }'
}

# Records the claims that took pushes since $3 (a claims_took reading) beside the pushes
# Umeng accepted meanwhile ($2); nothing for a build without the counter.
claims_line() { # label, pushes, claims before
    local claims
    claims=$(claims_took)
    [[ $claims =~ ^[0-9]+$ && $3 =~ ^[0-9]+$ ]] || return 0
    printf '{"kind":"claims","label":"%s","pushes":%s,"claims":%s}\n' \
        "$1" "$2" "$((claims - $3))" | tee -a "$OUT" >&2
}

bench_async() { # backend, database url, what queue_depth reads
    local backend=$1 url=$2 where=$3 db= c label start end depth peak sampler pushes before
    local claims_before claims
    [[ $backend == postgres ]] && db=$PG_DB
    start_gateways "$url" 1
    MEASURED_PIDS=("${GW_PIDS[@]}")
    for c in $CLIENTS; do
      for up in 0 "$UPSTREAM_MS"; do
        label="$backend-async-c$c"
        ((up > 0)) && label="$backend-async-up$up-c$c"
        log "asynchronous intake on $backend, $c clients, upstream $up ms"
        if ((up > 0)); then
            curl -fsS -o /dev/null -X POST "$SIM_URL/_sim/faults" -H 'content-type: application/json' \
                -d "{\"path\":\"/api/send\",\"kind\":{\"kind\":\"latency\",\"ms\":$up}}"
        fi
        # Earlier runs on this database count no more.
        before=$(accepted_async "$backend" "$where")
        claims_before=$(claims_took)
        queue_depth_sampler "$backend" "$where" >"$WORK/depth-$label" &
        sampler=$!
        PIDS+=("$sampler")
        start=$(date +%s.%N)
        measure "$label" gateway "$db" --mode gateway --target "$GW_URLS" --app bench-unicast \
            --backend "$backend" --concurrency "$c" --scenario async --respond-async \
            --upstream-ms "$up"
        if ((up > 0)); then
            # Pushes per claim while Umeng is slow: the sends and claims of the intake only.
            claims_line "$label" "$(($(accepted_async "$backend" "$where") - before))" \
                "$claims_before"
            # The queue left by a slow upstream would take minutes to drain (the worker's
            # per-app concurrency over the latency); it drains at full speed, unmeasured.
            curl -fsS -o /dev/null -X DELETE "$SIM_URL/_sim/faults"
            for _ in $(seq 1 1200); do
                [[ $(queue_depth "$backend" "$where") == 0 ]] && break
                sleep 0.25
            done
            stop_pid "$sampler"
            continue
        fi
        for _ in $(seq 1 1200); do
            depth=$(queue_depth "$backend" "$where")
            [[ $depth == 0 ]] && break
            sleep 0.25
        done
        end=$(date +%s.%N)
        stop_pid "$sampler"
        peak=$(sort -n "$WORK/depth-$label" | tail -n1)
        pushes=$(($(accepted_async "$backend" "$where") - before))
        printf '{"kind":"drain","label":"%s","pushes":%s,"drain_secs":%s,"peak_depth":%s,"left":%s}\n' \
            "$label" "$pushes" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" \
            "${peak:-0}" "${depth:-0}" | tee -a "$OUT" >&2
        claims_line "$label" "$pushes" "$claims_before"
      done
    done
    stop_gateways
}

if has_scenario async; then
    bench_async sqlite "sqlite://$WORK/gateway-async.db" "$WORK/gateway-async.db"
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    bench_async postgres "$PG_URL/$PG_DB" "$PG_URL/$PG_DB"
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null
fi

# Sends the parts scenario's requests to one gateway on $2 (backend $1).
bench_parts() { # backend, database url
    local backend=$1 url=$2 kind i answer code ms codes walls calls rss
    start_gateways "$url" 1
    python3 - "$WORK" "$PARTS_AUDIENCE" <<'EOP'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
note = {"title": "Bench", "text": "One request, a large audience"}
bodies = {
    "listcast": {"app": "bench-unicast", "type": "listcast", "notification": note,
                 "device_tokens": [f"{i:0>44}" for i in range(n)], "production_mode": False},
    "customizedcast": {"app": "bench-unicast", "type": "customizedcast", "notification": note,
                       "alias_type": "user_id", "aliases": [f"user-{i}" for i in range(n)],
                       "production_mode": False},
}
for kind, body in bodies.items():
    with open(f"{work}/parts-{kind}.json", "w") as out:
        json.dump(body, out)
EOP
    for kind in listcast customizedcast; do
        log "one $kind to $PARTS_AUDIENCE recipients on $backend, $PARTS_REPEAT times"
        echo 5 >"/proc/${GW_PIDS[0]}/clear_refs" 2>/dev/null || true
        curl -sS -X DELETE "$SIM_URL/_sim/requests" >/dev/null
        codes=
        walls=
        for i in $(seq 1 "$PARTS_REPEAT"); do
            answer=$(curl -sS -o "$WORK/parts-answer.json" -w '%{http_code} %{time_total}' \
                -X POST "$GW_URLS/v1/pushes" -H "authorization: Bearer $TOKEN" \
                -H 'content-type: application/json' --data-binary "@$WORK/parts-$kind.json")
            code=${answer%% *}
            ms=$(awk -v t="${answer##* }" 'BEGIN { printf "%.1f", t * 1000 }')
            codes+="${codes:+ }$code"
            walls+="${walls:+,}$ms"
        done
        calls=$(curl -sS "$SIM_URL/_sim/requests" | python3 -c 'import json, sys; print(sum(1 for r in json.load(sys.stdin) if r["path"] == "/api/send"))')
        rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/${GW_PIDS[0]}/status")
        printf '{"kind":"parts","backend":"%s","cast":"%s","audience":%s,"requests":%s,"statuses":"%s","wall_ms":[%s],"umeng_calls":%s,"rss_kib":%s}\n' \
            "$backend" "$kind" "$PARTS_AUDIENCE" "$PARTS_REPEAT" "$codes" "$walls" "$calls" "$rss" |
            tee -a "$OUT" >&2
    done
    stop_gateways
}

if has_scenario parts; then
    bench_parts sqlite "sqlite://$WORK/gateway-parts.db"
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    bench_parts postgres "$PG_URL/$PG_DB"
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null
fi

if has_scenario replicas; then
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    for n in $REPLICAS; do
        log "starting $n gateway replica(s) on one PostgreSQL database"
        start_gateways "$PG_URL/$PG_DB" "$n"
        MEASURED_PIDS=("${GW_PIDS[@]}")
        for c in $REPLICA_CLIENTS; do
            log "gateway + postgres, $n replica(s), $c clients"
            measure "postgres-r$n-c$c" gateway "$PG_DB" --mode gateway --target "$GW_URLS" \
                --app bench-unicast --backend postgres --concurrency "$c" --scenario replicas
        done
        stop_gateways
    done
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB" >/dev/null
fi

# Fills database $1 with PURGE_ROWS old pushes.
fill_old_pushes() { # database url
    local url=$1
    write_config "$WORK/gateway-purge.toml" "$url" "$GW_PORT"
    "$BIN" --config "$WORK/gateway-purge.toml" migrate >/dev/null
    # The rows of bench/history-insert.sql, spread over 10 days, 100 to 110 days ago.
    psql "$url" -qX -v ON_ERROR_STOP=1 -v n="$PURGE_ROWS" >/dev/null <<'SQL'
insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode, client,
                    out_biz_no, fingerprint, status, description, request, umeng_request,
                    umeng_response, msg_id, http_status, latency_ms, created_at, sent_at,
                    finished_at, updated_at)
select lpad(to_hex(ms >> 16), 8, '0') || '-' || lpad(to_hex(ms & 65535), 4, '0') || '-7000-8000-'
       || lpad(to_hex(i), 12, '0'), 'bench-unicast',
       '5f00000000000000000b0001', 'android', 'unicast', false, false, 'bench',
       case when i % 4 = 0 then 'order-' || i end, md5(i::text) || md5(i::text), 'accepted',
       'order shipped',
       '{"app":"bench-unicast","type":"unicast","device_tokens":["AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv"],"notification":{"title":"Your order shipped","text":"Order 42 is on its way, it should arrive on Thursday between 9 am and noon","open":{"url":"https://shop.example/orders/42?utm_source=push&utm_medium=app"},"extra":{"order":"42","shipment":"SF1234567890","carrier":"sf-express"}},"policy":{"expire_time":"2026-12-01T01Z"},"out_biz_no":"order-42-shipped","production_mode": true,"description":"order shipped"}'::jsonb,
       '{"appkey":"5f00000000000000000b0001","timestamp":"1767225600000","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{"display_type":"notification","body":{"ticker":"Your order shipped","title":"Your order shipped","text":"Order 42 is on its way, it should arrive on Thursday between 9 am and noon","after_open":"go_url","url":"https://shop.example/orders/42?utm_source=push&utm_medium=app"},"extra":{"order":"42","shipment":"SF1234567890","carrier":"sf-express"}},"policy":{"expire_time":"2026-12-01 09h","out_biz_no":"order-42-shipped"},"production_mode":"true","description":"order shipped"}'::jsonb,
       '{"ret":"SUCCESS","data":{"msg_id":"uu12345678901234567890"}}'::jsonb,
       'uu' || i, 201, 3, t, t, t, t
  from (select i, ms, to_timestamp(ms / 1000.0) as t
          from (select i, (extract(epoch from now() - interval '110 days') * 1000)::bigint
                          + i * (864000000 / :n) as ms
                  from generate_series(1, :n) as i) x) y;
insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id, created_at)
select appkey, out_biz_no, fingerprint, id, created_at from pushes where out_biz_no is not null;
checkpoint;
SQL
    psql "$url" -qX -c "vacuum analyze" >/dev/null
}

bench_purge() {
    local url="$PG_URL/$PG_DB" size="select pg_total_relation_size('pushes')"
    local pushes keys before_size lsn start end purged after_size wal gw_cpu pg_cpu
    psql "$PG_URL/postgres" -qX -c "create database $PG_DB" >/dev/null
    log "purge: filling $PURGE_ROWS old pushes"
    fill_old_pushes "$url"
    pushes=$(psql "$url" -qtAX -c "select count(*) from pushes")
    keys=$(psql "$url" -qtAX -c "select count(*) from idempotency_keys")
    before_size=$(psql "$url" -qtAX -c "$size")
    lsn=$(psql "$url" -qtAX -c "select pg_current_wal_lsn()")
    log "purge: starting a gateway; its first purge round removes them"
    local log_file=$WORK/gateway-$PG_DB-$GW_PORT.log
    rm -f "$log_file"
    start=$(date +%s.%N)
    start_gateways "$url" 1
    for _ in $(seq 1 36000); do
        grep -q 'old rows purged\|retention purge failed' "$log_file" 2>/dev/null && break
        sleep 0.1
    done
    end=$(date +%s.%N)
    purged=$(grep -m1 'old rows purged' "$log_file" | sed -n 's/.*"pushes":\([0-9]*\).*/\1/p')
    gw_cpu=$(cpu_of_pids "${GW_PIDS[@]}" | awk '{ t += $2 } END { printf "%.2f", t }')
    # shellcheck disable=SC2046
    pg_cpu=$(cpu_of_pids $(pg_backends "$PG_DB") | awk '{ t += $2 } END { printf "%.2f", t }')
    wal=$(psql "$url" -qtAX -c "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn')::bigint")
    after_size=$(psql "$url" -qtAX -c "$size")
    stop_gateways
    printf '{"kind":"purge","pushes":%s,"keys":%s,"purged":%s,"secs":%s,"wal_bytes":%s,"size_before":%s,"size_after":%s,"cpu_secs":%s,"pg_cpu_secs":%s}\n' \
        "$pushes" "$keys" "${purged:-0}" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" \
        "$wal" "$before_size" "${after_size:-0}" "$gw_cpu" "$pg_cpu" | tee -a "$OUT" >&2
    psql "$PG_URL/postgres" -qX -c "drop database $PG_DB with (force)" >/dev/null
}

if has_scenario purge; then
    bench_purge
fi

log "results: $OUT"
echo
"$LOADGEN" report "$OUT"
