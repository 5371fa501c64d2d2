//! Hand-written bindings to the kernel's ublk UAPI.
//!
//! Follows `include/uapi/linux/ublk_cmd.h` of Linux at torvalds/linux commit `08677040a911`
//! ("ublk: enable UBLK_F_SHMEM_ZC", 7.1 development cycle), cross-checked against the 6.12
//! driver (`drivers/block/ublk_drv.c` of 6.12.y) for what older kernels accept. Names are the
//! kernel's, so the header can be read side by side; the safe layer in `userdm-ublk` uses Rust
//! names.
//!
//! What is stable and what is not:
//! * everything up to `UBLK_F_NO_AUTO_PART_SCAN` (bit 18) and the parameter blocks up to
//!   `ublk_param_segment` shipped in released kernels (6.0 through 7.0);
//! * `UBLK_F_SHMEM_ZC`, `UBLK_U_CMD_REG_BUF`/`UNREG_BUF`, `ublk_shmem_buf_reg` and
//!   `UBLK_IO_F_SHMEM_ZC` were still moving when this was written (two trees disagreed on bit 19
//!   of the IO flags); they are here for completeness and userdm does not use them.
//!
//! Always gate on `UBLK_U_CMD_GET_FEATURES` at run time: a constant existing here says nothing
//! about the running kernel.
//!
//! Every struct has compile-time asserts on its size and on the offset of every field.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![allow(non_camel_case_types)]

use core::mem::{offset_of, size_of};

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
compile_error!(
    "userdm-ublk-sys encodes ioctl numbers with the generic Linux layout; this architecture uses \
     a different one"
);

// ------------------------------------------------------------------ ioctl encoding ----

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The generic Linux `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOR(ty, nr, T)` with `size_of::<T>() == size`.
pub const fn ior(ty: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, ty, nr, size)
}

/// `_IOWR(ty, nr, T)` with `size_of::<T>() == size`.
pub const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

/// `_IOC_NR(op)`: the command number inside an encoded opcode.
pub const fn ioc_nr(op: u32) -> u8 {
    ((op >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)) as u8
}

/// `_IOC_TYPE(op)`.
pub const fn ioc_type(op: u32) -> u8 {
    ((op >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)) as u8
}

const SIZE_CTRL: usize = size_of::<ublksrv_ctrl_cmd>();
const SIZE_IO: usize = size_of::<ublksrv_io_cmd>();
const SIZE_BATCH: usize = size_of::<ublk_batch_io>();

// ------------------------------------------------------------------ control commands ----

/// Legacy (not ioctl-encoded) control command numbers; only their `_IOC_NR` is used by new code.
pub const UBLK_CMD_GET_QUEUE_AFFINITY: u8 = 0x01;
/// Legacy number of GET_DEV_INFO.
pub const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
/// Legacy number of ADD_DEV.
pub const UBLK_CMD_ADD_DEV: u8 = 0x04;
/// Legacy number of DEL_DEV.
pub const UBLK_CMD_DEL_DEV: u8 = 0x05;
/// Legacy number of START_DEV.
pub const UBLK_CMD_START_DEV: u8 = 0x06;
/// Legacy number of STOP_DEV.
pub const UBLK_CMD_STOP_DEV: u8 = 0x07;
/// Legacy number of SET_PARAMS.
pub const UBLK_CMD_SET_PARAMS: u8 = 0x08;
/// Legacy number of GET_PARAMS.
pub const UBLK_CMD_GET_PARAMS: u8 = 0x09;
/// Legacy number of START_USER_RECOVERY.
pub const UBLK_CMD_START_USER_RECOVERY: u8 = 0x10;
/// Legacy number of END_USER_RECOVERY.
pub const UBLK_CMD_END_USER_RECOVERY: u8 = 0x11;
/// Legacy number of GET_DEV_INFO2.
pub const UBLK_CMD_GET_DEV_INFO2: u8 = 0x12;

