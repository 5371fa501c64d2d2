//! dm-user in user space: the `user` target, its control endpoint, and dm-user's wire codec.
//!
//! A table row `<start> <len> user <arg0> <arg1> <ctl> [options]` serves its IO through
//! otherwise unprivileged daemons that speak dm-user's message stream (the protocol of the
//! Android Common Kernel's `drivers/md/dm-user.c`; see `docs/dm-user-protocol.md`). Where
//! dm-user makes a misc device `/dev/dm-user/<ctl>` that each daemon thread `open()`s, userdm
//! makes a Unix stream socket at the same path (`$USERDM_DMUSER_DIR` moves the directory) that
//! each daemon thread `connect()`s; everything after that is byte for byte the same: read a
//! 40-byte [`wire::DmUserMessage`] and, for a WRITE, its data; write a reply header and, for a
//! successful READ, the data.
//!
//! * [`wire`]: the header, the uapi constants and [`wire::MessageReader`], a stream parser that
//!   takes messages split at any byte. This module is all there is without the `target`
//!   feature, for daemons.
//! * [`UserTarget`] (feature `target`, on by default): the [`userdm_table::Target`] of `user`
//!   rows. Construction creates (or joins) the endpoint and its thread; `io` queues the request
//!   in a fixed slot table and waits for the reply; the endpoint thread hands requests to
//!   daemons, matches replies by seq, re-queues requests of daemons that die, and fails requests
//!   after `timeout_ms` without a daemon when the row asks for it.
//!
//! ```no_run
//! use userdm_dmuser::{UserTarget, UserTargetContext};
//! use userdm_table::Table;
//!
//! let ctx = UserTargetContext::new().with_dir("/run/userdm-test");
//! // The socket /run/userdm-test/ctl exists from here until the table is dropped.
//! let table: Table<UserTarget> = Table::parse(&ctx, "0 1024 user 0 1024 ctl timeout_ms=4000").unwrap();
//! # drop(table);
//! ```
#![deny(missing_docs)]

pub mod wire;

#[cfg(feature = "target")]
mod cuse;
#[cfg(feature = "target")]
mod endpoint;
#[cfg(feature = "target")]
mod params;
#[cfg(feature = "target")]
mod shared;
#[cfg(feature = "target")]
mod sys;
#[cfg(feature = "target")]
mod target;
#[cfg(feature = "target")]
mod worker;

#[cfg(feature = "target")]
pub use cuse::CUSE_ENV;
#[cfg(feature = "target")]
pub use endpoint::{DEFAULT_DIR, DIR_ENV};
#[cfg(feature = "target")]
pub use params::{OnClose, UserParams};
#[cfg(feature = "target")]
pub use target::{UserTarget, UserTargetContext, USER_OPS};
