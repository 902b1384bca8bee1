"""Checks `trustline agent` with py-spiffe (PyPI `spiffe`), a SPIFFE client no one here wrote.

Usage: python pyspiffe_check.py SOCKET EXPECTED_ID REGION CA_BUNDLE_JSON
       python pyspiffe_check.py --refused SOCKET

Prints one `ok: ...` line per check and exits 1 on the first failure, naming it. Everything is
verified with py-spiffe's own code (and `cryptography` for the X.509 signatures): the SVID's
chain up to a root of the bundle the agent serves, the key matching the leaf, the JWT-SVID's
signature, audience and expiry against the JWT bundle, and the CA's SPIFFE bundle document
(`x509-svid` and `jwt-svid` keys) parsed by `JwtBundle.parse`.
"""

import base64
import json
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient


def fail(what):
    print(f"FAIL: {what}")
    sys.exit(1)


def ok(what):
    print(f"ok: {what}")


def verify_signed_by(cert, issuer):
    """Raises unless `issuer`'s key signed `cert` (EC keys: what our CA makes)."""
    issuer.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )


def refused(socket):
    client = WorkloadApiClient(f"unix://{socket}", default_timeout=10)
    try:
        svid = client.fetch_x509_svid()
    except Exception as e:  # py-spiffe wraps the gRPC status in its own error
        text = str(e)
        if "PERMISSION_DENIED" in text.upper() or "permission" in text.lower():
            ok(f"a caller matching no registration is refused: {text.strip()[:160]}")
            return
        fail(f"refused, but not with PermissionDenied: {text}")
    fail(f"a caller matching no registration got {svid.spiffe_id}")


def main():
    if sys.argv[1] == "--refused":
        refused(sys.argv[2])
        return
    socket, expected, region, ca_doc_path = sys.argv[1:5]
    client = WorkloadApiClient(f"unix://{socket}", default_timeout=10)

    # X.509-SVID, its key and its chain up to the bundle the agent serves.
    svid = client.fetch_x509_svid()
    if str(svid.spiffe_id) != expected:
        fail(f"X.509-SVID for {svid.spiffe_id}, expected {expected}")
    ok(f"X.509-SVID for {svid.spiffe_id}, chain of {len(svid.cert_chain)}")
    leaf = svid.leaf
    pub = lambda k: k.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub(svid.private_key.public_key()) != pub(leaf.public_key()):
        fail("the private key does not match the leaf")
    ok("the private key matches the leaf")
    bundles = client.fetch_x509_bundles()
    td = TrustDomain(SpiffeId(expected).trust_domain.name)
    bundle = bundles.get_bundle_for_trust_domain(td)
    if bundle is None or not bundle.x509_authorities:
        fail(f"no X.509 bundle for {td}")
    chain = svid.cert_chain
    for child, parent in zip(chain, chain[1:]):
        verify_signed_by(child, parent)
    top = chain[-1]
    roots = bundle.x509_authorities
    if not any(_signed(top, r) for r in roots):
        fail("the chain does not end at a root of the agent's bundle")
    ok(f"chain verified up to one of {len(roots)} bundle root(s)")
    now = time.time()
    if not (leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp()):
        fail("the leaf is not valid now")

    # JWT-SVID: fetched, then validated with py-spiffe's own code against the JWT bundle.
    jwt = client.fetch_jwt_svid(audience={"inventory"})
    if str(jwt.spiffe_id) != expected:
        fail(f"JWT-SVID for {jwt.spiffe_id}")
    jwt_bundles = client.fetch_jwt_bundles()
    jb = jwt_bundles.get_bundle_for_trust_domain(td)
    if jb is None:
        fail(f"no JWT bundle for {td}")
    valid = JwtSvid.parse_and_validate(jwt.token, jb, {"inventory"})
    ok(f"JWT-SVID validated by py-spiffe: sub {valid.spiffe_id}, exp in {int(valid.expiry - now)} s")
    claims = json.loads(_b64(jwt.token.split(".")[1]))
    if claims.get("region") != region:
        fail(f"region claim {claims.get('region')!r}, expected {region!r}")
    ok(f"region claim {region}")
    for bad_aud in ({"payroll"},):
        try:
            JwtSvid.parse_and_validate(jwt.token, jb, bad_aud)
            fail("a wrong audience validated")
        except Exception:
            ok("a wrong audience is refused by py-spiffe")
    head, body, sig = jwt.token.split(".")
    forged = json.loads(_b64(body))
    forged["sub"] = f"spiffe://{td.name}/ns/evil/sa/x"
    forged_token = ".".join([head, _enc(json.dumps(forged).encode()), sig])
    try:
        JwtSvid.parse_and_validate(forged_token, jb, {"inventory"})
        fail("a token with a changed sub validated")
    except Exception:
        ok("a token with a changed sub is refused by py-spiffe")

    # The agent's own validation.
    via_agent = client.validate_jwt_svid(jwt.token, "inventory")
    if str(via_agent.spiffe_id) != expected:
        fail(f"ValidateJWTSVID said {via_agent.spiffe_id}")
    ok("ValidateJWTSVID accepts it")
    try:
        client.validate_jwt_svid(forged_token, "inventory")
        fail("ValidateJWTSVID accepted a forged token")
    except Exception:
        ok("ValidateJWTSVID refuses the forged token")

    # The CA's SPIFFE bundle document, with both key uses, parsed by py-spiffe.
    with open(ca_doc_path, "rb") as f:
        doc_bytes = f.read()
    doc = json.loads(doc_bytes)
    uses = sorted({k.get("use") for k in doc["keys"]})
    if uses != ["jwt-svid", "x509-svid"]:
        fail(f"the CA's bundle document has key uses {uses}")
    parsed = JwtBundle.parse(td, doc_bytes)
    kid = json.loads(_b64(head))["kid"]
    if parsed.get_jwt_authority(kid) is None:
        fail(f"JwtBundle.parse of the CA's document lacks kid {kid}")
    JwtSvid.parse_and_validate(jwt.token, parsed, {"inventory"})
    ok(f"JwtBundle.parse reads the CA's document ({len(doc['keys'])} keys, uses {uses}) and validates with it")


def _signed(cert, root):
    try:
        verify_signed_by(cert, root)
        return True
    except Exception:
        return False


def _b64(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _enc(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


if __name__ == "__main__":
    main()
