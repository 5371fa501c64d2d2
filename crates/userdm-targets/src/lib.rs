//! userdm's device-mapper targets, one module each, and [`AnyTarget`], which dispatches to them.
//!
//! | type | params | kernel |
//! |---|---|---|
//! | `linear` | `<dev> <offset>` | dm-linear |
//! | `striped` | `<#stripes> <chunk_sectors> (<dev> <offset>)...` | dm-stripe |
//! | `zero` | none | dm-zero |
//! | `error` | none, or `<dev> <offset>` | dm-target.c |
//! | `delay` | `<dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]]` | dm-delay |
//! | `flakey` | `<dev> <offset> <up_s> <down_s> [<#features> <feature>...]` | dm-flakey |
//! | `dust` | `<dev> <offset> <blksz>` | dm-dust |
//! | `memory` | `[<#options> [chunk_bytes <n>] [max_allocated_bytes <n>]]` | none: userdm's RAM disk |
//!
//! Params, validation messages, `dmsetup table` and `dmsetup status` output and messages follow
//! the kernel's (Linux 6.12) word for word where it has them; each module says where it differs.
//! A `<dev>` is a block device (shown as `maj:min`, as the kernel shows it), `maj:min` itself,
//! a regular file (shown by its path), or `userdm:NAME` when the [`TargetContext`] has a
//! resolver. Backing files are opened once, when the table is loaded, and all their IO goes
//! through the calling thread's [`Reactor`].
//!
//! # Where userdm differs from the kernel
//!
//! - Backing stores may be regular files, shown by path in `dmsetup table` and listed by
//!   `deps` as `0:0`; the kernel takes only block devices. Error messages start with the
//!   kernel's text and add what it leaves to the log (the path, the OS error, the sizes).
//! - Discard punches a hole (`fallocate`), and is dropped if the filesystem cannot; write-zeroes
//!   punches a hole (or `ZERO_RANGE` under `NOUNMAP`), writing zeros by hand as a last resort.
//!   FUA and FLUSH are `fdatasync`. Secure erase is not served.
//! - zero serves write-zeroes (it reads zeros anyway); the kernel's zero does not advertise it.
//! - delay holds each request on its own timer from the moment it reaches the target. The engine
//!   splits a write with PREFLUSH into a flush (flush class) and the write (write class); the
//!   kernel sends the whole request to the flush device.
//! - flakey follows the current kernel source (defaults of `error_reads error_writes`, the
//!   `corrupt_bio_byte` checks); `corrupt_bio_byte`'s flags mask is matched against the kernel's
//!   `REQ_*` bits 8 to 21 only, the ones stable across versions.
//! - dust's message errors, which the kernel writes to its log, are the
//!   [`userdm_table::MessageError::Invalid`] text; flushes pass straight through.
//! - striped raises its table event through [`TargetContext::with_event_hook`]; it has no
//!   `io_min`/`io_opt` hints to give.
//!
//! ```
//! use userdm_table::Table;
//! use userdm_targets::{AnyTarget, TargetContext};
//!
//! let table: Table<AnyTarget> =
//!     Table::parse(&TargetContext::new(), "0 8 zero\n8 8 memory\n").unwrap();
//! assert_eq!(table.status_lines(), vec!["0 8 zero ", "8 8 memory 0 4096"]);
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod args;
mod backing;
mod context;
mod delay;
mod dust;
mod error;
mod flakey;
mod linear;
mod memory;
mod striped;
#[allow(unsafe_code)]
mod sys;
mod zero;

pub use context::{Clock, DeviceResolver, EventHook, ManualClock, MonotonicClock, TargetContext};
pub use delay::Delay;
pub use dust::Dust;
pub use error::ErrorTarget;
pub use flakey::Flakey;
pub use linear::Linear;
pub use memory::{Extent, Memory, MemoryStores};
pub use striped::Striped;
pub use userdm_dmuser::{UserTarget, UserTargetContext};
pub use zero::Zero;

/// Constants of the memory target.
pub mod memory_limits {
    pub use crate::memory::{
        CHUNK_BYTES_DEFAULT, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, LEAF_CHUNKS, LEAVES_MAX,
    };
}

use userdm_io::{IoHeader, IoResult, OpSet};
use userdm_table::{
    Allocation, Dep, MessageError, RowSpec, TableError, Target, TargetLimits, TargetType,
};
use userdm_uring::Reactor;

