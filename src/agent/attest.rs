//! Workload attestation: who is calling, by the kernel's word, and which registration entries
//! that caller matches.
//!
//! The facts are the socket's peer credentials (`SO_PEERCRED`: uid, primary gid and pid, as the
//! kernel recorded them when the caller connected) and the executable of that pid, read from
//! `/proc/PID/exe`. Nothing the caller sends is used.
//!
//! **The PID-reuse race.** A pid names a process only while it lives: if the caller exits and
//! the pid is reused before `/proc/PID/exe` is read, the new process's executable would be
//! read. The start time of the pid (`/proc/PID/stat`, field 22) is read before and after the
//! executable, and a change refuses the path (a process that started in between). That closes
//! the window during the read, not a reuse that happened entirely before it (connect, exit,
//! pid reused, then our first read); entries that rely on `path` therefore assume callers stay
//! alive while they call, which a Workload API client streaming its SVIDs does. The uid and
//! gid come from the socket itself and do not have this race. A process that hands its
//! connected socket to another one (or `exec`s another program) passes on what it was given.
//!
//! Only the primary gid is known (supplementary groups are not in `SO_PEERCRED`). Reading
//! another user's `/proc/PID/exe` needs the agent to run as root (or with CAP_SYS_PTRACE);
//! when it cannot be read the caller has no path, and entries with a `path` do not match it.

use std::path::{Path, PathBuf};

use super::config::Entry;
use crate::identity::SpiffeId;

/// The socket peer's credentials, as the kernel gave them at connect time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    /// `None` when the kernel could not name it (a peer in a pid namespace we do not see).
    pub pid: Option<i32>,
}

/// An attested caller: its credentials and, when it could be read safely, its executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub cred: PeerCred,
    pub path: Option<PathBuf>,
    /// Why there is no path, for the audit line.
    pub path_error: Option<String>,
}

/// Attests the peer `cred`, reading its executable under `proc_root` (`/proc`).
pub fn attest(cred: PeerCred, proc_root: &Path) -> Caller {
    let (path, path_error) = match cred.pid.filter(|p| *p > 0) {
        None => (None, Some("no pid for the peer".to_string())),
        Some(pid) => match exe_of(proc_root, pid) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
    };
    Caller {
        cred,
        path,
        path_error,
    }
}

/// The executable of `pid`, refused when the pid's start time changes while it is read (the
/// pid was reused) or the file was deleted.
fn exe_of(proc_root: &Path, pid: i32) -> Result<PathBuf, String> {
    let dir = proc_root.join(pid.to_string());
    let before = start_time(&dir)?;
    let exe = std::fs::read_link(dir.join("exe")).map_err(|e| format!("reading exe: {e}"))?;
    let after = start_time(&dir)?;
    if before != after {
        return Err(format!("pid {pid} was reused while it was read"));
    }
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(format!("{} was deleted", exe.display()));
    }
    Ok(exe)
}

/// Field 22 of `/proc/PID/stat` (start time, in clock ticks since boot).
fn start_time(dir: &Path) -> Result<u64, String> {
    let stat =
        std::fs::read_to_string(dir.join("stat")).map_err(|e| format!("reading stat: {e}"))?;
    parse_start_time(&stat).ok_or_else(|| "unreadable stat".to_string())
}

/// The start time from a `stat` line. The command name (field 2) is in parentheses and may
/// hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether every selector `entry` gives matches `caller`.
pub fn matches(entry: &Entry, caller: &Caller) -> bool {
    entry.uid.is_none_or(|u| u == caller.cred.uid)
        && entry.gid.is_none_or(|g| g == caller.cred.gid)
        && entry
            .path
            .as_ref()
            .is_none_or(|p| caller.path.as_ref() == Some(p))
}

/// The SPIFFE IDs of the entries `caller` matches, in file order, each once: the first is the
/// caller's default identity.
pub fn matching(entries: &[Entry], caller: &Caller) -> Vec<SpiffeId> {
    let mut out: Vec<SpiffeId> = Vec::new();
    for e in entries.iter().filter(|e| matches(e, caller)) {
        if !out.contains(&e.spiffe_id) {
            out.push(e.spiffe_id.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://example.org/{name}")).unwrap()
    }

    fn entry(name: &str, uid: Option<u32>, gid: Option<u32>, path: Option<&str>) -> Entry {
        Entry {
            spiffe_id: id(name),
            uid,
            gid,
            path: path.map(PathBuf::from),
        }
    }

    fn caller(uid: u32, gid: u32, path: Option<&str>) -> Caller {
        Caller {
            cred: PeerCred {
                uid,
                gid,
                pid: Some(1),
            },
            path: path.map(PathBuf::from),
            path_error: None,
        }
    }

    #[test]
    fn every_selector_given_must_match() {
        let e = entry("web", Some(1000), Some(50), Some("/usr/bin/web"));
        assert!(matches(&e, &caller(1000, 50, Some("/usr/bin/web"))));
        assert!(!matches(&e, &caller(1001, 50, Some("/usr/bin/web"))));
        assert!(!matches(&e, &caller(1000, 51, Some("/usr/bin/web"))));
        assert!(!matches(&e, &caller(1000, 50, Some("/usr/bin/other"))));
        // A caller whose executable could not be read matches no entry that names a path.
        assert!(!matches(&e, &caller(1000, 50, None)));
        assert!(matches(
            &entry("web", Some(1000), None, None),
            &caller(1000, 7, None)
        ));
    }

    #[test]
    fn several_entries_give_several_ids_in_file_order_each_once() {
        let entries = [
            entry("a", Some(1000), None, None),
            entry("b", None, Some(50), None),
            entry("a", None, None, Some("/bin/x")),
            entry("c", Some(2000), None, None),
        ];
        assert_eq!(
            matching(&entries, &caller(1000, 50, Some("/bin/x"))),
            vec![id("a"), id("b")]
        );
        assert_eq!(
            matching(&entries, &caller(7, 50, Some("/bin/x"))),
            vec![id("b"), id("a")]
        );
        assert!(matching(&entries, &caller(7, 7, None)).is_empty());
    }

    #[test]
    fn the_start_time_is_read_after_the_last_parenthesis() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("12 (x) S 1"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_attested_with_its_own_executable() {
        let cred = PeerCred {
            uid: 0,
            gid: 0,
            pid: Some(std::process::id() as i32),
        };
        let c = attest(cred, Path::new("/proc"));
        assert_eq!(c.path, Some(std::env::current_exe().unwrap()), "{c:?}");
        let gone = attest(
            PeerCred {
                pid: Some(i32::MAX),
                ..cred
            },
            Path::new("/proc"),
        );
        assert_eq!(gone.path, None);
        assert!(gone.path_error.is_some());
        assert_eq!(
            attest(PeerCred { pid: None, ..cred }, Path::new("/proc")).path,
            None
        );
    }

    #[test]
    fn a_pid_without_a_readable_start_time_gets_no_path() {
        // Without the start time, a reuse of the pid during the read could not be seen: no
        // path rather than a guessed one.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("77");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("stat"), "77 (x) S").unwrap();
        std::os::unix::fs::symlink("/usr/bin/true", p.join("exe")).unwrap();
        let cred = PeerCred {
            uid: 1,
            gid: 1,
            pid: Some(77),
        };
        assert_eq!(attest(cred, dir.path()).path, None);
        let stat = format!("77 (x) S {}", "1 ".repeat(19));
        std::fs::write(p.join("stat"), stat).unwrap();
        assert_eq!(
            attest(cred, dir.path()).path,
            Some(PathBuf::from("/usr/bin/true"))
        );
    }
}
