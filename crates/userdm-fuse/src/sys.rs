//! The few syscalls libc has no safe wrapper for: mount, unmount, the `/dev/fuse` clone ioctl,
//! poll, and one linked pair of io_uring operations. This is the only module with `unsafe`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use userdm_io::Errno;
use userdm_uring::Reactor;

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = (2 << 30) | (4 << 16) | (229 << 8);

/// Opens `/dev/fuse` for a new connection (blocking) or a clone (`nonblocking`).
pub(crate) fn open_fuse_device(nonblocking: bool) -> io::Result<File> {
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open("/dev/fuse")
}

/// Opens a new `/dev/fuse` descriptor attached to `session`'s connection, so that a worker
/// thread reads its own requests without contending on one file's wait queue lock.
pub(crate) fn clone_fuse_device(session: &File) -> io::Result<File> {
    let clone = open_fuse_device(true)?;
    let session_fd: u32 = session
        .as_raw_fd()
        .try_into()
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session fd) through the pointer, which
    // points at a live local; both descriptors are open for the duration of the call.
    let res = unsafe {
        libc::ioctl(
            clone.as_raw_fd(),
            FUSE_DEV_IOC_CLONE as _,
            &session_fd as *const u32,
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `mount(2)`.
pub(crate) fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let source = cstring(source.as_bytes())?;
    let target = cstring(target.as_os_str().as_bytes())?;
    let fstype = cstring(fstype.as_bytes())?;
    let data = cstring(data.as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that lives until the call returns; the
    // kernel copies them.
    let res = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `umount2(2)`.
pub(crate) fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: `target` is a NUL-terminated string that lives until the call returns.
    let res = unsafe { libc::umount2(target.as_ptr(), flags) };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for `fd` to become readable; false on timeout.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: one valid pollfd, borrowed mutably for the call.
        let res = unsafe { libc::poll(&mut pfd, 1, ms) };
        if res >= 0 {
            return Ok(res > 0);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// The effective user and group ids: the owner the kernel records for the mount.
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Polls `file` for readability and reads into `buf` once it is readable, as two linked SQEs
/// submitted together. Returns the read's byte count or errno; a poll failure cancels the read
/// (ECANCELED).
pub(crate) async fn poll_then_read(
    rt: &Reactor,
    file: &File,
    buf: &mut [u8],
) -> Result<usize, Errno> {
    let fd = types::Fd(file.as_raw_fd());
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let poll_entry = opcode::PollAdd::new(fd, libc::POLLIN as u32)
        .build()
        .flags(squeue::Flags::IO_LINK);
    let read_entry = opcode::Read::new(fd, buf.as_mut_ptr(), len).build();
    // SAFETY: the poll touches no memory, and `file` outlives it (borrowed for this call).
    let mut poll_op = pin!(unsafe { rt.submit(poll_entry) });
    // SAFETY: the read writes `buf`, which is mutably borrowed until this function returns; the
    // future lives in this frame, and dropping it before its completion waits for the kernel
    // (Reactor::submit's contract), so the kernel never writes `buf` after the borrow ends.
    let mut read_op = pin!(unsafe { rt.submit(read_entry) });
    // Poll both in the same turn so that both SQEs are queued back to back and the link holds.
    // (If the submission queue fills between them the link is cut, and the read just answers
    // EAGAIN when nothing is there, which the caller retries.)
    let (mut poll_res, mut read_res) = (None, None);
    poll_fn(|cx| {
        if poll_res.is_none() {
            if let Poll::Ready(res) = poll_op.as_mut().poll(cx) {
                poll_res = Some(res);
            }
        }
        if read_res.is_none() {
            if let Poll::Ready(res) = read_op.as_mut().poll(cx) {
                read_res = Some(res);
            }
        }
        if poll_res.is_some() && read_res.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    match read_res {
        Some(res) if res >= 0 => Ok(res as usize),
        Some(res) if res == -libc::ECANCELED => match poll_res {
            Some(p) if p < 0 => Err(Errno::from_neg(p)),
            _ => Err(Errno::EAGAIN),
        },
        Some(res) => Err(Errno::from_neg(res)),
        None => Err(Errno::EIO),
    }
}
