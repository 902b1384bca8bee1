#!/usr/bin/env bash
# Interoperability of `trustline ca serve` with standard tools: openssl makes the keys and CSRs,
# curl talks to the API, openssl verifies what comes back and probes the TLS versions.
#
# requires: openssl curl
#
# Usage: TRUSTLINE=target/debug/trustline integration/ca_openssl.sh   (KEEP=1 keeps the temp dir)
set -euo pipefail

TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
TD=interop.test
ID=spiffe://$TD/ns/default/sa/openssl

source "$(dirname "${BASH_SOURCE[0]}")/lib/checks.bash"

need_tools openssl curl
need_trustline

D=$(mktemp -d "${TMPDIR:-/tmp}/trustline-openssl.XXXXXX")
SERVER_PID=
cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if ((failures > 0 || rc != 0)) && [[ -s $D/serve.log ]]; then
        echo "--- last lines of the CA log ($D/serve.log) ---"
        tail -n 20 "$D/serve.log"
    fi
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
# A setup step that fails ends the run: say which, so the run still ends on a FAIL line.
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

"$TRUSTLINE" ca init --trust-domain "$TD" --out "$D/root" >/dev/null
"$TRUSTLINE" ca init --root "$D/root" --region r1 --out "$D/r1" >/dev/null
BUNDLE=$D/root/bundle.pem

# Port 0: the server prints the address it bound once every listener (API, admin socket) is up.
NO_COLOR=1 "$TRUSTLINE" ca serve --ca "$D/r1" --data "$D/data" --listen 127.0.0.1:0 \
    --metrics-listen off >"$D/serve.out" 2>"$D/serve.log" &
SERVER_PID=$!
ADDR=
for _ in $(seq 1 300); do
    ADDR=$(sed -n 's|^trustline CA serving https://||p' "$D/serve.out")
    [[ -n $ADDR ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $ADDR ]]; then
    echo "FAIL: the CA did not start (no 'trustline CA serving https://...' line within 30s)"
    exit 1
fi
URL=https://$ADDR
echo "CA serving $URL"

token() { "$TRUSTLINE" ca token --data "$D/data" --spiffe-id "$1"; }

# post_csr OUT CSR [CURL ARGS...]: POST /v1/svid, body to OUT, prints the HTTP status.
post_csr() {
    local out=$1 csr=$2
    shift 2
    curl -sS --cacert "$BUNDLE" -H "Content-Type: application/pkcs10" \
        --data-binary "@$csr" -o "$out" -w '%{http_code}' "$@" "$URL/v1/svid" \
        2>>"$D/curl.err" || echo " (curl exit $?: $(tail -n 1 "$D/curl.err"))"
}

# ec_csr KEY CSR SPIFFE-ID: a P-256 key and a CSR whose only SAN is the SPIFFE ID.
ec_csr() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1" \
        -subj "/CN=x" -addext "subjectAltName=URI:$3" -out "$2" 2>/dev/null
}

# split_chain PEM LEAF REST: the first certificate, and the others.
split_chain() {
    awk -v leaf="$2" -v rest="$3" \
        '/-----BEGIN CERTIFICATE-----/ { n++ } { print > (n == 1 ? leaf : rest) }' "$1"
}

count_certs() { grep -c -- '-----BEGIN CERTIFICATE-----' "$1" || true; }

verifies() {
    [[ $(openssl verify -CAfile "$BUNDLE" -untrusted "$2" "$1" 2>&1) == "$1: OK" ]]
}

# json_error FILE CODE: the body is a JSON error object with "error": CODE.
json_error() {
    if command -v jq >/dev/null; then
        jq -e --arg c "$2" '.error == $c and (.detail | type) == "string"' "$1" >/dev/null
    else
        grep -q "^{.*\"error\":\"$2\"" "$1"
    fi
}

# --- first issuance with a join token ------------------------------------------------------
TOKEN=$(token "$ID")
ec_csr "$D/key.pem" "$D/csr.pem" "$ID"
code=$(post_csr "$D/chain.pem" "$D/csr.pem" -H "Authorization: Bearer $TOKEN")
check "issue with curl and a join token (CA cert verified via its 127.0.0.1 IP SAN): HTTP $code" \
    [ "$code" = 200 ]
