//! The few raw system calls the ublk server needs besides io_uring: memory maps, thread
//! placement, the mount namespace, and looking for openers of a block device.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// `PR_SET_IO_FLUSHER` (Linux 5.6): the thread serves writeback, so memory reclaim must not wait
/// on it (allocations behave as GFP_NOIO).
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// `MADV_POPULATE_WRITE` (Linux 5.14), which the libc crate does not name on every target.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// Rounds `value` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn round_up(value: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// A memory mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of anonymous, private, page-aligned memory. Pages are not reserved: they
    /// are faulted in on first touch.
    pub(crate) fn anonymous(len: usize) -> io::Result<Mapping> {
        let len = round_up(len.max(1), page_size()).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: an anonymous mapping at an address the kernel picks; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Mapping::checked(ptr, len)
    }

    /// Asks for small pages only. Tag buffers are touched piecemeal (a 4 KiB request touches one
    /// page of a 512 KiB buffer); with transparent huge pages each first touch would make a
    /// whole 2 MiB page resident.
    pub(crate) fn no_huge_pages(&self) -> io::Result<()> {
        // SAFETY: advice on a range this mapping owns; it changes no contents.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_NOHUGEPAGE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` resident and writable now (`MADV_POPULATE_WRITE`, Linux
    /// 5.14+), instead of at their first touch on the data path.
    pub(crate) fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: the range lies inside this mapping (checked above); populating only faults in
        // zero-filled pages, which changes no contents.
        let res = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                MADV_POPULATE_WRITE,
            )
        };
        if res < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps `len` bytes of `fd` at `offset`, read-only and shared (the ublk io_desc array).
    pub(crate) fn shared_read_only(fd: RawFd, len: usize, offset: u64) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a shared read-only mapping of a descriptor we hold, at an address the kernel
        // picks; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        Mapping::checked(ptr, len)
    }

    fn checked(ptr: *mut libc::c_void, len: usize) -> io::Result<Mapping> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::AddrNotAvailable)?;
        Ok(Mapping { ptr, len })
    }

    /// The first byte.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of the page size for anonymous maps).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value made and nothing else unmaps.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Restricts the calling thread to the CPUs set in `mask` (a kernel cpumask, little-endian
/// bytes). An empty mask is ignored.
pub(crate) fn set_thread_affinity(mask: &[u8]) -> io::Result<()> {
    if mask.iter().all(|b| *b == 0) {
        return Ok(());
    }
    // SAFETY: the kernel reads `mask.len()` bytes from a live slice.
    let res = unsafe { libc::syscall(libc::SYS_sched_setaffinity, 0, mask.len(), mask.as_ptr()) };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks the calling thread as an IO flusher (needs CAP_SYS_RESOURCE).
pub(crate) fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let res = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into a mount namespace of its own, with every mount a slave of the
/// original namespace: mounts made outside still appear here, nothing made here leaks out.
///
/// A ublk server that shares its mount namespace with the users of its own disk can deadlock on
/// exit: tearing down the namespace may sync a filesystem that only the exiting server could
/// serve. Threads spawned afterwards by this thread inherit the namespace.
pub fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let root = CString::new("/").map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: mount(2) with a NUL-terminated target and null source, type and data.
    let res = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling process's id.
pub(crate) fn pid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Reads up to `buf.len()` bytes at `offset` with pread(2).
pub(crate) fn pread(fd: &impl AsRawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: the kernel writes at most `buf.len()` bytes into a live, exclusively borrowed
    // slice.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Writes up to `buf.len()` bytes at `offset` with pwrite(2).
pub(crate) fn pwrite(fd: &impl AsRawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: the kernel reads at most `buf.len()` bytes from a live slice.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Who holds a block device, as far as user space can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// Another block device is stacked on it (`/sys/dev/block/M:m/holders/NAME`).
    Stacked(String),
    /// An exclusive open (a mounted filesystem, swap, an md or dm member) refused `O_EXCL`.
    Exclusive,
    /// A process has it open.
    Process { pid: u32, comm: String },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Stacked(name) => write!(f, "{name} is stacked on it"),
            Holder::Exclusive => f.write_str("it is mounted or claimed exclusively"),
            Holder::Process { pid, comm } => write!(f, "process {pid} ({comm}) has it open"),
        }
    }
}

/// Finds a reason the block device `major:minor` (node `node`) is in use: stacked devices, an
/// exclusive claim (tried with an `O_EXCL` open), then any process's open descriptor (a scan of
/// `/proc/*/fd`). Racy by nature: an open after the check is not seen.
pub(crate) fn find_holder(node: &Path, major: u32, minor: u32) -> Option<Holder> {
    let holders = format!("/sys/dev/block/{major}:{minor}/holders");
    if let Ok(entries) = fs::read_dir(holders) {
        if let Some(entry) = entries.flatten().next() {
            return Some(Holder::Stacked(
                entry.file_name().to_string_lossy().into_owned(),
            ));
        }
    }
    let excl = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(node);
    if let Err(e) = excl {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Some(Holder::Exclusive);
        }
    }
    find_opener(major, minor)
}

fn find_opener(major: u32, minor: u32) -> Option<Holder> {
    let (pid, path) = openers(major, minor).next()?.0;
    let comm = fs::read(path.join("comm")).unwrap_or_default();
    let comm = std::ffi::OsStr::from_bytes(comm.trim_ascii_end());
    Some(Holder::Process {
        pid,
        comm: comm.to_string_lossy().into_owned(),
    })
}

