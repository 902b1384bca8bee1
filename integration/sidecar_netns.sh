#!/usr/bin/env bash
# Transparent interception in network namespaces, like pods: `trustline redirect` installs the
# iptables rules, sidecars run as their own UID, and a plain-text `curl` in pod A reaches the app in
# pod B over SPIFFE mTLS 1.3 without either app knowing. A non-mesh client C is refused.
#
#   A 10.77.0.1 ──veth── 10.77.0.2 B 10.78.0.1 ──veth── 10.78.0.2 C (no sidecar)
#   A 10.79.1.1 ──veth── CA ──veth── 10.79.2.1 B        (the CA listens on 10.79.0.1:8443)
#
# Pods: app (B: python3 http.server on 0.0.0.0:8000 and [::]:8000, and on 8001 which is excluded
# from redirection; a loopback-only "debug" service on 127.0.0.1:8002 that B does not declare),
# sidecar as UID 1337 (setpriv), `trustline redirect --proxy-uid 1337`. The CA sits in its own
# namespace; sidecars get their SVIDs from it with join tokens. The wire is checked with a
# python3 AF_PACKET sniffer on B's veth (tcpdump is not needed). The A-B and B-C links also carry
# IPv6 (fd77::/64, fd78::/64): IPv6 TCP must go through the sidecar or be refused, never around.
#
# requires: root ip iptables ip6tables openssl curl python3 setpriv
#
# Usage: sudo TRUSTLINE=target/debug/trustline integration/sidecar_netns.sh   (KEEP=1 keeps the temp dir)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TD=mesh.test
ID_A=spiffe://$TD/ns/demo/sa/client-a
ID_B=spiffe://$TD/ns/demo/sa/server-b
PROXY_UID=1337
APP_PORT=8000
EXCLUDED_PORT=8001
DEBUG_PORT=8002
URL=http://10.77.0.2:$APP_PORT/
URL6_FROM_A="http://[fd77::2]:$APP_PORT/"
URL6_FROM_C="http://[fd78::1]:$APP_PORT/"
MARKER=trustline-netns-secret-body
DEBUG_MARKER=trustline-netns-loopback-only-debug

source "$(dirname "${BASH_SOURCE[0]}")/lib/checks.bash"

need_root "network namespaces, iptables"
need_tools ip iptables ip6tables openssl curl python3 setpriv
need_trustline
# pyenv and similar shims may not work inside `ip netns exec`: use the real interpreter.
PY=$(python3 -c 'import sys; print(sys.executable)')

