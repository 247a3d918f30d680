#!/usr/bin/env bash
# The slow and destructive half of the reliability suite (RELIABILITY.md has the figures).
# The fast half (faults, replicas, outage, dropped clients, hostile input, fuzz seeds) runs
# in `cargo test` / .ci/run. Needs PostgreSQL on 127.0.0.1:5432 like the tests; never
# stops the server (outages are made on each test's own database).
#
#   reliability/run.sh            everything
#   FUZZ_SECS=300 reliability/run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
status=0

# The figures (memory, connections) are measured on a release build of the gateway.
echo "== release build of the gateway for the figures"
cargo build --release -q --bin umeng-push-gateway || status=1
export UMGW_GATEWAY_BIN="$PWD/target/release/umeng-push-gateway"

echo "== crash (kill -9 under load), long database outage, asynchronous delivery (Umeng down,"
echo "   kill -9 with a queue, two replicas draining one), memory and connection figures"
cargo test --test api reliability:: -- --ignored --nocapture --test-threads=1 2>&1 \
  | grep -E '^(crash|outage|async|figure|test |test result)' || status=1

echo "== fuzz: push request decoder"
if cargo +nightly fuzz --version >/dev/null 2>&1; then
  corpus=$(mktemp -d)
  cp fuzz/corpus/push_request/* "$corpus"/
  (cd fuzz && cargo +nightly fuzz run push_request "$corpus" -- \
      -max_total_time="${FUZZ_SECS:-60}" -rss_limit_mb=2048) 2>&1 | tail -n 5 || status=1
  rm -rf "$corpus"
else
  echo "cargo-fuzz or a nightly toolchain is missing (cargo install cargo-fuzz;"
  echo "rustup toolchain install nightly): running the seed-corpus test instead"
  cargo test --test api fuzz_seeds 2>&1 | grep -E '^test ' || status=1
fi

echo "== schemathesis against /openapi.json"
if command -v st >/dev/null 2>&1 || pip install -q schemathesis >/dev/null 2>&1; then
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cargo build -q --bin umeng-push-gateway
  UMENG_GATEWAY_DATABASE__URL="sqlite://$dir/gw.db" UMENG_GATEWAY_SERVER__LISTEN="127.0.0.1:$port" \
    target/debug/umeng-push-gateway serve >"$dir/gw.log" 2>&1 &
  gw=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/openapi.json")
  if [ "$code" = 200 ]; then
    st run "http://127.0.0.1:$port/openapi.json" -H 'Authorization: Bearer demo' \
      --checks all --max-examples "${ST_EXAMPLES:-50}" 2>&1 | tail -n 30 || status=1
  else
    echo "GET /openapi.json answered $code: this build serves no OpenAPI document; skipped"
  fi
  kill "$gw" 2>/dev/null; wait "$gw" 2>/dev/null
  rm -rf "$dir"
else
  echo "schemathesis does not install here: skipped"
fi

echo "== secrets in the logs of the whole suite"
reliability/check-secrets.sh || status=1

exit $status