if [[ $code == 200 ]]; then
    split_chain "$D/chain.pem" "$D/leaf.pem" "$D/intermediate.pem"
    check "chain is leaf + intermediate, root not sent ($(count_certs "$D/chain.pem") certs)" \
        [ "$(count_certs "$D/chain.pem")" = 2 ]
    check "openssl verify -CAfile bundle.pem -untrusted intermediate leaf.pem: OK" \
        verifies "$D/leaf.pem" "$D/intermediate.pem"
    check "openssl verify -x509_strict -purpose sslclient and sslserver" bash -c '
        for p in sslclient sslserver; do
            [[ $(openssl verify -x509_strict -purpose $p -CAfile "$1" -untrusted "$2" "$3" 2>&1) == "$3: OK" ]] || exit 1
        done' _ "$BUNDLE" "$D/intermediate.pem" "$D/leaf.pem"

    TEXT=$(openssl x509 -in "$D/leaf.pem" -noout -text)
    SANS=$(openssl x509 -in "$D/leaf.pem" -noout -ext subjectAltName | tail -n +2 | tr -d ' ')
    check "leaf has exactly one SAN, URI:$ID (got: ${SANS//$'\n'/ })" [ "$SANS" = "URI:$ID" ]
    check "leaf is CA:FALSE" grep -q "CA:FALSE" <<<"$TEXT"
    KU=$(grep -A1 "X509v3 Key Usage" <<<"$TEXT" | tail -n 1 | sed 's/^ *//')
    check "leaf key usage is Digital Signature only (got: $KU)" [ "$KU" = "Digital Signature" ]
    check "leaf EKU is serverAuth + clientAuth" \
        grep -q "TLS Web Server Authentication, TLS Web Client Authentication" <<<"$TEXT"
    check "leaf subject ignores the CSR's CN=x" \
        bash -c '! openssl x509 -in "$1" -noout -subject | grep -q "CN *= *x"' _ "$D/leaf.pem"
fi

# --- TLS versions ------------------------------------------------------------------------
s_client() {
    timeout 20 openssl s_client -connect "$ADDR" -CAfile "$BUNDLE" -verify_return_error "$@" \
        </dev/null 2>&1
}
if OUT=$(s_client -tls1_2); then
    fail "openssl s_client -tls1_2 is refused (it connected)"
else
    check "openssl s_client -tls1_2 is refused with a protocol_version alert" \
        grep -q "alert protocol version" <<<"$OUT"
fi
if OUT=$(s_client -tls1_3 -verify_ip 127.0.0.1); then
    check "openssl s_client -tls1_3 connects and verifies the CA" \
        grep -q "Verify return code: 0 (ok)" <<<"$OUT"
    check "negotiated TLSv1.3" grep -q "TLSv1.3" <<<"$OUT"
else
    fail "openssl s_client -tls1_3 connects ($(tail -n 3 <<<"$OUT" | tr '\n' ' '))"
fi

# --- renewal with the SVID as client certificate ------------------------------------------
if [[ -f $D/leaf.pem ]]; then
    ec_csr "$D/key2.pem" "$D/csr2.pem" "$ID"
    code=$(post_csr "$D/chain2.pem" "$D/csr2.pem" --cert "$D/chain.pem" --key "$D/key.pem")
    check "renew with curl --cert leaf+chain --key key.pem and a new CSR: HTTP $code" \
        [ "$code" = 200 ]
    if [[ $code == 200 ]]; then
        split_chain "$D/chain2.pem" "$D/leaf2.pem" "$D/intermediate2.pem"
        check "renewed leaf verifies" verifies "$D/leaf2.pem" "$D/intermediate2.pem"
        check "renewed leaf has a new serial and key" bash -c '
            [[ $(openssl x509 -in "$1" -noout -serial) != $(openssl x509 -in "$2" -noout -serial) ]] &&
            [[ $(openssl x509 -in "$1" -noout -pubkey) != $(openssl x509 -in "$2" -noout -pubkey) ]]' \
            _ "$D/leaf.pem" "$D/leaf2.pem"
    fi
fi

