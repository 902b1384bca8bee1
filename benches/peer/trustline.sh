#!/usr/bin/env bash
# trustline sidecar pair, as a launcher for the shared peer benchmark (shared/peer-bench).
# Run through shared/peer-bench/peers/sidecar.sh, which sets PEER_LIB:
#   SIDECAR_LAUNCHER=$PWD/benches/peer/trustline.sh ../shared/peer-bench/run.sh --peers direct,sidecar ...
# or use benches/peer/run-comparison.sh, which does everything.
#
# The pair, one process per side (explicit mode, no iptables):
#   oha --plain--> outbound sidecar 127.0.0.1:IN_PORT ([[listener]] -> service "server")
#       --mTLS 1.3--> inbound sidecar 127.0.0.1:MTLS_PORT ([inbound], allow = client ID only)
#       --plain--> backend 127.0.0.1:BACKEND_PORT (inbound.app_address)
# Identities come from certs.sh (identity source "files"): the outbound side is
# spiffe://example.org/ns/default/sa/client (client.crt/key) and pins the server's ID
# spiffe://example.org/ns/default/sa/server (server.crt/key), bundle = ca.crt.
#
# Knobs (environment):
#   TRUSTLINE_BIN         binary (default: <repo>/target/release/trustline; build it first)
#   TRUSTLINE_BUILD_REV   git revision the binary was built from, for `version` (default: the work tree's)
#   TRUSTLINE_RESUMPTION  false (default: like-for-like with the peers, every connection is a full
#                         mutual handshake) or true (trustline's own default)
#   TRUSTLINE_POOLING     false (default: like-for-like, a TLS connection per app connection) or true
#                         (trustline's own default: one warm session per destination, a stream each)
#   TRUSTLINE_WORKERS     worker threads per sidecar (default 1, like every peer)
#   TRUSTLINE_RUST_LOG    log filter (default warn: no per-connection log line, like Envoy's
#                         `-l warning` and ztunnel's RUST_LOG=warn; trustline's own default is info)
source "${PEER_LIB:?run me through shared/peer-bench/peers/sidecar.sh (SIDECAR_LAUNCHER=$0), which sets PEER_LIB}"

TL_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TL_BIN=${TRUSTLINE_BIN:-$TL_REPO/target/release/trustline}
TL_RESUMPTION=${TRUSTLINE_RESUMPTION:-false}
TL_POOLING=${TRUSTLINE_POOLING:-false}
TL_WORKERS=${TRUSTLINE_WORKERS:-1}
TL_LOG=${TRUSTLINE_RUST_LOG:-warn}
for knob in TL_RESUMPTION TL_POOLING; do
  case ${!knob} in true | false) ;; *)
    echo "TRUSTLINE_${knob#TL_} must be true or false, not '${!knob}'" >&2; exit 2 ;;
  esac
done
TD=spiffe://example.org/ns/default/sa
PEER_DESC="trustline sidecar pair, explicit listener -> [inbound], mTLS 1.3 rustls/aws-lc (server SPIFFE ID pinned; allow list = client ID); $TL_WORKERS worker(s) each, resumption $TL_RESUMPTION, pooling $TL_POOLING, RUST_LOG=$TL_LOG"

version() {
  if [[ ! -x $TL_BIN ]]; then
    echo "trustline binary not found at $TL_BIN: run 'cargo build --release' in $TL_REPO (or set TRUSTLINE_BIN)" >&2
    return 1
  fi
  local v rev=${TRUSTLINE_BUILD_REV:-}
  v=$("$TL_BIN" --version) || return 1
  if [[ -z $rev ]]; then # the work tree now (run-comparison.sh passes the one it built)
    rev=$(git -C "$TL_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [[ -n $(git -C "$TL_REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && rev+="+dirty"
  fi
  echo "$v (git $rev, built $(date -u -r "$TL_BIN" +%Y-%m-%dT%H:%MZ))"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

admin_port() { # admin_port PREFERRED: PREFERRED if nothing listens there, else the next free one
  local p=$1
  while ! port_free "$p"; do ((p++)); done
  echo "$p"
}

sidecar_toml() { # sidecar_toml ID CERT KEY BUNDLE ADMIN_PORT BODY
  cat <<EOC
# written by benches/peer/trustline.sh
trust_domain = "example.org"
spiffe_id = "$1"
bundle = "$4"
resumption = $TL_RESUMPTION
pooling = $TL_POOLING
workers = $TL_WORKERS

[identity]
source = "files"
cert = "$2"
key = "$3"

[admin]
listen = "127.0.0.1:$5"

$6
EOC
}

wait_ready() { # wait_ready ADMIN_PORT NAME: until /readyz says 200 (the SVID is loaded)
  local i
  if ! command -v curl >/dev/null; then
    wait_port "$1"; return
  fi
  for ((i = 0; i < 200; i++)); do
    curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$1/readyz" && return 0
    kill -0 "$(sed -n "${3}p" "$RUNDIR/pids")" 2>/dev/null || break
    sleep 0.05
  done
  echo "trustline $2 sidecar not ready (admin :$1); log:" >&2
  tail -n 20 "$RUNDIR/$2.log" >&2
  return 1
}

start() {
  local in_port=$1 mtls_port=$2 backend_port=$3 c=$4 rd=$5
  version >/dev/null || return 1
  local in_admin out_admin
  in_admin=$(admin_port $((in_port + 1000)))
  out_admin=$(admin_port $((in_port + 2000)))
  [[ $out_admin == "$in_admin" ]] && out_admin=$(admin_port $((in_admin + 1)))

  sidecar_toml "$TD/server" "$c/server.crt" "$c/server.key" "$c/ca.crt" "$in_admin" "[inbound]
listen = \"127.0.0.1:$mtls_port\"
app_address = \"127.0.0.1:$backend_port\"
allow = [\"$TD/client\"]" >"$rd/in.toml"

  sidecar_toml "$TD/client" "$c/client.crt" "$c/client.key" "$c/ca.crt" "$out_admin" "[[service]]
name = \"server\"
addresses = [\"127.0.0.1:$mtls_port\"]
spiffe_ids = [\"$TD/server\"]

[[listener]]
listen = \"127.0.0.1:$in_port\"
service = \"server\"" >"$rd/out.toml"

  echo "in_admin=$in_admin out_admin=$out_admin" >"$rd/admin-ports"
  spawn in env RUST_LOG="$TL_LOG" "$TL_BIN" sidecar --config "$rd/in.toml"
  spawn out env RUST_LOG="$TL_LOG" "$TL_BIN" sidecar --config "$rd/out.toml"
  if ! wait_ready "$in_admin" in 1 || ! wait_ready "$out_admin" out 2; then
    stop_pids "$rd"; return 1
  fi
}

main "$@"
