//! The control plane: `/dev/ublk-control` and the SQE128 ring its commands travel on.
//!
//! Every command is synchronous from the caller's point of view: it is pushed, submitted and
//! waited for on this object's own small ring. The kernel runs most of them on an io-wq worker
//! (they may sleep), and some wait for the data plane (START_DEV and END_USER_RECOVERY wait until
//! every tag has been fetched), so a wait can be bounded by a deadline and interrupted by an
//! abort check; an interrupted command is cancelled, and if the kernel still holds its buffer
//! that buffer is leaked rather than freed under it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use userdm_ublk_sys as sys;

use crate::info::{DevInfo, Features};
use crate::UblkError;

/// The default control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How long a wait slice lasts before the abort check runs again.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long a cancelled command is given to finish before its buffer is leaked.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// Bytes of the cpumask asked for by GET_QUEUE_AFFINITY (4096 CPUs; a multiple of 8).
const AFFINITY_MASK_BYTES: usize = 512;

/// Plain data the kernel may read and overwrite with any bytes.
///
/// # Safety
/// Implementors must be `repr(C)` (or arrays) of integers only, so that every bit pattern is a
/// valid value.
pub(crate) unsafe trait Pod: Copy + 'static {}

// SAFETY: all of these are repr(C) structs of integer fields (or integer arrays).
unsafe impl Pod for sys::ublksrv_ctrl_dev_info {}
// SAFETY: as above.
unsafe impl Pod for sys::ublk_params {}
// SAFETY: an array of integers.
unsafe impl Pod for [u64; AFFINITY_MASK_BYTES / 8] {}
// SAFETY: an integer.
unsafe impl Pod for u64 {}
// SAFETY: an array of integers.
unsafe impl<const N: usize> Pod for [u8; N] {}

/// How long to wait for a command, and when to give up early.
pub(crate) struct Wait<'a> {
    timeout: Option<Duration>,
    abort: Option<&'a dyn Fn() -> bool>,
}

impl<'a> Wait<'a> {
    /// Wait as long as it takes.
    pub(crate) const FOREVER: Wait<'static> = Wait {
        timeout: None,
        abort: None,
    };

    /// Wait at most `timeout`.
    pub(crate) fn at_most(timeout: Duration) -> Wait<'static> {
        Wait {
            timeout: Some(timeout),
            abort: None,
        }
    }

    /// Wait at most `timeout`, and stop as soon as `abort` returns true.
    pub(crate) fn at_most_unless(timeout: Duration, abort: &'a dyn Fn() -> bool) -> Wait<'a> {
        Wait {
            timeout: Some(timeout),
            abort: Some(abort),
        }
    }
}

/// One command's header fields.
struct Cmd {
    op: u32,
    name: &'static str,
    dev_id: u32,
    queue_id: u16,
    data0: u64,
}

impl Cmd {
    fn new(op: u32, name: &'static str, dev_id: u32) -> Cmd {
        Cmd {
            op,
            name,
            dev_id,
            queue_id: u16::MAX,
            data0: 0,
        }
    }

    fn data(mut self, data0: u64) -> Cmd {
        self.data0 = data0;
        self
    }

    fn dev(&self) -> Option<u32> {
        (self.dev_id != u32::MAX).then_some(self.dev_id)
    }
}

/// Why a wait ended without a completion.
enum Interrupted {
    TimedOut(Duration),
    Aborted,
}

/// An open `/dev/ublk-control` with its own SQE128 ring. Not shared between threads: make one
/// per thread that needs one (they are cheap).
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    path: PathBuf,
    next_user_data: u64,
}

