//! Write dm-user daemons: the other end of userdm's `user` target (or of a kernel with
//! dm-user).
//!
//! A daemon connects to the control endpoint `/dev/dm-user/<ctl>` (a Unix socket made by
//! userdm; `$USERDM_DMUSER_DIR` moves the directory) — or opens it, where it is a character
//! device — once per thread, reads requests and writes replies. The protocol is small enough to
//! need no library (see `docs/dm-user-protocol.md` and the C example); this crate saves the
//! loops:
//!
//! * [`Channel`]: one connection. [`Channel::read_request`] blocks for the next request,
//!   [`Channel::poll_request`] does not (for an event loop: the channel is `AsRawFd`), and
//!   [`Channel::reply`] answers any request read on this channel, in any order.
//! * [`Handler`] and [`serve`]: implement reads and writes, and let the loop do the rest;
//!   [`serve_threads`] runs one channel per thread over a shared handler.
//! * [`AsyncChannel`]: std-only async. A reader thread feeds [`AsyncChannel::next_request`], a
//!   plain `Future` that any executor can poll (a minimal [`block_on`] is included), and
//!   [`Responder`]s reply from any thread or task.
//! * [`MemoryDisk`] and [`FileDisk`]: ready-made handlers.
//!
//! ```no_run
//! use userdm_dmuser_daemon::{serve, Channel, MemoryDisk};
//!
//! let mut channel = Channel::connect(userdm_dmuser_daemon::endpoint_path("ctl")).unwrap();
//! let disk = MemoryDisk::new(1024 * 512);
//! serve(&mut channel, &disk).unwrap(); // returns when the target is removed
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod async_channel;
mod channel;
mod disks;

pub use async_channel::{block_on, AsyncChannel, NextRequest, Responder};
pub use channel::{Channel, Request};
pub use disks::{FileDisk, MemoryDisk};
pub use userdm_dmuser::wire;

use std::path::PathBuf;

use userdm_io::{IoFlags, IoOp};
use wire::{DM_USER_RESP_ERROR, DM_USER_RESP_SUCCESS, DM_USER_RESP_UNSUPPORTED};

/// The path of control endpoint `ctl`: `$USERDM_DMUSER_DIR/<ctl>`, else `/dev/dm-user/<ctl>`.
pub fn endpoint_path(ctl: &str) -> PathBuf {
    let dir = std::env::var_os("USERDM_DMUSER_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/dev/dm-user"), PathBuf::from);
    dir.join(ctl)
}

/// How a request ended, as the reply's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `DM_USER_RESP_SUCCESS`.
    Success,
    /// `DM_USER_RESP_ERROR`: the request fails with EIO.
    Error,
    /// `DM_USER_RESP_UNSUPPORTED`: the request fails with EOPNOTSUPP under userdm, EIO under
    /// dm-user.
    Unsupported,
}

impl Status {
    /// The reply type code.
    pub fn code(self) -> u64 {
        match self {
            Status::Success => DM_USER_RESP_SUCCESS,
            Status::Error => DM_USER_RESP_ERROR,
            Status::Unsupported => DM_USER_RESP_UNSUPPORTED,
        }
    }
}

/// What a daemon does with requests. Shared by every channel of [`serve_threads`], so it takes
/// `&self`; each method returns the reply's status. Sectors are 512-byte units relative to the
/// device (not to the row).
///
/// **Flush rule**: before returning [`Status::Success`] from [`Handler::flush`], make durable
/// every write you have answered with success before the flush request was read, on any channel.
/// A write with [`IoFlags::FUA`] must be durable before its own reply.
pub trait Handler: Sync {
    /// Fills `buf` from `sector` on.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Status;
    /// Stores `data` at `sector`.
    fn write(&self, sector: u64, data: &[u8], flags: IoFlags) -> Status;
    /// Makes completed writes durable.
    fn flush(&self) -> Status {
        Status::Success
    }
    /// The range's data is no longer needed.
    fn discard(&self, _sector: u64, _len: u64) -> Status {
        Status::Unsupported
    }
    /// The range must read as zeros.
    fn write_zeroes(&self, _sector: u64, _len: u64, _flags: IoFlags) -> Status {
        Status::Unsupported
    }
    /// Discard, making the old data unrecoverable.
    fn secure_erase(&self, _sector: u64, _len: u64) -> Status {
        Status::Unsupported
    }
}

/// Answers one request with `handler`: returns the status and, for a successful READ, fills
/// `read_buf` (resized to the request's length).
pub fn handle<H: Handler + ?Sized>(handler: &H, req: &Request, read_buf: &mut Vec<u8>) -> Status {
    let h = &req.header;
    let flags = IoFlags::from_dm_user(h.flags);
    match req.op() {
        Some(IoOp::Read) => {
            let Ok(len) = usize::try_from(h.len) else {
                return Status::Error;
            };
            read_buf.clear();
            read_buf.resize(len, 0);
            handler.read(h.sector, read_buf)
        }
        Some(IoOp::Write) => handler.write(h.sector, &req.data, flags),
        Some(IoOp::Flush) => handler.flush(),
        Some(IoOp::Discard) => handler.discard(h.sector, h.len),
        Some(IoOp::WriteZeroes) => handler.write_zeroes(h.sector, h.len, flags),
        Some(IoOp::SecureErase) => handler.secure_erase(h.sector, h.len),
        _ => Status::Unsupported,
    }
}

/// Serves requests from `channel` with `handler` until the target goes away (end of stream, or
/// ENOTBLK from a dm-user kernel). Returns how many requests were answered.
pub fn serve<H: Handler + ?Sized>(channel: &mut Channel, handler: &H) -> std::io::Result<u64> {
    let mut served = 0;
    let mut read_buf = Vec::new();
    while let Some(req) = channel.read_request()? {
        let status = handle(handler, &req, &mut read_buf);
        let data: &[u8] = if status == Status::Success && req.op() == Some(IoOp::Read) {
            &read_buf
        } else {
            &[]
        };
        channel.reply(req.header.seq, status, data)?;
        served += 1;
    }
    Ok(served)
}

/// Connects `threads` channels to `path` and serves each on its own thread with `handler`,
/// until the target goes away. Returns the requests answered in all.
pub fn serve_threads<H: Handler>(
    path: &std::path::Path,
    threads: usize,
    handler: &H,
) -> std::io::Result<u64> {
    let mut channels = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        channels.push(Channel::connect(path)?);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = channels
            .into_iter()
            .map(|mut ch| s.spawn(move || serve(&mut ch, handler)))
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| std::io::Error::other("a serving thread panicked"))??;
        }
        Ok(total)
    })
}
