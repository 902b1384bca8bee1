//! Re-authentication of a live session with the peers' new SVIDs, after the manner of RFC 9261
//! exported authenticators: without it a session would be closed, streams and all, when the
//! first of the two certificates it was authenticated with expires.
//!
//! The caller opens one `POST` stream to [`REAUTH_PATH`] carrying a [`Proof`]: its current chain
//! and a signature with the chain's key over a context string, its role, the session's TLS
//! exporter value ([`exporter`]) and a digest of the chain. The destination verifies the chain
//! as a handshake would (same verifier), requires the session's SPIFFE ID and region, checks
//! the signature, moves the session's live registrations to the new certificate, and answers
//! `200` with its own proof, which the caller verifies the same way. The exporter binds a proof
//! to one TLS session: a proof seen on another session does not verify. Any failure leaves
//! the old certificates' limits in force (fail closed). A sidecar without re-authentication
//! answers `405`, and its sessions end at expiry as before.

use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::crypto::provider;
use crate::identity::{inspect_cert, peer_region, CertInfo};
use crate::refusal::Refusal;
use crate::region::Region;

/// The `:path` of a re-authentication stream.
pub const REAUTH_PATH: &str = "/.trustline/reauth";

/// The full URI the caller sends (HTTP/2 requires a scheme and authority besides `CONNECT`).
pub const REAUTH_URI: &str = "https://session.trustline.invalid/.trustline/reauth";

/// The largest proof either side reads.
pub const MAX_PROOF: usize = 32 << 10;

/// The most certificates a proof may carry (a leaf and its intermediates).
const MAX_CHAIN: usize = 4;

/// The TLS exporter label of the session's binding value.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-trustline-session-reauth";

/// What every signed message starts with, so a proof is never taken for another signature.
const CONTEXT: &[u8] = b"trustline session re-authentication v1\0";

/// A session's binding value: the TLS exporter of its connection.
pub type Exporter = [u8; 32];

/// The exporter value of a TLS connection; `None` before its handshake is complete.
pub fn exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Option<Exporter> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .ok()
}

/// Which end signs: a caller's proof is never accepted as a destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn word(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
}

/// A proof of possession of an SVID, for one session.
pub struct Proof {
    pub chain: Vec<CertificateDer<'static>>,
    pub scheme: SignatureScheme,
    pub signature: Vec<u8>,
}

/// Why a proof was refused.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

fn refused(reason: Refusal, detail: impl ToString) -> Refused {
    Refused {
        reason,
        detail: detail.to_string(),
    }
}

/// The message a proof signs.
fn message(role: Role, exporter: &Exporter, chain: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for c in chain {
        d.update(&(c.len() as u32).to_be_bytes());
        d.update(c);
    }
    let mut m = Vec::with_capacity(CONTEXT.len() + 8 + 32 + 32);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(role.word());
    m.push(0);
    m.extend_from_slice(exporter);
    m.extend_from_slice(d.finish().as_ref());
    m
}

/// Our proof for `role` with `key` (the SVID handshakes present now).
pub fn sign(key: &CertifiedKey, role: Role, exporter: &Exporter) -> Result<Proof, Refused> {
    let schemes = crate::tls::verify_schemes();
    let signer = key
        .key
        .choose_scheme(&schemes)
        .ok_or_else(|| refused(Refusal::BadSignature, "no signature scheme for our key"))?;
    let signature = signer
        .sign(&message(role, exporter, &key.cert))
        .map_err(|e| refused(Refusal::BadSignature, e))?;
    Ok(Proof {
        chain: key.cert.clone(),
        scheme: signer.scheme(),
        signature,
    })
}

