#!/usr/bin/env bash
# Rotation under outside load: real processes (`trustline ca serve` with short SVIDs, two
# `trustline sidecar`s, nginx as the app) and oha driving keep-alive and new connections through
# the pair while both sidecars rotate, for ROUNDS runs back to back. Every run gets fresh sidecars
# (new join tokens); the CA and nginx stay. Prints one line per run (requests, failures by kind,
# rotations, closures the sidecars counted) and exits non-zero if any request failed.
#
# Pooled sessions are re-authenticated across rotations (src/proxy/session/reauth.rs), so a
# keep-alive connection is not cut when the first certificate its session was opened with
# expires. Direct connections (POOLING=false) have no framing for that and are still cut once per
# SVID lifetime: with POOLING=false, KEEP=0 (new connections only) is the meaningful load, or
# KEEPALIVE_CUTS=allow, which reports keep-alive cuts and fails only on the other failures.
#
#   A: [[listener]] 127.0.0.1:L ──mTLS 1.3 session──▶ B: [inbound] ──▶ nginx 127.0.0.1:N
#   oha -c KEEP (keep-alive) and oha -c NEW --disable-keepalive, both against L, for DURATION
#
# Usage: benches/chaos/rotation-under-load.sh
#   ROUNDS=7 DURATION=30s TTL=6s KEEP=32 (0: none) NEW=4 POOLING=true RUST_LOG=info
#   KEEPALIVE_CUTS=fail (default: every failed request fails the run) or allow
#   TRUSTLINE=target/release/trustline   (default: target/release if built, else target/debug)
#   KEEP_DIR=1 keeps the scratch directory (logs, audit, oha JSON of every run)
# Requires: oha, nginx, curl, jq, python3. Listens on loopback only, on free ports.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [[ -z ${TRUSTLINE:-} ]]; then
    TRUSTLINE=$repo/target/release/trustline
    [[ -x $TRUSTLINE ]] || TRUSTLINE=$repo/target/debug/trustline
fi
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-30s}
TTL=${TTL:-6s}
KEEP=${KEEP:-32}
NEW=${NEW:-4}
POOLING=${POOLING:-true}
KEEPALIVE_CUTS=${KEEPALIVE_CUTS:-fail}
export RUST_LOG=${RUST_LOG:-info}
TD=chaos.test
ID_A=spiffe://$TD/ns/chaos/sa/web
ID_B=spiffe://$TD/ns/chaos/sa/api
for tool in oha nginx curl jq python3; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool is not installed"; exit 1; }
done
[[ -x $TRUSTLINE ]] || { echo "FAIL: no trustline binary at $TRUSTLINE"; exit 1; }

D=$(mktemp -d "${TMPDIR:-/tmp}/chaos-rotation.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${KEEP_DIR:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT

# free_ports N: N loopback ports free right now.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
# wait_for WHAT TRIES COMMAND...: retries every 0.05 s.
wait_for() {
    local what=$1 tries=$2
    shift 2
    for _ in $(seq 1 "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "FAIL: timed out waiting for $what"
    return 1
}
# metric_sum ADMIN REGEX: the sum of the samples whose line matches REGEX.
metric_sum() {
    curl -sf "http://$1/metrics" | awk -v re="$2" '$0 ~ re && !/^#/ { n += $NF } END { print n + 0 }'
}
# metric_lines ADMIN REGEX: the non-zero samples matching REGEX, on one line.
metric_lines() {
    curl -sf "http://$1/metrics" | awk -v re="$2" '$0 ~ re && !/^#/ && $NF != 0 { printf "%s=%s ", $1, $NF }'
}

read -r CA_PORT NGINX_PORT < <(free_ports 2)

# --- the CA and the app -------------------------------------------------------------------------
"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
"$TRUSTLINE" ca init --root "$D/root" --region r1 --out "$D/r1" >/dev/null
"$TRUSTLINE" ca serve --ca "$D/r1" --data "$D/cadata" --listen "127.0.0.1:$CA_PORT" \
    --svid-ttl "$TTL" --rate-limit 0 --metrics-listen off >"$D/ca.out" 2>"$D/ca.log" &
PIDS+=($!)
wait_for "the CA to serve" 400 grep -q '^trustline CA serving' "$D/ca.out"

mkdir -p "$D/nginx/logs"
cat >"$D/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $D/nginx/nginx.pid;
error_log $D/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { return 200 "ok\n"; }
    }
}
EOF
nginx -p "$D/nginx" -c "$D/nginx/nginx.conf" &
PIDS+=($!)
wait_for "nginx" 200 curl -sf "http://127.0.0.1:$NGINX_PORT/"