/// `data[0]` = queue id; `addr`/`len` receive a cpumask (len ≥ nr_cpu_ids bits, multiple of 8).
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior(b'u', UBLK_CMD_GET_QUEUE_AFFINITY, SIZE_CTRL);
/// `addr`/`len` receive a `ublksrv_ctrl_dev_info`.
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(b'u', UBLK_CMD_GET_DEV_INFO, SIZE_CTRL);
/// `addr` points at a `ublksrv_ctrl_dev_info`, read and written back with negotiated flags.
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(b'u', UBLK_CMD_ADD_DEV, SIZE_CTRL);
/// Removes the device; waits until every reference (cdev fd, mmap) is gone.
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(b'u', UBLK_CMD_DEL_DEV, SIZE_CTRL);
/// `data[0]` = server pid; waits until every queue has fetched every tag, then adds the disk.
pub const UBLK_U_CMD_START_DEV: u32 = iowr(b'u', UBLK_CMD_START_DEV, SIZE_CTRL);
/// Deletes the disk and aborts the server's pending commands.
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(b'u', UBLK_CMD_STOP_DEV, SIZE_CTRL);
/// `addr`/`len` point at a `ublk_params`; only before START_DEV.
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(b'u', UBLK_CMD_SET_PARAMS, SIZE_CTRL);
/// `addr`/`len` receive a `ublk_params` (`len` field must be set by the caller).
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(b'u', UBLK_CMD_GET_PARAMS, SIZE_CTRL);
/// Starts recovery of a QUIESCED (or FAIL_IO) device whose server is gone.
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(b'u', UBLK_CMD_START_USER_RECOVERY, SIZE_CTRL);
/// `data[0]` = new server pid; waits for the new server's fetches, then resumes IO.
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(b'u', UBLK_CMD_END_USER_RECOVERY, SIZE_CTRL);
/// As GET_DEV_INFO, carrying the char device path for unprivileged devices.
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior(b'u', UBLK_CMD_GET_DEV_INFO2, SIZE_CTRL);
/// `addr`/`len` (= 8) receive the driver's `UBLK_F_*` mask. Linux 6.5+.
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(b'u', 0x13, SIZE_CTRL);
/// DEL_DEV without waiting for the last reference. Linux 6.9+.
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(b'u', 0x14, SIZE_CTRL);
/// `data[0]` = new size in sectors (`UBLK_F_UPDATE_SIZE`). Linux 6.16+.
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(b'u', 0x15, SIZE_CTRL);
/// `data[0]` = timeout in ms (0 = forever); needs `UBLK_F_QUIESCE`. Linux 6.16+.
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(b'u', 0x16, SIZE_CTRL);
/// STOP_DEV that fails with EBUSY while the disk is open (`UBLK_F_SAFE_STOP_DEV`). Linux 7.0+.
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(b'u', 0x17, SIZE_CTRL);
/// Registers shared memory for `UBLK_F_SHMEM_ZC` (7.1 development; not used by userdm).
pub const UBLK_U_CMD_REG_BUF: u32 = iowr(b'u', 0x18, SIZE_CTRL);
/// Unregisters shared memory (`data[0]` = index; 7.1 development; not used by userdm).
pub const UBLK_U_CMD_UNREG_BUF: u32 = iowr(b'u', 0x19, SIZE_CTRL);

/// `len` of GET_FEATURES.
pub const UBLK_FEATURES_LEN: u16 = 8;

// ------------------------------------------------------------------ IO commands ----

/// Legacy number of FETCH_REQ.
pub const UBLK_IO_FETCH_REQ: u8 = 0x20;
/// Legacy number of COMMIT_AND_FETCH_REQ.
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;
/// Legacy number of NEED_GET_DATA.
pub const UBLK_IO_NEED_GET_DATA: u8 = 0x22;

/// Arms a tag: completes when a request arrives for it. Sent once per tag at start.
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(b'u', UBLK_IO_FETCH_REQ, SIZE_IO);
/// Commits a result (`result` = bytes or -errno) and re-arms the tag.
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(b'u', UBLK_IO_COMMIT_AND_FETCH_REQ, SIZE_IO);
/// Second step of a WRITE with `UBLK_F_NEED_GET_DATA`: gives the buffer for the data.
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr(b'u', UBLK_IO_NEED_GET_DATA, SIZE_IO);
/// Registers a request's pages as io_uring fixed buffer `addr`. Linux 6.15+.
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr(b'u', 0x23, SIZE_IO);
/// Unregisters fixed buffer `addr`. Linux 6.15+.
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr(b'u', 0x24, SIZE_IO);
/// Batch IO: prepare (`UBLK_F_BATCH_IO`). Linux 7.0+.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr(b'u', 0x25, SIZE_BATCH);
/// Batch IO: commit.
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr(b'u', 0x26, SIZE_BATCH);
/// Batch IO: multishot fetch.
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr(b'u', 0x27, SIZE_BATCH);