impl Control {
    /// Opens the control device at `path` (normally [`CONTROL_PATH`]).
    ///
    /// A missing device means the kernel has no ublk (`modprobe ublk_drv`); a refused open means
    /// the caller lacks CAP_SYS_ADMIN. Both errors say so.
    pub fn open(path: impl AsRef<Path>) -> Result<Control, UblkError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => {
                    UblkError::NoUblk { path: path.clone() }
                }
                Some(libc::EACCES | libc::EPERM) => UblkError::Permission { path: path.clone() },
                _ => UblkError::os(format!("cannot open {}", path.display()), e),
            })?;
        let ring = new_ring()?;
        Ok(Control {
            ring,
            file,
            path,
            next_user_data: 1,
        })
    }

    /// The control device's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GET_FEATURES: the flags this driver accepts (Linux 6.5+).
    pub fn features(&mut self) -> Result<Features, UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_GET_FEATURES, "GET_FEATURES", u32::MAX);
        let buf = Box::new(0u64);
        match self.exec(cmd, Some(buf), Wait::FOREVER) {
            Ok((_, Some(buf))) => Ok(Features::from_bits(*buf)),
            Ok((_, None)) => Err(UblkError::InvalidOption(
                "GET_FEATURES lost its buffer".into(),
            )),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                Err(UblkError::FeatureMissing {
                    what: "feature discovery",
                    flag: "UBLK_U_CMD_GET_FEATURES",
                    since: "6.5",
                })
            }
            Err(e) => Err(e),
        }
    }

    /// ADD_DEV: creates `/dev/ublkcN`; returns the negotiated info (id, flags, sizes).
    pub(crate) fn add_dev(
        &mut self,
        info: sys::ublksrv_ctrl_dev_info,
        timeout: Duration,
    ) -> Result<sys::ublksrv_ctrl_dev_info, UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_ADD_DEV, "ADD_DEV", info.dev_id);
        let (_, buf) = self.exec(cmd, Some(Box::new(info)), Wait::at_most(timeout))?;
        buf.map(|b| *b)
            .ok_or_else(|| UblkError::InvalidOption("ADD_DEV lost its buffer".into()))
    }

    /// SET_PARAMS (before START_DEV only).
    pub(crate) fn set_params(
        &mut self,
        id: u32,
        params: &sys::ublk_params,
    ) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_SET_PARAMS, "SET_PARAMS", id);
        self.exec(cmd, Some(Box::new(*params)), Wait::FOREVER)
            .map(drop)
    }

    /// GET_PARAMS, including the read-only device numbers.
    pub fn params(&mut self, id: u32) -> Result<sys::ublk_params, UblkError> {
        let params = sys::ublk_params {
            len: size_of::<sys::ublk_params>() as u32,
            ..Default::default()
        };
        let cmd = Cmd::new(sys::UBLK_U_CMD_GET_PARAMS, "GET_PARAMS", id);
        let (_, buf) = self.exec(cmd, Some(Box::new(params)), Wait::FOREVER)?;
        buf.map(|b| *b)
            .ok_or_else(|| UblkError::InvalidOption("GET_PARAMS lost its buffer".into()))
    }

    /// GET_DEV_INFO.
    pub fn dev_info(&mut self, id: u32) -> Result<DevInfo, UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_GET_DEV_INFO, "GET_DEV_INFO", id);
        let buf = Box::new(sys::ublksrv_ctrl_dev_info::default());
        let (_, buf) = self
            .exec(cmd, Some(buf), Wait::FOREVER)
            .map_err(|e| no_device(e, id))?;
        let raw =
            buf.ok_or_else(|| UblkError::InvalidOption("GET_DEV_INFO lost its buffer".into()))?;
        Ok(DevInfo::from_raw(&raw))
    }

    /// GET_DEV_INFO2: as GET_DEV_INFO, but the request names the char device path (needed for
    /// unprivileged devices; Linux 6.3+).
    pub fn dev_info2(&mut self, id: u32) -> Result<DevInfo, UblkError> {
        const INFO: usize = size_of::<sys::ublksrv_ctrl_dev_info>();
        let path = format!("/dev/ublkc{id}");
        let path_len = path.len() + 1;
        let mut buf = Box::new([0u8; 64 + INFO]);
        buf[..path.len()].copy_from_slice(path.as_bytes());
        let cmd = Cmd::new(sys::UBLK_U_CMD_GET_DEV_INFO2, "GET_DEV_INFO2", id);
        let dev_path_len = path_len as u16;
        let (_, buf) = self
            .exec_with_path(cmd, buf, (path_len + INFO) as u16, dev_path_len)
            .map_err(|e| no_device(e, id))?;
        let bytes = &buf[path_len..path_len + INFO];
        // SAFETY: `bytes` holds exactly size_of::<ublksrv_ctrl_dev_info>() bytes and the struct
        // is plain integers, so any bytes are a valid value; read_unaligned allows any offset.
        let raw: sys::ublksrv_ctrl_dev_info =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Ok(DevInfo::from_raw(&raw))
    }

    /// GET_QUEUE_AFFINITY: the CPUs that submit to queue `queue`, as a kernel cpumask.
    pub(crate) fn queue_affinity(&mut self, id: u32, queue: u16) -> Result<Vec<u8>, UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_GET_QUEUE_AFFINITY, "GET_QUEUE_AFFINITY", id)
            .data(u64::from(queue));
        let buf = Box::new([0u64; AFFINITY_MASK_BYTES / 8]);
        let (_, buf) = self.exec(cmd, Some(buf), Wait::FOREVER)?;
        let words = buf.map(|b| *b).unwrap_or([0; AFFINITY_MASK_BYTES / 8]);
        Ok(words.iter().flat_map(|w| w.to_ne_bytes()).collect())
    }

    /// START_DEV: waits until every tag is fetched, then adds `/dev/ublkbN`.
    pub(crate) fn start_dev(&mut self, id: u32, pid: i32, wait: Wait<'_>) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_START_DEV, "START_DEV", id).data(pid as u64);
        self.exec::<u64>(cmd, None, wait).map(drop)
    }

    /// STOP_DEV: deletes the disk and aborts the server's commands.
    pub(crate) fn stop_dev(&mut self, id: u32) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_STOP_DEV, "STOP_DEV", id);
        self.exec::<u64>(cmd, None, Wait::FOREVER)
            .map(drop)
            .map_err(|e| no_device(e, id))
    }

    /// TRY_STOP_DEV: STOP_DEV unless the disk is open (EBUSY). Linux 7.0+.
    pub(crate) fn try_stop_dev(&mut self, id: u32) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_TRY_STOP_DEV, "TRY_STOP_DEV", id);
        self.exec::<u64>(cmd, None, Wait::FOREVER).map(drop)
    }

    /// DEL_DEV: removes the device; waits (up to `timeout`) for its last reference.
    pub(crate) fn del_dev(&mut self, id: u32, timeout: Duration) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_DEL_DEV, "DEL_DEV", id);
        self.exec::<u64>(cmd, None, Wait::at_most(timeout))
            .map(drop)
            .map_err(|e| no_device(e, id))
    }

    /// DEL_DEV_ASYNC: removes the device without waiting for its last reference (6.9+).
    pub(crate) fn del_dev_async(&mut self, id: u32) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_DEL_DEV_ASYNC, "DEL_DEV_ASYNC", id);
        self.exec::<u64>(cmd, None, Wait::FOREVER)
            .map(drop)
            .map_err(|e| no_device(e, id))
    }

    /// START_USER_RECOVERY.
    pub(crate) fn start_user_recovery(&mut self, id: u32) -> Result<(), UblkError> {
        let cmd = Cmd::new(
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            "START_USER_RECOVERY",
            id,
        );
        self.exec::<u64>(cmd, None, Wait::FOREVER).map(drop)
    }

    /// END_USER_RECOVERY: waits until every tag is fetched again, then resumes IO.
    pub(crate) fn end_user_recovery(
        &mut self,
        id: u32,
        pid: i32,
        wait: Wait<'_>,
    ) -> Result<(), UblkError> {
        let cmd =
            Cmd::new(sys::UBLK_U_CMD_END_USER_RECOVERY, "END_USER_RECOVERY", id).data(pid as u64);
        self.exec::<u64>(cmd, None, wait).map(drop)
    }

    /// UPDATE_SIZE (Linux 6.16+).
    pub(crate) fn update_size(&mut self, id: u32, sectors: u64) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_UPDATE_SIZE, "UPDATE_SIZE", id).data(sectors);
        self.exec::<u64>(cmd, None, Wait::FOREVER).map(drop)
    }

    /// QUIESCE_DEV (Linux 6.16+, needs `UBLK_F_QUIESCE`): `timeout_ms` 0 waits forever.
    pub(crate) fn quiesce_dev(&mut self, id: u32, timeout_ms: u64) -> Result<(), UblkError> {
        let cmd = Cmd::new(sys::UBLK_U_CMD_QUIESCE_DEV, "QUIESCE_DEV", id).data(timeout_ms);
        self.exec::<u64>(cmd, None, Wait::FOREVER).map(drop)
    }

    fn exec<T: Pod>(
        &mut self,
        cmd: Cmd,
        buf: Option<Box<T>>,
        wait: Wait<'_>,
    ) -> Result<(i32, Option<Box<T>>), UblkError> {
        let len = if buf.is_some() { size_of::<T>() } else { 0 };
        let len =
            u16::try_from(len).map_err(|_| UblkError::InvalidOption("buffer too big".into()))?;
        let mut buf = buf;
        // The kernel writes through this address, so derive it from a unique borrow.
        let addr = buf.as_mut().map_or(0, |b| &mut **b as *mut T as u64);
        let header = sys::ublksrv_ctrl_cmd {
            dev_id: cmd.dev_id,
            queue_id: cmd.queue_id,
            len,
            addr,
            data: [cmd.data0],
            ..Default::default()
        };
        self.run(&cmd, header, buf, wait)
    }

    fn exec_with_path<const N: usize>(
        &mut self,
        cmd: Cmd,
        mut buf: Box<[u8; N]>,
        len: u16,
        dev_path_len: u16,
    ) -> Result<(i32, Box<[u8; N]>), UblkError> {
        let header = sys::ublksrv_ctrl_cmd {
            dev_id: cmd.dev_id,
            queue_id: cmd.queue_id,
            len,
            addr: buf.as_mut_ptr() as u64,
            data: [cmd.data0],
            dev_path_len,
            ..Default::default()
        };
        let (res, buf) = self.run(&cmd, header, Some(buf), Wait::FOREVER)?;
        let buf = buf.ok_or_else(|| UblkError::InvalidOption("command lost its buffer".into()))?;
        Ok((res, buf))
    }

    /// Pushes one command and waits for it. `buf`, if any, is what `header.addr` points at; it
    /// is handed back on completion, or leaked if the kernel might still write it.
    fn run<T: Pod>(
        &mut self,
        cmd: &Cmd,
        header: sys::ublksrv_ctrl_cmd,
        buf: Option<Box<T>>,
        wait: Wait<'_>,
    ) -> Result<(i32, Option<Box<T>>), UblkError> {
        let user_data = self.next_user_data;
        self.next_user_data += 1;
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd.op)
            .cmd(encode_ctrl_cmd(&header))
            .build()
            .user_data(user_data);
        self.push(&entry)?;
        match self.wait_for(user_data, &wait) {
            Ok(res) if res < 0 => Err(UblkError::Command {
                cmd: cmd.name,
                dev_id: cmd.dev(),
                source: io::Error::from_raw_os_error(-res),
            }),
            Ok(res) => Ok((res, buf)),
            Err(Interrupted::TimedOut(timeout)) => {
                self.cancel(user_data, buf);
                Err(UblkError::Timeout {
                    cmd: cmd.name,
                    timeout,
                })
            }
            Err(Interrupted::Aborted) => {
                self.cancel(user_data, buf);
                Err(UblkError::Command {
                    cmd: cmd.name,
                    dev_id: cmd.dev(),
                    source: io::Error::from_raw_os_error(libc::ECANCELED),
                })
            }
        }
    }

    fn push(&mut self, entry: &squeue::Entry128) -> Result<(), UblkError> {
        // SAFETY: the only memory the entry points at is the command's buffer, which `run`
        // keeps alive until the CQE arrives or leaks it (see `cancel`).
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            return Err(UblkError::InvalidOption(
                "the ublk control ring is full; a cancelled command never finished".into(),
            ));
        }
        Ok(())
    }

    /// Submits and waits until the CQE with `user_data` arrives.
    fn wait_for(&mut self, user_data: u64, wait: &Wait<'_>) -> Result<i32, Interrupted> {
        let start = Instant::now();
        loop {
            if let Some(res) = self.reap(user_data) {
                return Ok(res);
            }
            let slice = match wait.timeout {
                Some(timeout) => {
                    let left = timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(Interrupted::TimedOut(timeout));
                    }
                    left.min(WAIT_SLICE)
                }
                None if wait.abort.is_some() => WAIT_SLICE,
                None => Duration::from_secs(3600),
            };
            if wait.abort.is_some_and(|abort| abort()) {
                return Err(Interrupted::Aborted);
            }
            let ts = types::Timespec::from(slice);
            let args = types::SubmitArgs::new().timespec(&ts);
            // ETIME is the slice ending, EINTR a signal: both just loop. Anything else means the
            // ring is unusable; report it as the command timing out after what it was given.
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) {
                    return Err(Interrupted::TimedOut(start.elapsed()));
                }
            }
        }
    }

    fn reap(&mut self, user_data: u64) -> Option<i32> {
        let mut found = None;
        for cqe in self.ring.completion() {
            if cqe.user_data() == user_data {
                found = Some(cqe.result());
            }
        }
        found
    }

    /// Cancels an interrupted command. If it does not finish within the grace period the kernel
    /// may still write its buffer, so the buffer and the ring are leaked and a fresh ring made.
    #[cold]
    fn cancel<T: Pod>(&mut self, user_data: u64, buf: Option<Box<T>>) {
        let cancel = opcode::AsyncCancel::new(user_data).build().user_data(0);
        let cancel = squeue::Entry128::from(cancel);
        let finished = self.push(&cancel).is_ok()
            && self
                .wait_for(user_data, &Wait::at_most(CANCEL_GRACE))
                .is_ok();
        if finished {
            drop(buf);
            return;
        }
        if let Some(buf) = buf {
            Box::leak(buf);
        }
        if let Ok(ring) = new_ring() {
            std::mem::forget(std::mem::replace(&mut self.ring, ring));
        }
    }
}

