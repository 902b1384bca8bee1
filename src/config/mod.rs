//! Loading TOML configuration files with errors that name the file, the line, the field and the
//! reason. Each role defines its own `deny_unknown_fields` structs and `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::identity::{parse_workload_id, SpiffeId, TrustDomain};
use crate::region::{Region, ServiceName};
use crate::util::parse_duration;

/// A configuration problem, located as precisely as it can be.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {field}: {reason}", file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "command line".into()), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file, or `None` for a command-line flag.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field (or flag) at fault.
    pub field: String,
    /// What is wrong and what was expected.
    pub reason: String,
}

impl ConfigError {
    /// An error about `field` of `file` (or of the command line when `file` is `None`).
    pub fn field(file: Option<&Path>, field: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.map(Path::to_path_buf),
            line: None,
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Reads and parses a TOML file into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: None,
        field: "(file)".into(),
        reason: e.to_string(),
    })?;
    parse_toml(&text, Some(path))
}

/// Parses TOML text into `T`; `path` names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: Option<&Path>) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| crate::util::line_of(text, s.start));
        let snippet = e.span().map(|s| text[s.clone()].to_string());
        ConfigError {
            file: path.map(Path::to_path_buf),
            line,
            field: snippet
                .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "(document)".into()),
            reason: e.message().trim().to_string(),
        }
    })
}

/// Where a config file is, for errors and relative paths.
pub struct Ctx<'a> {
    pub file: &'a Path,
    pub dir: PathBuf,
}

impl Ctx<'_> {
    pub fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::field(Some(self.file), &field.into(), reason)
    }
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
    pub fn addr(&self, field: &str, v: &str) -> Result<SocketAddr, ConfigError> {
        v.parse().map_err(|_| {
            self.err(
                field,
                format!("{v:?} is not an address like 127.0.0.1:8080"),
            )
        })
    }
    pub fn duration(
        &self,
        field: &str,
        v: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) => parse_duration(v).map_err(|e| self.err(field, e.to_string())),
        }
    }
    pub fn id(&self, field: &str, v: &str, td: &TrustDomain) -> Result<SpiffeId, ConfigError> {
        let id = parse_workload_id(v).map_err(|e| self.err(field, e.to_string()))?;
        if !id.is_member_of(td) {
            return Err(self.err(field, format!("{id} is not in trust domain {td}")));
        }
        Ok(id)
    }
    /// A region name, by the one rule of [`Region`].
    pub fn region(&self, field: &str, v: &str) -> Result<Region, ConfigError> {
        Region::new(v).map_err(|e| self.err(field, e.to_string()))
    }
    /// A service name, by the one rule of [`ServiceName`].
    pub fn service(&self, field: &str, v: &str) -> Result<ServiceName, ConfigError> {
        ServiceName::new(v).map_err(|e| self.err(field, e.to_string()))
    }
}