# sidecar NAME ID TAIL: writes NAME's config (fresh token), starts it, records its pid in SIDECAR_PID.
sidecar() {
    local name=$1 id=$2 tail=$3 dir=$D/round/$1
    mkdir -p "$dir"
    cp "$D/root/bundle.pem" "$dir/bundle.pem"
    "$TRUSTLINE" ca token --data "$D/cadata" --spiffe-id "$id" >"$dir/join.token"
    chmod 0600 "$dir/join.token"
    cat >"$dir/sidecar.toml" <<EOF
trust_domain = "$TD"
spiffe_id = "$id"
bundle = "bundle.pem"
pooling = $POOLING
drain_timeout = "1s"
audit_log = "audit.log"
workers = 1

[identity]
source = "ca"
ca_url = "https://127.0.0.1:$CA_PORT"
token_file = "join.token"

$tail
EOF
    "$TRUSTLINE" sidecar --config "$dir/sidecar.toml" >"$dir/out" 2>"$dir/log" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
}

total_failed=0
total_keep_failed=0
total_requests=0
echo "# $(date -u +%FT%TZ) rounds=$ROUNDS duration=$DURATION ttl=$TTL keep-alive=$KEEP new=$NEW pooling=$POOLING binary=$TRUSTLINE"
for round in $(seq 1 "$ROUNDS"); do
    rm -rf "$D/round"
    read -r B_IN B_ADMIN A_LISTEN A_ADMIN < <(free_ports 4)
    sidecar b "$ID_B" "[admin]
listen = \"127.0.0.1:$B_ADMIN\"

