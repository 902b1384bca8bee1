//! Small helpers shared by several roles: private-key files, durations.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Writes a private key (or any secret) with mode 0600 from the moment the file exists.
pub fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path)
}

/// Writes a public file (certificates, bundles) atomically.
pub fn write_public(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

/// A file's (modification time, size): what the watchers compare to notice a change.
pub fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The 1-based line of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A duration that does not parse: the text as written, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {text:?}: {error}")]
pub struct DurationError {
    text: String,
    error: humantime::DurationError,
}

/// Parses a human duration such as `15m`, `24h` or `3650d`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|error| DurationError {
        text: s.to_string(),
        error,
    })
}

/// Lowercase hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Decodes hex (either case, optional `:` separators as printed by openssl).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    /// Config errors embed this text after the field name.
    #[test]
    fn a_bad_duration_names_the_text_as_written() {
        assert_eq!(
            super::parse_duration(" 15m ").unwrap(),
            std::time::Duration::from_secs(900)
        );
        let e = super::parse_duration("5 parsecs").unwrap_err().to_string();
        assert!(e.starts_with("invalid duration \"5 parsecs\": "), "{e}");
        let cause = humantime::parse_duration("5 parsecs")
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("invalid duration \"5 parsecs\": {cause}"));
    }
}
