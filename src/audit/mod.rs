//! The audit trail: one JSON object per line, appended, separate from debug logs.
//!
//! Each role defines the fixed schema of its events (a `Serialize` struct) and hands them to an
//! [`AuditLog`]. A line is written with one `write` call on an `O_APPEND` file, so concurrent
//! writers never interleave and a crash leaves at most one torn final line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

pub mod ca;
pub mod decision;
pub mod tunnel;

/// An append-only JSON-lines audit file (or a sink that drops events).
#[derive(Debug)]
pub struct AuditLog {
    file: Option<Mutex<File>>,
    path: Option<PathBuf>,
}

impl AuditLog {
    /// Opens (creating) the audit file at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            file: Some(Mutex::new(file)),
            path: Some(path.to_path_buf()),
        })
    }

    /// An audit log that records nothing.
    pub fn disabled() -> Self {
        AuditLog {
            file: None,
            path: None,
        }
    }

    /// Where the events go.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends one event. Failures are reported in the debug log and never stop the caller.
    pub fn record<E: Serialize>(&self, event: &E) {
        let Some(file) = &self.file else { return };
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit event could not be encoded");
                return;
            }
        };
        line.push(b'\n');
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(&line) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}