[inbound]
listen = \"127.0.0.1:$B_IN\"
app_address = \"127.0.0.1:$NGINX_PORT\"
allow = [\"$ID_A\"]"
    b_pid=$SIDECAR_PID
    sidecar a "$ID_A" "[admin]
listen = \"127.0.0.1:$A_ADMIN\"

[[service]]
name = \"api\"
addresses = [\"127.0.0.1:$B_IN\"]
spiffe_ids = [\"$ID_B\"]

[[listener]]
listen = \"127.0.0.1:$A_LISTEN\"
service = \"api\""
    a_pid=$SIDECAR_PID
    wait_for "sidecar B ready" 400 curl -sf "http://127.0.0.1:$B_ADMIN/readyz"
    wait_for "sidecar A ready" 400 curl -sf "http://127.0.0.1:$A_ADMIN/readyz"
    wait_for "a request through the pair" 100 curl -sf "http://127.0.0.1:$A_LISTEN/"
    rot0_a=$(metric_sum "127.0.0.1:$A_ADMIN" '^trustline_svid_rotations_total')
    rot0_b=$(metric_sum "127.0.0.1:$B_ADMIN" '^trustline_svid_rotations_total')

    url=http://127.0.0.1:$A_LISTEN/
    if ((KEEP > 0)); then
        oha --no-tui --output-format json -o "$D/keep-$round.json" -z "$DURATION" -c "$KEEP" "$url" &
        k=$!
    else
        echo '{"summary":{"successRate":1},"statusCodeDistribution":{},"errorDistribution":{}}' >"$D/keep-$round.json"
        k=
    fi
    oha --no-tui --output-format json -o "$D/new-$round.json" -z "$DURATION" -c "$NEW" \
        --disable-keepalive "$url" &
    n=$!
    wait $k "$n"

    summary() { jq -r '"\(.summary.successRate) \([.statusCodeDistribution[]] | add // 0) \([.errorDistribution[]] | add // 0)"' "$1"; }
    read -r _ keep_ok keep_err < <(summary "$D/keep-$round.json")
    read -r _ new_ok new_err < <(summary "$D/new-$round.json")
    non200=$(jq -s '[.[].statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0' \
        "$D/keep-$round.json" "$D/new-$round.json")
    kinds=$(jq -rs '[.[].errorDistribution | to_entries[]] | group_by(.key) | map("\(.[0].key)=\(map(.value) | add)") | join("; ")' \
        "$D/keep-$round.json" "$D/new-$round.json")
    # oha counts the requests still in flight when -z ends as "aborted due to deadline": not failures.
    aborted=$(jq -s '[.[].errorDistribution | to_entries[] | select(.key | test("aborted due to deadline")) | .value] | add // 0' \
        "$D/keep-$round.json" "$D/new-$round.json")
    failed=$((keep_err + new_err - aborted + non200))
    requests=$((keep_ok + new_ok + keep_err + new_err - aborted))
    rot_a=$(($(metric_sum "127.0.0.1:$A_ADMIN" '^trustline_svid_rotations_total') - rot0_a))
    rot_b=$(($(metric_sum "127.0.0.1:$B_ADMIN" '^trustline_svid_rotations_total') - rot0_b))
    closed_a=$(metric_lines "127.0.0.1:$A_ADMIN" '^trustline_live_connections_closed_total|^trustline_connections_failed_total')
    closed_b=$(metric_lines "127.0.0.1:$B_ADMIN" '^trustline_live_connections_closed_total|^trustline_connections_failed_total')
    keep_aborted=$(jq '[.errorDistribution | to_entries[] | select(.key | test("aborted due to deadline")) | .value] | add // 0' "$D/keep-$round.json")
    echo "run $round: requests=$requests failed=$failed (keep-alive: $keep_ok ok, $((keep_err - keep_aborted)) failed; new connections: $new_ok ok, $((new_err - aborted + keep_aborted)) failed; non-200: $non200) rotations=$rot_a/$rot_b errors: ${kinds:-none}"
    # A counts no metric when its pool closes a session at the destination's expiry (with every
    # stream on it): its log line is the record.
    a_sessions=$(grep -c 'session closed with its open streams' "$D/round/a/log" || true)
    echo "    A: ${closed_a:-no live closure counted}; sessions closed with their streams (log): $a_sessions"
    echo "    B: ${closed_b:-nothing counted}"
    if ((failed > 0)); then
        for s in a b; do
            echo "    --- sidecar $s: warnings and errors ---"
            grep -E ' (WARN|ERROR) ' "$D/round/$s/log" | sed 's/^/    /' | tail -n 20 || true
            echo "    --- sidecar $s: audit denials ---"
            grep -v '"outcome":"allow"' "$D/round/$s/audit.log" | sed 's/^/    /' | tail -n 10 || true
        done
        mkdir -p "$D/failed-$round"
        cp -r "$D/round/." "$D/failed-$round/"
    fi
    total_failed=$((total_failed + failed))
    total_keep_failed=$((total_keep_failed + keep_err - keep_aborted))
    total_requests=$((total_requests + requests))
    kill "$a_pid" "$b_pid"
    wait "$a_pid" "$b_pid" 2>/dev/null || true
done
echo "total: $total_requests requests, $total_failed failed over $ROUNDS runs ($total_keep_failed on keep-alive connections)"
if [[ $KEEPALIVE_CUTS == allow ]]; then
    ((total_failed - total_keep_failed == 0))
else
    ((total_failed == 0))
fi
