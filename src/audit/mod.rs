//! The audit trail: one JSON object per line, appended, separate from debug logs.
//!
//! Each role defines the fixed schema of its events (a `Serialize` struct) and hands them to an
//! [`AuditLog`]. A line is written with one `write` call on an `O_APPEND` file, so concurrent
//! writers never interleave and a crash leaves at most one torn final line. A write that fails
//! part-way (a full disk writes what fits, then refuses) is cut off again, so the next event
//! starts on a line of its own instead of being glued to a fragment.

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
    file: Option<Mutex<Sink>>,
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
            file: Some(Mutex::new(Sink { file, torn: false })),
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
        let mut sink = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sink.append(line) {
            tracing::error!(error = %e, "audit log write failed; the event is lost");
        }
    }
}

/// The open audit file, and whether it may end in a fragment of a line.
#[derive(Debug)]
struct Sink {
    file: File,
    /// A failed write left a fragment that could not be cut off: the next line starts on a
    /// new one.
    torn: bool,
}

impl Sink {
    /// Appends `line` whole, or cuts off what a failed write left of it.
    fn append(&mut self, mut line: Vec<u8>) -> std::io::Result<()> {
        if self.torn {
            line.insert(0, b'\n');
        }
        let before = self.file.metadata()?.len();
        let Err(e) = self.file.write_all(&line) else {
            self.torn = false;
            return Ok(());
        };
        // Shrinking frees space, so it works on a full disk; if it fails all the same, the
        // fragment stays and the next line begins with a newline.
        self.torn = self.file.set_len(before).is_err();
        Err(e)
    }
}
