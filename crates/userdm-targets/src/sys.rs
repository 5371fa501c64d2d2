//! The block-device ioctls targets need, and the only `unsafe` in this crate.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `BLKSSZGET`: `_IO(0x12, 104)`, the logical block size as an `int`.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKPBSZGET`: `_IO(0x12, 123)`, the physical block size as an `unsigned int`.
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// The logical block size of the block device open as `file`.
pub(crate) fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at a live, aligned
    // `c_int` on our stack for the duration of the call; the fd is open (borrowed from `file`).
    let res = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The physical block size of the block device open as `file`.
pub(crate) fn physical_block_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one `unsigned int` through the pointer, which points at a live,
    // aligned `c_uint` on our stack for the duration of the call; the fd is open.
    let res = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKPBSZGET as _,
            &mut size as *mut libc::c_uint,
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctls_on_a_regular_file_fail_cleanly() {
        let f = tempfile::tempfile().unwrap();
        assert_eq!(
            logical_block_size(&f).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert!(physical_block_size(&f).is_err());
    }
}
