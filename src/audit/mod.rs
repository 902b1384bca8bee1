//! The audit trail: one JSON object per line, appended, separate from debug logs.
//!
//! Each role defines the fixed schema of its events (a `Serialize` struct) and hands them to an
//! [`AuditLog`]. [`AuditLog::record`] encodes the event and queues the line: it never does file
//! I/O on the caller's thread (a tokio worker, which a stalled `write` would freeze with every
//! connection on it). One writer thread per log takes the queued lines in the order they were
//! queued and appends them with one `write` call on an `O_APPEND` file, so lines never
//! interleave. A write that fails part-way (a full disk writes what fits, then refuses) is cut
//! off again, so the next line starts on a line of its own instead of being glued to a fragment.
//!
//! **Bounded, and what happens when it is full.** The queue holds [`QUEUE_LINES`] lines, seconds
//! of events at the CA's full issuance rate, so it fills only when the writer has been stuck on
//! the disk that long. Then the event is dropped rather than stalling the caller: a CA or proxy
//! that stops serving because its audit disk is slow fails everyone, and for the CA the ledger,
//! not the audit log, is the durable record of what was issued. A drop is never silent: it is
//! counted ([`AuditLog::lost`]), logged at `error` (the first of each run of drops), and when the
//! writer catches up it appends `{"audit_events_lost":N,"reason":"..."}` to the audit file
//! itself, so a reader of the trail sees the gap, and its size, about where it happened. Events
//! lost to a failed write (a full disk) are counted and marked the same way.
//!
//! **Stopping, and the crash window.** [`AuditLog::flush`] returns once every event recorded
//! before the call has been written; the CA, the sidecar and the gateway call it when they stop,
//! and dropping the log flushes too and ends the writer. Lines are written, not fsynced: a
//! SIGKILL loses what was still queued (normally the events of the last moment, at worst
//! [`QUEUE_LINES`] if the disk was stalled) and can leave one torn final line; a crash of the
//! machine also loses what the kernel had not yet written back.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;

pub mod agent;
pub mod ca;
pub mod decision;
pub mod tunnel;

/// Most lines waiting for the writer (each a few hundred bytes: a few MiB at most).
pub const QUEUE_LINES: usize = 16_384;

/// An append-only JSON-lines audit file (or a sink that drops events).
pub struct AuditLog {
    inner: Option<Inner>,
    path: Option<PathBuf>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// What [`AuditLog`] and its writer thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Lines were queued, or the log is closing: wakes the writer.
    wake: Condvar,
    /// The writer finished a batch: wakes [`AuditLog::flush`].
    wrote: Condvar,
    /// Events lost so far: dropped at a full queue or in a failed write.
    lost: AtomicU64,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// Lines queued since the start (dropped ones not counted).
    queued: u64,
    /// Of those, how many the writer is done with (written or lost).
    done: u64,
    /// Events dropped at a full queue that the file does not mention yet.
    dropped: u64,
    /// Events lost in failed writes that the file does not mention yet.
    failed: u64,
    closing: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("lost", &self.lost())
            .finish()
    }
}

