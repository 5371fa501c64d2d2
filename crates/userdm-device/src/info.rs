//! What `dmsetup info` reports, as data.

use serde::Serialize;

/// A snapshot of a device's state, the facts behind `dmsetup info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// Uuid, if set.
    pub uuid: Option<String>,
    /// Whether IO is held.
    pub suspended: bool,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether a live table is present.
    pub live_table: bool,
    /// Whether an inactive (loaded, not yet resumed) table is present.
    pub inactive_table: bool,
    /// How many users hold the device open (export connections, kernel openers).
    pub open_count: i32,
    /// The event counter.
    pub event_nr: u32,
    /// Rows in the live table.
    pub target_count: u32,
    /// Whether removal is deferred until the last close.
    pub deferred_remove: bool,
    /// Size of the live table, in sectors.
    pub size_sectors: u64,
}

/// Counters of the IO a device has served, for `--json` status and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IoStats {
    /// Reads completed successfully.
    pub reads: u64,
    /// Writes completed successfully.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Other requests (flush, discard, ...) completed successfully.
    pub others: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests a target gave back during a noflush suspend, resubmitted after resume.
    pub requeues: u64,
}
