#!/usr/bin/env bash
# Sidecar SIGKILL and restart under load, in a pod with the redirect rules installed:
#
#   pod A (ns tlch-pa-*) 10.93.0.1 ──veth── 10.93.0.2 pod B (ns tlch-pb-*)
#     CA on 10.93.0.1:8443 (local to A), `trustline redirect`,      sidecar B: inbound 10.93.0.2:8000
#     sidecar A as UID 1337 (outbound 15001), load: probe + oha      -> app 127.0.0.1:8080
#
# Under load (integration/lib/probe.py every 20 ms, a new connection each, 2 s timeout; and oha
# with keep-alive), sidecar A is killed with SIGKILL and started again (a fresh join token, as an
# orchestrator gives a restarted pod) RESTARTS times. Measured: exec to 200 on /readyz (p50, max);
# checked: no TRUSTLINE rule added or lost, no socket left of a killed sidecar, the restarted one
# binds its ports every time, and clients see refused connections during the gap, never a hang
# (no probe request reaches its timeout) or a silently wrong answer (an answer cut by the kill is an error the client sees: short of its Content-Length).
#
# requires: root ip iptables ip6tables curl python3 setpriv ss oha
#
# Usage: sudo TRUSTLINE=target/debug/trustline integration/chaos_restart.sh   (KEEP=1 keeps the temp dir)
#        RESTARTS=20 READY_MS=1000: the check on the median is a generous bound that catches a
#        hang or a regression on a loaded machine; the goal (100 ms) is a figure to compare with
#        (RELIABILITY.md; benches/startup.rs measures start-up alone)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
RESTARTS=${RESTARTS:-20}
READY_MS=${READY_MS:-1000}
TD=mesh.test
ID_A=spiffe://$TD/ns/demo/sa/client-a
ID_B=spiffe://$TD/ns/demo/sa/server-b
PROXY_UID=1337
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

source "$here/lib/checks.bash"

