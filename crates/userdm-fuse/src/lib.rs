//! userdm's FUSE export: a device presented as one regular file.
//!
//! Where ublk is missing, a device can still be used as a file: [`FuseExport::start`] mounts a
//! single-file FUSE filesystem over a path (creating it if needed), as qemu-storage-daemon's
//! FUSE export does, and serves reads, writes, `fsync` and `fallocate` on it from the device.
//! `losetup` on that file then gives a real block device.
//!
//! The FUSE protocol is implemented here, not through libfuse: for one file it is a dozen
//! opcodes ([`proto`]), and owning it lets the data path run on userdm's io_uring reactors
//! with preallocated buffers. Each of [`FuseOptions::threads`] workers clones the `/dev/fuse`
//! connection (`FUSE_DEV_IOC_CLONE`) and runs [`FuseOptions::queue_depth`] tasks; a task reads
//! a request, turns it into device IO and writes the reply, all through its thread's ring, with
//! no allocation per request.
//!
//! Byte offsets become sector IO; a write that is not sector aligned is a read-modify-write
//! under a range lock. By default every open bypasses the page cache ([`CacheMode::Direct`]),
//! so the file stays coherent with NBD or ublk exports of the same device.
//!
//! A server that dies leaves the mount behind, answering ENOTCONN; `fusermount3 -u PATH` or
//! `umount -l PATH` removes it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use userdm_fuse::{mem::MemDevice, FuseExport, FuseOptions};
//!
//! let device = Arc::new(MemDevice::new(64 << 20));
//! let export = FuseExport::start(device, "/tmp/disk.img", FuseOptions::default()).unwrap();
//! // `losetup --find --show /tmp/disk.img` now gives a block device backed by `device`.
//! export.stop().unwrap();
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod export;
mod handler;
pub mod mem;
mod mountpoint;
pub mod proto;
mod sync;
mod sys;
mod worker;

pub use export::{CacheMode, FuseError, FuseExport, FuseHandle, FuseOptions, FuseStats};
