#!/usr/bin/env bash
# tlsfuzzer's negative client-certificate scripts (written by others) against a sidecar's
# inbound mTLS listener, with client certificates from our CA.
#
# NOT A CI TEST: tlsfuzzer is not on PyPI and is not committed here, so CI cannot have it.
# integration/run lists this script as SKIP unless TLSFUZZER names a checkout. Run it by hand:
#
#   fetch github:tlsfuzzer/tlsfuzzer (or git clone it) to DIR, then
#   python3 -m venv /tmp/tf && /tmp/tf/bin/pip install --pre "tlslite-ng>=0.9.0b2" ecdsa
#   (tlsfuzzer 14555fe needs 0.9: 0.8.2, the latest release, lacks the ML-DSA names)
#   TLSFUZZER=DIR PYTHON=/tmp/tf/bin/python integration/run tlsfuzzer
#   (or: integration/tlsfuzzer.sh DIR, with TRUSTLINE and PYTHON set)
#
# Each script prints its probes' verdicts; this one records, per script, how many probes passed
# and failed, and fails if a probe failed that is not listed in EXPECTED_FAILURES below with the
# reason it does not apply to a TLS-1.3-only mTLS server.
#
# skip-unless-set: TLSFUZZER
# requires: openssl curl python3 ss
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TLSFUZZER=${1:-${TLSFUZZER:-}}
PYTHON=${PYTHON:-python3}
TD=fuzz.test

source "$(dirname "${BASH_SOURCE[0]}")/lib/checks.bash"

need_tools openssl curl python3 ss
need_trustline
[[ -n $TLSFUZZER && -d $TLSFUZZER/tlsfuzzer ]] || {
    echo "FAIL: give the tlsfuzzer checkout: integration/tlsfuzzer.sh DIR (or TLSFUZZER=DIR)"
    exit 1
}
"$PYTHON" -c 'import tlslite, ecdsa' 2>/dev/null || {
    echo "FAIL: $PYTHON lacks tlslite-ng and ecdsa (pip install tlslite-ng ecdsa)"
    exit 1
}

D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-tlsfuzzer.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

# wait_line FILE SED-EXPR: the first match of SED-EXPR in FILE, waiting up to 30 s.
wait_line() {
    local v=
    for _ in $(seq 1 300); do
        v=$(sed -n "$2" "$1" | head -n 1)
        [[ -n $v ]] && break
        sleep 0.1
    done
    echo "$v"
}

# A CA serving from the root itself (no intermediate): tlsfuzzer sends the leaf alone.
"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
BUNDLE=$D/root/bundle.pem
NO_COLOR=1 "$TRUSTLINE" ca serve --ca "$D/root" --data "$D/data" --listen 127.0.0.1:0 \
    --metrics-listen off >"$D/ca.out" 2>"$D/ca.log" &
PIDS+=($!)
CA=$(wait_line "$D/ca.out" 's|^trustline CA serving https://||p')
[[ -n $CA ]] || { echo "FAIL: the CA did not start"; exit 1; }
token() { "$TRUSTLINE" ca token --data "$D/data" --spiffe-id "$1"; }

# svid NAME KEYGEN-ARGS...: a key of that kind and its SVID from the CA, NAME.key/NAME.pem.
svid() {
    local name=$1 id=spiffe://$TD/ns/fuzz/sa/$1
    shift
    openssl req -new "$@" -nodes -keyout "$D/$name.key" -subj "/CN=$name" \
        -addext "subjectAltName=URI:$id" -out "$D/$name.csr" 2>/dev/null
    curl -sSf --cacert "$BUNDLE" -H "Authorization: Bearer $(token "$id")" \
        -H 'Content-Type: application/pkcs10' --data-binary "@$D/$name.csr" \
        "https://$CA/v1/svid" >"$D/$name.pem"
    echo "\"$id\","
}
ALLOW=$(
    svid ecdsa -newkey ec -pkeyopt ec_paramgen_curve:P-256
    svid ed25519 -newkey ed25519
)
# Our CA issues no RSA SVIDs (ECDSA and Ed25519 CSRs only); tlsfuzzer's RSA scripts get one
# signed with the root's key by openssl, on the CA's own leaf profile.
RSA_ID=spiffe://$TD/ns/fuzz/sa/rsa
openssl req -new -newkey rsa:2048 -nodes -keyout "$D/rsa.key" -subj /CN=rsa -out "$D/rsa.csr" 2>/dev/null
cat >"$D/rsa.ext" <<EOF
subjectAltName = URI:$RSA_ID
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
EOF
openssl x509 -req -in "$D/rsa.csr" -CA "$D/root/ca.crt" -CAkey "$D/root/ca.key" -CAcreateserial \
    -days 1 -extfile "$D/rsa.ext" -out "$D/rsa.pem" 2>/dev/null
ALLOW+="\"$RSA_ID\""

# The app behind the sidecars: answers tlsfuzzer's "GET / HTTP/1.0" in one write (one TLS
# record: the scripts expect exactly one ApplicationData before their close_notify).
"$PYTHON" -u -c '
import socket, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(256)
print(s.getsockname()[1], flush=True)
def serve(c):
    try:
        c.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(4096)
            if not d:
                break
            data += d
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except OSError:
        pass
    finally:
        c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
