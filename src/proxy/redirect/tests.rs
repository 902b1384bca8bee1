//! Rule generation and execution of `trustline redirect`, with a fake iptables (no root needed).

use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: RedirectArgs,
}

fn parse(argv: &[&str]) -> Result<RedirectArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("redirect").chain(argv.iter().copied())).map(|c| c.args)
}

fn lines(cmds: &[IptablesCmd]) -> Vec<String> {
    cmds.iter().map(|c| c.shell("iptables")).collect()
}

fn plan(argv: &[&str]) -> Interception {
    Interception::from_args(&parse(argv).unwrap()).unwrap()
}

#[test]
fn default_install_rules() {
    let got = lines(&install_commands(&plan(&["--proxy-uid", "1337"])));
    let want = [
        "iptables -w -t nat -N TRUSTLINE_IN_REDIRECT",
        "iptables -w -t nat -A TRUSTLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "iptables -w -t nat -N TRUSTLINE_INBOUND",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp --dport 15020 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp --dport 15006 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp -j TRUSTLINE_IN_REDIRECT",
        "iptables -w -t nat -N TRUSTLINE_REDIRECT",
        "iptables -w -t nat -A TRUSTLINE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -w -t nat -N TRUSTLINE_OUTPUT",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -o lo -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -p tcp -j TRUSTLINE_REDIRECT",
        "iptables -w -t nat -A PREROUTING -p tcp -j TRUSTLINE_INBOUND",
        "iptables -w -t nat -A OUTPUT -p tcp -j TRUSTLINE_OUTPUT",
    ];
    assert_eq!(got, want);
}

#[test]
fn options_change_ports_exclusions_and_gid() {
    let p = plan(&[
        "--proxy-uid=1000",
        "--proxy-gid=2000",
        "--inbound-port=16006",
        "--outbound-port=16001",
        "--exclude-inbound-ports=8443,15020,9090,8443",
        "--exclude-outbound-ports",
        "22,5432",
    ]);
    // The admin port and the inbound port are always excluded, each once.
    assert_eq!(p.exclude_inbound, [15020, 16006, 8443, 9090]);
    assert_eq!(p.exclude_outbound, [22, 5432]);
    let got = lines(&install_commands(&p));
    for want in [
        "iptables -w -t nat -A TRUSTLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp --dport 16006 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp --dport 8443 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_INBOUND -p tcp --dport 9090 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -m owner --uid-owner 1000 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -m owner --gid-owner 2000 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -p tcp --dport 22 -j RETURN",
        "iptables -w -t nat -A TRUSTLINE_OUTPUT -p tcp --dport 5432 -j RETURN",
    ] {
        assert_eq!(got.iter().filter(|l| **l == want).count(), 1, "{want}");
    }
    assert_eq!(got.iter().filter(|l| l.contains("--dport 8443")).count(), 1);
    // Exclusions come before the catch-all redirect of their chain.
    let pos = |s: &str| got.iter().position(|l| l.ends_with(s)).unwrap();
    assert!(pos("--dport 5432 -j RETURN") < pos("-p tcp -j TRUSTLINE_REDIRECT"));
    assert!(pos("--dport 9090 -j RETURN") < pos("-p tcp -j TRUSTLINE_IN_REDIRECT"));
}

#[test]
fn jumps_are_added_after_the_chains_are_complete() {
    let got = lines(&install_commands(&plan(&["--proxy-uid", "1"])));
    let first_jump = got
        .iter()
        .position(|l| l.contains(" PREROUTING ") || l.contains(" OUTPUT "))
        .unwrap();
    assert_eq!(first_jump, got.len() - 2);
}

#[test]
fn flags_are_checked() {
    let err = parse(&[]).unwrap_err().to_string();
    assert!(err.contains("--proxy-uid"), "{err}");
    assert!(parse(&["--remove"]).is_ok());
    assert!(parse(&["--remove", "--proxy-uid", "1"]).is_err());
    assert!(parse(&["--proxy-uid", "1", "--inbound-port", "0"]).is_err());
    assert!(parse(&["--proxy-uid", "1", "--exclude-inbound-ports", "80,x"]).is_err());
    assert!(parse(&["--proxy-uid", "1", "--exclude-outbound-ports", "70000"]).is_err());
    let mut no_uid = parse(&["--remove"]).unwrap();
    no_uid.remove = false;
    assert!(matches!(
        Interception::from_args(&no_uid),
        Err(RedirectError::NoProxyUid)
    ));
    assert!(matches!(
        execute(
            &no_uid,
            &mut Fake::default(),
            &mut Fake::default(),
            &mut Vec::new()
        ),
        Err(RedirectError::NoProxyUid)
    ));
}

