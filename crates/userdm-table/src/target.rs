//! What a table row's implementation provides.

use std::future::Future;

use userdm_io::{IoHeader, IoResult, OpSet};
use userdm_uring::Reactor;

use crate::{MessageError, RowSpec, TableError};

/// A target type's name and version, as `dmsetup targets` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetType {
    /// The name used in tables.
    pub name: &'static str,
    /// Major, minor, patch.
    pub version: [u32; 3],
}

/// A device another device depends on, as `dmsetup deps` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dep {
    /// Major number (0 when the dependency is a regular file).
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// What the table named.
    pub path: String,
}

/// Limits a target puts on the device, combined over rows by taking the strictest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetLimits {
    /// The smallest addressable unit, in bytes (512 or 4096).
    pub logical_block_bytes: u32,
    /// The unit the backing store writes without read-modify-write.
    pub physical_block_bytes: u32,
    /// Whether completed writes may sit in a volatile cache until FLUSH.
    pub volatile_cache: bool,
    /// Whether the backing store is rotational.
    pub rotational: bool,
}

impl Default for TargetLimits {
    fn default() -> TargetLimits {
        TargetLimits {
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            volatile_cache: true,
            rotational: false,
        }
    }
}

impl TargetLimits {
    /// The strictest of two sets of limits.
    pub fn combine(self, other: TargetLimits) -> TargetLimits {
        TargetLimits {
            logical_block_bytes: self.logical_block_bytes.max(other.logical_block_bytes),
            physical_block_bytes: self.physical_block_bytes.max(other.physical_block_bytes),
            volatile_cache: self.volatile_cache || other.volatile_cache,
            rotational: self.rotational || other.rotational,
        }
    }
}

/// The allocation state of a run of storage, as NBD's `base:allocation` metadata context and
/// sparse-aware copies see it.
///
/// "Data" (neither flag) is always a correct answer; `hole` says the run holds no storage
/// (reading it costs nothing), `zero` that it reads as zeros. A hole that is not zero is allowed
/// (its contents are undefined), as the NBD specification allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Length of the run in bytes; nonzero unless the query was empty.
    pub len_bytes: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

impl Allocation {
    /// Allocated storage of unknown contents: what a target that does not know says.
    pub const fn data(len_bytes: u64) -> Allocation {
        Allocation {
            len_bytes,
            hole: false,
            zero: false,
        }
    }

    /// Unallocated storage that reads as zeros.
    pub const fn hole(len_bytes: u64) -> Allocation {
        Allocation {
            len_bytes,
            hole: true,
            zero: true,
        }
    }

    /// The same state, `len_bytes` long.
    pub const fn with_len(self, len_bytes: u64) -> Allocation {
        Allocation { len_bytes, ..self }
    }
}

/// One row's implementation: a device-mapper target instance.
///
/// Instances are built on the control thread by [`Target::construct`] when a table is loaded,
/// then shared (behind `Arc<Table>`) by every data-path thread of the device, so the trait needs
/// `Send + Sync` and per-IO state must live in the IO, not in `&mut self`.
///
/// [`Target::io`] runs on a data-path thread inside that thread's [`Reactor`]. The request's
/// `sector` is relative to the row's start; `buf` is exactly `io.len_bytes` long for operations
/// that carry data ([`userdm_io::IoOp::carries_write_data`] or
/// [`userdm_io::IoOp::returns_data`]) and empty otherwise. The buffer belongs to the caller and
/// is valid until the future completes.
///
/// The engine checks ranges and [`Target::ops`] before calling `io`, so a target sees only
/// operations it declared, inside its row.
pub trait Target: Send + Sync + Sized {
    /// What construction needs from the outside: where relative paths resolve, how to reach other
    /// userdm devices.
    type Context;

    /// Every type this implementation can construct, for `dmsetup targets`.
    fn types() -> &'static [TargetType];

    /// Builds the target of one row. Errors name the bad parameter; the caller adds the line.
    fn construct(ctx: &Self::Context, row: &RowSpec) -> Result<Self, TableError>;

    /// The type name, as in the table.
    fn type_name(&self) -> &'static str;

    /// The operations this target serves.
    fn ops(&self) -> OpSet;

    /// The params as `dmsetup table` prints them (canonical form, devices as `maj:min`).
    fn table_params(&self) -> String;

    /// The status as `dmsetup status` prints it.
    fn status(&self) -> String {
        String::new()
    }

    /// Handles `dmsetup message`. `Ok(Some(reply))` is printed by the CLI.
    fn message(&self, _argv: &[String]) -> Result<Option<String>, MessageError> {
        Err(MessageError::Unsupported)
    }

    /// Devices this row depends on.
    fn deps(&self) -> Vec<Dep> {
        Vec::new()
    }

    /// Limits the row puts on the device.
    fn limits(&self) -> TargetLimits {
        TargetLimits::default()
    }

    /// Called before the device suspends. A target that holds IO (delay) must let it go now;
    /// with `noflush`, a target that queues IO may give it back with `IoError::Requeue`.
    fn presuspend(&self, _noflush: bool) {}

    /// Called when the table becomes live again, or live for the first time.
    fn resume(&self) {}

    /// The allocation state of the run of the row starting at `offset_bytes` (row-relative, a
    /// multiple of 512, inside the row), at most `max_len_bytes` (nonzero, not past the row's end)
    /// long. The answer's length is nonzero and at most `max_len_bytes`; shorter means the state
    /// changes there (or the target stopped looking).
    ///
    /// Synchronous and cheap: called on data-path threads, once per extent of an NBD
    /// `BLOCK_STATUS` and of large structured reads. The default, "all data", is always correct.
    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        let _ = offset_bytes;
        Allocation::data(max_len_bytes)
    }

    /// Serves one request. See the trait docs for the contract.
    fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> impl Future<Output = IoResult>;
}