' >"$D/app.out" 2>"$D/app.log" &
PIDS+=($!)
APP_PORT=$(wait_line "$D/app.out" '1p')

# Two sidecars: "server-ec" with its ECDSA P-256 SVID from the CA, and "server-rsa" with an RSA
# SVID (files source, signed by the root like the RSA client's): most tlsfuzzer scripts offer
# RSA signature schemes only, so they need an RSA server.
token "spiffe://$TD/ns/fuzz/sa/server-ec" >"$D/server-ec.token"
openssl req -new -newkey rsa:2048 -nodes -keyout "$D/server-rsa.key" -subj /CN=server-rsa \
    -out "$D/server-rsa.csr" 2>/dev/null
sed "s|$RSA_ID|spiffe://$TD/ns/fuzz/sa/server-rsa|" "$D/rsa.ext" >"$D/server-rsa.ext"
openssl x509 -req -in "$D/server-rsa.csr" -CA "$D/root/ca.crt" -CAkey "$D/root/ca.key" \
    -CAcreateserial -days 1 -extfile "$D/server-rsa.ext" -out "$D/server-rsa.pem" 2>/dev/null
declare -A PORT
sidecar() { # NAME IDENTITY-TOML-LINES
    local name=$1 pid admin
    {
        echo "trust_domain = \"$TD\""
        echo "spiffe_id = \"spiffe://$TD/ns/fuzz/sa/$name\""
        echo "bundle = \"$BUNDLE\""
        echo "pooling = false"
        printf '\n[identity]\n%s\n' "$2"
        printf '\n[admin]\nlisten = "127.0.0.1:0"\n'
        printf '\n[inbound]\nlisten = "127.0.0.1:0"\napp_address = "127.0.0.1:%s"\n' "$APP_PORT"
        echo "allow = [$ALLOW]"
    } >"$D/$name.toml"
    NO_COLOR=1 "$TRUSTLINE" sidecar --config "$D/$name.toml" >"$D/$name.out" 2>"$D/$name.log" &
    pid=$!
    PIDS+=("$pid")
    admin=$(wait_line "$D/$name.out" 's|^trustline sidecar .*: admin http://\(.*\)/readyz$|\1|p')
    for _ in $(seq 1 300); do curl -sf "http://$admin/readyz" >/dev/null && break; sleep 0.1; done
    PORT[$name]=$(ss -Hltnp | awk -v pid="pid=$pid," -v admin="$admin" \
        'index($0, pid) && $4 != admin { split($4, a, ":"); print a[2]; exit }')
    [[ -n ${PORT[$name]} ]] || { echo "FAIL: no inbound listener of $name"; exit 1; }
    echo "sidecar $name: inbound mTLS on 127.0.0.1:${PORT[$name]}"
}
sidecar server-ec "source = \"ca\"
ca_url = \"https://$CA\"
token_file = \"$D/server-ec.token\""
sidecar server-rsa "source = \"files\"
cert = \"$D/server-rsa.pem\"
key = \"$D/server-rsa.key\""
echo "app on 127.0.0.1:$APP_PORT; tlsfuzzer $(git -C "$TLSFUZZER" rev-parse --short HEAD 2>/dev/null || echo '(not a git checkout)')"

# What trustline's CertificateRequest advertises (rustls with aws-lc-rs), for the scripts' -s.
OUR_SIGALGS="ecdsa_secp384r1_sha384 ecdsa_secp256r1_sha256 ecdsa_secp521r1_sha512 ed25519 \
rsa_pss_rsae_sha512 rsa_pss_rsae_sha384 rsa_pss_rsae_sha256 rsa_pkcs1_sha512 rsa_pkcs1_sha384 \
rsa_pkcs1_sha256 mldsa44 mldsa65 mldsa87"