/// IO command result: a request was delivered.
pub const UBLK_IO_RES_OK: i32 = 0;
/// IO command result: issue NEED_GET_DATA for this WRITE.
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// IO command result: the device is going away; do not re-fetch (`-ENODEV`).
pub const UBLK_IO_RES_ABORT: i32 = -19;

// ------------------------------------------------------------------ user copy offsets ----

/// mmap offset of queue 0's `ublksrv_io_desc` array.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
/// Start of the USER_COPY window of `/dev/ublkcN`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
/// Most tags per queue.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
/// Offset bits of one request's buffer (so at most 32 MiB per request).
pub const UBLK_IO_BUF_OFF: u32 = 0;
/// Width of the in-request offset.
pub const UBLK_IO_BUF_BITS: u32 = 25;
/// Mask of the in-request offset.
pub const UBLK_IO_BUF_BITS_MASK: u64 = (1 << UBLK_IO_BUF_BITS) - 1;
/// Shift of the tag in a USER_COPY offset.
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
/// Width of the tag.
pub const UBLK_TAG_BITS: u32 = 16;
/// Mask of the tag.
pub const UBLK_TAG_BITS_MASK: u64 = (1 << UBLK_TAG_BITS) - 1;
/// Shift of the queue id in a USER_COPY offset.
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
/// Width of the queue id.
pub const UBLK_QID_BITS: u32 = 12;
/// Mask of the queue id.
pub const UBLK_QID_BITS_MASK: u64 = (1 << UBLK_QID_BITS) - 1;
/// Most queues per device.
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;
/// Total width of a USER_COPY offset above `UBLKSRV_IO_BUF_OFFSET`.
pub const UBLKSRV_IO_BUF_TOTAL_BITS: u32 = UBLK_QID_OFF + UBLK_QID_BITS;
/// Size of the USER_COPY window.
pub const UBLKSRV_IO_BUF_TOTAL_SIZE: u64 = 1 << UBLKSRV_IO_BUF_TOTAL_BITS;
/// Bit selecting the integrity buffer instead of the data buffer (`UBLK_F_INTEGRITY`).
pub const UBLK_INTEGRITY_FLAG_OFF: u32 = 62;
/// `1 << UBLK_INTEGRITY_FLAG_OFF`.
pub const UBLKSRV_IO_INTEGRITY_FLAG: u64 = 1 << UBLK_INTEGRITY_FLAG_OFF;

/// The `/dev/ublkcN` file offset at which `pread`/`pwrite` reach byte `offset` of the request
/// `(q_id, tag)` under `UBLK_F_USER_COPY`. `None` when a field does not fit its bits.
pub const fn ublk_user_copy_pos(q_id: u16, tag: u16, offset: u32) -> Option<u64> {
    if q_id as u64 > UBLK_QID_BITS_MASK || offset as u64 > UBLK_IO_BUF_BITS_MASK {
        return None;
    }
    Some(
        UBLKSRV_IO_BUF_OFFSET
            + ((q_id as u64) << UBLK_QID_OFF)
            + ((tag as u64) << UBLK_TAG_OFF)
            + offset as u64,
    )
}

const _: () =
    assert!(UBLKSRV_IO_BUF_OFFSET + UBLKSRV_IO_BUF_TOTAL_SIZE < UBLKSRV_IO_INTEGRITY_FLAG);
const _: () = assert!(UBLK_MAX_QUEUE_DEPTH as u64 <= UBLK_TAG_BITS_MASK + 1);

// ------------------------------------------------------------------ feature flags ----

