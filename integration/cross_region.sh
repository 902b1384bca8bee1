#!/usr/bin/env bash
# Two regions in network namespaces, 150 ms apart through `trustline wan-relay` (75 ms each way)
# in a third "wan" namespace. Each region has its own CA (an intermediate of one root), two
# gateways and two services with sidecars; every piece is a separate `trustline` process.
#
#   region a (ns tl-ra-*)  10.81.0.1 ──veth── 10.81.0.2  wan (relays)  10.82.0.2 ──veth── 10.82.0.1  region b (ns tl-rb-*)
#     CA a, gateways a0 a1, web, batch                                     CA b, gateways b0 b1, api, ledger
#
# Shows: web (a) -> api (b) works and api's sidecar logs web's own SPIFFE ID and region a; the
# region policy of gateway b refuses web -> ledger; gateways killed with SIGKILL fail over; with
# CA b stopped and the root key gone, region a still issues (a new workload joins) and serves.
#
# requires: root ip curl python3
#
# Usage: sudo TRUSTLINE=target/debug/trustline integration/cross_region.sh   (KEEP=1 keeps the temp dir)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TD=mesh.test
wid() { echo "spiffe://$TD/ns/shop/sa/$1"; }

source "$(dirname "${BASH_SOURCE[0]}")/lib/checks.bash"

need_root "network namespaces"
need_tools ip curl python3
need_trustline
PY=$(python3 -c 'import sys; print(sys.executable)')

