//! `userdm`: dmsetup's command line for userdm's user-space device-mapper.
//!
//! The binary is glue: [`cli`] defines the command line, [`commands`] finds each device's
//! server through the run directory and sends it control requests (crate `userdm-control`),
//! and [`output`] prints the answers in dmsetup's formats. The same binary is also every
//! device's server (`userdm __serve`, started by `create`; see [`serve`]).
//!
//! Exit status: 0 on success, 1 when a command failed, 2 on a usage error.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cli;
mod commands;
mod exports;
mod output;
mod serve;
mod ublk_verbs;

use std::process::ExitCode;

use clap::Parser;

/// A usage error found after parsing (conflicting or missing input): exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Standard output went away (`userdm ls | head -0`): not an error.
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("broken pipe")
    }
}

impl std::error::Error for BrokenPipe {}

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and --version exit 0, usage errors 2 (clap's convention and ours).
        Err(e) => e.exit(),
    };
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BrokenPipe>().is_some() => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("userdm: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("userdm: {e:#}");
            ExitCode::from(1)
        }
    }
}