impl Proof {
    /// The wire form: scheme (u16), signature length (u16), signature, certificate count (u8),
    /// then each certificate's length (u32) and DER.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::from(self.scheme).to_be_bytes());
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out.push(self.chain.len() as u8);
        for c in &self.chain {
            out.extend_from_slice(&(c.len() as u32).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    /// Reads the wire form; every length is checked against what is left.
    pub fn decode(mut b: &[u8]) -> Result<Proof, Refused> {
        if b.len() > MAX_PROOF {
            return Err(refused(Refusal::ReauthMalformed, "proof too large"));
        }
        let scheme = SignatureScheme::from(u16::from_be_bytes(take::<2>(&mut b)?));
        let n = usize::from(u16::from_be_bytes(take::<2>(&mut b)?));
        let signature = take_n(&mut b, n)?.to_vec();
        let [count] = take::<1>(&mut b)?;
        let count = usize::from(count);
        if count == 0 || count > MAX_CHAIN {
            return Err(refused(
                Refusal::ReauthMalformed,
                format!("a chain of {count} certificates"),
            ));
        }
        let mut chain = Vec::with_capacity(count);
        for _ in 0..count {
            let n = u32::from_be_bytes(take::<4>(&mut b)?) as usize;
            chain.push(CertificateDer::from(take_n(&mut b, n)?.to_vec()));
        }
        if !b.is_empty() {
            return Err(refused(Refusal::ReauthMalformed, "trailing bytes"));
        }
        Ok(Proof {
            chain,
            scheme,
            signature,
        })
    }

    /// Checks the signature by the leaf's key over this session's message for `role`. The
    /// chain itself must have been verified before (the handshake's verifier).
    pub fn check_signature(&self, role: Role, exporter: &Exporter) -> Result<(), Refused> {
        use SignatureScheme as S;
        let bad = |d: &str| refused(Refusal::BadSignature, d);
        // TLS 1.3's rule: no PKCS#1 v1.5 signatures outside certificates.
        if matches!(
            self.scheme,
            S::RSA_PKCS1_SHA256 | S::RSA_PKCS1_SHA384 | S::RSA_PKCS1_SHA512 | S::RSA_PKCS1_SHA1
        ) {
            return Err(bad("a PKCS#1 v1.5 signature"));
        }
        let leaf = self.chain.first().ok_or_else(|| bad("no certificate"))?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| bad(&e.to_string()))?;
        let algs = provider()
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == self.scheme)
            .map(|(_, a)| *a)
            .ok_or_else(|| bad("unsupported signature scheme"))?;
        let msg = message(role, exporter, &self.chain);
        if algs
            .iter()
            .any(|a| ee.verify_signature(*a, &msg, &self.signature).is_ok())
        {
            Ok(())
        } else {
            Err(bad(
                "the signature does not verify with the leaf's key for this session",
            ))
        }
    }

    /// After the chain passed the handshake's verifier: the leaf's facts, required to be the
    /// session's SPIFFE ID and region (read as the handshake read it: none for a peer outside
    /// our trust domain `ours`), and the signature checked.
    pub fn accept(
        &self,
        role: Role,
        exporter: &Exporter,
        id: &crate::identity::SpiffeId,
        region: Option<&Region>,
        ours: &crate::identity::TrustDomain,
    ) -> Result<(CertInfo, Option<Region>), Refused> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| refused(Refusal::ReauthMalformed, "no certificate"))?;
        let info = inspect_cert(leaf).map_err(|e| refused(Refusal::BadSpiffeId, e))?;
        if info.id != *id {
            return Err(refused(
                Refusal::UnexpectedIdentity,
                format!("the proof is for {}, the session for {id}", info.id),
            ));
        }
        let proved = peer_region(&self.chain, ours);
        if proved.as_ref() != region {
            return Err(refused(
                Refusal::WrongRegion,
                format!("the proof's CA is of region {proved:?}, the session's of {region:?}"),
            ));
        }
        self.check_signature(role, exporter)?;
        Ok((info, proved))
    }
}

fn take<const N: usize>(b: &mut &[u8]) -> Result<[u8; N], Refused> {
    let s = take_n(b, N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Ok(out)
}

fn take_n<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], Refused> {
    if b.len() < n {
        return Err(refused(Refusal::ReauthMalformed, "truncated proof"));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// `t` as the `UnixTime` verifiers take.
pub fn unix(t: SystemTime) -> rustls::pki_types::UnixTime {
    rustls::pki_types::UnixTime::since_unix_epoch(
        t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
    )
}

/// Reads a body of at most [`MAX_PROOF`] bytes.
pub async fn read_body(mut body: h2::RecvStream) -> Result<Vec<u8>, Refused> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| refused(Refusal::ReauthMalformed, e))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if out.len() + chunk.len() > MAX_PROOF {
            return Err(refused(
                Refusal::ReauthMalformed,
                format!("a proof over {MAX_PROOF} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_oversized_proofs_are_refused() {
        let p = Proof {
            chain: vec![CertificateDer::from(vec![1, 2, 3])],
            scheme: SignatureScheme::ECDSA_NISTP256_SHA256,
            signature: vec![9; 70],
        };
        let wire = p.encode();
        let back = Proof::decode(&wire).expect("round trip");
        assert_eq!(back.chain, p.chain);
        assert_eq!(back.signature, p.signature);
        for n in 0..wire.len() {
            let e = Proof::decode(&wire[..n]).err().expect("truncated");
            assert_eq!(e.reason, Refusal::ReauthMalformed);
        }
        let mut long = wire.clone();
        long.push(0);
        assert!(Proof::decode(&long).is_err());
        assert!(Proof::decode(&vec![0u8; MAX_PROOF + 1]).is_err());
    }
}