# Unique names, so a crashed earlier run or a parallel one does not collide.
S=$(printf '%04x' $((($$ ^ RANDOM) & 0xffff)))
NA=tl-a-$S NB=tl-b-$S NC=tl-c-$S NCA=tl-ca-$S
D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-netns.XXXXXX")
chmod 0711 "$D" # the sidecar UID must reach its own directory below
PIDS=()
cleanup() {
    local rc=$? pid ns
    trap - ERR
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$NA" "$NB" "$NC" "$NCA"; do
        if ip netns list | grep -qw "$ns"; then
            # Anything this script started there and did not record (none expected).
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            for _ in $(seq 1 20); do
                [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break
                sleep 0.1
            done
            ip netns del "$ns" 2>/dev/null || true # its veths go with it
        fi
    done
    if ((failures > 0 || rc != 0)); then
        for log in "$D"/*.log; do
            [[ -s $log ]] || continue
            echo "--- last lines of $log ---"
            tail -n 15 "$log"
        done
    fi
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

# (Background processes use `ip netns exec` directly, so that $! is the process itself.)
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# --- the world ---------------------------------------------------------------------------
for ns in "$NA" "$NB" "$NC" "$NCA"; do
    ip netns add "$ns"
    in_ns "$ns" ip link set lo up
done
# link NS1 IF1 ADDR1 NS2 IF2 ADDR2: a veth pair between two namespaces.
link() {
    ip link add "$2" type veth peer name "$5"
    ip link set "$2" netns "$1"
    ip link set "$5" netns "$4"
    in_ns "$1" ip addr add "$3" dev "$2"
    in_ns "$4" ip addr add "$6" dev "$5"
    in_ns "$1" ip link set "$2" up
    in_ns "$4" ip link set "$5" up
}
link "$NA" "tlab$S" 10.77.0.1/24 "$NB" "tlba$S" 10.77.0.2/24
link "$NB" "tlbc$S" 10.78.0.1/24 "$NC" "tlcb$S" 10.78.0.2/24
# link6 NS IF ADDR: IPv6 on a veth end (nodad: usable at once).
link6() {
    in_ns "$1" sysctl -qw "net.ipv6.conf.$2.disable_ipv6=0"
    in_ns "$1" ip -6 addr add "$3" dev "$2" nodad
}
link6 "$NA" "tlab$S" fd77::1/64
link6 "$NB" "tlba$S" fd77::2/64
link6 "$NB" "tlbc$S" fd78::1/64
link6 "$NC" "tlcb$S" fd78::2/64
link "$NA" "tlak$S" 10.79.1.1/24 "$NCA" "tlka$S" 10.79.1.2/24
link "$NB" "tlbk$S" 10.79.2.1/24 "$NCA" "tlkb$S" 10.79.2.2/24
in_ns "$NCA" ip addr add 10.79.0.1/32 dev lo
in_ns "$NA" ip route add 10.79.0.1/32 via 10.79.1.2
in_ns "$NB" ip route add 10.79.0.1/32 via 10.79.2.2
# C reaches B's pod IP through B's C-facing link (B owns 10.77.0.2, so no forwarding is needed).
in_ns "$NC" ip route add 10.77.0.0/24 via 10.78.0.1
B_WIRE=tlba$S

# wait_for WHAT TRIES COMMAND...: retries every 0.1 s.
wait_for() {
    local what=$1 tries=$2
    shift 2
    for _ in $(seq 1 "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "FAIL: timed out waiting for $what"
    return 1
}

# --- the CA, in its own namespace ----------------------------------------------------------
"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
"$TRUSTLINE" ca init --root "$D/root" --region r1 --out "$D/r1" >/dev/null
NO_COLOR=1 ip netns exec "$NCA" "$TRUSTLINE" ca serve --ca "$D/r1" --data "$D/cadata" \
    --listen 10.79.0.1:8443 --san 10.79.0.1 --metrics-listen off >"$D/ca.out" 2>"$D/ca.log" &
PIDS+=($!)
wait_for "the CA to serve" 300 grep -q '^trustline CA serving' "$D/ca.out"

# --- the apps --------------------------------------------------------------------------------
# B's app listens on every address, as many apps do: only the redirect keeps C away from it.
mkdir -p "$D/www"
echo "$MARKER" >"$D/www/index.html"
for port in $APP_PORT $EXCLUDED_PORT; do
    ip netns exec "$NB" "$PY" -m http.server "$port" --bind 0.0.0.0 --directory "$D/www" \
        >/dev/null 2>"$D/app-$port.log" &
    PIDS+=($!)
done
# The same app on IPv6 (IPv6 only, so the IPv4 one keeps its port and its plain log lines).
cat >"$D/app6.py" <<'EOF'
import functools, http.server, socket, sys
class V6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
V6(("::", int(sys.argv[1])), handler).serve_forever()
EOF
ip netns exec "$NB" "$PY" "$D/app6.py" "$APP_PORT" "$D/www" >/dev/null 2>"$D/app6-$APP_PORT.log" &
PIDS+=($!)
# A debugging service bound to loopback only: nobody outside the pod may reach it.
mkdir -p "$D/debug"
echo "$DEBUG_MARKER" >"$D/debug/index.html"
ip netns exec "$NB" "$PY" -m http.server "$DEBUG_PORT" --bind 127.0.0.1 --directory "$D/debug" \
    >/dev/null 2>"$D/app-$DEBUG_PORT.log" &
PIDS+=($!)
wait_for "B's app" 100 in_ns "$NB" curl -sf "http://127.0.0.1:$APP_PORT/"
wait_for "B's second app" 100 in_ns "$NB" curl -sf "http://127.0.0.1:$EXCLUDED_PORT/"
wait_for "B's IPv6 app" 100 in_ns "$NB" curl -sf "http://[::1]:$APP_PORT/"
wait_for "B's debug service" 100 in_ns "$NB" curl -sf "http://127.0.0.1:$DEBUG_PORT/"
# Control: before interception, C reaches B's app in plain text, over IPv4 and IPv6.
check "control: before redirect, C reaches B's app directly" \
    bash -c '[[ $(ip netns exec "$1" curl -sS --max-time 5 "$2") == "$3" ]]' _ "$NC" "$URL" "$MARKER"
check "control: before redirect, C reaches B's app directly over IPv6 ($URL6_FROM_C)" \
    bash -c '[[ $(ip netns exec "$1" curl -sS --max-time 5 "$2") == "$3" ]]' _ "$NC" "$URL6_FROM_C" "$MARKER"

# --- interception, then the sidecars ------------------------------------------------------------
in_ns "$NA" "$TRUSTLINE" redirect --proxy-uid "$PROXY_UID" >"$D/redirect-a.out"
# B: installed twice, to show it does not duplicate.
for _ in 1 2; do
    in_ns "$NB" "$TRUSTLINE" redirect --proxy-uid "$PROXY_UID" \
        --exclude-inbound-ports "$EXCLUDED_PORT" >"$D/redirect-b.out"
done
# TRUSTLINE lines of iptables and ip6tables together.
trustline_rules() {
    { in_ns "$1" iptables -w -t nat -S; in_ns "$1" ip6tables -w -t nat -S; } | grep -c TRUSTLINE || true
}
DRY_B=$("$TRUSTLINE" redirect --dry-run --proxy-uid "$PROXY_UID" --exclude-inbound-ports "$EXCLUDED_PORT")
# -N lines and -A lines both mention TRUSTLINE: one per dry-run command (IPv4 and IPv6).
check "redirect installed twice in B leaves one copy ($(trustline_rules "$NB") TRUSTLINE lines, $(wc -l <<<"$DRY_B") commands)" \
    [ "$(trustline_rules "$NB")" = "$(wc -l <<<"$DRY_B")" ]
check "redirect installs IPv6 rules too ($(in_ns "$NB" ip6tables -w -t nat -S | grep -c TRUSTLINE) ip6tables TRUSTLINE lines in B)" \
    [ "$(in_ns "$NB" ip6tables -w -t nat -S | grep -c TRUSTLINE)" -gt 0 ]

# pod NS NAME SPIFFE-ID CONFIG-TAIL: the pod's directory (owned by the sidecar UID), its join
# token (0600) and config, and the sidecar started as that UID.
pod() {
    local ns=$1 name=$2 id=$3 tail=$4 dir=$D/$2
    mkdir -m 0700 "$dir"
    cp "$D/root/bundle.pem" "$dir/bundle.pem"
    in_ns "$NCA" "$TRUSTLINE" ca token --data "$D/cadata" --spiffe-id "$id" >"$dir/join.token"
    chmod 0600 "$dir/join.token"
    cat >"$dir/sidecar.toml" <<EOF
trust_domain = "$TD"
spiffe_id = "$id"
bundle = "bundle.pem"
drain_timeout = "1s"

[identity]
source = "ca"
ca_url = "https://10.79.0.1:8443"
token_file = "join.token"

$tail
EOF
    chown -R "$PROXY_UID:$PROXY_UID" "$dir"
    NO_COLOR=1 ip netns exec "$ns" setpriv --reuid="$PROXY_UID" --regid="$PROXY_UID" --clear-groups \
        "$TRUSTLINE" sidecar --config "$dir/sidecar.toml" >"$D/sidecar-$name.out" 2>"$D/sidecar-$name.log" &
    PIDS+=($!)
}
pod "$NA" a "$ID_A" "[outbound]
listen = \"127.0.0.1:15001\"

[[service]]
name = \"server-b\"
addresses = [\"10.77.0.2:$APP_PORT\"]
spiffe_ids = [\"$ID_B\"]

[[service]]
name = \"server-b-debug\"
addresses = [\"10.77.0.2:$DEBUG_PORT\"]
spiffe_ids = [\"$ID_B\"]"
pod "$NB" b "$ID_B" "[inbound]
listen = \"0.0.0.0:15006\"
ports = [$APP_PORT]
allow = [\"$ID_A\"]"
# Ready means an SVID from the CA: the sidecars' own CA connections were not redirected.
wait_for "sidecar A to be ready" 300 in_ns "$NA" curl -sf http://127.0.0.1:15020/readyz
wait_for "sidecar B to be ready" 300 in_ns "$NB" curl -sf http://127.0.0.1:15020/readyz
pass "both sidecars (UID $PROXY_UID) obtained SVIDs from the CA through the redirect rules"
check "the sidecar runs as UID $PROXY_UID" \
    bash -c '[[ $(ps -o uid= -p "$1" | tr -d " ") == "$2" ]]' _ "${PIDS[-1]}" "$PROXY_UID"
check "the join token stays 0600, owned by UID $PROXY_UID" \
    [ "$(stat -c '%a %u' "$D/b/join.token")" = "600 $PROXY_UID" ]

# metric NS NAME LABELS: the value of one sample of the sidecar's metrics (0 when absent).
metric() {
    in_ns "$1" curl -sf http://127.0.0.1:15020/metrics |
        awk -v m="$2{$3}" '$1 == m { v = $2 } END { print v + 0 }'
}
# failed NS DIRECTION: all failures of a direction, any reason.
failed() {
    in_ns "$1" curl -sf http://127.0.0.1:15020/metrics |
        awk -v d="direction=\"$2\"" '/^trustline_connections_failed_total\{/ && index($1, d) { n += $2 } END { print n + 0 }'
}

# --- (a) + (b): plain curl from A, mTLS 1.3 on the wire ------------------------------------------
cat >"$D/sniff.py" <<'EOF'
# Captures the TCP payloads between A and B's app port on one interface (AF_PACKET), until
# SIGTERM, then reports what the wire showed.
import signal, socket, struct, sys
iface, port, marker, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
s.settimeout(0.1)
open(ready, "w").close()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
flows = {"client": {}, "server": {}}  # seq -> payload, per direction
packets = 0
while not stop:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
    if ip[9] != 6:
        continue
    tcp = ip[ihl:total]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    payload = tcp[(tcp[12] >> 4) * 4:]
    packets += 1
    if payload and port in (sport, dport):
        flows["client" if dport == port else "server"].setdefault(seq, payload)
def stream(d):
    return b"".join(p for _, p in sorted(flows[d].items()))
c, srv = stream("client"), stream("server")
print("packets", packets)
print("client_bytes", len(c))
print("server_bytes", len(srv))
print("client_first", c[:3].hex())
print("server_first", srv[:3].hex())
# ServerHello: record(5) type(1) len(3) version(2) random(32) sid_len(1)+sid suite(2) comp(1) ext_len(2) exts
version = "none"
if srv[:1] == b"\x16" and srv[5:6] == b"\x02":
    i = 5 + 4 + 2 + 32
    i += 1 + srv[i]
    i += 3
    end = i + 2 + struct.unpack("!H", srv[i:i + 2])[0]
    i += 2
    while i + 4 <= end:
        typ, ln = struct.unpack("!HH", srv[i:i + 4])
        if typ == 0x2B:
            version = srv[i + 4:i + 4 + ln].hex()
        i += 4 + ln
print("server_hello_supported_version", version)
wire = c + srv
print("cleartext_get", int(b"GET /" in wire))
print("cleartext_body", int(marker in wire))
print("cleartext_spiffe", int(b"spiffe://" in wire))
EOF
# sniff_start / sniff_stop: capture on B's A-facing veth into $D/sniff.out.
SNIFF=
sniff_start() {
    rm -f "$D/sniff.ready" "$D/sniff.out"
    ip netns exec "$NB" "$PY" "$D/sniff.py" "$B_WIRE" "$APP_PORT" "$MARKER" "$D/sniff.ready" \
        >"$D/sniff.out" 2>"$D/sniff.log" &
    SNIFF=$!
    PIDS+=("$SNIFF")
    wait_for "the sniffer" 100 test -e "$D/sniff.ready"
}
sniff_stop() {
    sleep 0.3
    kill -TERM "$SNIFF"
    wait "$SNIFF" || true
}
wire() { awk -v k="$1" '$1 == k { print $2 }' "$D/sniff.out"; }

sniff_start
FROM_SIDECAR=$(grep -c '^127.0.0.1 .*"GET / HTTP' "$D/app-$APP_PORT.log" || true)
BODY=$(in_ns "$NA" curl -sS --max-time 10 "$URL" 2>"$D/curl-a.log" || true)
check "(a) plain curl $URL from pod A gets B's page" [ "$BODY" = "$MARKER" ]
sniff_stop
echo "     wire: $(tr '\n' ' ' <"$D/sniff.out")"
check "(b) sidecar A counted an outbound mTLS connection (opened=$(metric "$NA" trustline_connections_opened_total 'direction="outbound"'))" \
    [ "$(metric "$NA" trustline_connections_opened_total 'direction="outbound"')" = 1 ]
check "(b) sidecar B counted an inbound mTLS connection (opened=$(metric "$NB" trustline_connections_opened_total 'direction="inbound"'))" \
    [ "$(metric "$NB" trustline_connections_opened_total 'direction="inbound"')" = 1 ]
check "(b) B's app saw the request come from its sidecar, on 127.0.0.1" \
    [ "$(grep -c '^127.0.0.1 .*"GET / HTTP' "$D/app-$APP_PORT.log" || true)" = $((FROM_SIDECAR + 1)) ]
check "(b) on the wire, A's first bytes are a TLS handshake record (got $(wire client_first), want 160301/160303)" \
    bash -c '[[ $1 == 160301 || $1 == 160303 ]]' _ "$(wire client_first)"
check "(b) on the wire, B's ServerHello selects TLS 1.3 (supported_versions $(wire server_hello_supported_version))" \
    [ "$(wire server_hello_supported_version)" = 0304 ]
check "(b) on the wire, no 'GET /' in clear text" [ "$(wire cleartext_get)" = 0 ]
check "(b) on the wire, the page body is not in clear text" [ "$(wire cleartext_body)" = 0 ]
check "(b) on the wire, no SPIFFE ID in clear text (certificates are encrypted, as in TLS 1.3)" \
    [ "$(wire cleartext_spiffe)" = 0 ]

# --- (c): C, outside the mesh, is refused by B's inbound sidecar ------------------------------
before=$(failed "$NB" inbound)
GETS_FROM_C=$(grep -c '^10.78.0.2 ' "$D/app-$APP_PORT.log" || true)
if in_ns "$NC" curl -sS --max-time 5 "$URL" >"$D/curl-c.out" 2>"$D/curl-c.log"; then
    fail "(c) plain curl from C is refused (it got: $(head -c 100 "$D/curl-c.out"))"
else
    pass "(c) plain curl $URL from C fails ($(tail -n 1 "$D/curl-c.log"))"
fi
after=$(failed "$NB" inbound)
check "(c) sidecar B counted the plain-text attempt as an inbound failure ($before -> $after)" \
    [ "$after" -gt "$before" ]
before=$(metric "$NB" trustline_connections_failed_total 'direction="inbound",reason="no_client_certificate"')
in_ns "$NC" timeout 10 openssl s_client -connect "10.77.0.2:$APP_PORT" -tls1_3 \
    -CAfile "$D/root/bundle.pem" </dev/null >"$D/s_client-c.log" 2>&1 || true
after=$(metric "$NB" trustline_connections_failed_total 'direction="inbound",reason="no_client_certificate"')
check "(c) TLS 1.3 from C without a client certificate: B counts no_client_certificate ($before -> $after)" \
    [ "$after" -gt "$before" ]
check "(c) B's app never saw C's requests after the redirect" \
    [ "$(grep -c '^10.78.0.2 ' "$D/app-$APP_PORT.log" || true)" = "$GETS_FROM_C" ]
check "(c) an --exclude-inbound-ports port ($EXCLUDED_PORT) is not redirected: C reaches it directly" \
    bash -c '[[ $(ip netns exec "$1" curl -sS --max-time 5 "http://10.77.0.2:$2/") == "$3" ]]' \
    _ "$NC" "$EXCLUDED_PORT" "$MARKER"

# --- (e): only declared app ports, IPv6 intercepted ------------------------------------------
# A is allowed in, but B declares only $APP_PORT: B's loopback-only debug service stays out of
# reach, though A's sidecar carries the call over mTLS to B's inbound side.
before=$(metric "$NB" trustline_connections_failed_total 'direction="inbound",reason="undeclared_port"')
DEBUG_GETS=$(grep -c '"GET /' "$D/app-$DEBUG_PORT.log" || true)
GOT=$(in_ns "$NA" curl -sS --max-time 5 "http://10.77.0.2:$DEBUG_PORT/" 2>/dev/null || true)
check "(e) an allowed peer dialling B's undeclared port $DEBUG_PORT does not reach B's loopback-only service" \
    bash -c '[[ $1 != *"$2"* ]]' _ "$GOT" "$DEBUG_MARKER"
after=$(metric "$NB" trustline_connections_failed_total 'direction="inbound",reason="undeclared_port"')
check "(e) B counts it as undeclared_port ($before -> $after)" [ "$after" -gt "$before" ]
check "(e) B's debug service saw no request from outside the pod" \
    [ "$(grep -c '"GET /' "$D/app-$DEBUG_PORT.log" || true)" = "$DEBUG_GETS" ]
# IPv6: C (no sidecar) and A's app both try B's app over IPv6; neither may get around the
# sidecars (they listen on IPv4 only, so the redirected IPv6 connections are refused).
V6_GETS=$(grep -c '"GET /' "$D/app6-$APP_PORT.log" || true)
GOT=$(in_ns "$NC" curl -sS --max-time 5 "$URL6_FROM_C" 2>/dev/null || true)
check "(e) plain curl over IPv6 from C ($URL6_FROM_C) does not reach B's app" \
    bash -c '[[ $1 != *"$2"* ]]' _ "$GOT" "$MARKER"
GOT=$(in_ns "$NA" curl -sS --max-time 5 "$URL6_FROM_A" 2>/dev/null || true)
check "(e) plain curl over IPv6 from A's app ($URL6_FROM_A) does not get to B's app around the sidecars" \
    bash -c '[[ $1 != *"$2"* ]]' _ "$GOT" "$MARKER"
check "(e) B's IPv6 app saw no request after the redirect" \
    [ "$(grep -c '"GET /' "$D/app6-$APP_PORT.log" || true)" = "$V6_GETS" ]

# --- (d): dry run and removal ----------------------------------------------------------------
DRY=$("$TRUSTLINE" redirect --dry-run --proxy-uid "$PROXY_UID")
check "(d) --dry-run prints $(wc -l <<<"$DRY") iptables and ip6tables commands with both REDIRECTs" bash -c '
    ! grep -qvE "^ip6?tables -w -t nat " <<<"$1" &&
    grep -q "^ip6tables -w -t nat -A TRUSTLINE_OUTPUT -d ::1/128 -j RETURN$" <<<"$1" &&
    grep -q -- "-j REDIRECT --to-ports 15006$" <<<"$1" &&
    grep -q -- "-j REDIRECT --to-ports 15001$" <<<"$1" &&
    grep -q -- "--uid-owner 1337 -j RETURN$" <<<"$1"' _ "$DRY"
in_ns "$NC" "$TRUSTLINE" redirect --dry-run --proxy-uid "$PROXY_UID" >/dev/null
check "(d) --dry-run changes nothing" [ "$(trustline_rules "$NC")" = 0 ]
# The printed commands are shell-ready and exact: run them in C, compare with A's real install.
in_ns "$NC" bash -e <<<"$DRY"
check "(d) the dry-run commands, run by a shell, make the same rules as the install" \
    [ "$(in_ns "$NC" iptables -t nat -S; in_ns "$NC" ip6tables -t nat -S)" = "$(in_ns "$NA" iptables -t nat -S; in_ns "$NA" ip6tables -t nat -S)" ]
for ns in "$NA" "$NB" "$NC"; do in_ns "$ns" "$TRUSTLINE" redirect --remove >/dev/null; done
check "(d) --remove leaves no TRUSTLINE rule or chain (iptables -t nat -S in A, B, C)" \
    [ "$(($(trustline_rules "$NA") + $(trustline_rules "$NB") + $(trustline_rules "$NC")))" = 0 ]
check "(d) --remove again is not an error" \
    bash -c '[[ $(ip netns exec "$1" "$2" redirect --remove | tr "\n" " ") == "IPv4: no trustline rules were installed IPv6: no trustline rules were installed " ]]' \
    _ "$NB" "$TRUSTLINE"
check "(d) --dry-run --remove prints the deletions" \
    bash -c '"$1" redirect --remove --dry-run | grep -q -- "-X TRUSTLINE_OUTPUT$"' _ "$TRUSTLINE"
# Without the rules, C's plain curl reaches the app again: the refusal above was the redirect's.
check "(d) after --remove, C reaches B's app directly again" \
    bash -c '[[ $(ip netns exec "$1" curl -sS --max-time 5 "$2") == "$3" ]]' _ "$NC" "$URL" "$MARKER"

# The capture can see clear text when there is some: without the rules, A's curl goes out plain.
sniff_start
in_ns "$NA" curl -sS --max-time 5 -o /dev/null "$URL"
sniff_stop
check "(d) after --remove, the same capture sees A's 'GET /' and the page in clear text (so it would have above)" \
    [ "$(wire cleartext_get)$(wire cleartext_body)" = 11 ]

echo
if ((failures > 0)); then
    echo "sidecar_netns: $failures check(s) FAILED"
    exit 1
fi
echo "sidecar_netns: all checks passed"