/// Zero copy by io_uring buffer registration (defined 6.0, usable 6.15+; stripped by 6.12).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Complete commands through task work; always forced on by the kernel.
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// Two-step WRITE: the server supplies the buffer after seeing the request.
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// The device survives its server; outstanding IO fails when it dies. Linux 6.1+.
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// With USER_RECOVERY: outstanding IO is reissued to the next server. Linux 6.1+.
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// Unprivileged devices. Linux 6.3+.
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// ioctl-encoded opcodes. Linux 6.4+ (forced on).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Data moves by pread/pwrite on `/dev/ublkcN`. Linux 6.5+.
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
/// Zoned device; needs USER_COPY. Linux 6.6+.
pub const UBLK_F_ZONED: u64 = 1 << 8;
/// With USER_RECOVERY: IO fails, rather than waits, while there is no server. Linux 6.13+.
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
/// `UBLK_U_CMD_UPDATE_SIZE`. Linux 6.16+.
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
/// Request pages are registered as a fixed buffer before the command completes. Linux 6.16+.
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
/// `UBLK_U_CMD_QUIESCE_DEV`; needs USER_RECOVERY. Linux 6.16+.
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
/// Each tag may have its own daemon task. Linux 6.16+.
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
/// Buffer (un)registration from any task. Linux 6.17+.
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
/// Batched IO commands. Linux 7.0+.
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
/// Integrity metadata; needs USER_COPY. Linux 7.0+.
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
/// `UBLK_U_CMD_TRY_STOP_DEV`. Linux 7.0+.
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
/// No partition scan at START_DEV. Linux 7.0+.
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
/// Shared-memory zero copy (7.1 development; unstable, unused by userdm).
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;