# Probes that fail for a reason that does not apply to a TLS-1.3-only mTLS server or that is
# not trustline's to change, each with the reason (RELIABILITY.md has the long form).
# Format: "script|probe name (a glob)|reason".
EMPTY_CERT="sends an empty Certificate and expects to get in: trustline requires a client certificate and refuses with certificate_required (RFC 8446 4.4.2.4)"
SCHEME_ALERT="a CertificateVerify whose ECDSA scheme does not fit the key is refused with decrypt_error, where the script wants illegal_parameter: the alert is rustls' (the signature fails to verify); the handshake is refused either way"
NO_COMPRESSION="trustline offers no RFC 8879 certificate compression (rustls' brotli/zlib features are off: no decompressor before the peer is authenticated); a CompressedCertificate it never offered is refused as unexpected_message"
NO_PHA="trustline authenticates clients in the handshake (CertificateRequest in its first flight), never after it; the script wants a handshake without one"
TLS12_ONLY="a TLS 1.2 handshake: refused (protocol_version, or handshake_failure for a hello without supported_versions), as a TLS-1.3-only server must"
EXPECTED_FAILURES=(
    "test-tls13-certificate-request|sanity|$EMPTY_CERT"
    "test-tls13-certificate-request|check sigalgs in cert request|$EMPTY_CERT"
    "test-tls13-certificate-request|verify extensions in CertificateRequest|$EMPTY_CERT"
    "test-tls13-ecdsa-in-certificate-verify|check sigalgs in cert request|$EMPTY_CERT"
    "test-tls13-certificate-verify|check sigalgs in cert request|$EMPTY_CERT"
    "test-tls13-ecdsa-in-certificate-verify|check ecdsa_secp*_sha* signature is refused|$SCHEME_ALERT"
    "test-tls13-eddsa-in-certificate-verify|check ecdsa_secp*_sha* signature is refused|$SCHEME_ALERT"
    "test-tls13-client-certificate-compression|*|$NO_COMPRESSION"
    "test-tls13-post-handshake-auth|*|$NO_PHA"
    "test-invalid-client-hello|sanity*|$TLS12_ONLY (the malformed hellos that pass are refused before any version check matters)"
    "test-invalid-client-hello|Client Hello type fuzz to *|the first message, a ClientHello body under another handshake type, is refused with decode_error, where the script wants unexpected_message: rustls decodes a message by its type before it checks that the type is expected; refused either way"
    "test-certificate-malformed|*|$TLS12_ONLY"
    "test-certificate-verify|*|$TLS12_ONLY"
    "test-certificate-request|*|$TLS12_ONLY"
)

# run SERVER SCRIPT KEY CERT [ARGS...]: one tlsfuzzer script against a sidecar; prints its
# counts, every expected failure with its reason, and fails on any other failed probe.
run() {
    local server=$1 name=$2 key=$3 cert=$4 t0=$SECONDS out ok bad total probe known e
    shift 4
    out=$D/$name.out
    (cd "$TLSFUZZER" && timeout 900 "$PYTHON" "scripts/$name.py" -h 127.0.0.1 \
        -p "${PORT[$server]}" ${key:+-k "$D/$key"} ${cert:+-c "$D/$cert"} "$@") >"$out" 2>&1 || true
    total=$(sed -n 's/^TOTAL: *\([0-9]*\).*/\1/p' "$out" | tail -n 1)
    ok=$(sed -n 's/^PASS: *\([0-9]*\).*/\1/p' "$out" | tail -n 1)
    bad=$(sed -n 's/^FAIL: *\([0-9]*\).*/\1/p' "$out" | tail -n 1)
    echo "== $name against $server, client ${cert:-none}: ${total:-?} probes, ${ok:-?} passed, ${bad:-?} failed ($((SECONDS - t0)) s)"
    [[ -n $ok ]] || { fail "$name: no summary (see $out)"; return; }
    # The names of the failed probes: tlsfuzzer lists them after "FAILED:".
    sed -n '/^FAILED:/,$p' "$out" | grep -E "^\s+['\"]" | sed -E "s/^\s*['\"](.*)['\"]$/\1/" \
        >"$D/$name.failed" || true
    declare -A why=()
    while IFS= read -r probe; do
        known=
        for e in "${EXPECTED_FAILURES[@]}"; do
            local script=${e%%|*} rest=${e#*|}
            # shellcheck disable=SC2053 # the probe field is a glob
            [[ $script == "$name" && $probe == ${rest%%|*} ]] && { known=${rest#*|}; break; }
        done
        if [[ -n $known ]]; then
            why[$known]=$((${why[$known]:-0} + 1))
        else
            fail "$name: $probe: $(awk -v p="$probe ..." '$0 == p {f=1} f && /Error:|AssertionError/ {print; exit}' "$out" | cut -c1-200)"
        fi
    done <"$D/$name.failed"
    for e in "${!why[@]}"; do echo "   expected failure x${why[$e]}: $e"; done
}

# TLS 1.3 client-certificate scripts.
run server-rsa test-tls13-certificate-request ecdsa.key ecdsa.pem -s "$OUR_SIGALGS"
run server-ec test-tls13-ecdsa-in-certificate-verify ecdsa.key ecdsa.pem -s "$OUR_SIGALGS"
run server-ec test-tls13-eddsa-in-certificate-verify ed25519.key ed25519.pem -s "$OUR_SIGALGS"
run server-rsa test-tls13-certificate-verify rsa.key rsa.pem -s "$OUR_SIGALGS"
run server-rsa test-tls13-client-certificate-compression ecdsa.key ecdsa.pem
run server-rsa test-tls13-post-handshake-auth ecdsa.key ecdsa.pem --cert-required
# Malformed ClientHellos (no client certificate involved).
run server-rsa test-invalid-client-hello "" "" -n 0
# The TLS 1.2 client-certificate scripts the issue names.
run server-rsa test-certificate-malformed rsa.key rsa.pem -d
run server-rsa test-certificate-verify rsa.key rsa.pem -d
run server-rsa test-certificate-request rsa.key rsa.pem -d

((failures == 0)) || { echo "tlsfuzzer: $failures unexpected probe failure(s)"; exit 1; }
echo "tlsfuzzer: no unexpected failure"
