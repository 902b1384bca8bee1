//! `trustline redirect`: the iptables (nat) rules that send a pod's TCP through the sidecar.
//! (Being written; see the redirect issue notes.)

use clap::Args;

/// Flags of `trustline redirect`.
#[derive(Args, Debug, Clone)]
pub struct RedirectArgs {
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Errors of `trustline redirect`.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs the command.
pub fn run(_args: &RedirectArgs) -> Result<(), RedirectError> {
    Err(RedirectError::NotImplemented)
}