/// Every flag above with its kernel name, in bit order.
pub const UBLK_F_NAMES: [(u64, &str); 20] = [
    (UBLK_F_SUPPORT_ZERO_COPY, "UBLK_F_SUPPORT_ZERO_COPY"),
    (
        UBLK_F_URING_CMD_COMP_IN_TASK,
        "UBLK_F_URING_CMD_COMP_IN_TASK",
    ),
    (UBLK_F_NEED_GET_DATA, "UBLK_F_NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "UBLK_F_USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "UBLK_F_USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UBLK_F_UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "UBLK_F_CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "UBLK_F_USER_COPY"),
    (UBLK_F_ZONED, "UBLK_F_ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "UBLK_F_USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UBLK_F_UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "UBLK_F_AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "UBLK_F_QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "UBLK_F_PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "UBLK_F_BUF_REG_OFF_DAEMON"),
    (UBLK_F_BATCH_IO, "UBLK_F_BATCH_IO"),
    (UBLK_F_INTEGRITY, "UBLK_F_INTEGRITY"),
    (UBLK_F_SAFE_STOP_DEV, "UBLK_F_SAFE_STOP_DEV"),
    (UBLK_F_NO_AUTO_PART_SCAN, "UBLK_F_NO_AUTO_PART_SCAN"),
    (UBLK_F_SHMEM_ZC, "UBLK_F_SHMEM_ZC"),
];

// ------------------------------------------------------------------ device states ----

/// No disk.
pub const UBLK_S_DEV_DEAD: u16 = 0;
/// Disk present, server serving.
pub const UBLK_S_DEV_LIVE: u16 = 1;
/// Server gone (recovery enabled); IO waits.
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
/// Server gone (USER_RECOVERY_FAIL_IO); IO fails. Linux 6.13+.
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ------------------------------------------------------------------ request ops and flags ----

/// READ.
pub const UBLK_IO_OP_READ: u8 = 0;
/// WRITE.
pub const UBLK_IO_OP_WRITE: u8 = 1;
/// FLUSH.
pub const UBLK_IO_OP_FLUSH: u8 = 2;
/// DISCARD.
pub const UBLK_IO_OP_DISCARD: u8 = 3;
/// WRITE_SAME (never sent by current kernels).
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
/// WRITE_ZEROES.
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
/// ZONE_OPEN.
pub const UBLK_IO_OP_ZONE_OPEN: u8 = 10;
/// ZONE_CLOSE.
pub const UBLK_IO_OP_ZONE_CLOSE: u8 = 11;
/// ZONE_FINISH.
pub const UBLK_IO_OP_ZONE_FINISH: u8 = 12;
/// ZONE_APPEND.
pub const UBLK_IO_OP_ZONE_APPEND: u8 = 13;
/// ZONE_RESET_ALL.
pub const UBLK_IO_OP_ZONE_RESET_ALL: u8 = 14;
/// ZONE_RESET.
pub const UBLK_IO_OP_ZONE_RESET: u8 = 15;
/// REPORT_ZONES (a `blk_zone` array is returned).
pub const UBLK_IO_OP_REPORT_ZONES: u8 = 18;

/// Do not retry on device errors.
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
/// Do not retry on transport errors.
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
/// Do not retry on driver errors.
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
/// Metadata IO.
pub const UBLK_IO_F_META: u32 = 1 << 11;
/// Forced unit access.
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
/// WRITE_ZEROES must not deallocate.
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
/// Swap IO.
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;
/// AUTO_BUF_REG failed with FALLBACK set: register the buffer by hand.
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;
/// The request has an integrity buffer.
pub const UBLK_IO_F_INTEGRITY: u32 = 1 << 18;
/// The buffer is in registered shared memory (7.1 development; unstable).
pub const UBLK_IO_F_SHMEM_ZC: u32 = 1 << 19;

/// `ublksrv_get_op`: the op byte of `op_flags`.
pub const fn ublksrv_get_op(op_flags: u32) -> u8 {
    (op_flags & 0xff) as u8
}

/// `ublksrv_get_flags`: the flag bits of `op_flags`, shifted down by 8 as the header does.
pub const fn ublksrv_get_flags(op_flags: u32) -> u32 {
    op_flags >> 8
}

// ------------------------------------------------------------------ structs ----

/// A control command, carried in the 80-byte command area of an SQE128 `URING_CMD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_cmd {
    /// Target device (`u32::MAX` in ADD_DEV: let the kernel pick).
    pub dev_id: u32,
    /// Target queue, `u16::MAX` (-1) when not queue-specific.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// Command-specific buffer (in or out).
    pub addr: u64,
    /// Inline data.
    pub data: [u64; 1],
    /// Length of the char device path at the start of `addr` (unprivileged devices and
    /// GET_DEV_INFO2), including the NUL.
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// Device information, negotiated by ADD_DEV and read by GET_DEV_INFO.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_dev_info {
    /// Number of hardware queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request buffer in bytes (rounded down to a page by the kernel).
    pub max_io_buf_bytes: u32,
    /// Device id (N in `/dev/ublkcN`).
    pub dev_id: u32,
    /// Server pid (-1 when none).
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*`.
    pub flags: u64,
    /// Server-private, invisible to the driver.
    pub ublksrv_flags: u64,
    /// Owner uid, stored by the kernel.
    pub owner_uid: u32,
    /// Owner gid, stored by the kernel.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// One request, in the read-only array the server mmaps from `/dev/ublkcN`, indexed by tag.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublksrv_io_desc {
    /// Op in bits 0-7, `UBLK_IO_F_*` flags above.
    pub op_flags: u32,
    /// Sectors (or zones, for REPORT_ZONES).
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// Server buffer address given at fetch.
    pub addr: u64,
}

/// An IO command, carried in the 16-byte command area of a normal `URING_CMD` SQE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublksrv_io_cmd {
    /// Queue id.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result, for COMMIT: bytes done or -errno.
    pub result: i32,
    /// Buffer address (or zone append LBA, or fixed-buffer index for (UN)REGISTER_IO_BUF).
    pub addr: u64,
}

/// Fallback flag of `ublk_auto_buf_reg`: deliver the request with `UBLK_IO_F_NEED_REG_BUF`
/// instead of failing it when registration fails.
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;
/// Every valid `ublk_auto_buf_reg` flag.
pub const UBLK_AUTO_BUF_REG_F_MASK: u8 = UBLK_AUTO_BUF_REG_FALLBACK;

/// Auto buffer registration data, carried in `sqe->addr` of FETCH and COMMIT_AND_FETCH.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_auto_buf_reg {
    /// Fixed-buffer index to register the request's pages at.
    pub index: u16,
    /// `UBLK_AUTO_BUF_REG_*`.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved0: u8,
    /// Reserved, zero.
    pub reserved1: u32,
}

/// `ublk_auto_buf_reg_to_sqe_addr`.
pub const fn ublk_auto_buf_reg_to_sqe_addr(buf: ublk_auto_buf_reg) -> u64 {
    buf.index as u64
        | (buf.flags as u64) << 16
        | (buf.reserved0 as u64) << 24
        | (buf.reserved1 as u64) << 32
}

/// `ublk_sqe_addr_to_auto_buf_reg`.
pub const fn ublk_sqe_addr_to_auto_buf_reg(addr: u64) -> ublk_auto_buf_reg {
    ublk_auto_buf_reg {
        index: addr as u16,
        flags: (addr >> 16) as u8,
        reserved0: (addr >> 24) as u8,
        reserved1: (addr >> 32) as u32,
    }
}

/// Element header of the batch IO commands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_elem_header {
    /// Tag.
    pub tag: u16,
    /// Fixed-buffer index (AUTO_BUF_REG).
    pub buf_index: u16,
    /// Result (commit only).
    pub result: i32,
}

/// Batch element flag: a zone append LBA follows.
pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
/// Batch element flag: a buffer address follows.
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
/// Batch flag: AUTO_BUF_REG fallback.
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

/// Command area of the batch IO commands (`UBLK_F_BATCH_IO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_batch_io {
    /// Queue id.
    pub q_id: u16,
    /// `UBLK_BATCH_F_*`.
    pub flags: u16,
    /// Elements in the buffer.
    pub nr_elem: u16,
    /// Bytes per element.
    pub elem_bytes: u8,
    /// Reserved.
    pub reserved: u8,
    /// Reserved.
    pub reserved2: u64,
}

/// `UBLK_U_CMD_REG_BUF` argument (7.1 development; `len` was `u64` in another tree).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_shmem_buf_reg {
    /// Page-aligned address of the shared memory.
    pub addr: u64,
    /// Page-aligned length.
    pub len: u32,
    /// `UBLK_SHMEM_BUF_READ_ONLY`.
    pub flags: u32,
}

