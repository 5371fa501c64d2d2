//! `userdm __serve`: the device server, started by `create`.

use std::sync::Arc;

use anyhow::Result;
use userdm_control::proto::CreateConfig;
use userdm_control::rundir::RunDir;
use userdm_control::server::{detach, serve as serve_device, TableEvents};
use userdm_targets::{AnyTarget, MemoryStores, TargetContext, UserTargetContext};

use crate::cli::ServeArgs;

/// Runs the server of device `args.id` until the device is removed.
pub fn serve(args: ServeArgs) -> Result<()> {
    detach();
    let run = RunDir::new(args.run_dir);
    // One registry for every table this device loads, so a reload keeps `memory` rows' data.
    let memory_stores = Arc::new(MemoryStores::default());
    let make_ctx = |config: &CreateConfig, events: TableEvents| {
        // dm-user endpoints belong to the device's owner, so the daemon can run as that user.
        let mut user = UserTargetContext::default().with_device(config.name.clone());
        if let Some(uid) = config.uid {
            user = user.with_owner(uid, config.gid.unwrap_or(uid));
        }
        let ctx = TargetContext::new()
            .with_read_only(config.read_only)
            .with_user(user)
            .with_memory_stores(memory_stores.clone())
            .with_event_hook(Arc::new(move || events.raise()));
        // Set for a device with ublk recovery: `memory` rows then survive a crash of this server.
        match &config.memory_dir {
            Some(dir) => ctx.with_memory_dir(dir.clone()),
            None => ctx,
        }
    };
    let exports = crate::exports::Exports;
    serve_device::<AnyTarget>(&run, args.id, &make_ctx, &exports)?;
    Ok(())
}
