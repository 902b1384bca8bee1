//! `trustline redirect`: the iptables (nat) rules that send a pod's TCP through the sidecar, in
//! the manner of `istio-iptables`. Run it once in the pod's network namespace (an init
//! container with `CAP_NET_ADMIN`, or `ip netns exec`) before the app starts.
//!
//! ```text
//! PREROUTING -p tcp → TRUSTLINE_INBOUND
//!     dport 15020 (admin), the inbound port, --exclude-inbound-ports → RETURN
//!     else → TRUSTLINE_IN_REDIRECT → REDIRECT --to-ports 15006
//! OUTPUT -p tcp → TRUSTLINE_OUTPUT
//!     uid --proxy-uid (and gid --proxy-gid) → RETURN      the sidecar's own connections
//!     -o lo, -d 127.0.0.1/32 → RETURN                     loopback
//!     dport --exclude-outbound-ports → RETURN
//!     else → TRUSTLINE_REDIRECT → REDIRECT --to-ports 15001
//! ```
//!
//! Installing removes any earlier trustline rules first, so running it twice leaves one copy
//! (there is a short window without interception while it does so). The jumps from
//! PREROUTING/OUTPUT are added last, once the chains are complete. `--remove` reads
//! `iptables -t nat -S`, deletes every jump into our chains, then flushes and deletes them;
//! nothing installed is not an error. `--dry-run` prints the commands and touches nothing.
//!
//! **IPv4 only**: IPv6 TCP is not intercepted. Disable IPv6 in the pod (or block it with
//! ip6tables) if it must not bypass the sidecar.
//!
//! Rule generation is pure ([`install_commands`], [`remove_commands`]); only [`run`] executes.

use std::io::Write;
use std::process::Command;

use clap::Args;

/// Chain of inbound decisions (jumped to from PREROUTING).
pub const CHAIN_INBOUND: &str = "TRUSTLINE_INBOUND";
/// Chain holding the inbound REDIRECT.
pub const CHAIN_IN_REDIRECT: &str = "TRUSTLINE_IN_REDIRECT";
/// Chain of outbound decisions (jumped to from OUTPUT).
pub const CHAIN_OUTPUT: &str = "TRUSTLINE_OUTPUT";
/// Chain holding the outbound REDIRECT.
pub const CHAIN_REDIRECT: &str = "TRUSTLINE_REDIRECT";
/// Every chain we own, in creation order.
pub const CHAINS: [&str; 4] = [
    CHAIN_IN_REDIRECT,
    CHAIN_INBOUND,
    CHAIN_REDIRECT,
    CHAIN_OUTPUT,
];
/// The sidecar's admin port: never redirected, so probes and scrapes reach it.
pub const ADMIN_PORT: u16 = 15020;

/// Flags of `trustline redirect`.
#[derive(Args, Debug, Clone)]
pub struct RedirectArgs {
    /// UID the sidecar runs as: its own connections are not redirected (required to install).
    #[arg(long, required_unless_present = "remove")]
    pub proxy_uid: Option<u32>,
    /// GID the sidecar runs as: connections of this group are not redirected either.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port of the sidecar's inbound listener.
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port of the sidecar's transparent outbound listener.
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Inbound destination ports left alone, comma-separated (15020 and the inbound port always are).
    #[arg(long, value_delimiter = ',', value_name = "PORTS", value_parser = clap::value_parser!(u16).range(1..))]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PORTS", value_parser = clap::value_parser!(u16).range(1..))]
    pub exclude_outbound_ports: Vec<u16>,
    /// Remove the rules and chains instead (no error if there are none).
    #[arg(long, conflicts_with_all = ["proxy_uid", "proxy_gid"])]
    pub remove: bool,
    /// Print the iptables commands, one per line, instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// The iptables program (e.g. iptables-legacy).
    #[arg(long, default_value = "iptables", value_name = "PROGRAM")]
    pub iptables: String,
}

/// Errors of `trustline redirect`.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot run `{command}` (is iptables installed and on PATH? see --iptables)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{cause}\n{done} of {total} install commands had run; `trustline redirect --remove` removes what was installed")]
    Partial {
        done: usize,
        total: usize,
        cause: Box<RedirectError>,
    },
    #[error("--proxy-uid is required to install (the sidecar's UID, whose connections are not redirected)")]
    NoProxyUid,
    #[error("writing the output")]
    Output(#[from] std::io::Error),
}

/// What to intercept: the validated options of an install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interception {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Inbound ports not redirected, without duplicates (admin and inbound port included).
    pub exclude_inbound: Vec<u16>,
    /// Outbound ports not redirected, without duplicates.
    pub exclude_outbound: Vec<u16>,
}

