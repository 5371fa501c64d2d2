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

/// Whether `file` lives on a filesystem held entirely in memory (tmpfs, ramfs), whose reads and
/// writes never wait for a device.
pub(crate) fn is_memory_filesystem(file: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one `statfs` through the pointer, which points at a live, aligned
    // struct on our stack for the duration of the call; the fd is open (borrowed from `file`).
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } < 0 {
        return false;
    }
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    st.f_type == libc::TMPFS_MAGIC || st.f_type == RAMFS_MAGIC
}

/// Where `lseek(SEEK_DATA)` or `lseek(SEEK_HOLE)` from `offset` lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seek {
    /// The next data (or hole) starts here.
    At(u64),
    /// `ENXIO`: no data at or after `offset` (or `offset` is at or past the end of the file).
    NoMore,
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Seek> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek takes no pointers; the fd is open (borrowed from `file`). SEEK_DATA and
    // SEEK_HOLE move the file position, which no other code uses: all IO on backing files is
    // positioned (io_uring reads and writes with explicit offsets).
    let res = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if res >= 0 {
        return Ok(Seek::At(res as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(Seek::NoMore)
    } else {
        Err(e)
    }
}

/// `lseek(SEEK_DATA)`: the first byte of data at or after `offset`.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Seek> {
    lseek(file, offset, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`: the first byte of a hole at or after `offset` (the end of the file counts
/// as a hole).
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<Seek> {
    lseek(file, offset, libc::SEEK_HOLE)
}

/// `fallocate(2)` of `offset..offset + len` with `mode` (0 reserves blocks;
/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` frees them).
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let overflow = || io::Error::from_raw_os_error(libc::EOVERFLOW);
    let offset = libc::off_t::try_from(offset).map_err(|_| overflow())?;
    let len = libc::off_t::try_from(len).map_err(|_| overflow())?;
    // SAFETY: fallocate takes no pointers; the fd is open (borrowed from `file`).
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes `flock(LOCK_EX)` on `file` without waiting; it is released when the file closes,
/// including when the process dies.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock takes no pointers; the fd is open (borrowed from `file`).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_filesystems_are_recognised() {
        let f = tempfile::tempfile().unwrap();
        // The temporary directory may or may not be tmpfs; /dev/shm is tmpfs where it exists.
        let _ = is_memory_filesystem(&f);
        if let Ok(shm) = tempfile::tempfile_in("/dev/shm") {
            assert!(is_memory_filesystem(&shm));
        }
        assert!(!is_memory_filesystem(
            &File::open("/proc/self/stat").unwrap()
        ));
    }

    #[test]
    fn seek_data_and_hole_find_a_written_block() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 512 << 10).unwrap();
        // Filesystems without hole tracking report all data; the answers must still be sane.
        match seek_data(&f, 0).unwrap() {
            Seek::At(d) => assert!(d <= 512 << 10, "{d}"),
            Seek::NoMore => panic!("data was written"),
        }
        match seek_hole(&f, 512 << 10).unwrap() {
            Seek::At(h) => assert!(h > 512 << 10 && h <= 1 << 20, "{h}"),
            Seek::NoMore => panic!("the end of the file is a hole"),
        }
        assert_eq!(seek_data(&f, 1 << 20).unwrap(), Seek::NoMore);
    }

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
