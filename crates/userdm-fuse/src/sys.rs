//! The few syscalls libc has no safe wrapper for: mount, unmount, the `/dev/fuse` clone ioctl,
//! poll. This is the only module with `unsafe`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

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