S=$(printf '%04x' $((($$ ^ RANDOM) & 0xffff)))
NA=tl-ra-$S NB=tl-rb-$S NW=tl-wan-$S
D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-xr.XXXXXX")
declare -A PID
cleanup() {
    local rc=$? p ns
    trap - ERR
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in "$NA" "$NB" "$NW"; do
        if ip netns list | grep -qw "$ns"; then
            for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
            sleep 0.2
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    if ((failures > 0 || rc != 0)); then
        for f in "$D"/*.log; do
            [[ -s $f ]] || continue
            echo "---- $(basename "$f") (last 15 lines)"
            tail -n 15 "$f"
        done
    fi
    if [[ -n ${KEEP:-} ]]; then echo "kept $D"; else rm -rf "$D"; fi
    exit $((rc != 0 ? rc : failures > 0))
}
trap cleanup EXIT

in_a() { ip netns exec "$NA" "$@"; }
in_b() { ip netns exec "$NB" "$@"; }
in_w() { ip netns exec "$NW" "$@"; }
# start NAME NS CMD...: a background process with its log in $D/NAME.log
start() {
    local name=$1 ns=$2
    shift 2
    ip netns exec "$ns" "$@" >"$D/$name.log" 2>&1 &
    PID[$name]=$!
}
wait_ready() { # NS ADMIN_ADDR WHAT
    for _ in $(seq 1 200); do
        if ip netns exec "$1" curl -sf "http://$2/readyz" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "  $3 did not become ready" >&2
    return 1
}

echo "== namespaces"
for ns in "$NA" "$NB" "$NW"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add "xa-$S" netns "$NA" type veth peer name "wa-$S" netns "$NW"
ip link add "xb-$S" netns "$NB" type veth peer name "wb-$S" netns "$NW"
ip -n "$NA" addr add 10.81.0.1/24 dev "xa-$S"
ip -n "$NW" addr add 10.81.0.2/24 dev "wa-$S"
ip -n "$NB" addr add 10.82.0.1/24 dev "xb-$S"
ip -n "$NW" addr add 10.82.0.2/24 dev "wb-$S"
for l in "$NA xa-$S" "$NW wa-$S" "$NB xb-$S" "$NW wb-$S"; do
    set -- $l
    ip -n "$1" link set "$2" up
done

echo "== PKI: one root, intermediates a and b"
"$TRUSTLINE" ca init --trust-domain $TD --out "$D/root" >/dev/null
for r in a b; do "$TRUSTLINE" ca init --root "$D/root" --region $r --out "$D/ca-$r" >/dev/null; done

echo "== CAs, one per region"
start ca-a "$NA" "$TRUSTLINE" ca serve --ca "$D/ca-a" --data "$D/ca-a-data" --listen 127.0.0.1:8443 --metrics-listen off
start ca-b "$NB" "$TRUSTLINE" ca serve --ca "$D/ca-b" --data "$D/ca-b-data" --listen 127.0.0.1:8443 --metrics-listen off
for r in a b; do
    for _ in $(seq 1 100); do [[ -S $D/ca-$r-data/admin.sock ]] && break; sleep 0.05; done
done
token() { # REGION ID FILE
    "$TRUSTLINE" ca token --data "$D/ca-$1-data" --spiffe-id "$2" >"$3"
    chmod 600 "$3"
}

echo "== WAN relays (75 ms each way): a -> b gateways at 10.81.0.2:2544x, b -> a at 10.82.0.2:2544x"
for n in 0 1; do
    start "relay-to-b$n" "$NW" "$TRUSTLINE" wan-relay --listen "10.81.0.2:2544$n" --to "10.82.0.1:1544$n" --delay 75ms --proto udp
    start "relay-to-a$n" "$NW" "$TRUSTLINE" wan-relay --listen "10.82.0.2:2544$n" --to "10.81.0.1:1544$n" --delay 75ms --proto udp
done

cfg_head() { # NAME REGION ID: the common head of a config
    token "$2" "$3" "$D/$1.token"
    cat <<EOF
trust_domain = "$TD"
region = "$2"
bundle = "$D/root/bundle.pem"
audit_log = "$D/$1-audit.jsonl"
EOF
}
identity() { # NAME ADMIN
    cat <<EOF

[identity]
source = "ca"
ca_url = "https://127.0.0.1:8443"
token_file = "$D/$1.token"
refresh_interval = "1s"

[admin]
listen = "$2"
EOF
}

echo "== apps and sidecars of region b (api allows web from region a; ledger allows nobody remote)"
start app-api "$NB" "$PY" -m http.server 8080 --bind 127.0.0.1
start app-ledger "$NB" "$PY" -m http.server 8081 --bind 127.0.0.1
cat >"$D/api-policy.toml" <<EOF
[service.api]

[[service.api.rule]]
name = "web-from-a"
action = "allow"
from = ["$(wid web)"]
regions = ["a"]
EOF
{
    cfg_head api b "$(wid api)"
    echo "spiffe_id = \"$(wid api)\""
    identity api 127.0.0.1:15120
    cat <<EOF

[inbound]
listen = "127.0.0.1:16006"
app_address = "127.0.0.1:8080"
policy = "$D/api-policy.toml"
service = "api"
EOF
} >"$D/api.toml"
{
    cfg_head ledger b "$(wid ledger)"
    echo "spiffe_id = \"$(wid ledger)\""
    identity ledger 127.0.0.1:15121
    cat <<EOF

[inbound]
listen = "127.0.0.1:17006"
app_address = "127.0.0.1:8081"
allow = ["$(wid web)"]
EOF
} >"$D/ledger.toml"
start sidecar-api "$NB" "$TRUSTLINE" sidecar --config "$D/api.toml"
start sidecar-ledger "$NB" "$TRUSTLINE" sidecar --config "$D/ledger.toml"

echo "== gateways: a0 a1 b0 b1"
gateway() { # REGION N
    local r=$1 n=$2 other peers
    if [[ $r == a ]]; then other=b peers='["10.81.0.2:25440", "10.81.0.2:25441"]'; else other=a peers='["10.82.0.2:25440", "10.82.0.2:25441"]'; fi
    {
        cfg_head "gateway-$r$n" "$r" "spiffe://$TD/trustline/gateway/$r"
        echo "listen = \"0.0.0.0:1544$n\""
        identity "gateway-$r$n" "127.0.0.1:1522$n"
        cat <<EOF

[[peer]]
region = "$other"
addresses = $peers
EOF
        if [[ $r == b ]]; then
            cat <<EOF

[[expose]]
service = "api"
addresses = ["127.0.0.1:16006"]

[[expose]]
service = "ledger"
addresses = ["127.0.0.1:17006"]

[[rule]]
name = "a-to-api"
from = ["a"]
to = ["b"]
services = ["api"]
EOF
        else
            cat <<EOF

[[rule]]
name = "a-out"
from = ["a"]
to = ["b"]
services = ["*"]
EOF
        fi
    } >"$D/gateway-$r$n.toml"
    local ns=$NA
    [[ $r == b ]] && ns=$NB
    start "gateway-$r$n" "$ns" "$TRUSTLINE" gateway --config "$D/gateway-$r$n.toml"
}
for r in a b; do for n in 0 1; do gateway $r $n; done; done

echo "== sidecars of region a: web (calls api and ledger in b, batch locally), batch"
start app-batch "$NA" "$PY" -m http.server 8082 --bind 127.0.0.1
{
    cfg_head batch a "$(wid batch)"
    echo "spiffe_id = \"$(wid batch)\""
    identity batch 127.0.0.1:15131
    cat <<EOF

[inbound]
listen = "127.0.0.1:18006"
app_address = "127.0.0.1:8082"
allow = ["$(wid web)"]
EOF
} >"$D/batch.toml"
{
    cfg_head web a "$(wid web)"
    echo "spiffe_id = \"$(wid web)\""
    identity web 127.0.0.1:15130
    cat <<EOF

[tunnel]
gateways = ["127.0.0.1:15440", "127.0.0.1:15441"]

[[service]]
name = "api"
region = "b"
addresses = ["127.0.0.1:16006"]
spiffe_ids = ["$(wid api)"]

[[listener]]
listen = "127.0.0.1:9001"
service = "api"

[[service]]
name = "ledger"
region = "b"
addresses = ["127.0.0.1:17006"]
spiffe_ids = ["$(wid ledger)"]

[[listener]]
listen = "127.0.0.1:9002"
service = "ledger"

[[service]]
name = "batch"
addresses = ["127.0.0.1:18006"]
spiffe_ids = ["$(wid batch)"]

[[listener]]
listen = "127.0.0.1:9003"
service = "batch"
EOF
} >"$D/web.toml"
start sidecar-batch "$NA" "$TRUSTLINE" sidecar --config "$D/batch.toml"
start sidecar-web "$NA" "$TRUSTLINE" sidecar --config "$D/web.toml"

check "region b sidecars ready" wait_ready "$NB" 127.0.0.1:15120 api
check "ledger sidecar ready" wait_ready "$NB" 127.0.0.1:15121 ledger
check "gateways ready" bash -c "$(declare -f wait_ready); wait_ready $NA 127.0.0.1:15220 a0 && wait_ready $NA 127.0.0.1:15221 a1 && wait_ready $NB 127.0.0.1:15220 b0 && wait_ready $NB 127.0.0.1:15221 b1"
check "region a sidecars ready" bash -c "$(declare -f wait_ready); wait_ready $NA 127.0.0.1:15130 web && wait_ready $NA 127.0.0.1:15131 batch"

paths_up() { # NS ADMIN: all paths of a gateway up
    local j
    j=$(ip netns exec "$1" curl -sf "http://$2/paths") || return 1
    [[ $j == *'"up":true'* && $j != *'"up":false'* ]]
}
wait_paths() {
    for _ in $(seq 1 100); do paths_up "$@" && return 0; sleep 0.1; done
    return 1
}
check "gateway a0 holds warm paths to both b gateways" wait_paths "$NA" 127.0.0.1:15220
in_a curl -s "http://127.0.0.1:15220/paths" | sed 's/^/  /'
echo

get() { in_a curl -s -o /dev/null -m 5 -w '%{http_code} %{time_starttransfer}' "$1"; }
sleep 1 # the sidecar pre-opens its session to api
out=$(get http://127.0.0.1:9001/)
echo "  web -> api: $out (status, seconds to first byte; RTT 0.150)"
check "web (region a) -> api (region b) answers 200" test "${out%% *}" = 200
warm=$(get http://127.0.0.1:9001/)
echo "  again, new connection: $warm"
check "a new connection on the warm session takes about one RTT (< 0.3 s)" \
    "$PY" -c "import sys; sys.exit(0 if float('${warm#* }') < 0.3 else 1)"
sleep 0.3
check "api's sidecar logged web's own SPIFFE ID and region a" \
    grep -q "\"source_id\":\"$(wid web)\".*\"source_region\":\"a\".*\"outcome\":\"allow\"" "$D/api-audit.jsonl"

out=$(get http://127.0.0.1:9002/ || true)
check "web -> ledger is refused (no gateway rule admits region a to ledger)" test "${out%% *}" != 200
sleep 0.3
check "gateway b audited the refused stream with its rule" bash -c \
    "grep -h stream_refused $D/gateway-b0-audit.jsonl $D/gateway-b1-audit.jsonl | grep -q '\"destination_service\":\"ledger\".*\"rule\":\"default-deny\"'"
out=$(get http://127.0.0.1:9003/)
check "web -> batch (same region, direct mTLS) answers 200" test "${out%% *}" = 200

failover() { # GATEWAY: kill -9 it, then time until web -> api works again
    kill -9 "${PID[$1]}"
    local t0 t1
    t0=$(date +%s.%N)
    for _ in $(seq 1 100); do
        [[ $(get http://127.0.0.1:9001/ | cut -d' ' -f1) == 200 ]] && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
    "$PY" -c "print(f'{$t1 - $t0:.2f}')"
}
# Make sure the surviving gateways are in use: both paths up before each kill.
took=$(failover gateway-b0)
echo "  killed gateway b0 (SIGKILL): web -> api works again after ${took} s"
check "failover after losing a gateway of region b within ~2 s (< 3 s)" "$PY" -c "import sys; sys.exit(0 if $took < 3 else 1)"
took=$(failover gateway-a0)
echo "  killed gateway a0 (SIGKILL): web -> api works again after ${took} s"
check "failover after losing a gateway of region a within ~2 s (< 3 s)" "$PY" -c "import sys; sys.exit(0 if $took < 3 else 1)"
sleep 2
check "gateway a1 reported the lost path (tunnel_down and failover events)" bash -c \
    "grep -q '\"event\":\"tunnel_down\"' $D/gateway-a1-audit.jsonl && grep -q '\"event\":\"failover\"' $D/gateway-a1-audit.jsonl"
check "gateway a1 counts the failover in its metrics" bash -c \
    "ip netns exec $NA curl -s http://127.0.0.1:15221/metrics | grep -q '^trustline_tunnel_failovers_total [1-9]'"

echo "== region b's CA stopped and the root key taken offline"
kill "${PID[ca-b]}"
wait "${PID[ca-b]}" 2>/dev/null || true
unset 'PID[ca-b]'
mv "$D/root/ca.key" "$D/root-ca.key.offline"
{
    cfg_head late a "$(wid late)"
    echo "spiffe_id = \"$(wid late)\""
    identity late 127.0.0.1:15132
    cat <<EOF

[inbound]
listen = "127.0.0.1:19006"
app_address = "127.0.0.1:8082"
allow = ["$(wid web)"]
EOF
} >"$D/late.toml"
start sidecar-late "$NA" "$TRUSTLINE" sidecar --config "$D/late.toml"
check "region a still issues: a new workload gets its SVID" wait_ready "$NA" 127.0.0.1:15132 late
out=$(get http://127.0.0.1:9001/)
check "region a still serves: web -> api answers 200" test "${out%% *}" = 200
out=$(get http://127.0.0.1:9003/)
check "web -> batch answers 200" test "${out%% *}" = 200

echo
if ((failures > 0)); then
    echo "cross_region: $failures check(s) FAILED"
else
    echo "cross_region: all checks passed"
fi