/// Pin without FOLL_WRITE.
pub const UBLK_SHMEM_BUF_READ_ONLY: u32 = 1 << 0;

/// `ublk_param_basic.attrs`: read-only disk.
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
/// Rotational disk.
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
/// Volatile write cache (FLUSH is meaningful).
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// FUA is honoured (only with a volatile cache).
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

/// Basic parameters; the only mandatory block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_basic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size (9..=PAGE_SHIFT).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size (≥ logical).
    pub physical_bs_shift: u8,
    /// log2 of the optimal IO size.
    pub io_opt_shift: u8,
    /// log2 of the minimum IO size.
    pub io_min_shift: u8,
    /// Largest request in sectors (≤ max_io_buf_bytes / 512).
    pub max_sectors: u32,
    /// Chunk (zone) size in sectors.
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask.
    pub virt_boundary_mask: u64,
}

/// Discard and write-zeroes limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_discard {
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Discard granularity in bytes (must be non-zero when the block is present).
    pub discard_granularity: u32,
    /// Largest discard in sectors (0: no discard).
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0: no write-zeroes).
    pub max_write_zeroes_sectors: u32,
    /// Must be 1 when `max_discard_sectors` is non-zero.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// Device numbers; read-only (GET_PARAMS fills it, SET_PARAMS refuses it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_devt {
    /// Major of `/dev/ublkcN`.
    pub char_major: u32,
    /// Minor of `/dev/ublkcN`.
    pub char_minor: u32,
    /// Major of `/dev/ublkbN` (0 before START_DEV).
    pub disk_major: u32,
    /// Minor of `/dev/ublkbN`.
    pub disk_minor: u32,
}

/// Zoned limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_zoned {
    /// Most open zones.
    pub max_open_zones: u32,
    /// Most active zones.
    pub max_active_zones: u32,
    /// Largest zone append in sectors.
    pub max_zone_append_sectors: u32,
    /// Reserved.
    pub reserved: [u8; 20],
}

/// DMA alignment (Linux 6.14+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_dma_align {
    /// Alignment mask (power of two minus one, below PAGE_SIZE).
    pub alignment: u32,
    /// Padding.
    pub pad: [u8; 4],
}

/// Smallest segment the kernel accepts in `ublk_param_segment`.
pub const UBLK_MIN_SEGMENT_SIZE: u32 = 4096;

