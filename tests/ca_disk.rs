//! The CA's data directory on a failing disk: full (a small tmpfs the test mounts and fills), and
//! read-only (an ext4 image on that tmpfs, forced read-only by an injected filesystem error as
//! `errors=remount-ro` does on a real disk error).
//!
//! What must hold: SVID requests get `503` naming the reason, the server keeps serving (the
//! bundle, the refusals), nothing already issued is lost and no serial is issued twice; once
//! space returns the CA issues again by itself, without a restart; after a read-only disk is
//! repaired (fsck, mounted again) the ledger opens with every serial a client received.
//!
//! Mounting needs root, so the tests are `#[ignore]`d for `cargo test`; CI runs them as root
//! with `cargo test --test ca_disk -- --ignored`, and without root they fail, never pass.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use common::{id, Pki, PATIENCE, TD};
use trustline::ca::config::CaServeConfig;
use trustline::ca::ledger::{Ledger, RedbLedger};
use trustline::clock::Clock;
use trustline::identity::Svid;
use trustline::svid::ca_client::{CaClient, ClientError};

/// Most renewals tried on a full disk before the ledger must have refused one.
const MAX_TRIES: usize = 400;
/// Renewals tried while the disk stays full: their audit lines overflow any page's slack.
const STILL_FULL_TRIES: usize = 40;

fn require_root() {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .expect("running id -u");
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        uid, "0",
        "this test mounts filesystems and needs root (CI runs it as root); run it with sudo"
    );
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted (lazily) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cachaos-tmpfs-")
            .tempdir()
            .expect("mount point");
        let target = dir.path().to_str().expect("utf-8 path");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                target,
            ],
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the filesystem refuses (ENOSPC), down to single bytes, so that no free
/// page is left; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("filler file");
    let mut written = 0u64;
    for chunk in [1 << 20, 1 << 12, 1] {
        let buf = vec![0x5a_u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "filling: {e}");
                    break;
                }
            }
        }
    }
    written
}

/// A CA with its data directory at `data` (PKI and CA key elsewhere), on the system clock.
async fn start_ca(pki: &Pki, data: &Path) -> trustline::ca::server::Bound {
    let config = CaServeConfig {
        ca_dir: pki.region.clone(),
        data_dir: data.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: Duration::from_secs(3600),
        san: vec![],
        metrics_listen: None,
        audit_log: None,
        bundle_endpoint: None,
        rate_limit: 0,
        peers: Default::default(),
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: std::time::Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
    };
    trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts")
}

fn client(pki: &Pki, ca: &trustline::ca::server::Bound) -> CaClient {
    CaClient::new(
        &format!("https://{}", ca.api),
        pki.bundle(),
        Clock::system(),
    )
    .expect("client")
}

/// What a renewal attempt got.
enum Attempt {
    Renewed(Svid),
    /// `503`: the error code and detail.
    Unavailable(String, String),
}

async fn renew(client: &CaClient, svid: &Svid) -> Attempt {
    match client.renew(svid).await {
        Ok(s) => Attempt::Renewed(s),
        Err(ClientError::Refused {
            status,
            error,
            detail,
        }) if status.as_u16() == 503 => Attempt::Unavailable(error, detail),
        Err(e) => panic!("a renewal on a failing disk must succeed or get 503, got: {e}"),
    }
}

/// Renews until the CA refuses with 503 (at most [`MAX_TRIES`]); every SVID received goes to
/// `serials`. Returns the last good SVID and the refusal's detail.
async fn renew_until_refused(
    client: &CaClient,
    mut svid: Svid,
    serials: &mut Vec<String>,
) -> (Svid, String) {
    for _ in 0..MAX_TRIES {
        match renew(client, &svid).await {
            Attempt::Renewed(s) => {
                serials.push(s.info.serial.to_string());
                svid = s;
            }
            Attempt::Unavailable(error, detail) => {
                assert_eq!(error, "unavailable", "error code of a ledger failure");
                return (svid, detail);
            }
        }
    }
    panic!("{MAX_TRIES} renewals on a full disk and the ledger never refused one");
}

/// Every serial in `received` is in the ledger; none was received twice.
async fn check_recorded(ledger: &dyn Ledger, received: &[String]) {
    let issued: HashSet<String> = ledger
        .issued()
        .await
        .expect("reading the ledger")
        .into_iter()
        .map(|(s, _)| s.to_string())
        .collect();
    let mut seen = HashSet::new();
    for s in received {
        assert!(seen.insert(s), "serial {s} received twice");
        assert!(
            issued.contains(s),
            "serial {s} was answered but is not in the ledger"
        );
    }
}