fn new_ring() -> Result<IoUring<squeue::Entry128, cqueue::Entry>, UblkError> {
    IoUring::builder().build(8).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => {
                "; likely cause: io_uring is disabled by sysctl, try 'sysctl -w \
                 kernel.io_uring_disabled=0'"
            }
            Some(libc::EINVAL) => "; this kernel lacks SQE128 rings (Linux 5.19+)",
            _ => "",
        };
        UblkError::os(format!("cannot create the ublk control ring{hint}"), e)
    })
}

/// The 80-byte command area: `ublksrv_ctrl_cmd` in the first 32 bytes, zeros after.
pub(crate) fn encode_ctrl_cmd(c: &sys::ublksrv_ctrl_cmd) -> [u8; 80] {
    let mut out = [0u8; 80];
    out[0..4].copy_from_slice(&c.dev_id.to_ne_bytes());
    out[4..6].copy_from_slice(&c.queue_id.to_ne_bytes());
    out[6..8].copy_from_slice(&c.len.to_ne_bytes());
    out[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    out[16..24].copy_from_slice(&c.data[0].to_ne_bytes());
    out[24..26].copy_from_slice(&c.dev_path_len.to_ne_bytes());
    out[26..28].copy_from_slice(&c.pad.to_ne_bytes());
    out[28..32].copy_from_slice(&c.reserved.to_ne_bytes());
    out
}

/// ENODEV from a per-device command means there is no such device.
fn no_device(e: UblkError, id: u32) -> UblkError {
    if e.raw_os_error() == Some(libc::ENODEV) {
        UblkError::NoDevice { id }
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_control_device_is_explained() {
        let err = Control::open("/nonexistent/ublk-control").err().unwrap();
        assert!(matches!(err, UblkError::NoUblk { .. }));
        assert!(err.to_string().contains("modprobe ublk_drv"), "{err}");
    }

    #[test]
    fn ctrl_cmd_encoding_matches_the_struct_layout() {
        let c = sys::ublksrv_ctrl_cmd {
            dev_id: 0x0102_0304,
            queue_id: 0xffff,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            dev_path_len: 11,
            pad: 0,
            reserved: 0,
        };
        let bytes = encode_ctrl_cmd(&c);
        // SAFETY: ublksrv_ctrl_cmd is 32 bytes of plain integers, read from the first 32 bytes
        // of an 80-byte array.
        let back: sys::ublksrv_ctrl_cmd =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back, c);
        assert!(bytes[32..].iter().all(|b| *b == 0));
    }
}
