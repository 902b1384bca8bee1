#!/usr/bin/env bash
# Interoperability of `trustline agent` with py-spiffe (PyPI `spiffe` 0.3.2), a SPIFFE client no
# one here wrote: a CA, an agent joined with a node token, and py-spiffe fetching an X.509-SVID,
# the bundles and a JWT-SVID from the agent's Workload API socket and validating them with its own
# code (integration/lib/pyspiffe_check.py); py-spiffe's JwtBundle.parse reads the CA's SPIFFE
# bundle document (x509-svid and jwt-svid keys); a caller of another uid gets PermissionDenied.
#
# requires: root python3 curl setpriv
#
# py-spiffe is installed from PyPI into a venv ($PYSPIFFE_VENV, default
# /var/tmp/trustline-pyspiffe-venv, kept between runs).
#
# Usage: TRUSTLINE=target/debug/trustline integration/pyspiffe.sh   (KEEP=1 keeps the temp dir)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TD=py.test
ID=spiffe://$TD/ns/demo/sa/py
OTHER=spiffe://$TD/ns/demo/sa/nobody
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${PYSPIFFE_VENV:-/var/tmp/trustline-pyspiffe-venv}

source "$HERE/lib/checks.bash"

need_root "a second uid (65534) calls the agent"
need_tools python3 curl setpriv
need_trustline

if ! "$VENV/bin/python" -c 'import spiffe' 2>/dev/null; then
    echo "installing py-spiffe into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'spiffe==0.3.2'
fi
PY=$VENV/bin/python

D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-pyspiffe.XXXXXX")
chmod 0755 "$D"
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if ((failures > 0 || rc != 0)); then
        for log in "$D"/*.log; do
            [[ -s $log ]] || continue
            echo "--- last lines of $log ---"
            tail -n 20 "$log"
        done
    fi
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

# The checker runs as another uid too: from the temporary directory, which that uid can read
# (a clone may sit in a directory only root can enter).
CHECK=$D/pyspiffe_check.py
install -m 0644 "$HERE/lib/pyspiffe_check.py" "$CHECK"

"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
"$TRUSTLINE" ca init --root "$D/root" --region r1 --out "$D/r1" >/dev/null
BUNDLE=$D/root/bundle.pem

cat >"$D/ca.toml" <<EOF
ca = "$D/r1"
data = "$D/data"
listen = "127.0.0.1:0"
metrics_listen = "off"

[[agent]]
id = "spiffe://$TD/trustline/agent/n1"
workloads = ["$ID", "$OTHER"]
EOF
NO_COLOR=1 "$TRUSTLINE" ca serve --config "$D/ca.toml" >"$D/ca.out" 2>"$D/ca.log" &
PIDS+=($!)
ADDR=
for _ in $(seq 1 300); do
    ADDR=$(sed -n 's|^trustline CA serving https://||p' "$D/ca.out")
    [[ -n $ADDR ]] && break
    sleep 0.1
done
[[ -n $ADDR ]] || { echo "FAIL: the CA did not start"; exit 1; }

"$TRUSTLINE" ca token --data "$D/data" --spiffe-id "spiffe://$TD/trustline/agent/n1" >"$D/node.token"
SOCK=$D/agent/agent.sock
cat >"$D/agent.toml" <<EOF
trust_domain = "$TD"
bundle = "$BUNDLE"
socket = "$SOCK"
node = "n1"
region = "r1"

[identity]
source = "ca"
ca_url = "https://$ADDR"
token_file = "$D/node.token"

[[workload]]
spiffe_id = "$ID"
uid = 0

[[workload]]
spiffe_id = "$OTHER"
uid = 4242
EOF
NO_COLOR=1 "$TRUSTLINE" agent --config "$D/agent.toml" >"$D/agent.out" 2>"$D/agent.log" &
PIDS+=($!)
for _ in $(seq 1 300); do
    [[ -S $SOCK ]] && break
    sleep 0.1
done
[[ -S $SOCK ]] || { echo "FAIL: the agent made no socket at $SOCK"; exit 1; }

curl -sS --cacert "$BUNDLE" -H 'Accept: application/json' "https://$ADDR/v1/bundle" >"$D/bundle.json"

# The workload's SVIDs are obtained at the agent's start; py-spiffe's first fetch may come first.
out=
for _ in $(seq 1 50); do
    if out=$("$PY" "$CHECK" "$SOCK" "$ID" r1 "$D/bundle.json" 2>&1); then
        break
    fi
    sleep 0.2
done
echo "$out"
if grep -q '^FAIL' <<<"$out" || ! grep -q 'JwtBundle.parse reads' <<<"$out"; then
    fail "py-spiffe fetches and validates the agent's SVIDs and bundles"
else
    pass "py-spiffe fetches and validates the agent's X.509-SVID, JWT-SVID and bundles"
fi

# uid 65534 matches no registration (4242 would): PermissionDenied, and an audit line.
out=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$PY" "$CHECK" --refused "$SOCK" 2>&1 || true)
echo "$out"
check "a caller of another uid is refused with PermissionDenied" grep -q '^ok: a caller matching no registration is refused' <<<"$out"

((failures == 0)) || exit 1
echo "pyspiffe: all checks passed"
