//! `trustline redirect`: the iptables rules that send a pod's TCP through the sidecar.

use trustline::proxy::redirect::RedirectArgs;

/// Installs, prints or removes the rules.
pub fn run(a: &RedirectArgs) -> anyhow::Result<()> {
    trustline::proxy::redirect::run(a).map_err(Into::into)
}