need_root "network namespaces, iptables"
need_tools ip iptables ip6tables curl python3 setpriv ss oha
need_trustline
[[ $TRUSTLINE == /* ]] || TRUSTLINE=$PWD/$TRUSTLINE
PY=$(python3 -c 'import sys; print(sys.executable)')

S=$(printf '%04x' $((($$ ^ RANDOM) & 0xffff)))
NA=tlch-pa-$S NB=tlch-pb-$S
D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-chaos-restart.XXXXXX")
chmod 0711 "$D"
PIDS=()
SIDECAR=
cleanup() {
    local rc=$? pid ns
    trap - ERR
    touch "$D/stop"
    [[ -n $SIDECAR ]] && kill "$SIDECAR" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$NA" "$NB"; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            sleep 0.2
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    if ((failures > 0 || rc != 0)); then
        for log in "$D"/*.log; do
            [[ -s $log ]] || continue
            echo "--- last lines of $log ---"
            tail -n 10 "$log"
        done
    fi
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
    exit $((rc != 0 ? rc : failures > 0))
}
trap cleanup EXIT
in_a() { ip netns exec "$NA" "$@"; }
in_b() { ip netns exec "$NB" "$@"; }
wait_for() { # WHAT TRIES COMMAND...
    local what=$1 tries=$2
    shift 2
    for _ in $(seq 1 "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "FAIL: timed out waiting for $what"
    return 1
}

for ns in "$NA" "$NB"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add "cra-$S" netns "$NA" type veth peer name "crb-$S" netns "$NB"
ip -n "$NA" addr add 10.93.0.1/24 dev "cra-$S"
ip -n "$NB" addr add 10.93.0.2/24 dev "crb-$S"
ip -n "$NA" link set "cra-$S" up
ip -n "$NB" link set "crb-$S" up

"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
"$TRUSTLINE" ca init --root "$D/root" --region r1 --out "$D/r1" >/dev/null
NO_COLOR=1 ip netns exec "$NA" "$TRUSTLINE" ca serve --ca "$D/r1" --data "$D/cadata" \
    --listen 10.93.0.1:8443 --san 10.93.0.1 --metrics-listen off --rate-limit 0 >"$D/ca.out" 2>"$D/ca.log" &
PIDS+=($!)
wait_for "the CA to serve" 300 grep -q '^trustline CA serving' "$D/ca.out"

mkdir -p "$D/www"
echo "trustline-chaos-restart-body" >"$D/www/index.html"
ip netns exec "$NB" "$PY" -m http.server 8080 --bind 127.0.0.1 --directory "$D/www" >/dev/null 2>"$D/app.log" &
PIDS+=($!)

in_a "$TRUSTLINE" redirect --proxy-uid "$PROXY_UID" --exclude-inbound-ports 8443 >"$D/redirect.out"
rules() { { in_a iptables -w -t nat -S; in_a ip6tables -w -t nat -S; } | grep TRUSTLINE | sort; }
rules >"$D/rules.before"

config() { # DIR ID TAIL
    cat >"$1/sidecar.toml" <<EOF
trust_domain = "$TD"
spiffe_id = "$2"
bundle = "bundle.pem"
drain_timeout = "1s"

[identity]
source = "ca"
ca_url = "https://10.93.0.1:8443"
token_file = "join.token"

$3
EOF
}
token() { # DIR ID
    in_a "$TRUSTLINE" ca token --data "$D/cadata" --spiffe-id "$2" >"$1/join.token"
    chmod 0600 "$1/join.token"
    chown "$PROXY_UID:$PROXY_UID" "$1/join.token"
}
mkdir -m 0700 "$D/b" "$D/a"
cp "$D/root/bundle.pem" "$D/a/"
cp "$D/root/bundle.pem" "$D/b/"
config "$D/b" "$ID_B" "[admin]
listen = \"127.0.0.1:15020\"

[inbound]
listen = \"10.93.0.2:8000\"
app_address = \"127.0.0.1:8080\"
allow = [\"$ID_A\"]"
token "$D/b" "$ID_B"
NO_COLOR=1 ip netns exec "$NB" "$TRUSTLINE" sidecar --config "$D/b/sidecar.toml" >"$D/b.out" 2>"$D/b.log" &
PIDS+=($!)
config "$D/a" "$ID_A" "[outbound]
listen = \"127.0.0.1:15001\"

[[service]]
name = \"server-b\"
addresses = [\"10.93.0.2:8000\"]
spiffe_ids = [\"$ID_B\"]"
chown -R "$PROXY_UID:$PROXY_UID" "$D/a"
wait_for "sidecar B ready" 300 in_b curl -sf http://127.0.0.1:15020/readyz

# start_a: a fresh token, then sidecar A as UID 1337, timed from exec to ready; sets SIDECAR
# and appends the milliseconds to $D/ready-ms.
start_a() {
    token "$D/a" "$ID_A"
    local out
    out=$(in_a "$PY" "$here/lib/start_timed.py" "$D/a.log" 127.0.0.1:15020 10 \
        setpriv --reuid="$PROXY_UID" --regid="$PROXY_UID" --clear-groups \
        "$TRUSTLINE" sidecar --config "$D/a/sidecar.toml")
    SIDECAR=${out%% *}
    echo "${out#* }" >>"$D/ready-ms"
    [[ ${out#* } =~ ^[0-9.]+$ ]]
}
check "sidecar A (UID $PROXY_UID) starts and is ready" start_a
URL=http://10.93.0.2:8000/
check "a plain request from pod A reaches B's app through the redirect" \
    bash -c '[[ $(ip netns exec "$1" curl -sS --max-time 5 "$2") == trustline-chaos-restart-body ]]' _ "$NA" "$URL"
: >"$D/ready-ms"

# Load: the probe (a new connection every 20 ms) and oha (keep-alive, 4 connections, at most 200 requests/s).
ip netns exec "$NA" "$PY" "$here/lib/probe.py" "$URL" "$D/www/index.html" 0.02 600 "$D/probe.txt" "$D/stop" 2 &
PIDS+=($!)
ip netns exec "$NA" oha --no-tui --output-format json -o "$D/oha.json" -z 600s -c 4 -q 200 -t 2s "$URL" >/dev/null 2>&1 &
OHA=$!
PIDS+=($OHA)
sleep 1

leftovers=0
for i in $(seq 1 "$RESTARTS"); do
    kill -9 "$SIDECAR"
    # Wait until the kernel has reaped it: then nothing of it may remain.
    for _ in $(seq 1 100); do [[ -d /proc/$SIDECAR ]] || break; sleep 0.01; done
    left=$(in_a ss -Htanp | grep -c "pid=$SIDECAR," || true)
    listening=$(in_a ss -Htln | awk '$4 ~ /:(15001|15020)$/' | wc -l)
    if ((left > 0 || listening > 0)); then
        leftovers=$((leftovers + 1))
        echo "  restart $i: $left socket(s) of the killed sidecar, $listening listener(s) left"
    fi
    if ! rules | cmp -s - "$D/rules.before"; then
        leftovers=$((leftovers + 1))
        echo "  restart $i: the TRUSTLINE rules changed"
    fi
    sleep 0.2 # the gap: clients must see refusals, not hangs
    if ! start_a; then
        fail "restart $i: sidecar A did not become ready ($(tail -n 1 "$D/ready-ms"))"
        break
    fi
    sleep 0.5
done
sleep 1
touch "$D/stop"
kill -INT "$OHA" 2>/dev/null || true
wait "$OHA" 2>/dev/null || true

read -r n p50 max < <("$PY" -c '
import statistics, sys
v = sorted(float(x) for x in open(sys.argv[1]) if x.strip().replace(".", "", 1).isdigit())
print(len(v), f"{statistics.median(v):.1f}", f"{max(v):.1f}")' "$D/ready-ms")
echo "  exec to ready over $n restarts: p50 ${p50} ms, max ${max} ms (all: $(tr '\n' ' ' <"$D/ready-ms"))"
check "all $RESTARTS restarts became ready" test "$n" = "$RESTARTS"
check "ready again within ${READY_MS} ms at the median (p50 ${p50} ms, max ${max} ms; the goal is 100 ms)" \
    "$PY" -c "import sys; sys.exit(0 if $p50 <= $READY_MS else 1)"
check "no socket or listener of a killed sidecar left, the TRUSTLINE rules unchanged ($leftovers restart(s) with leftovers)" \
    test "$leftovers" = 0
s=$("$PY" "$here/lib/probe.py" --summary "$D/probe.txt")
echo "  probe (new connection every 20 ms): $s"
echo "  oha (keep-alive): $(jq -c '{ok: .statusCodeDistribution, errors: .errorDistribution}' "$D/oha.json" 2>/dev/null || echo none)"
check "clients saw refusals during the gaps (the probe counted refused or reset connections)" \
    bash -c "grep -qE ' (refused|reset|closed) ' $D/probe.txt"
check "no client hung: no probe request reached its 2 s timeout" bash -c "! grep -q ' timeout ' $D/probe.txt"
check "no answer came back silently wrong (200 with another body, or another status)" bash -c "! grep -qE ' (wrong-body|http-[0-9]+) ' $D/probe.txt"
check "oha saw no request time out (2 s)" bash -c "! jq -e '.errorDistribution | keys[] | select(test(\"timeout\"))' $D/oha.json >/dev/null"
# Three tries of 5 s: on a loaded CI machine the first request after the restart has met a
# sidecar still fetching its SVID (CI, 2026-12-02: "no SVID yet", then a 5 s curl timeout).
check "after the last restart, requests succeed again (up to 3 tries of 5 s)" \
    bash -c 'for _ in 1 2 3; do [[ $(ip netns exec "$1" curl -sS --max-time 5 "$2") == trustline-chaos-restart-body ]] && exit 0; done; exit 1' _ "$NA" "$URL"

kill -9 "$SIDECAR"
for _ in $(seq 1 100); do [[ -d /proc/$SIDECAR ]] || break; sleep 0.01; done
SIDECAR=
check "after the final SIGKILL, nothing listens on the sidecar's ports" \
    bash -c "[[ \$(ip netns exec $NA ss -Htln | awk '\$4 ~ /:(15001|15020)\$/' | wc -l) == 0 ]]"
in_a "$TRUSTLINE" redirect --remove >/dev/null
check "redirect --remove leaves no TRUSTLINE rule" test -z "$(rules)"

echo
if ((failures > 0)); then
    echo "chaos_restart: $failures check(s) FAILED"
else
    echo "chaos_restart: all checks passed"
fi
