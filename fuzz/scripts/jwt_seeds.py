#!/usr/bin/env python3
"""Writes the seeds of the jwt_validate fuzz target (fuzz/corpus/jwt_validate/).

Needs the `cryptography` package. The P-256 key is the target's fixed key (FIXED_KEY_PKCS8 in
fuzz_targets/jwt_validate.rs); the RSA key and the certificate are made afresh. Input layout: a
two-byte big-endian length, that many bytes of bundle JSON, then the token.
Run: python3 fuzz/scripts/jwt_seeds.py
"""
import base64, datetime, hashlib, json, os, struct, sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "corpus", "jwt_validate")
T0 = 1_800_000_000


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def uint(n):
    return b64u(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def fixed_key():
    src = open(os.path.join(HERE, "..", "fuzz_targets", "jwt_validate.rs")).read()
    b64 = src.split('const FIXED_KEY_PKCS8: &str = "')[1].split('"')[0]
    return serialization.load_der_private_key(base64.b64decode(b64), None)


def ec_jwk(key):
    n = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": b64u(n.x.to_bytes(32, "big")), "y": b64u(n.y.to_bytes(32, "big"))}


def thumbprint(jwk):
    names = {"EC": ["crv", "kty", "x", "y"], "RSA": ["e", "kty", "n"]}[jwk["kty"]]
    canon = json.dumps({k: jwk[k] for k in names}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canon.encode()).digest())


def sign(key, alg, header, claims):
    inp = (b64u(json.dumps(header, separators=(",", ":")).encode()) + "." +
           b64u(json.dumps(claims, separators=(",", ":")).encode())).encode()
    if alg == "ES256":
        r, s = decode_dss_signature(key.sign(inp, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "RS256":
        sig = key.sign(inp, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = b""
    return inp.decode() + "." + b64u(sig)


def seed(name, bundle, token):
    b = json.dumps(bundle).encode() if not isinstance(bundle, bytes) else bundle
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(struct.pack(">H", len(b)) + b + token.encode())


def root_cert():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fuzz")])
    now = datetime.datetime(2026, 1, 1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://fuzz.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    jwk = ec_jwk(key)
    return dict(jwk, kid=thumbprint(jwk), use="x509-svid",
                x5c=[base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()])


def main():
    os.makedirs(OUT, exist_ok=True)
    key = fixed_key()
    kid = thumbprint(ec_jwk(key))
    claims = {"sub": "spiffe://example.org/ns/shop/sa/web", "aud": "orders", "iat": T0,
              "exp": T0 + 300, "region": "eu-west"}
    hdr = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    empty = {"keys": []}
    seed("es256-ours", empty, sign(key, "ES256", hdr, claims))
    seed("es256-aud-array", empty, sign(key, "ES256", hdr, dict(claims, aud=["x", "orders"])))
    seed("es256-wrong-region", empty, sign(key, "ES256", hdr, dict(claims, region="us-east")))
    seed("es256-nbf", empty, sign(key, "ES256", hdr, dict(claims, nbf=T0 + 5)))
    seed("alg-none", empty, sign(key, "none", dict(hdr, alg="none"), claims))

    # The fuzz trust domain: a SPIFFE document with a root and the fixed key under another kid.
    fed = dict(claims, sub="spiffe://fuzz.example/ns/a/sa/b", region="us-east")
    doc = {"keys": [root_cert(), dict(ec_jwk(key), kid="fuzzkey", use="jwt-svid", region="us-east")],
           "spiffe_sequence": 3, "spiffe_refresh_hint": 300}
    seed("doc-es256", doc, sign(key, "ES256", dict(hdr, kid="fuzzkey"), fed))
    seed("doc-federated-no-region", {"keys": [dict(ec_jwk(key), kid="fuzzkey", use="jwt-svid")]},
         sign(key, "ES256", dict(hdr, kid="fuzzkey"), fed))

    # A plain JWKS with an RSA key.
    rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = rk.public_key().public_numbers()
    jwks = {"keys": [{"kty": "RSA", "kid": "rsa-1", "n": uint(n.n), "e": uint(n.e)}]}
    seed("jwks-rs256", jwks, sign(rk, "RS256", dict(hdr, alg="RS256", kid="rsa-1"), fed))

    # Duplicate members, as text.
    raw = sign(key, "ES256", hdr, claims)
    h, p, s = raw.split(".")
    dup = b64u(('{"alg":"ES256","kid":"%s","kid":"%s"}' % (kid, kid)).encode())
    seed("dup-kid", empty, ".".join([dup, p, s]))
    seed("dup-bundle", b'{"keys":[],"keys":[]}', raw)


if __name__ == "__main__":
    sys.exit(main())