/// The processes other than this one with open descriptors of the block device
/// `major:minor`: each one's pid and `/proc` directory, with how many descriptors it has.
fn openers(major: u32, minor: u32) -> impl Iterator<Item = ((u32, std::path::PathBuf), u32)> {
    let rdev = libc::makedev(major, minor);
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |proc_entry| {
            let pid = proc_entry.file_name().to_str()?.parse::<u32>().ok()?;
            if pid == me {
                return None;
            }
            let fds = fs::read_dir(proc_entry.path().join("fd")).ok()?;
            let count = fds
                .flatten()
                .filter(|fd| {
                    fs::metadata(fd.path())
                        .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
                })
                .count() as u32;
            (count > 0).then(|| ((pid, proc_entry.path()), count))
        })
}

/// Who uses the block device `major:minor`, as far as user space can see without touching it:
/// devices stacked on it (sysfs holders), mounts of it (the initial mount namespace's
/// mountinfo), and open descriptors of other processes (a scan of `/proc/*/fd`).
///
/// Unlike [`find_holder`] this never opens the device, so polling it cannot make a concurrent
/// `mount` or `mkfs` fail with EBUSY. A snapshot: an open after the scan is not seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockUsers {
    /// Block devices stacked on it.
    pub holders: u32,
    /// Mount entries of it.
    pub mounts: u32,
    /// Open descriptors in other processes.
    pub descriptors: u32,
}

impl BlockUsers {
    /// The openers the kernel's device-mapper would count: each holder, each mounted
    /// filesystem and each open descriptor.
    pub fn total(&self) -> u32 {
        self.holders + self.mounts + self.descriptors
    }

    /// Scans for the users of `major:minor`.
    pub fn scan(major: u32, minor: u32) -> BlockUsers {
        let holders = fs::read_dir(format!("/sys/dev/block/{major}:{minor}/holders"))
            .map(|d| d.flatten().count() as u32)
            .unwrap_or(0);
        // PID 1's namespace is where the administrator's mounts are; a server in a container
        // without access to it looks at its own.
        let devt = format!("{major}:{minor}");
        let mountinfo = fs::read_to_string("/proc/1/mountinfo")
            .or_else(|_| fs::read_to_string("/proc/self/mountinfo"))
            .unwrap_or_default();
        let mounts = mountinfo
            .lines()
            .filter(|line| line.split(' ').nth(2) == Some(devt.as_str()))
            .count() as u32;
        BlockUsers {
            holders,
            mounts,
            descriptors: count_openers(major, minor),
        }
    }
}

/// Open descriptors of the block device `major:minor` in processes other than this one.
fn count_openers(major: u32, minor: u32) -> u32 {
    openers(major, minor).map(|(_, n)| n).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_uses_an_unused_number() {
        assert_eq!(BlockUsers::scan(4095, 1_048_575).total(), 0);
    }

    /// A process holding a loop device open is counted, and found as its holder (skipped
    /// where loop devices cannot be made).
    #[test]
    fn another_process_holding_a_block_device_counts() {
        use std::os::unix::fs::MetadataExt;
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!("userdm-ublk-os-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let img = dir.join("img");
        fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output();
        let Some(dev) = out
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        else {
            eprintln!("skipped: no loop device");
            return;
        };
        let rdev = fs::metadata(&dev).unwrap().rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let mut holder = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::from(fs::File::open(&dev).unwrap()))
            .spawn()
            .unwrap();
        let users = BlockUsers::scan(major, minor);
        let found = find_opener(major, minor);
        let _ = holder.kill();
        let _ = holder.wait();
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(users.descriptors, 1, "{users:?}");
        assert!(
            matches!(found, Some(Holder::Process { pid, .. }) if pid == holder.id()),
            "{found:?}"
        );
    }

    #[test]
    fn anonymous_mapping_is_page_aligned_and_writable() {
        let map = Mapping::anonymous(10_000).unwrap();
        assert_eq!(map.as_ptr() as usize % page_size(), 0);
        assert!(map.len() >= 10_000);
        assert_eq!(map.len() % page_size(), 0);
        // SAFETY: the mapping is live and writable for `len` bytes.
        unsafe {
            map.as_ptr().write(7);
            map.as_ptr().add(map.len() - 1).write(9);
            assert_eq!(map.as_ptr().read(), 7);
        }
    }

    #[test]
    fn buffers_populate_inside_the_mapping_only() {
        let map = Mapping::anonymous(1 << 20).unwrap();
        map.no_huge_pages().unwrap();
        map.populate(0, 128 << 10).unwrap();
        map.populate((1 << 20) - 4096, 4096).unwrap();
        // The first page is resident now: mincore says so.
        let mut vec = [0u8; 1];
        // SAFETY: asks about one page of a live mapping into a one-byte vector.
        let res = unsafe { libc::mincore(map.as_ptr().cast(), 4096, vec.as_mut_ptr()) };
        assert_eq!(res, 0);
        assert_eq!(vec[0] & 1, 1);
        let err = map.populate((1 << 20) - 4096, 8192).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(map.populate(usize::MAX, 2).is_err());
    }

    #[test]
    fn round_up_works() {
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(usize::MAX, 4096), None);
    }

    #[test]
    fn no_holder_for_an_unused_number() {
        // A device number nothing uses: no holders directory, no openers.
        assert_eq!(find_opener(4095, 1_048_575), None);
    }
}