# --- a join token works once -------------------------------------------------------------
ec_csr "$D/key3.pem" "$D/csr3.pem" "$ID"
code=$(post_csr "$D/reuse.json" "$D/csr3.pem" -H "Authorization: Bearer $TOKEN")
check "second use of the join token: HTTP $code (want 401)" [ "$code" = 401 ]
check "401 body is a JSON error ($(head -c 200 "$D/reuse.json" 2>/dev/null))" \
    json_error "$D/reuse.json" unauthorized

# --- key types ---------------------------------------------------------------------------
ED_ID=spiffe://$TD/ns/default/sa/ed25519
openssl genpkey -algorithm ed25519 -out "$D/ed.key" 2>/dev/null
openssl req -new -key "$D/ed.key" -subj "/CN=x" -addext "subjectAltName=URI:$ED_ID" \
    -out "$D/ed.csr" 2>/dev/null
code=$(post_csr "$D/ed-chain.pem" "$D/ed.csr" -H "Authorization: Bearer $(token "$ED_ID")")
check "Ed25519 CSR accepted: HTTP $code" [ "$code" = 200 ]
if [[ $code == 200 ]]; then
    split_chain "$D/ed-chain.pem" "$D/ed-leaf.pem" "$D/ed-intermediate.pem"
    check "Ed25519 leaf verifies and carries the Ed25519 key" bash -c '
        [[ $(openssl verify -CAfile "$1" -untrusted "$2" "$3" 2>&1) == "$3: OK" ]] &&
        openssl x509 -in "$3" -noout -text | grep -q "Public Key Algorithm: ED25519"' \
        _ "$BUNDLE" "$D/ed-intermediate.pem" "$D/ed-leaf.pem"
fi

RSA_ID=spiffe://$TD/ns/default/sa/rsa
RSA_TOKEN=$(token "$RSA_ID")
openssl req -new -newkey rsa:2048 -nodes -keyout "$D/rsa.key" -subj "/CN=x" \
    -addext "subjectAltName=URI:$RSA_ID" -out "$D/rsa.csr" 2>/dev/null
code=$(post_csr "$D/rsa.json" "$D/rsa.csr" -H "Authorization: Bearer $RSA_TOKEN")
check "RSA-2048 CSR refused: HTTP $code (want 400)" [ "$code" = 400 ]
check "400 body is a JSON error ($(head -c 200 "$D/rsa.json" 2>/dev/null))" \
    json_error "$D/rsa.json" bad_request
ec_csr "$D/key4.pem" "$D/csr4.pem" "$RSA_ID"
code=$(post_csr "$D/chain4.pem" "$D/csr4.pem" -H "Authorization: Bearer $RSA_TOKEN")
check "a refused CSR does not spend the token (P-256 retry: HTTP $code)" [ "$code" = 200 ]

# --- bundle and revocation, by serials as openssl prints them -------------------------------
code=$(curl -sS --cacert "$BUNDLE" -o "$D/bundle-got.pem" -w '%{http_code}' "$URL/v1/bundle" \
    2>>"$D/curl.err" || true)
check "GET /v1/bundle returns bundle.pem: HTTP $code" \
    bash -c '[[ $1 == 200 ]] && cmp -s "$2" "$3"' _ "$code" "$BUNDLE" "$D/bundle-got.pem"
if [[ -f $D/leaf.pem ]]; then
    SERIAL=$(openssl x509 -in "$D/leaf.pem" -noout -serial | cut -d= -f2)
    check "trustline ca revoke --serial $SERIAL (openssl's format)" \
        bash -c '"$1" ca revoke --data "$2" --serial "$3" >/dev/null' _ "$TRUSTLINE" "$D/data" "$SERIAL"
    check "GET /v1/revoked lists it" bash -c '
        curl -sS --cacert "$1" "$2/v1/revoked" | grep -qi "\"serial\":\"0*$3\""' \
        _ "$BUNDLE" "$URL" "$SERIAL"
    ec_csr "$D/key5.pem" "$D/csr5.pem" "$ID"
    code=$(post_csr "$D/revoked.json" "$D/csr5.pem" --cert "$D/chain.pem" --key "$D/key.pem")
    check "renewal with the revoked leaf: HTTP $code (want 401)" [ "$code" = 401 ]
fi

echo
if ((failures > 0)); then
    echo "ca_openssl: $failures check(s) FAILED"
    exit 1
fi
echo "ca_openssl: all checks passed"