/// Opens the ledger of a stopped CA (its writer thread may hold the file a moment longer).
async fn open_ledger(path: &Path) -> RedbLedger {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match RedbLedger::open(path) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline && e.to_string().contains("already open") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the ledger {} does not open: {e}", path.display()),
        }
    }
}

/// Every line of the audit log is one JSON object (a torn line would swallow the next event).
fn check_audit(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).expect("audit log");
    for (n, line) in text.lines().enumerate() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| {
            panic!(
                "audit line {} is not one JSON object ({e}): {line:?}",
                n + 1
            )
        });
    }
    text.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a tmpfs (CI: cargo test --test ca_disk -- --ignored)"]
async fn a_full_disk_gets_503_loses_nothing_and_recovers_without_a_restart() {
    require_root();
    let pki = Pki::new(TD);
    let fs = Tmpfs::mount("8m");
    let data = fs.path().join("data");
    let ca = start_ca(&pki, &data).await;
    let client = client(&pki, &ca);
    let token = trustline::ca::admin::token(&ca.admin_socket, &id("web").to_string(), 900)
        .await
        .expect("token");
    let first = client
        .issue_with_token(&id("web"), &token)
        .await
        .expect("issue");
    let mut serials = vec![first.info.serial.to_string()];

    let late = trustline::ca::admin::token(&ca.admin_socket, &id("late").to_string(), 900)
        .await
        .expect("token");

    let filler = fs.path().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the tmpfs with {filled} bytes");
    let (last, detail) = renew_until_refused(&client, first, &mut serials).await;
    eprintln!("after {} renewals: 503 {detail}", serials.len() - 1);
    assert!(
        detail.contains("No space left on device"),
        "the refusal must name the reason: {detail}"
    );
    // Still full: refused again (each refusal an audit line the disk has no room for, which
    // must not tear the log), and the server keeps serving what needs no disk.
    for _ in 0..STILL_FULL_TRIES {
        match renew(&client, &last).await {
            Attempt::Renewed(s) => serials.push(s.info.serial.to_string()),
            Attempt::Unavailable(..) => {}
        }
    }
    client
        .fetch_bundle_pem()
        .await
        .expect("bundle on a full disk");
    // A join token refused while the disk is full is not spent: nothing was recorded. (A write
    // may also succeed: the ledger file can hold free pages of the transactions that failed.)
    let late_spent = match client.issue_with_token(&id("late"), &late).await {
        Err(ClientError::Refused { status, .. }) if status.as_u16() == 503 => false,
        Ok(svid) => {
            serials.push(svid.info.serial.to_string());
            true
        }
        other => panic!("a first issuance on a full disk: expected 503 or an SVID, got {other:?}"),
    };
    if let Err(e) = trustline::ca::admin::token(&ca.admin_socket, &id("db").to_string(), 900).await
    {
        let why = e.to_string();
        assert!(why.contains("No space left on device"), "{why}");
    }

    // Space returns: the same server issues again, by itself.
    std::fs::remove_file(&filler).expect("removing the filler");
    let freed = Instant::now();
    let deadline = freed + PATIENCE;
    let mut svid = last;
    let recovered = loop {
        match renew(&client, &svid).await {
            Attempt::Renewed(s) => break s,
            Attempt::Unavailable(_, detail) => {
                assert!(Instant::now() < deadline, "no recovery: {detail}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    eprintln!(
        "space back: renewed again {:?} after the filler was removed",
        freed.elapsed()
    );
    serials.push(recovered.info.serial.to_string());
    svid = recovered;
    for _ in 0..5 {
        let Attempt::Renewed(s) = renew(&client, &svid).await else {
            panic!("refused again with space back");
        };
        serials.push(s.info.serial.to_string());
        svid = s;
    }
    let token = trustline::ca::admin::token(&ca.admin_socket, &id("db").to_string(), 900)
        .await
        .expect("a token once space is back");
    let db = client
        .issue_with_token(&id("db"), &token)
        .await
        .expect("issue");
    serials.push(db.info.serial.to_string());
    if !late_spent {
        let late_svid = client
            .issue_with_token(&id("late"), &late)
            .await
            .expect("the token refused on the full disk is still good");
        serials.push(late_svid.info.serial.to_string());
    }
    match client.issue_with_token(&id("late"), &late).await {
        Err(ClientError::Refused { status, .. }) if status.as_u16() == 401 => {}
        other => panic!("the token was spent once space returned: expected 401, got {other:?}"),
    }
    check_recorded(ca.state.ledger.as_ref(), &serials).await;

    // And on disk, read by a fresh open after the server is gone.
    let audit = data.join("audit.log");
    ca.drain(Duration::from_secs(5)).await;
    ca.state.audit.flush();
    drop(ca);
    let ledger = open_ledger(&data.join("ledger.redb")).await;
    check_recorded(&ledger, &serials).await;
    let lines = check_audit(&audit);
    eprintln!(
        "{} serials recorded, {lines} audit lines, all whole",
        serials.len()
    );
}

/// An ext4 image on a tmpfs, loop-mounted with `errors=remount-ro`.
struct Ext4 {
    _backing: Tmpfs,
    image: PathBuf,
    mnt: PathBuf,
}

impl Ext4 {
    fn new() -> Self {
        let backing = Tmpfs::mount("48m");
        let image = backing.path().join("disk.img");
        let mnt = backing.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        run("truncate", &["-s", "32M", image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let me = Ext4 {
            _backing: backing,
            image,
            mnt,
        };
        me.mount();
        me
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        );
    }

    /// Injects a filesystem error: ext4 turns the filesystem read-only at once, under every
    /// open file, as it does on a real I/O error.
    fn break_it(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.mnt)
            .output()
            .expect("findmnt");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let name = Path::new(&dev).file_name().expect("loop device name");
        let knob = Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("{}: {e}", knob.display()));
    }

    /// Unmounts, repairs with e2fsck and mounts again (what an operator does).
    fn repair(&self) {
        run("umount", &[self.mnt.to_str().unwrap()]);
        // 0: clean, 1: errors corrected.
        let st = Command::new("e2fsck")
            .args(["-fy", self.image.to_str().unwrap()])
            .output()
            .expect("e2fsck");
        assert!(
            matches!(st.status.code(), Some(0 | 1)),
            "e2fsck: {}",
            String::from_utf8_lossy(&st.stdout)
        );
        self.mount();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a loop ext4 filesystem (CI: cargo test --test ca_disk -- --ignored)"]
async fn a_read_only_disk_gets_503_and_the_ledger_survives_the_repair() {
    require_root();
    let pki = Pki::new(TD);
    let disk = Ext4::new();
    let data = disk.mnt.join("data");
    let ca = start_ca(&pki, &data).await;
    let client = client(&pki, &ca);
    let token = trustline::ca::admin::token(&ca.admin_socket, &id("web").to_string(), 900)
        .await
        .expect("token");
    let mut svid = client
        .issue_with_token(&id("web"), &token)
        .await
        .expect("issue");
    let mut serials = vec![svid.info.serial.to_string()];
    for _ in 0..5 {
        let Attempt::Renewed(s) = renew(&client, &svid).await else {
            panic!("refused on a healthy disk");
        };
        serials.push(s.info.serial.to_string());
        svid = s;
    }

    disk.break_it();
    for _ in 0..5 {
        match renew(&client, &svid).await {
            Attempt::Renewed(s) => panic!("renewed {} on a read-only disk", s.info.serial),
            Attempt::Unavailable(error, detail) => {
                assert_eq!(error, "unavailable");
                assert!(
                    detail.contains("Read-only file system"),
                    "the refusal must name the reason: {detail}"
                );
            }
        }
    }
    client
        .fetch_bundle_pem()
        .await
        .expect("bundle on a read-only disk");
    ca.drain(Duration::from_secs(5)).await;
    drop(ca);

    // Repaired: the ledger holds everything answered, and a new CA issues fresh serials.
    disk.repair();
    {
        let ledger = open_ledger(&data.join("ledger.redb")).await;
        check_recorded(&ledger, &serials).await;
    }
    let ca = start_ca(&pki, &data).await;
    let client = self::client(&pki, &ca);
    let Attempt::Renewed(s) = renew(&client, &svid).await else {
        panic!("no renewal after the repair");
    };
    serials.push(s.info.serial.to_string());
    check_recorded(ca.state.ledger.as_ref(), &serials).await;
    ca.drain(Duration::from_secs(5)).await;
}
