//! userdm's ublk export: any [`BlockDevice`] (through [`UblkBackend`], which
//! `userdm_device::Device` implements) served as a real kernel block device,
//! `/dev/ublkbN`, through the kernel's ublk driver (Linux 6.0+; see `docs` in the repository
//! for which features need which kernel).
//!
//! ```no_run
//! use std::sync::Arc;
//! # fn demo<B: userdm_ublk::UblkBackend>(device: Arc<B>) -> Result<(), userdm_ublk::UblkError> {
//! use userdm_ublk::{UblkOptions, UblkServer};
//! let opts = UblkOptions { queues: 2, depth: 128, recovery: true, ..Default::default() };
//! let handle = UblkServer::start(device, opts)?;
//! println!("{} ({}:{})", handle.block_path().display(), handle.devt().0, handle.devt().1);
//! // ... later, on shutdown:
//! handle.stop()?;
//! # Ok(()) }
//! ```
//!
//! # Threads
//!
//! * The thread that calls [`UblkServer::start`], [`UblkServer::recover`], [`delete`], [`list`]
//!   or [`features`] runs control commands only, each on its own [`Control`] (an SQE128 ring
//!   over `/dev/ublk-control`), and never serves IO. The commands block; ADD_DEV, START_DEV,
//!   END_USER_RECOVERY and DEL_DEV are bounded by timeouts.
//! * Each hardware queue gets one thread, owned by the [`UblkHandle`]. It is pinned to the CPUs
//!   that submit to that queue (GET_QUEUE_AFFINITY), marked `PR_SET_IO_FLUSHER`, and moved into
//!   a private mount namespace (so the server never holds the last reference to a mount of its
//!   own disk). It runs one [`userdm_uring::Reactor`] and one task per tag; the backend's
//!   [`BlockDevice::io`] runs there. The handle joins the threads when it stops.
//!
//! # Data movement
//!
//! * default: the kernel copies request data to and from a page-aligned per-tag buffer;
//! * `need_get_data`: the same, WRITEs in two steps (`UBLK_F_NEED_GET_DATA`);
//! * `user_copy` (6.5+): the queue thread copies with pread/pwrite on `/dev/ublkcN`;
//! * `zero_copy` (6.16+): the device is created with `UBLK_F_AUTO_BUF_REG` (with the fallback
//!   flag) and `UBLK_F_USER_COPY`. Each queue thread then carries its ublk commands on a second,
//!   private ring with a sparse buffer table (the kernel registers a request's pages there as
//!   fixed buffer `tag`), driven from inside the reactor. A READ or WRITE whose backend names a
//!   [`DirectTarget`] ([`UblkBackend::direct_target`]) moves by fixed-buffer IO between that
//!   file and the request's pages: no copy through user memory. Everything else (other
//!   backends, other operations, a registration that fell back) goes through
//!   [`BlockDevice::io`] with user copy.
//!
//! # Lifecycle
//!
//! [`UblkHandle::stop`] stops and deletes the device. With `recovery`, a server killed with
//! SIGKILL leaves the device QUIESCED with IO held, and [`UblkServer::recover`] in a new process
//! resumes it. [`delete`] never hangs on an open device: it uses TRY_STOP_DEV where the kernel
//! has it (7.0+) and otherwise looks for holders itself, and answers [`UblkError::Busy`].
#![deny(missing_docs)]

mod backend;
mod ctrl;
mod error;
mod info;
mod os;
mod params;
mod queue;
mod server;
mod zc;

pub use backend::{DirectTarget, UblkBackend};
pub use ctrl::{Control, CONTROL_PATH};
pub use error::UblkError;
pub use info::{feature_info, DevInfo, DevState, FeatureInfo, Features, FEATURE_INFO};
pub use os::{enter_private_mount_namespace, BlockUsers};
pub use params::{build_params, DeviceShape, DISCARD_BYTES_MAX};
pub use server::{
    delete, features, list, BusyCheck, DeleteMode, UblkHandle, UblkOptions, UblkServer,
};
pub use userdm_device::BlockDevice;
/// The raw UAPI, for callers that need a constant.
pub use userdm_ublk_sys as sys;
