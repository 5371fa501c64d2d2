//! `userdm __serve`: the device server, started by `create`.

use std::sync::Arc;

use anyhow::Result;
use userdm_control::proto::CreateConfig;
use userdm_control::rundir::RunDir;
use userdm_control::server::{detach, serve as serve_device, TableEvents};
use userdm_targets::{AnyTarget, TargetContext};

use crate::cli::ServeArgs;

/// Runs the server of device `args.id` until the device is removed.
pub fn serve(args: ServeArgs) -> Result<()> {
    detach();
    let run = RunDir::new(args.run_dir);
    let make_ctx = |config: &CreateConfig, events: TableEvents| {
        TargetContext::new()
            .with_read_only(config.read_only)
            .with_event_hook(Arc::new(move || events.raise()))
    };
    let exports = crate::exports::Exports;
    serve_device::<AnyTarget>(&run, args.id, &make_ctx, &exports)?;
    Ok(())
}