const INSTALLED: &str = "\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N DOCKER
-N TRUSTLINE_INBOUND
-N TRUSTLINE_IN_REDIRECT
-N TRUSTLINE_OUTPUT
-N TRUSTLINE_REDIRECT
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -j TRUSTLINE_INBOUND
-A OUTPUT -p tcp -j TRUSTLINE_OUTPUT
-A OUTPUT -p tcp -m comment --comment \"to \\\"trustline\\\" twice\" -j TRUSTLINE_OUTPUT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A TRUSTLINE_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A TRUSTLINE_INBOUND -p tcp -j TRUSTLINE_IN_REDIRECT
-A TRUSTLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRUSTLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRUSTLINE_OUTPUT -p tcp -j TRUSTLINE_REDIRECT
-A TRUSTLINE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
";

#[test]
fn removal_deletes_every_jump_then_flushes_then_deletes_chains() {
    let cmds = remove_commands(INSTALLED);
    let mut want = vec![
        "iptables -w -t nat -D PREROUTING -p tcp -j TRUSTLINE_INBOUND".to_string(),
        "iptables -w -t nat -D OUTPUT -p tcp -j TRUSTLINE_OUTPUT".to_string(),
        "iptables -w -t nat -D OUTPUT -p tcp -m comment --comment 'to \"trustline\" twice' -j TRUSTLINE_OUTPUT".to_string(),
    ];
    for c in [
        "TRUSTLINE_INBOUND",
        "TRUSTLINE_IN_REDIRECT",
        "TRUSTLINE_OUTPUT",
        "TRUSTLINE_REDIRECT",
    ] {
        want.push(format!("iptables -w -t nat -F {c}"));
    }
    for c in [
        "TRUSTLINE_INBOUND",
        "TRUSTLINE_IN_REDIRECT",
        "TRUSTLINE_OUTPUT",
        "TRUSTLINE_REDIRECT",
    ] {
        want.push(format!("iptables -w -t nat -X {c}"));
    }
    assert_eq!(lines(&cmds), want);
    // The quoted comment reaches iptables as one argument, unquoted.
    assert!(cmds[2].0.contains(&"to \"trustline\" twice".to_string()));
}

#[test]
fn removal_of_nothing_is_nothing() {
    let clean = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N DOCKER\n-A PREROUTING -j DOCKER\n";
    assert!(remove_commands(clean).is_empty());
    assert!(remove_commands("").is_empty());
    // A half-installed state: only what exists is removed.
    assert_eq!(
        lines(&remove_commands(
            "-N TRUSTLINE_OUTPUT\n-A TRUSTLINE_OUTPUT -o lo -j RETURN\n"
        )),
        [
            "iptables -w -t nat -F TRUSTLINE_OUTPUT",
            "iptables -w -t nat -X TRUSTLINE_OUTPUT"
        ]
    );
}

#[test]
fn dry_run_removal_is_the_full_sequence() {
    let got = lines(&remove_installed());
    assert_eq!(got.len(), 2 + 4 + 4);
    assert_eq!(
        got[0],
        "iptables -w -t nat -D PREROUTING -p tcp -j TRUSTLINE_INBOUND"
    );
    assert_eq!(
        got[1],
        "iptables -w -t nat -D OUTPUT -p tcp -j TRUSTLINE_OUTPUT"
    );
    assert!(got[2..6].iter().all(|l| l.contains(" -F TRUSTLINE_")));
    assert!(got[6..].iter().all(|l| l.contains(" -X TRUSTLINE_")));
}

