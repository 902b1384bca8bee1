#!/usr/bin/env bash
# Chaos across regions, under a steady request load, with short SVIDs (TTL, 6 s by default):
#
#   region a (ns tlch-ra-*)  10.91.0.1 ──veth── 10.91.0.2  wan (relays)  10.92.0.2 ──veth── 10.92.0.1  region b (ns tlch-rb-*)
#     CA a, gateways a0 a1, web -> api (b), web -> batch (a)             CA b, gateways b0 b1, api, probe -> api (b)
#
# Every gateway has two paths to the other region (one per peer gateway, each through its own
# `trustline wan-relay`, 20 ms each way). Probes (integration/lib/probe.py: one new connection per
# request, 5 s timeout, "ok" only for status 200 with the exact body) run all along.
#
#   (1) one path lost silently (the relay in front of gateway b0 killed: its datagrams go nowhere):
#       web -> api keeps working over b1; failover time and every request's outcome measured;
#       the path comes back by itself when the relay returns.
#   (2) gateway b0 restarted (SIGKILL, then started again with a fresh token) under load: a0 and a1
#       reconnect to it by themselves; then both b gateways restarted at once: the gap measured.
#   (3) region partition: every relay killed for PARTITION (2 x TTL) seconds. Each region keeps
#       issuing (SVIDs rotate, a new workload joins) and serving locally; cross-region requests
#       fail with an error, never hang; when the relays return the regions heal by themselves.
#
# requires: root ip curl python3
#
# Usage: sudo TRUSTLINE=target/debug/trustline integration/chaos_partition.sh   (KEEP=1 keeps the temp dir)
#        TTL=6 (seconds) PARTITION=2*TTL (seconds) FAILOVER_MAX=5 (seconds: a generous bound on
#        the longest gap between successes while a path or gateway is lost, catching a path that
#        never fails over; the goal of 2 s is compared with the printed figure)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TTL=${TTL:-6}
PARTITION=${PARTITION:-$((2 * TTL))}
FAILOVER_MAX=${FAILOVER_MAX:-5}
TD=mesh.test
wid() { echo "spiffe://$TD/ns/shop/sa/$1"; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

source "$here/lib/checks.bash"

need_root "network namespaces"
need_tools ip curl python3
need_trustline
PY=$(python3 -c 'import sys; print(sys.executable)')
PROBE=$here/lib/probe.py

S=$(printf '%04x' $((($$ ^ RANDOM) & 0xffff)))
NA=tlch-ra-$S NB=tlch-rb-$S NW=tlch-w-$S
D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-chaos-partition.XXXXXX")
declare -A PID
cleanup() {
    local rc=$? p ns
    trap - ERR
    touch "$D/stop"
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
            echo "---- $(basename "$f") (last 10 lines)"
            tail -n 10 "$f"
        done
    fi
    if [[ -n ${KEEP:-} ]]; then echo "kept $D"; else rm -rf "$D"; fi
    exit $((rc != 0 ? rc : failures > 0))
}
trap cleanup EXIT

in_a() { ip netns exec "$NA" "$@"; }
in_b() { ip netns exec "$NB" "$@"; }
start() { # NAME NS CMD...: a background process with its log in $D/NAME.log
    local name=$1 ns=$2
    shift 2
    ip netns exec "$ns" "$@" >"$D/$name.log" 2>&1 &
    PID[$name]=$!
}
stop() { # NAME: SIGKILL
    kill -9 "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
    unset "PID[$1]"
}
wait_ready() { # NS ADMIN_ADDR WHAT
    for _ in $(seq 1 300); do
        if ip netns exec "$1" curl -sf "http://$2/readyz" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "  $3 did not become ready" >&2
    return 1
}
now() { "$PY" -c 'import time; print(f"{time.monotonic():.4f}")'; }
metric() { # NS ADMIN NAME: the value of an unlabelled sample (0 if absent)
    ip netns exec "$1" curl -sf "http://$2/metrics" | awk -v m="$3" '$1 == m { v = $2 } END { print v + 0 }'
}

echo "== namespaces"
for ns in "$NA" "$NB" "$NW"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add "cxa-$S" netns "$NA" type veth peer name "cwa-$S" netns "$NW"
ip link add "cxb-$S" netns "$NB" type veth peer name "cwb-$S" netns "$NW"
ip -n "$NA" addr add 10.91.0.1/24 dev "cxa-$S"
ip -n "$NW" addr add 10.91.0.2/24 dev "cwa-$S"
ip -n "$NB" addr add 10.92.0.1/24 dev "cxb-$S"
ip -n "$NW" addr add 10.92.0.2/24 dev "cwb-$S"
for l in "$NA cxa-$S" "$NW cwa-$S" "$NB cxb-$S" "$NW cwb-$S"; do
    set -- $l
    ip -n "$1" link set "$2" up
done

echo "== PKI and CAs (SVIDs of ${TTL}s)"
"$TRUSTLINE" ca init --trust-domain $TD --out "$D/root" >/dev/null
for r in a b; do "$TRUSTLINE" ca init --root "$D/root" --region $r --out "$D/ca-$r" >/dev/null; done
start ca-a "$NA" "$TRUSTLINE" ca serve --ca "$D/ca-a" --data "$D/ca-a-data" --listen 127.0.0.1:8443 --metrics-listen off --svid-ttl "${TTL}s" --rate-limit 0
start ca-b "$NB" "$TRUSTLINE" ca serve --ca "$D/ca-b" --data "$D/ca-b-data" --listen 127.0.0.1:8443 --metrics-listen off --svid-ttl "${TTL}s" --rate-limit 0
for r in a b; do
    for _ in $(seq 1 200); do [[ -S $D/ca-$r-data/admin.sock ]] && break; sleep 0.05; done
done
token() { # REGION ID FILE
    "$TRUSTLINE" ca token --data "$D/ca-$1-data" --spiffe-id "$2" >"$3"
    chmod 600 "$3"
}

relay() { # N DIRECTION(b|a): the relay in front of gateway <DIRECTION><N>
    if [[ $2 == b ]]; then
        start "relay-to-b$1" "$NW" "$TRUSTLINE" wan-relay --listen "10.91.0.2:2544$1" --to "10.92.0.1:1544$1" --delay 20ms --proto udp
    else
        start "relay-to-a$1" "$NW" "$TRUSTLINE" wan-relay --listen "10.92.0.2:2544$1" --to "10.91.0.1:1544$1" --delay 20ms --proto udp
    fi
}
for n in 0 1; do relay $n b; relay $n a; done

cfg_head() { # NAME REGION ID: the common head of a config (a fresh token each time)
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
sidecar() { # NAME REGION ADMIN TAIL
    {
        cfg_head "$1" "$2" "$(wid "$1")"
        echo "spiffe_id = \"$(wid "$1")\""
        identity "$1" "$3"
        echo
        echo "$4"
    } >"$D/$1.toml"
    local ns=$NA
    [[ $2 == b ]] && ns=$NB
    start "sidecar-$1" "$ns" "$TRUSTLINE" sidecar --config "$D/$1.toml"
}
gateway() { # REGION N
    local r=$1 n=$2 other peers
    if [[ $r == a ]]; then other=b peers='["10.91.0.2:25440", "10.91.0.2:25441"]'; else other=a peers='["10.92.0.2:25440", "10.92.0.2:25441"]'; fi
    {
        cfg_head "gateway-$r$n" "$r" "spiffe://$TD/trustline/gateway/$r"
        echo "listen = \"0.0.0.0:1544$n\""
        identity "gateway-$r$n" "127.0.0.1:1522$n"
        cat <<EOF

[[peer]]
region = "$other"
addresses = $peers

[[rule]]
name = "a-to-api"
from = ["a"]
to = ["b"]
services = ["api"]
EOF
        if [[ $r == b ]]; then
            cat <<EOF

[[expose]]
service = "api"
addresses = ["127.0.0.1:16006"]
EOF
        fi
    } >"$D/gateway-$r$n.toml"
    local ns=$NA
    [[ $r == b ]] && ns=$NB
    start "gateway-$r$n" "$ns" "$TRUSTLINE" gateway --config "$D/gateway-$r$n.toml"
}

echo "== apps, sidecars and gateways"
mkdir -p "$D/www"
echo "trustline-chaos-partition-body" >"$D/www/index.html"
BODY=$D/www/index.html
start app-api "$NB" "$PY" -m http.server 8080 --bind 127.0.0.1 --directory "$D/www"
start app-batch "$NA" "$PY" -m http.server 8082 --bind 127.0.0.1 --directory "$D/www"
sidecar api b 127.0.0.1:15120 "[inbound]
listen = \"127.0.0.1:16006\"
app_address = \"127.0.0.1:8080\"
allow = [\"$(wid web)\", \"$(wid probe)\"]"
sidecar probe b 127.0.0.1:15121 "[[service]]
name = \"api\"
addresses = [\"127.0.0.1:16006\"]
spiffe_ids = [\"$(wid api)\"]

[[listener]]
listen = \"127.0.0.1:9101\"
service = \"api\""
sidecar batch a 127.0.0.1:15131 "[inbound]
listen = \"127.0.0.1:18006\"
app_address = \"127.0.0.1:8082\"
allow = [\"$(wid web)\"]"
sidecar web a 127.0.0.1:15130 "[tunnel]
gateways = [\"127.0.0.1:15440\", \"127.0.0.1:15441\"]

[[service]]
name = \"api\"
region = \"b\"
addresses = [\"127.0.0.1:16006\"]
spiffe_ids = [\"$(wid api)\"]

[[listener]]
listen = \"127.0.0.1:9001\"
service = \"api\"

[[service]]
name = \"batch\"
addresses = [\"127.0.0.1:18006\"]
spiffe_ids = [\"$(wid batch)\"]

[[listener]]
listen = \"127.0.0.1:9003\"
service = \"batch\""
for r in a b; do for n in 0 1; do gateway $r $n; done; done

check "region b sidecars ready" bash -c "$(declare -f wait_ready); wait_ready $NB 127.0.0.1:15120 api && wait_ready $NB 127.0.0.1:15121 probe"
check "region a sidecars ready" bash -c "$(declare -f wait_ready); wait_ready $NA 127.0.0.1:15130 web && wait_ready $NA 127.0.0.1:15131 batch"
check "gateways ready" bash -c "$(declare -f wait_ready); wait_ready $NA 127.0.0.1:15220 a0 && wait_ready $NA 127.0.0.1:15221 a1 && wait_ready $NB 127.0.0.1:15220 b0 && wait_ready $NB 127.0.0.1:15221 b1"

path_up() { # NS ADMIN PEER_ADDR: that path of the gateway is up
    ip netns exec "$1" curl -sf "http://$2/paths" | "$PY" -c '
import json, sys
ps = json.load(sys.stdin)["paths"]
sys.exit(0 if any(p.get("up") and sys.argv[1] in json.dumps(p) for p in ps) else 1)' "$3"
}
fresh_path_up() { # NS ADMIN PEER_ADDR SINCE: that path is up on a connection made after SINCE (the now() clock: monotonic seconds)
    ip netns exec "$1" curl -sf "http://$2/paths" | "$PY" -c '
import json, sys, time
ps = json.load(sys.stdin)["paths"]
young = (time.monotonic() - float(sys.argv[2])) * 1000
sys.exit(0 if any(p.get("up") and p["address"] == sys.argv[1] and p["up_for_ms"] < young for p in ps) else 1)' "$3" "$4"
}
# a0 and a1 hold a connection to the restarted b0 made after SINCE, and every other path is up
reconnected_to_b0() { fresh_path_up "$NA" 127.0.0.1:15220 10.91.0.2:25440 "$1" && fresh_path_up "$NA" 127.0.0.1:15221 10.91.0.2:25440 "$1" && all_paths_up; }
# wait_until SECONDS COMMAND...: polls every 50 ms; prints how long it took, fails past SECONDS.
wait_until() {
    local limit=$1 t0 t
    shift
    t0=$(now)
    while true; do
        "$@" >/dev/null 2>&1 && break
        t=$("$PY" -c "print($(now) - $t0)")
        if "$PY" -c "import sys; sys.exit(0 if $t > $limit else 1)"; then
            echo "timeout"
            return 1
        fi
        sleep 0.05
    done
    "$PY" -c "print(f'{$(now) - $t0:.2f}')"
}
all_paths_up() {
    local g p
    for g in "$NA 127.0.0.1:15220" "$NA 127.0.0.1:15221"; do
        for p in 10.91.0.2:25440 10.91.0.2:25441; do path_up $g $p || return 1; done
    done
    for g in "$NB 127.0.0.1:15220" "$NB 127.0.0.1:15221"; do
        for p in 10.92.0.2:25440 10.92.0.2:25441; do path_up $g $p || return 1; done
    done
}
took=$(wait_until 20 all_paths_up) || true
check "every gateway holds both paths to the other region (after ${took}s)" all_paths_up
get() { ip netns exec "$1" curl -s -o /dev/null -m 5 -w '%{http_code}' "$2"; }
check "web -> api (cross-region) answers 200" test "$(get "$NA" http://127.0.0.1:9001/)" = 200
check "web -> batch (region a) answers 200" test "$(get "$NA" http://127.0.0.1:9003/)" = 200
check "probe -> api (region b) answers 200" test "$(get "$NB" http://127.0.0.1:9101/)" = 200

echo "== probes: one request every 100 ms on each route, a new connection each"
T_START=$(now)
start probe-cross "$NA" "$PY" "$PROBE" http://127.0.0.1:9001/ "$BODY" 0.1 600 "$D/cross.txt" "$D/stop"
start probe-local-a "$NA" "$PY" "$PROBE" http://127.0.0.1:9003/ "$BODY" 0.1 600 "$D/local-a.txt" "$D/stop"
start probe-local-b "$NB" "$PY" "$PROBE" http://127.0.0.1:9101/ "$BODY" 0.1 600 "$D/local-b.txt" "$D/stop"
sleep 3
summary() { "$PY" "$PROBE" --summary "$@"; }
# no_failure FILE FROM TO: every request of the window ok
no_failure() { [[ $(summary "$1" "$2" "$3") =~ ^requests=[1-9][0-9]*\ ok=[0-9]+\ slowest ]]; }
# no_hang FILE FROM TO: no request of the window ran into the 5 s timeout or came back silently wrong (cut answers are errors the client sees)
no_hang() { ! summary "$1" "$2" "$3" | grep -qE 'timeout=|wrong-body='; }
t=$(now)
echo "  baseline: cross $(summary "$D/cross.txt" "$T_START" "$t")"
check "baseline: every cross-region request ok" no_failure "$D/cross.txt" "$T_START" "$t"

echo "== (1) the path to gateway b0 lost silently (its relay killed)"
T1=$(now)
stop relay-to-b0
sleep 6
T1E=$(now)
s=$(summary "$D/cross.txt" "$T1" "$T1E")
echo "  cross-region while b0's path is lost: $s"
check "(1) no cross-region request hung or came back silently wrong (cut answers are errors the client sees)" no_hang "$D/cross.txt" "$T1" "$T1E"
gap=$(sed -n 's/.*longest_gap=\([0-9.]*\)s.*/\1/p' <<<"$s")
check "(1) failover to gateway b1: longest gap between successes ${gap}s (goal 2 s; bound ${FAILOVER_MAX} s)" \
    "$PY" -c "import sys; sys.exit(0 if $gap <= $FAILOVER_MAX else 1)"
check "(1) gateway a0 counts a failover" bash -c "[[ \$(ip netns exec $NA curl -s http://127.0.0.1:15220/metrics | awk '\$1 == \"trustline_tunnel_failovers_total\" { print \$2 }') -ge 1 ]]"
relay 0 b
took=$(wait_until 15 all_paths_up) || true
check "(1) the relay back: every path up again by itself (${took}s)" all_paths_up

echo "== (2) gateway b0 restarted under load (SIGKILL, then started with a fresh token)"
T2=$(now)
stop gateway-b0
sleep 1
gateway b 0
B0_START=$(now)
ready=$(wait_until 10 wait_ready "$NB" 127.0.0.1:15220 b0) || true
# the old connections to b0 look up until the idle timeout finds them dead: wait for new ones
back=$(wait_until 15 reconnected_to_b0 "$B0_START") || true
T2E=$(now)
s=$(summary "$D/cross.txt" "$T2" "$T2E")
echo "  b0 ready ${ready}s after its start; a0 and a1 reconnected to it ${back}s after that; cross-region meanwhile: $s"
check "(2) a0 and a1 reconnect to the restarted b0 by themselves" reconnected_to_b0 "$B0_START"
check "(2) no cross-region request hung or came back silently wrong (cut answers are errors the client sees)" no_hang "$D/cross.txt" "$T2" "$T2E"
gap=$(sed -n 's/.*longest_gap=\([0-9.]*\)s.*/\1/p' <<<"$s")
check "(2) with b1 up meanwhile, longest gap between successes ${gap}s (goal 2 s; bound ${FAILOVER_MAX} s; a killed gateway is noticed by the 1.5 s idle timeout)" \
    "$PY" -c "import sys; sys.exit(0 if $gap <= $FAILOVER_MAX else 1)"

echo "   both b gateways restarted at once"
T3=$(now)
stop gateway-b0
stop gateway-b1
gateway b 0
gateway b 1
ok_cross() { [[ $(get "$NA" http://127.0.0.1:9001/) == 200 ]]; }
back=$(wait_until 20 ok_cross) || true
T3E=$(now)
sleep 1
s=$(summary "$D/cross.txt" "$T3" "$(now)")
echo "  web -> api answers 200 again ${back}s after both were killed and restarted; meanwhile: $s"
check "(2) after both b gateways restart, cross-region requests succeed again by themselves" ok_cross
check "(2) no cross-region request hung or came back silently wrong (cut answers are errors the client sees)" no_hang "$D/cross.txt" "$T3" "$(now)"
took=$(wait_until 15 all_paths_up) || true
check "(2) every path up again (${took}s)" all_paths_up

echo "== (3) region partition: every relay killed for ${PARTITION}s (SVIDs of ${TTL}s)"
rot_a0=$(metric "$NA" 127.0.0.1:15130 trustline_svid_rotations_total)
rot_b0=$(metric "$NB" 127.0.0.1:15121 trustline_svid_rotations_total)
T4=$(now)
for n in 0 1; do stop "relay-to-b$n"; stop "relay-to-a$n"; done
sleep $((PARTITION / 2))
# A new workload joins in each region during the partition: each CA still issues.
sidecar late-a a 127.0.0.1:15132 "[inbound]
listen = \"127.0.0.1:19006\"
app_address = \"127.0.0.1:8082\"
allow = [\"$(wid web)\"]"
sidecar late-b b 127.0.0.1:15122 "[inbound]
listen = \"127.0.0.1:19007\"
app_address = \"127.0.0.1:8080\"
allow = [\"$(wid probe)\"]"
check "(3) partitioned region a still issues: a new workload gets its SVID" wait_ready "$NA" 127.0.0.1:15132 late-a
check "(3) partitioned region b still issues: a new workload gets its SVID" wait_ready "$NB" 127.0.0.1:15122 late-b
sleep $((PARTITION - PARTITION / 2))
T4E=$(now)
rot_a=$(($(metric "$NA" 127.0.0.1:15130 trustline_svid_rotations_total) - rot_a0))
rot_b=$(($(metric "$NB" 127.0.0.1:15121 trustline_svid_rotations_total) - rot_b0))
for f in local-a local-b cross; do echo "  during the partition, $f: $(summary "$D/$f.txt" "$T4" "$T4E")"; done
echo "  SVID rotations during the partition: web (a) $rot_a, probe (b) $rot_b"
check "(3) SVIDs kept rotating in both regions (more than one lifetime: >= 2 rotations each)" \
    test "$rot_a" -ge 2 -a "$rot_b" -ge 2
check "(3) region a served locally all along (every web -> batch request ok)" no_failure "$D/local-a.txt" "$T4" "$T4E"
check "(3) region b served locally all along (every probe -> api request ok)" no_failure "$D/local-b.txt" "$T4" "$T4E"
check "(3) no cross-region request hung or came back silently wrong (cut answers are errors the client sees): each failed with an error" no_hang "$D/cross.txt" "$T4" "$T4E"
T5=$(now)
for n in 0 1; do relay $n b; relay $n a; done
back=$(wait_until 30 ok_cross) || true
paths=$(wait_until 30 all_paths_up) || true
echo "  relays back: web -> api answers 200 after ${back}s, every path up after ${paths}s more"
check "(3) the regions heal without intervention when the relays return" ok_cross
check "(3) every gateway path is up again" all_paths_up
sleep 2
T5E=$(now)
echo "  after healing, cross: $(summary "$D/cross.txt" "$(
    "$PY" -c "print($T5E - 2)"
)" "$T5E")"
check "(3) after healing, every cross-region request ok" no_failure "$D/cross.txt" "$("$PY" -c "print($T5E - 2)")" "$T5E"
for f in local-a local-b cross; do echo "  whole run, $f: $(summary "$D/$f.txt")"; done
check "no request hung or came back silently wrong (cut answers are errors the client sees) in the whole run" bash -c \
    "! grep -hE ' (timeout|wrong-body) ' $D/cross.txt $D/local-a.txt $D/local-b.txt | grep -q ."

echo
if ((failures > 0)); then
    echo "chaos_partition: $failures check(s) FAILED"
else
    echo "chaos_partition: all checks passed"
fi