/// Segment limits (Linux 6.14+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_segment {
    /// Segment boundary mask (+1 must be a power of two ≥ 4096).
    pub seg_boundary_mask: u64,
    /// Largest segment in bytes (≥ 4096).
    pub max_segment_size: u32,
    /// Most segments per request.
    pub max_segments: u16,
    /// Padding.
    pub pad: [u8; 2],
}

/// Integrity parameters (Linux 7.0+, `UBLK_F_INTEGRITY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_param_integrity {
    /// `LBMD_PI_CAP_*`.
    pub flags: u32,
    /// Most integrity segments (0: no limit).
    pub max_integrity_segments: u16,
    /// log2 of the protection interval.
    pub interval_exp: u8,
    /// Metadata bytes per interval (non-zero).
    pub metadata_size: u8,
    /// Offset of the PI tuple in the metadata.
    pub pi_offset: u8,
    /// `LBMD_PI_CSUM_*`.
    pub csum_type: u8,
    /// Tag size.
    pub tag_size: u8,
    /// Padding.
    pub pad: [u8; 5],
}

/// `ublk_params.types`: basic block present.
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
/// Discard block present.
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// Devt block present (GET_PARAMS only).
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
/// Zoned block present.
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
/// DMA alignment block present (6.14+).
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
/// Segment block present (6.14+).
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
/// Integrity block present (7.0+).
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

/// Every parameter block. `len` and `types` say how much the two sides understand; the kernel
/// truncates to its own size and masks unknown types.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ublk_params {
    /// Total length the caller provides.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*`.
    pub types: u32,
    /// Basic block.
    pub basic: ublk_param_basic,
    /// Discard block.
    pub discard: ublk_param_discard,
    /// Devt block.
    pub devt: ublk_param_devt,
    /// Zoned block.
    pub zoned: ublk_param_zoned,
    /// DMA alignment block.
    pub dma: ublk_param_dma_align,
    /// Segment block.
    pub seg: ublk_param_segment,
    /// Integrity block.
    pub integrity: ublk_param_integrity,
}

/// Bytes of `ublk_params` up to and including the zoned block: what a 6.12 kernel knows.
pub const UBLK_PARAMS_LEN_6_12: usize = offset_of!(ublk_params, dma);

// ------------------------------------------------------------------ layout asserts ----

macro_rules! assert_layout {
    ($t:ty, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),* $(,)? }) => {
        const _: () = assert!(size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
        $(const _: () = assert!(offset_of!($t, $field) == $off);)*
    };
}