impl Interception {
    /// The options of an install from the flags (`--remove` aside).
    pub fn from_args(a: &RedirectArgs) -> Result<Self, RedirectError> {
        let mut exclude_inbound = vec![ADMIN_PORT, a.inbound_port];
        exclude_inbound.extend(&a.exclude_inbound_ports);
        Ok(Interception {
            proxy_uid: a.proxy_uid.ok_or(RedirectError::NoProxyUid)?,
            proxy_gid: a.proxy_gid,
            inbound_port: a.inbound_port,
            outbound_port: a.outbound_port,
            exclude_inbound: dedup(exclude_inbound),
            exclude_outbound: dedup(a.exclude_outbound_ports.clone()),
        })
    }
}

fn dedup(ports: Vec<u16>) -> Vec<u16> {
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// One iptables invocation: the arguments after the program name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesCmd(pub Vec<String>);

impl IptablesCmd {
    /// `-w -t nat` and then `args`: every command waits for the xtables lock.
    fn nat(args: &[&str]) -> Self {
        let mut v: Vec<String> = ["-w", "-t", "nat"].map(String::from).into();
        v.extend(args.iter().map(|s| s.to_string()));
        IptablesCmd(v)
    }

    /// The command line as a shell would need it.
    pub fn shell(&self, program: &str) -> String {
        std::iter::once(program)
            .chain(self.0.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:,=@%+".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The commands that install interception, assuming no trustline chain exists yet.
pub fn install_commands(i: &Interception) -> Vec<IptablesCmd> {
    let (inr, inb, red, out) = (
        CHAIN_IN_REDIRECT,
        CHAIN_INBOUND,
        CHAIN_REDIRECT,
        CHAIN_OUTPUT,
    );
    let mut c = vec![
        format!("-N {inr}"),
        format!("-A {inr} -p tcp -j REDIRECT --to-ports {}", i.inbound_port),
        format!("-N {inb}"),
    ];
    c.extend(
        i.exclude_inbound
            .iter()
            .map(|p| format!("-A {inb} -p tcp --dport {p} -j RETURN")),
    );
    c.extend([
        format!("-A {inb} -p tcp -j {inr}"),
        format!("-N {red}"),
        format!("-A {red} -p tcp -j REDIRECT --to-ports {}", i.outbound_port),
        format!("-N {out}"),
        // The sidecar's own connections (to peers, to the app, to the CA) go out as they are.
        format!("-A {out} -m owner --uid-owner {} -j RETURN", i.proxy_uid),
    ]);
    c.extend(
        i.proxy_gid
            .map(|g| format!("-A {out} -m owner --gid-owner {g} -j RETURN")),
    );
    c.extend([
        format!("-A {out} -o lo -j RETURN"),
        format!("-A {out} -d 127.0.0.1/32 -j RETURN"),
    ]);
    c.extend(
        i.exclude_outbound
            .iter()
            .map(|p| format!("-A {out} -p tcp --dport {p} -j RETURN")),
    );
    c.extend([
        format!("-A {out} -p tcp -j {red}"),
        // Last: interception starts only once the chains are complete.
        format!("-A PREROUTING -p tcp -j {inb}"),
        format!("-A OUTPUT -p tcp -j {out}"),
    ]);
    // No word of these contains a space (chain names and numbers), so splitting is exact.
    c.iter()
        .map(|line| IptablesCmd::nat(&line.split_whitespace().collect::<Vec<_>>()))
        .collect()
}

/// The commands that remove what is installed, given `iptables -t nat -S`: delete every rule of
/// another chain that jumps (or goes) to one of ours, then flush our chains, then delete them.
/// Empty when nothing of ours is there.
pub fn remove_commands(nat_rules: &str) -> Vec<IptablesCmd> {
    let ours = |s: &str| CHAINS.contains(&s);
    let mut jumps = Vec::new();
    let mut present = Vec::new();
    for line in nat_rules.lines() {
        let words = split_words(line);
        match words.first().map(String::as_str) {
            Some("-N") if words.len() == 2 && ours(&words[1]) => present.push(words[1].clone()),
            Some("-A") if words.len() > 1 && !ours(&words[1]) => {
                let into_ours = words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && ours(&w[1]));
                if into_ours {
                    let mut args: Vec<&str> = vec!["-D"];
                    args.extend(words[1..].iter().map(String::as_str));
                    jumps.push(IptablesCmd::nat(&args));
                }
            }
            _ => {}
        }
    }
    let flush = present.iter().map(|c| IptablesCmd::nat(&["-F", c]));
    let delete = present.iter().map(|c| IptablesCmd::nat(&["-X", c]));
    jumps.into_iter().chain(flush).chain(delete).collect()
}

/// What `--remove` runs when the rules are installed exactly once (what `--dry-run` prints).
pub fn remove_installed() -> Vec<IptablesCmd> {
    let mut state = String::new();
    for c in CHAINS {
        state.push_str(&format!("-N {c}\n"));
    }
    state.push_str(&format!("-A PREROUTING -p tcp -j {CHAIN_INBOUND}\n"));
    state.push_str(&format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}\n"));
    remove_commands(&state)
}

/// Splits one line of `iptables -S` into words; double quotes group (iptables quotes comments).
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut in_word) = (false, false);
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => cur.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Runs iptables commands; a trait so the install sequence can be tested without root.
pub trait Iptables {
    /// Runs one command; its stdout on success.
    fn run(&mut self, cmd: &IptablesCmd) -> Result<String, RedirectError>;
}

/// The real iptables, via `std::process::Command`.
pub struct System {
    pub program: String,
}

impl Iptables for System {
    fn run(&mut self, cmd: &IptablesCmd) -> Result<String, RedirectError> {
        let command = cmd.shell(&self.program);
        tracing::debug!(%command, "running");
        let out = Command::new(&self.program)
            .args(&cmd.0)
            .output()
            .map_err(|source| RedirectError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(RedirectError::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Removes what is installed; returns the number of commands run.
fn remove(ipt: &mut dyn Iptables) -> Result<usize, RedirectError> {
    let state = ipt.run(&IptablesCmd::nat(&["-S"]))?;
    let cmds = remove_commands(&state);
    for c in &cmds {
        ipt.run(c)?;
    }
    Ok(cmds.len())
}

/// Carries out `args` with `ipt`, reporting to `out`.
pub fn execute(
    args: &RedirectArgs,
    ipt: &mut dyn Iptables,
    out: &mut dyn Write,
) -> Result<(), RedirectError> {
    let plan = match args.remove {
        true => None,
        false => Some(Interception::from_args(args)?),
    };
    if args.dry_run {
        let cmds = match &plan {
            Some(i) => install_commands(i),
            None => remove_installed(),
        };
        for c in cmds {
            writeln!(out, "{}", c.shell(&args.iptables))?;
        }
        return Ok(());
    }
    let removed = remove(ipt)?;
    let Some(i) = plan else {
        match removed {
            0 => writeln!(out, "no trustline rules were installed")?,
            n => writeln!(out, "removed the trustline rules and chains ({n} commands)")?,
        }
        return Ok(());
    };
    let cmds = install_commands(&i);
    for (done, c) in cmds.iter().enumerate() {
        ipt.run(c).map_err(|e| RedirectError::Partial {
            done,
            total: cmds.len(),
            cause: Box::new(e),
        })?;
    }
    let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    writeln!(
        out,
        "installed {} rules: inbound tcp -> :{} (except ports {}); outbound tcp -> :{} (except uid {}{}, loopback{})",
        cmds.len(),
        i.inbound_port,
        list(&i.exclude_inbound),
        i.outbound_port,
        i.proxy_uid,
        i.proxy_gid.map(|g| format!(", gid {g}")).unwrap_or_default(),
        if i.exclude_outbound.is_empty() {
            String::new()
        } else {
            format!(", ports {}", list(&i.exclude_outbound))
        },
    )?;
    Ok(())
}

/// Runs the command: prints, installs or removes the rules.
pub fn run(args: &RedirectArgs) -> Result<(), RedirectError> {
    let mut ipt = System {
        program: args.iptables.clone(),
    };
    match execute(args, &mut ipt, &mut std::io::stdout().lock()) {
        // `trustline redirect --dry-run | head` is not an error.
        Err(RedirectError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
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
            execute(&no_uid, &mut Fake::default(), &mut Vec::new()),
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

    fn exec(fake: &mut Fake, argv: &[&str]) -> Result<String, RedirectError> {
        let mut out = Vec::new();
        execute(&parse(argv).unwrap(), fake, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn installing_twice_leaves_one_copy_and_remove_is_idempotent() {
        let mut fake = Fake::default();
        fake.rules.push("-A PREROUTING -j DOCKER".into());
        let out = exec(&mut fake, &["--proxy-uid", "1337"]).unwrap();
        assert!(out.starts_with("installed 15 rules"), "{out}");
        let once = fake.rules.clone();
        exec(&mut fake, &["--proxy-uid", "1337"]).unwrap();
        assert_eq!(fake.rules, once);

        let out = exec(&mut fake, &["--remove"]).unwrap();
        assert!(out.starts_with("removed"), "{out}");
        assert_eq!(fake.rules, ["-A PREROUTING -j DOCKER"]);
        let out = exec(&mut fake, &["--remove"]).unwrap();
        assert_eq!(out, "no trustline rules were installed\n");
    }

    #[test]
    fn dry_run_touches_nothing() {
        let mut fake = Fake::default();
        let out = exec(&mut fake, &["--proxy-uid", "1337", "--dry-run"]).unwrap();
        assert_eq!(out.lines().count(), 15);
        assert!(out.lines().all(|l| l.starts_with("iptables -w -t nat ")));
        let out = exec(
            &mut fake,
            &["--remove", "--dry-run", "--iptables", "iptables-legacy"],
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
        assert!(err.contains("`iptables -w -t nat -A TRUSTLINE_OUTPUT -m owner --uid-owner 1337 -j RETURN` failed"), "{err}");
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
}
