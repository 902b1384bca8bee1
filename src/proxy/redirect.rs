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
//! **IPv6** is intercepted the same way (`--ipv6 on`, the default): the same chains and rules
//! are installed with ip6tables (loopback is `::1/128`), so IPv6 TCP cannot bypass the sidecar.
//! A sidecar listening on IPv4 only then refuses redirected IPv6 connections (nothing listens on
//! the IPv6 side of its ports) rather than letting them through; listen on `[::]` to carry them.
//! `--ipv6 off` installs the IPv4 rules only, for pods without IPv6 (or without ip6tables); it
//! must be said explicitly, and even then the pod's non-loopback IPv6 addresses, if it has any,
//! are named in a warning. UDP is never intercepted (the mesh carries TCP).
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
    /// Intercept IPv6 too, with ip6tables (`on`), or IPv4 only (`off`: IPv6 TCP then bypasses
    /// the sidecar, so say it only for pods without IPv6).
    #[arg(long, default_value = "on", value_parser = ["on", "off"], value_name = "on|off")]
    pub ipv6: String,
    /// The ip6tables program (e.g. ip6tables-legacy).
    #[arg(long, default_value = "ip6tables", value_name = "PROGRAM")]
    pub ip6tables: String,
}

/// An address family and what differs between its rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The loopback network, never redirected on the way out.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
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

/// The IPv4 commands that install interception, assuming no trustline chain exists yet.
pub fn install_commands(i: &Interception) -> Vec<IptablesCmd> {
    install_commands_for(i, Family::V4)
}

/// The commands of one family (run with iptables or ip6tables) that install interception.
pub fn install_commands_for(i: &Interception, family: Family) -> Vec<IptablesCmd> {
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
        format!("-A {out} -d {} -j RETURN", family.loopback()),
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

/// The pod's IPv6 addresses other than loopback, from `/proc/net/if_inet6` text (32 hex digits,
/// then index, prefix length, scope, flags and the interface), as `address%interface`.
pub fn ipv6_addresses(if_inet6: &str) -> Vec<String> {
    if_inet6
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (hex, dev) = (w.first()?, w.last()?);
            let bits = u128::from_str_radix(hex, 16).ok()?;
            let addr = std::net::Ipv6Addr::from(bits);
            (!addr.is_loopback()).then(|| format!("{addr}%{dev}"))
        })
        .collect()
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

/// Carries out `args` with `ipt` (IPv4) and `ipt6` (IPv6, unless `--ipv6 off`), reporting to
/// `out`. IPv4 is done first, then IPv6, each complete before the other starts.
pub fn execute(
    args: &RedirectArgs,
    ipt: &mut dyn Iptables,
    ipt6: &mut dyn Iptables,
    out: &mut dyn Write,
) -> Result<(), RedirectError> {
    let mut families: Vec<(Family, &mut dyn Iptables, &str)> =
        vec![(Family::V4, ipt, &args.iptables)];
    if args.ipv6 == "on" {
        families.push((Family::V6, ipt6, &args.ip6tables));
    }
    for (family, ipt, program) in families {
        execute_family(args, family, ipt, program, out)?;
    }
    Ok(())
}

/// [`execute`] for one family.
fn execute_family(
    args: &RedirectArgs,
    family: Family,
    ipt: &mut dyn Iptables,
    program: &str,
    out: &mut dyn Write,
) -> Result<(), RedirectError> {
    let plan = match args.remove {
        true => None,
        false => Some(Interception::from_args(args)?),
    };
    if args.dry_run {
        let cmds = match &plan {
            Some(i) => install_commands_for(i, family),
            None => remove_installed(),
        };
        for c in cmds {
            writeln!(out, "{}", c.shell(program))?;
        }
        return Ok(());
    }
    let name = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let removed = remove(ipt)?;
    let Some(i) = plan else {
        match removed {
            0 => writeln!(out, "{name}: no trustline rules were installed")?,
            n => writeln!(
                out,
                "{name}: removed the trustline rules and chains ({n} commands)"
            )?,
        }
        return Ok(());
    };
    let installed = install(&i, family, ipt)?;
    report_installed(out, name, installed, &i)
}

/// Installs the rules of `i` for `family`; returns how many commands ran.
fn install(
    i: &Interception,
    family: Family,
    ipt: &mut dyn Iptables,
) -> Result<usize, RedirectError> {
    let cmds = install_commands_for(i, family);
    for (done, c) in cmds.iter().enumerate() {
        ipt.run(c).map_err(|e| RedirectError::Partial {
            done,
            total: cmds.len(),
            cause: Box::new(e),
        })?;
    }
    Ok(cmds.len())
}

/// The line that says what `install` put in place (`rules` commands).
fn report_installed(
    out: &mut dyn Write,
    name: &str,
    rules: usize,
    i: &Interception,
) -> Result<(), RedirectError> {
    let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    writeln!(
        out,
        "{name}: installed {} rules: inbound tcp -> :{} (except ports {}); outbound tcp -> :{} (except uid {}{}, loopback{})",
        rules,
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
    let mut ipt6 = System {
        program: args.ip6tables.clone(),
    };
    if args.ipv6 == "off" && !args.remove {
        let exposed =
            ipv6_addresses(&std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default());
        if !exposed.is_empty() {
            eprintln!(
                "WARNING: --ipv6 off: IPv6 TCP is NOT intercepted, and this network namespace has IPv6 addresses ({}): \
                 IPv6 traffic to and from them bypasses the sidecar (no mTLS, no policy). Use --ipv6 on, or remove them.",
                exposed.join(", ")
            );
        }
    }
    match execute(args, &mut ipt, &mut ipt6, &mut std::io::stdout().lock()) {
        // `trustline redirect --dry-run | head` is not an error.
        Err(RedirectError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests;