/// Every target type, with the versions `dmsetup targets` shows for the kernel's own (6.12).
pub const TARGET_TYPES: &[TargetType] = &[
    TargetType {
        name: "linear",
        version: [1, 4, 0],
    },
    TargetType {
        name: "striped",
        version: [1, 6, 0],
    },
    TargetType {
        name: "zero",
        version: [1, 2, 0],
    },
    TargetType {
        name: "error",
        version: [1, 7, 0],
    },
    TargetType {
        name: "delay",
        version: [1, 4, 0],
    },
    TargetType {
        name: "flakey",
        version: [1, 5, 0],
    },
    TargetType {
        name: "dust",
        version: [1, 0, 0],
    },
    TargetType {
        name: "memory",
        version: [1, 0, 0],
    },
    TargetType {
        name: "user",
        version: [1, 0, 0],
    },
];

/// One row's target, of any type. An enum rather than a trait object because
/// [`Target::io`] is an `async fn` (not object-safe) and the data path must not box a future
/// per request: the enum's future is a plain state machine.
#[derive(Debug)]
pub enum AnyTarget {
    /// `linear`.
    Linear(Linear),
    /// `striped`.
    Striped(Striped),
    /// `zero`.
    Zero(Zero),
    /// `error`.
    Error(ErrorTarget),
    /// `delay`.
    Delay(Delay),
    /// `flakey`.
    Flakey(Flakey),
    /// `dust`.
    Dust(Dust),
    /// `memory`.
    Memory(std::sync::Arc<Memory>),
    /// `user`: dm-user, served by a daemon (crate `userdm-dmuser`).
    User(UserTarget),
}

impl AnyTarget {
    /// The run of allocated or unallocated storage at `offset_bytes` (row-relative), for
    /// targets that know (memory); `None` for the others.
    pub fn allocation_extent(&self, offset_bytes: u64, max_len_bytes: u64) -> Option<Extent> {
        match self {
            AnyTarget::Memory(m) => Some(m.allocation_extent(offset_bytes, max_len_bytes)),
            _ => None,
        }
    }
}

impl Target for AnyTarget {
    type Context = TargetContext;

