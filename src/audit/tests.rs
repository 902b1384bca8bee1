//! The audit log with its writer thread, on real files (and a FIFO for a stalled disk).

use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::{AuditLog, QUEUE_LINES};

#[derive(Serialize)]
struct Ev {
    thread: usize,
    n: usize,
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l:?}"))
        })
        .collect()
}

/// The events of each recording thread, in file order.
fn per_thread(lines: &[serde_json::Value], threads: usize) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); threads];
    for l in lines {
        out[l["thread"].as_u64().unwrap() as usize].push(l["n"].as_u64().unwrap());
    }
    out
}

#[test]
fn flush_returns_once_every_event_recorded_before_it_is_in_the_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    const THREADS: usize = 4;
    const EACH: usize = 5_000;
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let log = &log;
            s.spawn(move || {
                for n in 0..EACH {
                    log.record(&Ev { thread, n });
                }
            });
        }
    });
    log.flush();
    // Read while the log is still open: flush, not drop, put them there.
    let got = lines(&path);
    assert_eq!(got.len(), THREADS * EACH);
    for (thread, ns) in per_thread(&got, THREADS).into_iter().enumerate() {
        let want: Vec<u64> = (0..EACH as u64).collect();
        assert_eq!(ns, want, "thread {thread}'s events, in the order recorded");
    }
    assert_eq!(log.lost(), 0);
    // And it keeps working after a flush.
    log.record(&Ev { thread: 0, n: EACH });
    log.flush();
    assert_eq!(lines(&path).len(), THREADS * EACH + 1);
}

#[test]
fn dropping_the_log_writes_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    for n in 0..3_000 {
        log.record(&Ev { thread: 0, n });
    }
    drop(log);
    let got = lines(&path);
    assert_eq!(per_thread(&got, 1)[0], (0..3_000).collect::<Vec<u64>>());
    // A second log on the same file appends after it.
    let log = AuditLog::open(&path).unwrap();
    log.record(&Ev {
        thread: 0,
        n: 3_000,
    });
    drop(log);
    assert_eq!(lines(&path).len(), 3_001);
}

/// The writer blocked on a FIFO nobody reads stands for a stalled disk: `record` must neither
/// block nor lose events silently.
#[test]
fn a_stalled_writer_drops_events_counts_them_and_marks_them_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    // Opening a FIFO for writing waits for a reader: open it for reading, read nothing yet.
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || std::fs::File::open(path).unwrap())
    };
    let log = AuditLog::open(&path).unwrap();
    let mut fifo = reader.join().unwrap();
    // The pipe (64 KiB), one batch in the writer's hands and a full queue hold fewer than this:
    // drops must come, and every `record` returns (the test would hang otherwise).
    let bound = 3 * QUEUE_LINES + 65_536 / 20;
    let mut recorded = 0;
    while log.lost() == 0 {
        assert!(
            recorded < bound,
            "{recorded} events recorded and none dropped"
        );
        log.record(&Ev {
            thread: 0,
            n: recorded,
        });
        recorded += 1;
    }
    for _ in 0..10 {
        log.record(&Ev {
            thread: 0,
            n: recorded,
        });
        recorded += 1;
    }
    let lost = log.lost();
    assert!(lost >= 11, "{lost}");
    // Unblock the writer and stop: what was queued is written, then the mark of the drops.
    let text = std::thread::spawn(move || {
        let mut s = String::new();
        fifo.read_to_string(&mut s).unwrap();
        s
    });
    drop(log);
    let text = text.join().unwrap();
    let mut written = Vec::new();
    let mut marked = 0;
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if let Some(n) = v["audit_events_lost"].as_u64() {
            assert_eq!(v["reason"], "queue_full");
            marked += n;
        } else {
            written.push(v["n"].as_u64().unwrap());
        }
    }
    assert_eq!(marked, lost, "the file says how many were dropped");
    assert_eq!(written.len() as u64 + lost, recorded as u64);
    assert!(written.windows(2).all(|w| w[0] < w[1]), "in order");
}

#[test]
fn a_disabled_log_records_and_flushes_nothing() {
    let log = AuditLog::disabled();
    log.record(&Ev { thread: 0, n: 0 });
    log.flush();
    assert_eq!(log.lost(), 0);
    assert!(log.path().is_none());
}

#[test]
fn decision_events_carry_the_token_facts_flat_and_only_when_read() {
    use super::decision::{DecisionEvent, JwtAudit};
    let mut ev = DecisionEvent {
        time: "2026-12-02T14:00:00Z".into(),
        event: "decision",
        source_id: "spiffe://t.test/ns/edge/sa/gateway".into(),
        source_serial: "01".into(),
        source_region: Some("eu-west".into()),
        destination_service: "api".into(),
        destination_region: None,
        port: 8080,
        method: Some("GET".into()),
        path: Some("/x".into()),
        outcome: "allow",
        rule: "r".into(),
        mode: "enforced",
        detail: None,
        jwt: None,
    };
    let plain = serde_json::to_value(&ev).unwrap();
    assert!(
        plain
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("jwt")),
        "{plain}"
    );
    ev.jwt = Some(JwtAudit {
        jwt_sub: Some("spiffe://t.test/ns/web/sa/portal".into()),
        jwt_region: Some("us-east".into()),
        jwt_error: None,
    });
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(v["jwt_sub"], "spiffe://t.test/ns/web/sa/portal");
    assert_eq!(v["jwt_region"], "us-east");
    assert_eq!(v["source_id"], "spiffe://t.test/ns/edge/sa/gateway");
    assert!(v.get("jwt_error").is_none(), "{v}");
}