impl AuditLog {
    /// Opens (creating) the audit file at `path` for appending, and starts its writer thread.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            wrote: Condvar::new(),
            lost: AtomicU64::new(0),
        });
        let sink = Sink { file, torn: false };
        let writer = {
            let shared = shared.clone();
            let path = path.to_path_buf();
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || shared.run(sink, &path))?
        };
        Ok(AuditLog {
            inner: Some(Inner {
                shared,
                writer: Some(writer),
            }),
            path: Some(path.to_path_buf()),
        })
    }

    /// An audit log that records nothing.
    pub fn disabled() -> Self {
        AuditLog {
            inner: None,
            path: None,
        }
    }

    /// Where the events go.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Queues one event for the writer; never waits for the disk. Failures (and drops at a
    /// full queue) are counted, logged and marked in the file, and never stop the caller.
    pub fn record<E: Serialize>(&self, event: &E) {
        let Some(inner) = &self.inner else { return };
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit event could not be encoded");
                return;
            }
        };
        line.push(b'\n');
        let shared = &inner.shared;
        let mut q = shared.lock();
        if q.lines.len() >= QUEUE_LINES {
            if q.dropped == 0 {
                tracing::error!(
                    path = ?self.path,
                    queued = QUEUE_LINES,
                    "audit queue full (the audit file's disk is stalled); dropping events until it drains"
                );
            }
            q.dropped += 1;
            shared.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.lines.push_back(line);
        q.queued += 1;
        drop(q);
        shared.wake.notify_one();
    }

    /// Waits until every event recorded before this call is written (or known lost). It blocks
    /// the calling thread for as long as the disk takes: call it when stopping.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let shared = &inner.shared;
        let mut q = shared.lock();
        let target = q.queued;
        while q.done < target {
            if inner.writer.as_ref().is_none_or(|w| w.is_finished()) {
                return;
            }
            q = shared.wrote.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Events lost so far: dropped because the queue was full, or in a failed write.
    pub fn lost(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.lost.load(Ordering::Relaxed))
    }
}

impl Drop for AuditLog {
    /// Writes what is queued and stops the writer.
    fn drop(&mut self) {
        let Some(inner) = &mut self.inner else { return };
        inner.shared.lock().closing = true;
        inner.shared.wake.notify_one();
        if let Some(w) = inner.writer.take() {
            let _ = w.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer thread: appends batches of queued lines, in order, until closing and empty.
    fn run(&self, mut sink: Sink, path: &Path) {
        loop {
            let (lines, dropped, failed, last) = {
                let mut q = self.lock();
                while q.lines.is_empty() && !q.closing {
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.lines.is_empty() && q.dropped == 0 && q.failed == 0 {
                    return;
                }
                // Closing with only the marks of lost events left: one last try.
                let last = q.lines.is_empty();
                (
                    std::mem::take(&mut q.lines),
                    std::mem::take(&mut q.dropped),
                    std::mem::take(&mut q.failed),
                    last,
                )
            };
            let n = lines.len() as u64;
            let mut buf = Vec::with_capacity(lines.iter().map(Vec::len).sum::<usize>() + 128);
            for l in &lines {
                buf.extend_from_slice(l);
            }
            if dropped > 0 {
                buf.extend_from_slice(&lost_line(dropped, "queue_full"));
            }
            if failed > 0 {
                buf.extend_from_slice(&lost_line(failed, "write_failed"));
            }
            let result = sink.append(buf);
            let mut q = self.lock();
            if let Err(e) = result {
                self.lost.fetch_add(n, Ordering::Relaxed);
                tracing::error!(path = %path.display(), error = %e, events = n, "audit log write failed; these events are lost");
                // Marked in the file by the next write that succeeds.
                q.dropped += dropped;
                q.failed += failed + n;
            }
            q.done += n;
            drop(q);
            self.wrote.notify_all();
            if last {
                return;
            }
        }
    }
}

/// The line that marks `n` lost events in the file.
fn lost_line(n: u64, reason: &str) -> Vec<u8> {
    let mut l =
        serde_json::to_vec(&serde_json::json!({ "audit_events_lost": n, "reason": reason }))
            .unwrap_or_default();
    l.push(b'\n');
    l
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
    /// Appends `lines` whole, or cuts off what a failed write left of them.
    fn append(&mut self, mut lines: Vec<u8>) -> std::io::Result<()> {
        if self.torn {
            lines.insert(0, b'\n');
        }
        let before = self.file.metadata()?.len();
        let Err(e) = self.file.write_all(&lines) else {
            self.torn = false;
            return Ok(());
        };
        // Shrinking frees space, so it works on a full disk; if it fails all the same, the
        // fragment stays and the next line begins with a newline.
        self.torn = self.file.set_len(before).is_err();
        Err(e)
    }
}

#[cfg(test)]
mod tests;