assert_layout!(ublksrv_ctrl_cmd, size 32, align 8, {
    dev_id @ 0, queue_id @ 4, len @ 6, addr @ 8, data @ 16, dev_path_len @ 24, pad @ 26,
    reserved @ 28,
});
assert_layout!(ublksrv_ctrl_dev_info, size 64, align 8, {
    nr_hw_queues @ 0, queue_depth @ 2, state @ 4, pad0 @ 6, max_io_buf_bytes @ 8, dev_id @ 12,
    ublksrv_pid @ 16, pad1 @ 20, flags @ 24, ublksrv_flags @ 32, owner_uid @ 40, owner_gid @ 44,
    reserved1 @ 48, reserved2 @ 56,
});
assert_layout!(ublksrv_io_desc, size 24, align 8, {
    op_flags @ 0, nr_sectors @ 4, start_sector @ 8, addr @ 16,
});
assert_layout!(ublksrv_io_cmd, size 16, align 8, { q_id @ 0, tag @ 2, result @ 4, addr @ 8 });
assert_layout!(ublk_auto_buf_reg, size 8, align 4, {
    index @ 0, flags @ 2, reserved0 @ 3, reserved1 @ 4,
});
assert_layout!(ublk_elem_header, size 8, align 4, { tag @ 0, buf_index @ 2, result @ 4 });
assert_layout!(ublk_batch_io, size 16, align 8, {
    q_id @ 0, flags @ 2, nr_elem @ 4, elem_bytes @ 6, reserved @ 7, reserved2 @ 8,
});
assert_layout!(ublk_shmem_buf_reg, size 16, align 8, { addr @ 0, len @ 8, flags @ 12 });
assert_layout!(ublk_param_basic, size 32, align 8, {
    attrs @ 0, logical_bs_shift @ 4, physical_bs_shift @ 5, io_opt_shift @ 6, io_min_shift @ 7,
    max_sectors @ 8, chunk_sectors @ 12, dev_sectors @ 16, virt_boundary_mask @ 24,
});
assert_layout!(ublk_param_discard, size 20, align 4, {
    discard_alignment @ 0, discard_granularity @ 4, max_discard_sectors @ 8,
    max_write_zeroes_sectors @ 12, max_discard_segments @ 16, reserved0 @ 18,
});
assert_layout!(ublk_param_devt, size 16, align 4, {
    char_major @ 0, char_minor @ 4, disk_major @ 8, disk_minor @ 12,
});
assert_layout!(ublk_param_zoned, size 32, align 4, {
    max_open_zones @ 0, max_active_zones @ 4, max_zone_append_sectors @ 8, reserved @ 12,
});
assert_layout!(ublk_param_dma_align, size 8, align 4, { alignment @ 0, pad @ 4 });
assert_layout!(ublk_param_segment, size 16, align 8, {
    seg_boundary_mask @ 0, max_segment_size @ 8, max_segments @ 12, pad @ 14,
});
assert_layout!(ublk_param_integrity, size 16, align 4, {
    flags @ 0, max_integrity_segments @ 4, interval_exp @ 6, metadata_size @ 7, pi_offset @ 8,
    csum_type @ 9, tag_size @ 10, pad @ 11,
});
assert_layout!(ublk_params, size 152, align 8, {
    len @ 0, types @ 4, basic @ 8, discard @ 40, devt @ 60, zoned @ 76, dma @ 108, seg @ 120,
    integrity @ 136,
});
const _: () = assert!(UBLK_PARAMS_LEN_6_12 == 108);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_kernel_encoding() {
        // Values printed by a C program including <linux/ublk_cmd.h> on x86-64.
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(UBLK_U_CMD_TRY_STOP_DEV, 0xc020_7517);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xc010_7522);
        assert_eq!(UBLK_U_IO_REGISTER_IO_BUF, 0xc010_7523);
        assert_eq!(UBLK_U_IO_UNREGISTER_IO_BUF, 0xc010_7524);
        assert_eq!(ioc_nr(UBLK_U_CMD_ADD_DEV), UBLK_CMD_ADD_DEV);
        assert_eq!(ioc_type(UBLK_U_IO_FETCH_REQ), b'u');
    }

    #[test]
    fn user_copy_positions() {
        assert_eq!(ublk_user_copy_pos(0, 0, 0), Some(UBLKSRV_IO_BUF_OFFSET));
        assert_eq!(
            ublk_user_copy_pos(1, 2, 512),
            Some(0x8000_0000 + (1 << 41) + (2 << 25) + 512)
        );
        assert_eq!(ublk_user_copy_pos(4096, 0, 0), None);
        assert_eq!(ublk_user_copy_pos(0, 0, 1 << 25), None);
        let last = ublk_user_copy_pos(4095, u16::MAX, (1 << 25) - 1).unwrap();
        assert!(last < UBLKSRV_IO_BUF_OFFSET + UBLKSRV_IO_BUF_TOTAL_SIZE);
    }

    #[test]
    fn auto_buf_reg_round_trips() {
        let reg = ublk_auto_buf_reg {
            index: 0x1234,
            flags: UBLK_AUTO_BUF_REG_FALLBACK,
            reserved0: 0,
            reserved1: 0,
        };
        let addr = ublk_auto_buf_reg_to_sqe_addr(reg);
        assert_eq!(addr, 0x0001_1234);
        assert_eq!(ublk_sqe_addr_to_auto_buf_reg(addr), reg);
    }

    #[test]
    fn op_flags_split() {
        let op_flags = u32::from(UBLK_IO_OP_WRITE) | UBLK_IO_F_FUA;
        assert_eq!(ublksrv_get_op(op_flags), UBLK_IO_OP_WRITE);
        assert_eq!(ublksrv_get_flags(op_flags), UBLK_IO_F_FUA >> 8);
    }

    #[test]
    fn flag_names_are_in_bit_order() {
        for (bit, (flag, name)) in UBLK_F_NAMES.iter().enumerate() {
            assert_eq!(*flag, 1u64 << bit, "{name}");
            assert!(name.starts_with("UBLK_F_"));
        }
    }
}