    fn types() -> &'static [TargetType] {
        TARGET_TYPES
    }

    fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<AnyTarget, TableError> {
        Ok(match row.target_type.as_str() {
            "linear" => AnyTarget::Linear(Linear::construct(ctx, row)?),
            "striped" => AnyTarget::Striped(Striped::construct(ctx, row)?),
            "zero" => AnyTarget::Zero(Zero::construct(row)?),
            "error" => AnyTarget::Error(ErrorTarget::construct(ctx, row)?),
            "delay" => AnyTarget::Delay(Delay::construct(ctx, row)?),
            "flakey" => AnyTarget::Flakey(Flakey::construct(ctx, row)?),
            "dust" => AnyTarget::Dust(Dust::construct(ctx, row)?),
            "memory" => AnyTarget::Memory(Memory::construct_shared(ctx, row)?),
            "user" => AnyTarget::User(UserTarget::construct(&ctx.user, row)?),
            other => {
                return Err(TableError::UnknownTarget {
                    line: row.line,
                    target: other.to_string(),
                })
            }
        })
    }

    fn type_name(&self) -> &'static str {
        match self {
            AnyTarget::Linear(_) => "linear",
            AnyTarget::Striped(_) => "striped",
            AnyTarget::Zero(_) => "zero",
            AnyTarget::Error(_) => "error",
            AnyTarget::Delay(_) => "delay",
            AnyTarget::Flakey(_) => "flakey",
            AnyTarget::Dust(_) => "dust",
            AnyTarget::Memory(_) => "memory",
            AnyTarget::User(_) => "user",
        }
    }

    fn ops(&self) -> OpSet {
        match self {
            AnyTarget::Linear(t) => t.ops(),
            AnyTarget::Striped(t) => t.ops(),
            AnyTarget::Zero(t) => t.ops(),
            AnyTarget::Error(t) => t.ops(),
            AnyTarget::Delay(t) => t.ops(),
            AnyTarget::Flakey(t) => t.ops(),
            AnyTarget::Dust(t) => t.ops(),
            AnyTarget::Memory(t) => t.ops(),
            AnyTarget::User(t) => t.ops(),
        }
    }

    fn table_params(&self) -> String {
        match self {
            AnyTarget::Linear(t) => t.table_params(),
            AnyTarget::Striped(t) => t.table_params(),
            AnyTarget::Zero(_) | AnyTarget::Error(_) => String::new(),
            AnyTarget::Delay(t) => t.table_params(),
            AnyTarget::Flakey(t) => t.table_params(),
            AnyTarget::Dust(t) => t.table_params(),
            AnyTarget::Memory(t) => t.table_params(),
            AnyTarget::User(t) => t.table_params(),
        }
    }

    fn status(&self) -> String {
        match self {
            AnyTarget::Striped(t) => t.status(),
            AnyTarget::Delay(t) => t.status(),
            AnyTarget::Dust(t) => t.status(),
            AnyTarget::Memory(t) => t.status(),
            AnyTarget::User(t) => t.status(),
            AnyTarget::Linear(_) | AnyTarget::Zero(_) | AnyTarget::Error(_) => String::new(),
            AnyTarget::Flakey(_) => String::new(),
        }
    }

    fn message(&self, argv: &[String]) -> Result<Option<String>, MessageError> {
        match self {
            AnyTarget::Dust(t) => t.message(argv),
            _ => Err(MessageError::Unsupported),
        }
    }

    fn deps(&self) -> Vec<Dep> {
        match self {
            AnyTarget::Linear(t) => t.deps(),
            AnyTarget::Striped(t) => t.deps(),
            AnyTarget::Error(t) => t.deps(),
            AnyTarget::Delay(t) => t.deps(),
            AnyTarget::Flakey(t) => t.deps(),
            AnyTarget::Dust(t) => t.deps(),
            AnyTarget::Zero(_) | AnyTarget::Memory(_) | AnyTarget::User(_) => Vec::new(),
        }
    }

    fn limits(&self) -> TargetLimits {
        match self {
            AnyTarget::Linear(t) => t.limits(),
            AnyTarget::Striped(t) => t.limits(),
            AnyTarget::Error(t) => t.limits(),
            AnyTarget::Delay(t) => t.limits(),
            AnyTarget::Flakey(t) => t.limits(),
            AnyTarget::Dust(t) => t.limits(),
            AnyTarget::User(t) => t.limits(),
            AnyTarget::Zero(_) | AnyTarget::Memory(_) => TargetLimits::default(),
        }
    }

    /// linear, striped and delay ask their backing files (`SEEK_HOLE`/`SEEK_DATA`); memory
    /// answers from its chunk table; zero is one hole that reads as zeros; error, flakey, dust and
    /// user say "data" (a hole would let a sparse copy skip the errors or corruption they exist
    /// to produce).
    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        match self {
            AnyTarget::Linear(t) => t.allocation(offset_bytes, max_len_bytes),
            AnyTarget::Striped(t) => t.allocation(offset_bytes, max_len_bytes),
            AnyTarget::Delay(t) => t.allocation(offset_bytes, max_len_bytes),
            AnyTarget::Zero(_) => Allocation::hole(max_len_bytes),
            AnyTarget::Memory(m) => {
                let e = m.allocation_extent(offset_bytes, max_len_bytes);
                if e.allocated {
                    Allocation::data(e.len_bytes)
                } else {
                    Allocation::hole(e.len_bytes)
                }
            }
            AnyTarget::Error(_)
            | AnyTarget::Flakey(_)
            | AnyTarget::Dust(_)
            | AnyTarget::User(_) => Allocation::data(max_len_bytes),
        }
    }

    fn presuspend(&self, noflush: bool) {
        match self {
            // Delay lets held IO go whether or not the suspend flushes, as the kernel's
            // `delay_presuspend`.
            AnyTarget::Delay(t) => t.presuspend(),
            // dm-user may give back IO no daemon has read yet, on a noflush suspend.
            AnyTarget::User(t) => t.presuspend(noflush),
            _ => {}
        }
    }

    fn resume(&self) {
        match self {
            AnyTarget::Delay(t) => t.resume(),
            AnyTarget::User(t) => t.resume(),
            _ => {}
        }
    }

    async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        match self {
            AnyTarget::Linear(t) => t.io(rt, io, buf).await,
            AnyTarget::Striped(t) => t.io(rt, io, buf).await,
            AnyTarget::Zero(t) => t.io(io, buf),
            AnyTarget::Error(t) => t.io(),
            AnyTarget::Delay(t) => t.io(rt, io, buf).await,
            AnyTarget::Flakey(t) => t.io(rt, io, buf).await,
            AnyTarget::Dust(t) => t.io(rt, io, buf).await,
            AnyTarget::Memory(t) => t.io(io, buf),
            AnyTarget::User(t) => t.io(rt, io, buf).await,
        }
    }
}
