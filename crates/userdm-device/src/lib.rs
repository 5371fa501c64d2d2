//! A mapped device as the kernel's device-mapper defines it, in user space.
//!
//! A [`Device`] has a name, an optional uuid set at most once, a live table that serves IO, and
//! an inactive slot that `load` fills and `resume` swaps in. A new device has no table and is
//! not suspended (as the kernel's: IO fails until a table is loaded and resumed). `suspend` stops new IO and waits for IO in flight; `resume` swaps tables, destroys the
//! old one and lets held IO through, to the new table. Event numbers count table events
//! (rename, removal, and events raised by targets) and [`Device::wait_event`] blocks until one.
//!
//! Exports (ublk queues, NBD connections, FUSE) call [`Device::io`] from their data-path threads;
//! the control plane calls everything else from its own thread. The two meet in [`gate`]: an
//! in-flight counter and a suspended flag.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod block;
mod device;
pub mod gate;
mod info;

pub use block::BlockDevice;
pub use device::{Device, DeviceError, Geometry};
pub use info::{DeviceInfo, IoStats};
