#!/usr/bin/env bash
# Suite-level secret check: run the whole API test suite (slow cases included) with every
# test gateway and simulator logging at debug level (TEST_LOG=1), keep the crash test's
# child-process logs, then grep everything for the test master secrets, client tokens,
# full device tokens and signatures. Exit 1 on any hit in the gateway's own logs.
#
# Usage: reliability/check-secrets.sh [LOG_DIR]   (default: a new temp dir, kept)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d /tmp/umgw-secrets.XXXXXX)}
mkdir -p "$out"
log="$out/suite.log"

echo "running the API suite with TEST_LOG=1 RUST_LOG=debug; logs in $out"
TEST_LOG=1 RUST_LOG=debug UMGW_RELIABILITY_LOG_DIR="$out" \
  cargo test --test api -- --include-ignored --test-threads=2 >"$log" 2>&1
echo "suite exit code: $? ($(grep -cE '^test .* ok$' "$log") tests ok)"
cat "$out"/crash-*.log >>"$log" 2>/dev/null || true
echo "log lines: $(wc -l <"$log")"

# The values in tests/api/app.rs and the crash test's config.
secrets=(
  androidsecret0123456789abcdefghi                                    # master secrets
  iossecret0123456789abcdefghijklm
  token-sender token-reader token-android-only                        # client bearer tokens
  AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv                        # full device tokens
  0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
)
# Lines from the gateway (not from the simulator, which plays Umeng and may see anything).
gateway_lines() { grep -v 'umeng_push_gateway::simulator' "$log"; }

fail=0
for s in "${secrets[@]}"; do
  all=$(grep -cF -- "$s" "$log")
  gw=$(gateway_lines | grep -cF -- "$s")
  printf '%-66s all logs: %6d   gateway: %6d\n' "$s" "$all" "$gw"
  [ "$gw" -eq 0 ] || fail=1
done
# Signatures: sign=<32 hex> in a URL, or a "sign" field.
sig_all=$(grep -cE 'sign=[0-9a-f]{32}|"sign" ?: ?"[0-9a-f]{32}"' "$log")
sig_gw=$(gateway_lines | grep -cE 'sign=[0-9a-f]{32}|"sign" ?: ?"[0-9a-f]{32}"')
printf '%-66s all logs: %6d   gateway: %6d\n' "sign=<md5> / \"sign\":\"<md5>\"" "$sig_all" "$sig_gw"
[ "$sig_gw" -eq 0 ] || fail=1

if [ "$fail" -ne 0 ]; then
  echo "SECRETS FOUND in gateway logs (see $log)"
  exit 1
fi
echo "no secret, token or signature in the gateway's logs"
