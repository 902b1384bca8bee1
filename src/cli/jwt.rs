//! `trustline jwt validate`: checks a JWT-SVID against a bundle, for operators.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use trustline::clock::Clock;
use trustline::identity::{parse_trust_domain, TrustDomain};
use trustline::jwt::{self, JwtBundle, JwtBundles, MAX_BUNDLE_LEN, MAX_TOKEN_LEN};

#[derive(Subcommand)]
pub enum JwtCommand {
    /// Validates a JWT-SVID (signature, expiry, audience, region) and prints its verified
    /// claims as JSON; exits 1 with the reason when it is refused.
    #[command(
        after_help = "FILE is a SPIFFE bundle document (what `GET /v1/bundle` with `Accept: application/json`\n\
                      serves: x509-svid and jwt-svid keys) or a plain JWKS (what FetchJWTBundles sends).\n\
                      Neither names its trust domain: without --trust-domain the keys are taken to be those\n\
                      of the trust domain of the token's own sub, so any trust domain the token names is\n\
                      accepted if a key of FILE signed it. Give --trust-domain to pin it.\n\n\
                      The output's \"region\" is the verified region (the key's, when FILE says which region\n\
                      holds it), null when the key's region is not known; \"claims\" holds every claim as signed.\n\n\
                      Examples:\n  \
                      trustline jwt validate --bundle bundle.json --audience orders \"$TOKEN\"\n  \
                      trustline jwt validate --bundle jwks.json --audience orders --trust-domain example.org < token.txt"
    )]
    Validate(ValidateArgs),
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The bundle: a SPIFFE bundle document or a plain JWKS (JSON).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// The audience the token must name.
    #[arg(long, value_name = "AUD")]
    audience: String,
    /// The trust domain whose keys FILE holds (default: the trust domain of the token's sub).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// The token; read from standard input when absent or "-".
    token: Option<String>,
}

pub fn run(command: JwtCommand) -> anyhow::Result<()> {
    match command {
        JwtCommand::Validate(a) => validate(&a),
    }
}

fn validate(a: &ValidateArgs) -> anyhow::Result<()> {
    let token = match a.token.as_deref() {
        Some(t) if t != "-" => t.trim().to_string(),
        _ => read_bounded(std::io::stdin(), MAX_TOKEN_LEN + 2)
            .context("reading the token from standard input")?
            .trim()
            .to_string(),
    };
    let td = match &a.trust_domain {
        Some(td) => parse_trust_domain(td)?,
        None => jwt::peek_subject(&token)?.trust_domain().clone(),
    };
    let bundle = read_bundle(&a.bundle, &td)?;
    let bundles = JwtBundles::from(bundle);
    let v = jwt::validate(&token, &bundles, &a.audience, Clock::system().now())?;
    let out = json!({
        "sub": v.sub.to_string(),
        "aud": v.aud,
        "exp": v.exp,
        "iat": v.iat,
        "region": v.region.as_ref().map(|r| r.as_str()),
        "kid": v.kid,
        "claims": Value::Object(v.claims),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// At most `max` bytes of UTF-8 (more is cut there: the validator then refuses a token too long).
fn read_bounded(r: impl std::io::Read, max: usize) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    r.take(max as u64).read_to_end(&mut buf)?;
    Ok(String::from_utf8(buf)?)
}

/// A SPIFFE bundle document (it has `spiffe_sequence`, `spiffe_refresh_hint` or `x509-svid`
/// keys: read strictly, with its x509 keys checked) or else a plain JWKS.
fn read_bundle(path: &Path, td: &TrustDomain) -> anyhow::Result<JwtBundle> {
    let what = || format!("reading the bundle {}", path.display());
    let file = std::fs::File::open(path).with_context(what)?;
    let mut bytes = Vec::new();
    file.take(MAX_BUNDLE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(what)?;
    let is_spiffe_doc = serde_json::from_slice::<Value>(&bytes).is_ok_and(|doc| {
        doc.get("spiffe_sequence").is_some()
            || doc.get("spiffe_refresh_hint").is_some()
            || doc["keys"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["use"] == "x509-svid"))
    });
    let bundle = if is_spiffe_doc {
        jwt::parse_spiffe_bundle(td, &bytes).map(|d| d.jwt)
    } else {
        jwt::parse_jwks(td, &bytes)
    };
    bundle.with_context(|| format!("bundle {}", path.display()))
}
