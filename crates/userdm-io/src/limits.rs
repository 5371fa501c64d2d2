//! Every fixed limit in userdm, in one place, with the relations between them asserted.

use crate::SECTOR_SIZE;

/// The largest single request a target is handed. Larger client requests are split.
pub const IO_BYTES_MAX: u64 = 1 << 20;
/// The most requests one queue or connection keeps in flight.
pub const QUEUE_DEPTH_MAX: u16 = 4096;
/// The default depth of a queue or connection.
pub const QUEUE_DEPTH_DEFAULT: u16 = 128;
/// The most rows in one table, as the kernel's `DM_MAX_TARGETS`.
pub const TABLE_ROWS_MAX: usize = 1 << 20;
/// The longest parameter string of one row, as the kernel's `DM_MAX_TARGET_PARAMS`.
pub const TARGET_PARAMS_BYTES_MAX: usize = 1024;
/// The longest device name, without its NUL (`DM_NAME_LEN - 1`).
pub const DEVICE_NAME_BYTES_MAX: usize = 127;
/// The longest device uuid, without its NUL (`DM_UUID_LEN - 1`).
pub const DEVICE_UUID_BYTES_MAX: usize = 128;
/// The largest device, in sectors: the kernel's `LLONG_MAX >> 9`.
pub const DEVICE_SECTORS_MAX: u64 = (i64::MAX as u64) >> 9;

const _: () = assert!(IO_BYTES_MAX % SECTOR_SIZE == 0);
const _: () = assert!(QUEUE_DEPTH_DEFAULT <= QUEUE_DEPTH_MAX);
const _: () = assert!(IO_BYTES_MAX <= u32::MAX as u64);
