//! The data-path runtime: one io_uring ring and a small executor per thread.
//!
//! ublk accepts a queue's IO commands only from the thread that fetched them, and an NBD
//! connection is cheapest when one thread owns its socket, so userdm never moves IO between
//! threads. Each data-path thread builds one [`Reactor`], spawns a fixed set of tasks at start
//! (typically one per tag), and calls [`Reactor::block_on`]. Tasks are ordinary Rust futures; the
//! IO they await ([`Reactor::read_at`], [`Reactor::send`], [`Reactor::sleep`], ...) is submitted
//! to that thread's ring, so the frontend's commands and the targets' IO share one
//! `io_uring_enter` per loop turn.
//!
//! Steady-state IO allocates nothing: operation slots are a fixed table made when the reactor
//! starts, wakers are made once per task, and the ready queue is preallocated.
//!
//! Wakers may be called from other threads (a dm-user daemon's channel thread, the control thread
//! resuming a suspended device): the reactor then wakes from `io_uring_enter` through an eventfd
//! that it always keeps a read armed on.
//!
//! ```no_run
//! use userdm_uring::Reactor;
//! let rt = Reactor::new(64).unwrap();
//! let file = std::fs::File::open("/etc/hostname").unwrap();
//! let mut buf = [0u8; 16];
//! let n = rt.block_on(rt.read_at(&file, &mut buf, 0)).unwrap();
//! println!("{n} bytes");
//! ```
#![deny(missing_docs)]

mod executor;
mod ops;
mod reactor;
pub mod sync;
pub mod thread;

pub use ops::Op;
pub use reactor::{Reactor, ReactorStats, DEFAULT_SPIN};