#[test]
fn shell_quoting() {
    assert_eq!(shell_quote("127.0.0.1/32"), "127.0.0.1/32");
    assert_eq!(shell_quote("a b"), "'a b'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
    assert_eq!(shell_quote(""), "''");
    assert_eq!(
        split_words(r#"-A X -m comment --comment "a \"b\" c" -j Y"#),
        [
            "-A",
            "X",
            "-m",
            "comment",
            "--comment",
            "a \"b\" c",
            "-j",
            "Y"
        ]
    );
}

/// An iptables that keeps `-N`/`-A` lines like `-S` would print them.
#[derive(Default)]
struct Fake {
    rules: Vec<String>,
    ran: Vec<String>,
    fail_on: Option<String>,
}

impl Iptables for Fake {
    fn run(&mut self, cmd: &IptablesCmd) -> Result<String, RedirectError> {
        let line = cmd.shell("iptables");
        self.ran.push(line.clone());
        if self.fail_on.as_deref().is_some_and(|f| line.contains(f)) {
            return Err(RedirectError::Failed {
                command: line,
                status: "exit status: 1".into(),
                stderr: "iptables: No chain/target/match by that name.".into(),
            });
        }
        let args = &cmd.0[3..];
        let rest = args[1..].join(" ");
        match args[0].as_str() {
            "-S" => return Ok(self.rules.iter().map(|r| format!("{r}\n")).collect()),
            "-N" => self.rules.push(format!("-N {rest}")),
            "-A" => self.rules.push(format!("-A {rest}")),
            "-D" => {
                let at = self
                    .rules
                    .iter()
                    .position(|r| *r == format!("-A {rest}"))
                    .unwrap();
                self.rules.remove(at);
            }
            "-F" => self
                .rules
                .retain(|r| !r.starts_with(&format!("-A {rest} "))),
            "-X" => self.rules.retain(|r| *r != format!("-N {rest}")),
            other => panic!("unexpected {other}"),
        }
        Ok(String::new())
    }
}

/// Runs `argv` with `fake` as iptables (IPv4) and a fake ip6tables that is thrown away.
fn exec(fake: &mut Fake, argv: &[&str]) -> Result<String, RedirectError> {
    exec_both(fake, &mut Fake::default(), argv)
}

fn exec_both(fake: &mut Fake, fake6: &mut Fake, argv: &[&str]) -> Result<String, RedirectError> {
    let mut out = Vec::new();
    execute(&parse(argv).unwrap(), fake, fake6, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn installing_twice_leaves_one_copy_and_remove_is_idempotent() {
    let mut fake = Fake::default();
    fake.rules.push("-A PREROUTING -j DOCKER".into());
    let out = exec(&mut fake, &["--proxy-uid", "1337"]).unwrap();
    assert!(out.starts_with("IPv4: installed 15 rules"), "{out}");
    let once = fake.rules.clone();
    exec(&mut fake, &["--proxy-uid", "1337"]).unwrap();
    assert_eq!(fake.rules, once);

    let out = exec(&mut fake, &["--remove"]).unwrap();
    assert!(out.starts_with("IPv4: removed"), "{out}");
    assert_eq!(fake.rules, ["-A PREROUTING -j DOCKER"]);
    let out = exec(&mut fake, &["--remove"]).unwrap();
    assert_eq!(
        out,
        "IPv4: no trustline rules were installed\nIPv6: no trustline rules were installed\n"
    );
}

#[test]
fn dry_run_touches_nothing() {
    let mut fake = Fake::default();
    let out = exec(&mut fake, &["--proxy-uid", "1337", "--dry-run"]).unwrap();
    assert_eq!(out.lines().count(), 30);
    assert!(out
        .lines()
        .take(15)
        .all(|l| l.starts_with("iptables -w -t nat ")));
    assert!(out
        .lines()
        .skip(15)
        .all(|l| l.starts_with("ip6tables -w -t nat ")));
    let out = exec(
        &mut fake,
        &[
            "--remove",
            "--dry-run",
            "--iptables",
            "iptables-legacy",
            "--ipv6",
            "off",
        ],
    )
    .unwrap();
    assert!(out
        .lines()
        .all(|l| l.starts_with("iptables-legacy -w -t nat ")));
    assert!(fake.ran.is_empty());
}

#[test]
fn a_failure_names_the_command_and_what_was_done() {
    let mut fake = Fake {
        fail_on: Some("--uid-owner".into()),
        ..Fake::default()
    };
    let err = exec(&mut fake, &["--proxy-uid", "1337"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "`iptables -w -t nat -A TRUSTLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN` failed"
        ),
        "{err}"
    );
    assert!(err.contains("No chain/target/match"), "{err}");
    assert!(err.contains("9 of 15 install commands had run"), "{err}");
    assert!(err.contains("--remove"), "{err}");
}

#[test]
fn a_missing_program_is_named() {
    let mut sys = System {
        program: "/nonexistent/iptables".into(),
    };
    let err = sys.run(&IptablesCmd::nat(&["-S"])).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/iptables -w -t nat -S"), "{err}");
    assert!(err.contains("--iptables"), "{err}");
}

/// The annotated pod example uses the ports these rules redirect to.
#[test]
fn pod_example_matches_the_redirect_defaults() {
    use crate::identity::parse_trust_domain;
    use crate::proxy::config::SidecarConfig;
    use std::path::Path;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("example.org").unwrap();
    let root = dir.path().join("root");
    crate::ca::authority::init_root(&td, &root, Duration::from_secs(3600), false).unwrap();
    std::fs::copy(root.join("bundle.pem"), dir.path().join("bundle.pem")).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecar-pod.toml");
    let file = dir.path().join("sidecar-pod.toml");
    std::fs::copy(&example, &file).unwrap();
    let c = SidecarConfig::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let a = parse(&["--proxy-uid", "1337"]).unwrap();
    assert_eq!(c.outbound.unwrap().0.port(), a.outbound_port);
    assert_eq!(c.inbound.unwrap().listen.port(), a.inbound_port);
    assert_eq!(c.admin.port(), ADMIN_PORT);
}

/// F11: the IPv6 rules are the IPv4 ones with the IPv6 loopback, run by ip6tables.
#[test]
fn ipv6_rules_mirror_the_ipv4_ones() {
    let p = plan(&["--proxy-uid", "1337", "--exclude-inbound-ports", "8001"]);
    let v4 = lines(&install_commands_for(&p, Family::V4));
    let v6 = lines(&install_commands_for(&p, Family::V6));
    let want: Vec<String> = v4
        .iter()
        .map(|l| l.replace("-d 127.0.0.1/32", "-d ::1/128"))
        .collect();
    assert_eq!(v6, want);
    assert!(v6.contains(&"iptables -w -t nat -A TRUSTLINE_OUTPUT -d ::1/128 -j RETURN".to_string()));
    assert!(v6.contains(
        &"iptables -w -t nat -A TRUSTLINE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
            .to_string()
    ));
    assert!(
        v6.contains(&"iptables -w -t nat -A PREROUTING -p tcp -j TRUSTLINE_INBOUND".to_string())
    );
}

/// F11: an install intercepts IPv6 by default; `--ipv6 off` must be said to skip it.
#[test]
fn install_and_removal_cover_ipv6_unless_told_off() {
    let (mut v4, mut v6) = (Fake::default(), Fake::default());
    let out = exec_both(&mut v4, &mut v6, &["--proxy-uid", "1337"]).unwrap();
    assert!(out.contains("IPv4: installed 15 rules"), "{out}");
    assert!(out.contains("IPv6: installed 15 rules"), "{out}");
    assert!(v6
        .rules
        .contains(&"-A PREROUTING -p tcp -j TRUSTLINE_INBOUND".to_string()));
    assert!(v6
        .rules
        .contains(&"-A OUTPUT -p tcp -j TRUSTLINE_OUTPUT".to_string()));
    assert!(v6
        .rules
        .contains(&"-A TRUSTLINE_OUTPUT -d ::1/128 -j RETURN".to_string()));
    exec_both(&mut v4, &mut v6, &["--remove"]).unwrap();
    assert!(v4.rules.is_empty() && v6.rules.is_empty(), "{:?}", v6.rules);

    let (mut v4, mut v6) = (Fake::default(), Fake::default());
    exec_both(&mut v4, &mut v6, &["--proxy-uid", "1337", "--ipv6", "off"]).unwrap();
    assert_eq!(v4.rules.len(), 15);
    assert!(v6.ran.is_empty());
    assert!(parse(&["--proxy-uid", "1", "--ipv6", "maybe"]).is_err());
}

/// F11: a failing ip6tables (no IPv6 NAT in the kernel, say) fails the install; it does not
/// leave IPv6 open silently.
#[test]
fn a_failing_ip6tables_fails_the_install() {
    let mut v4 = Fake::default();
    let mut v6 = Fake {
        fail_on: Some("-N TRUSTLINE_IN_REDIRECT".into()),
        ..Fake::default()
    };
    let err = exec_both(&mut v4, &mut v6, &["--proxy-uid", "1337"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 of 15 install commands had run"), "{err}");
}

#[test]
fn ipv6_addresses_other_than_loopback_are_named() {
    let text = "\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
";
    assert_eq!(
        ipv6_addresses(text),
        ["fe80::fc:ff:fe00:1%eth0", "fd00::2%eth0"]
    );
    assert!(ipv6_addresses("00000000000000000000000000000001 01 80 10 80 lo\n").is_empty());
    assert!(ipv6_addresses("").is_empty());
}
