//! A target's backing store: a regular file or a block device, opened once when the table is
//! loaded, and every kind of IO on it through the reactor.
//!
//! Every target that maps onto another device (linear, striped, delay, flakey, dust, error with
//! a device) uses this module, so file IO is written once.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use userdm_io::{Errno, IoError, IoFlags, IoHeader, IoOp, IoResult, SECTOR_SIZE};
use userdm_table::{Allocation, Dep, TargetLimits};
use userdm_uring::Reactor;

use crate::args::escape_word;
use crate::TargetContext;

/// Zeros to write from when a filesystem cannot zero a range itself. Static, so writing zeros
/// allocates nothing; 64 KiB keeps the number of writes per MiB small.
pub(crate) static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// What the backing path named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackingKind {
    /// A regular file: shown in tables by its path.
    File,
    /// A block device: shown in tables as `major:minor`, as the kernel does.
    Block { major: u32, minor: u32 },
}

/// An open backing file or block device.
#[derive(Debug)]
pub(crate) struct Backing {
    file: File,
    /// The path as the table gave it.
    path: String,
    kind: BackingKind,
    size_bytes: u64,
    limits: TargetLimits,
    /// A regular file on tmpfs or ramfs: reads and writes are plain `pread`/`pwrite` on the
    /// calling thread. They are memory copies that never wait for a device, and io_uring would
    /// hand each of them to a kernel worker thread (these filesystems do not take non-blocking
    /// buffered IO), which costs a thread switch per request.
    in_memory: bool,
    /// The filesystem refused `PUNCH_HOLE`; remembered so that every discard does not ask again.
    punch_hole_refused: AtomicBool,
    /// The filesystem refused `ZERO_RANGE`.
    zero_range_refused: AtomicBool,
}

/// The kernel's `format_dev_t`: how devices appear in `dmsetup table` and `status`.
pub(crate) fn format_dev(major: u32, minor: u32) -> String {
    format!("{major}:{minor}")
}

/// `MAJ:MIN` as the kernel's `dm_get_device` accepts in place of a path.
fn parse_dev(path: &str) -> Option<(u32, u32)> {
    let (major, minor) = path.split_once(':')?;
    Some((
        crate::args::parse_u32(major)?,
        crate::args::parse_u32(minor)?,
    ))
}

impl Backing {
    /// Opens `path` (read-only when the context says so). The error says what was tried and the
    /// OS's reason; callers put their kernel-style prefix in front.
    pub(crate) fn open(ctx: &TargetContext, path: &str) -> Result<Arc<Backing>, String> {
        let open_path = resolve(ctx, path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!ctx.read_only)
            .open(&open_path)
            .map_err(|e| format!("cannot open '{}': {e}", open_path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat '{path}': {e}"))?;
        let file_type = meta.file_type();
        let (kind, size_bytes, limits) = if file_type.is_block_device() {
            let rdev = meta.rdev();
            let kind = BackingKind::Block {
                major: libc::major(rdev),
                minor: libc::minor(rdev),
            };
            // Seeking to the end gives a block device's size without an ioctl.
            let size = (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| format!("cannot get the size of '{path}': {e}"))?;
            (kind, size, block_limits(&file))
        } else if file_type.is_file() {
            (BackingKind::File, meta.len(), TargetLimits::default())
        } else {
            return Err(format!("'{path}' is not a regular file or a block device"));
        };
        let in_memory = kind == BackingKind::File && crate::sys::is_memory_filesystem(&file);
        Ok(Arc::new(Backing {
            file,
            path: path.to_string(),
            kind,
            size_bytes,
            limits,
            in_memory,
            punch_hole_refused: AtomicBool::new(false),
            zero_range_refused: AtomicBool::new(false),
        }))
    }

    /// The name the kernel would print: `maj:min` for a block device, the path for a file.
    pub(crate) fn name(&self) -> String {
        match self.kind {
            BackingKind::Block { major, minor } => format_dev(major, minor),
            BackingKind::File => escape_word(&self.path),
        }
    }

    /// The dependency `dmsetup deps` lists (major 0 minor 0 for a file).
    pub(crate) fn dep(&self) -> Dep {
        let (major, minor) = match self.kind {
            BackingKind::Block { major, minor } => (major, minor),
            BackingKind::File => (0, 0),
        };
        Dep {
            major,
            minor,
            path: self.path.clone(),
        }
    }

    /// The size in bytes when the table was loaded.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The limits the backing store imposes.
    pub(crate) fn limits(&self) -> TargetLimits {
        self.limits
    }

    /// Checks that sectors `start..start + len` lie inside the backing store, as the kernel's
    /// `device_area_is_invalid` does when a table is loaded.
    pub(crate) fn check_area(&self, start: u64, len: u64) -> Result<(), String> {
        let need = start
            .checked_add(len)
            .and_then(|end| end.checked_mul(SECTOR_SIZE));
        match need {
            Some(need) if need <= self.size_bytes => Ok(()),
            _ => Err(format!(
                "'{}' too small for target: start={start}, len={len}, dev_size={} (sectors): \
                 needs {} bytes, has {} bytes",
                self.path,
                self.size_bytes / SECTOR_SIZE,
                need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                self.size_bytes,
            )),
        }
    }

    /// The allocation state at byte `offset` of the store, at most `max_len` long.
    ///
    /// Regular files answer from `lseek(SEEK_HOLE)` and, inside a hole, `lseek(SEEK_DATA)`: one
    /// or two cheap syscalls, no IO. Block devices, and files on filesystems that track no holes,
    /// are all data. Any failure reads as data, which is always correct.
    pub(crate) fn allocation(&self, offset: u64, max_len: u64) -> Allocation {
        if self.kind != BackingKind::File {
            return Allocation::data(max_len);
        }
        let end = offset.saturating_add(max_len);
        match crate::sys::seek_hole(&self.file, offset) {
            Ok(crate::sys::Seek::At(hole)) if hole > offset => {
                return Allocation::data(hole.min(end) - offset);
            }
            Ok(crate::sys::Seek::At(_)) => {}
            // Past the end of the file (truncated since the table was loaded): reads fail
            // there, so claim nothing.
            Ok(crate::sys::Seek::NoMore) | Err(_) => return Allocation::data(max_len),
        }
        // In a hole: it lasts until the next data, or to the end of the file.
        match crate::sys::seek_data(&self.file, offset) {
            Ok(crate::sys::Seek::At(data)) if data > offset => {
                Allocation::hole(data.min(end) - offset)
            }
            Ok(crate::sys::Seek::NoMore) => Allocation::hole(max_len),
            _ => Allocation::data(max_len),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub(crate) async fn read(&self, rt: &Reactor, offset: u64, buf: &mut [u8]) -> IoResult {
        if self.in_memory {
            use std::os::unix::fs::FileExt;
            return match self.file.read_exact_at(buf, offset) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Errno::EIO.into()),
                Err(e) => Err(Errno::new(e.raw_os_error().unwrap_or(libc::EIO)).into()),
            };
        }
        Ok(rt.read_exact_at(&self.file, buf, offset).await?)
    }

    /// Writes `buf` at `offset`; with `fua`, the data is durable when this returns.
    pub(crate) async fn write(&self, rt: &Reactor, offset: u64, buf: &[u8], fua: bool) -> IoResult {
        if self.in_memory {
            use std::os::unix::fs::FileExt;
            self.file
                .write_all_at(buf, offset)
                .map_err(|e| Errno::new(e.raw_os_error().unwrap_or(libc::EIO)))?;
        } else {
            rt.write_all_at(&self.file, buf, offset).await?;
        }
        if fua {
            rt.fsync(&self.file, true).await?;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub(crate) async fn flush(&self, rt: &Reactor) -> IoResult {
        Ok(rt.fsync(&self.file, true).await?)
    }

    /// Tells the store that a range is no longer needed. A store that cannot punch holes keeps
    /// the old data, which a discard allows.
    pub(crate) async fn discard(&self, rt: &Reactor, offset: u64, len: u64) -> IoResult {
        if self.punch_hole_refused.load(Ordering::Relaxed) {
            return Ok(());
        }
        match rt.fallocate(&self.file, PUNCH_HOLE, offset, len).await {
            Ok(()) => Ok(()),
            Err(e) if e == Errno::EOPNOTSUPP => {
                self.punch_hole_refused.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a range read as zeros: a hole if `unmap` is allowed, else zeroed blocks, else
    /// zeros written by hand when the filesystem can do neither.
    pub(crate) async fn write_zeroes(
        &self,
        rt: &Reactor,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoResult {
        if unmap && !self.punch_hole_refused.load(Ordering::Relaxed) {
            match rt.fallocate(&self.file, PUNCH_HOLE, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if e == Errno::EOPNOTSUPP => {
                    self.punch_hole_refused.store(true, Ordering::Relaxed)
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !self.zero_range_refused.load(Ordering::Relaxed) {
            match rt.fallocate(&self.file, ZERO_RANGE, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if e == Errno::EOPNOTSUPP => {
                    self.zero_range_refused.store(true, Ordering::Relaxed)
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeroes_by_hand(rt, offset, len).await
    }

    #[cold]
    async fn write_zeroes_by_hand(&self, rt: &Reactor, offset: u64, len: u64) -> IoResult {
        let mut done = 0u64;
        // Bounded: each turn writes up to 64 KiB of a range the engine bounded.
        while done < len {
            let step = (len - done).min(ZEROES.len() as u64);
            let at = offset.checked_add(done).ok_or(Errno::EOVERFLOW)?;
            rt.write_all_at(&self.file, &ZEROES[..step as usize], at)
                .await?;
            done += step;
        }
        Ok(())
    }
}

const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn resolve(ctx: &TargetContext, path: &str) -> Result<PathBuf, String> {
    if let Some(name) = path.strip_prefix("userdm:") {
        return match &ctx.resolver {
            Some(resolver) => resolver.resolve(name),
            None => Err(format!(
                "'{path}': userdm devices cannot be used as backing devices here"
            )),
        };
    }
    // The kernel accepts `maj:min` for any block device; udev keeps links by number.
    if let Some((major, minor)) = parse_dev(path) {
        return Ok(PathBuf::from(format!("/dev/block/{major}:{minor}")));
    }
    Ok(PathBuf::from(path))
}

fn block_limits(file: &File) -> TargetLimits {
    // A device that will not say keeps the kernel's defaults: 512-byte sectors.
    let logical = crate::sys::logical_block_size(file)
        .ok()
        .filter(|s| s.is_power_of_two() && *s >= 512)
        .unwrap_or(512);
    let physical = crate::sys::physical_block_size(file)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(logical)
        .max(logical);
    TargetLimits {
        logical_block_bytes: logical,
        physical_block_bytes: physical,
        ..TargetLimits::default()
    }
}

/// A backing store and the sector where a row's data starts in it: what linear is, and what
/// delay, flakey and dust pass IO through to.
#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) backing: Arc<Backing>,
    /// First sector in the backing store.
    pub(crate) start: u64,
}

impl Mapping {
    /// The table form `dev start`.
    pub(crate) fn table_params(&self) -> String {
        format!("{} {}", self.backing.name(), self.start)
    }

    /// The byte offset in the backing store of row-relative `sector`.
    fn offset(&self, sector: u64) -> Result<u64, IoError> {
        self.start
            .checked_add(sector)
            .and_then(|s| s.checked_mul(SECTOR_SIZE))
            .ok_or(IoError::Failed(Errno::EOVERFLOW))
    }

    /// The allocation state at row-relative byte `offset_bytes`.
    pub(crate) fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        match self
            .start
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(offset_bytes))
        {
            Some(at) => self.backing.allocation(at, max_len_bytes),
            None => Allocation::data(max_len_bytes),
        }
    }

    /// Serves one request on the backing store, the request's sector being row-relative.
    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        match io.op {
            IoOp::Read => self.backing.read(rt, self.offset(io.sector)?, buf).await,
            IoOp::Write => {
                let fua = io.flags.contains(IoFlags::FUA);
                self.backing
                    .write(rt, self.offset(io.sector)?, buf, fua)
                    .await
            }
            IoOp::Flush => self.backing.flush(rt).await,
            IoOp::Discard => {
                self.backing
                    .discard(rt, self.offset(io.sector)?, io.len_bytes)
                    .await
            }
            IoOp::WriteZeroes => {
                let unmap = !io.flags.contains(IoFlags::NOUNMAP);
                self.backing
                    .write_zeroes(rt, self.offset(io.sector)?, io.len_bytes, unmap)
                    .await
            }
            _ => Err(Errno::EOPNOTSUPP.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn kernel_device_names() {
        assert_eq!(format_dev(7, 1), "7:1");
        assert_eq!(format_dev(259, 1048575), "259:1048575");
        assert_eq!(parse_dev("8:16"), Some((8, 16)));
        assert_eq!(parse_dev("/dev/sda"), None);
        assert_eq!(parse_dev("8:x"), None);
    }

    #[test]
    fn a_file_is_named_by_its_path() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let b = Backing::open(&TargetContext::new(), &path).unwrap();
        assert_eq!(b.name(), path);
        assert_eq!(b.size_bytes(), 4096);
        assert_eq!(
            b.dep(),
            Dep {
                major: 0,
                minor: 0,
                path: path.clone()
            }
        );
        assert!(b.check_area(0, 8).is_ok());
        assert!(b
            .check_area(1, 8)
            .unwrap_err()
            .contains("needs 4608 bytes, has 4096 bytes"));
        assert!(b.check_area(u64::MAX, 8).is_err());
    }

    #[test]
    fn a_block_device_is_named_by_number() {
        // /dev/loop-control is a char device; look for any readable block device instead, and
        // skip when the sandbox has none.
        let Some(path) = ["/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"]
            .into_iter()
            .find(|p| File::open(p).is_ok())
        else {
            eprintln!("skipped: no readable block device");
            return;
        };
        let ctx = TargetContext::new().with_read_only(true);
        let b = Backing::open(&ctx, path).unwrap();
        let BackingKind::Block { major, minor } = b.kind else {
            panic!("{path} is not a block device");
        };
        assert_eq!(b.name(), format!("{major}:{minor}"));
        assert_eq!(b.dep().major, major);
        assert!(b.limits().logical_block_bytes >= 512);
    }

    #[test]
    fn open_errors_name_the_path_and_the_reason() {
        let e = Backing::open(&TargetContext::new(), "/nonexistent/x").unwrap_err();
        assert_eq!(
            e,
            "cannot open '/nonexistent/x': No such file or directory (os error 2)"
        );
        let e = Backing::open(&TargetContext::new(), "/tmp").unwrap_err();
        assert!(e.contains("/tmp"), "{e}");
        let e = Backing::open(&TargetContext::new(), "userdm:foo").unwrap_err();
        assert_eq!(
            e,
            "'userdm:foo': userdm devices cannot be used as backing devices here"
        );
    }

    #[test]
    fn userdm_paths_go_through_the_resolver() {
        #[derive(Debug)]
        struct To(PathBuf);
        impl crate::DeviceResolver for To {
            fn resolve(&self, name: &str) -> Result<PathBuf, String> {
                if name == "disk" {
                    Ok(self.0.clone())
                } else {
                    Err(format!("no userdm device '{name}'"))
                }
            }
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        let ctx = TargetContext::new().with_resolver(Arc::new(To(f.path().to_path_buf())));
        let b = Backing::open(&ctx, "userdm:disk").unwrap();
        assert_eq!(b.name(), "userdm:disk");
        assert_eq!(
            Backing::open(&ctx, "userdm:other").unwrap_err(),
            "no userdm device 'other'"
        );
    }

    #[test]
    fn allocation_follows_the_files_holes() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        f.as_file().write_all_at(&[7u8; 65536], 1 << 20).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let b = Backing::open(&TargetContext::new(), &path).unwrap();
        let first = b.allocation(0, 4 << 20);
        if !first.hole {
            // This filesystem tracks no holes: everything is data, which is correct too.
            assert_eq!(first, Allocation::data(4 << 20));
            eprintln!("skipped: the temporary directory's filesystem reports no holes");
            return;
        }
        assert_eq!(first, Allocation::hole(1 << 20));
        assert_eq!(b.allocation(4096, 8192), Allocation::hole(8192));
        let data = b.allocation(1 << 20, 4 << 20);
        assert!(!data.hole && !data.zero);
        assert!(
            data.len_bytes >= 65536 && data.len_bytes < 3 << 20,
            "{data:?}"
        );
        assert_eq!(b.allocation(1 << 20, 4096), Allocation::data(4096));
        // The tail hole runs to the end of the file; a query past it is still answered.
        assert_eq!(b.allocation(3 << 20, 1 << 20), Allocation::hole(1 << 20));
        assert_eq!(b.allocation(8 << 20, 512), Allocation::data(512));
        // Through a mapping, offsets are relative to its start sector.
        let m = Mapping {
            backing: b,
            start: 2048,
        };
        assert_eq!(m.allocation(0, 65536), Allocation::data(65536));
        assert_eq!(m.allocation(65536, 65536), Allocation::hole(65536));
    }

    #[test]
    fn files_on_tmpfs_are_read_and_written_directly() {
        let Ok(mut f) = tempfile::NamedTempFile::new_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        f.write_all(&[1u8; 8192]).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let b = Backing::open(&TargetContext::new(), &path).unwrap();
        assert!(b.in_memory);
        let rt = Reactor::new(8).unwrap();
        rt.block_on(b.write(&rt, 4096, &[2u8; 4096], true)).unwrap();
        let mut back = vec![0u8; 8192];
        rt.block_on(b.read(&rt, 0, &mut back)).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 1) && back[4096..].iter().all(|&x| x == 2));
        // Past the end of the file: EIO, as through the ring.
        let mut past = vec![0u8; 512];
        assert_eq!(
            rt.block_on(b.read(&rt, 8192, &mut past)),
            Err(Errno::EIO.into())
        );
        assert_eq!(
            rt.stats().ops_submitted,
            2,
            "only the eventfd read and the FUA fsync"
        );
    }

    #[test]
    fn zeroing_falls_back_and_discarding_reads_zero() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xAAu8; 16384]).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let b = Backing::open(&TargetContext::new(), &path).unwrap();
        let rt = Reactor::new(8).unwrap();
        rt.block_on(b.write_zeroes(&rt, 512, 1024, false)).unwrap();
        rt.block_on(b.write_zeroes_by_hand(&rt, 4096, 512)).unwrap();
        rt.block_on(b.discard(&rt, 8192, 4096)).unwrap();
        let mut back = vec![0u8; 16384];
        rt.block_on(b.read(&rt, 0, &mut back)).unwrap();
        assert!(back[..512].iter().all(|&x| x == 0xAA));
        assert!(back[512..1536].iter().all(|&x| x == 0));
        assert!(back[1536..4096].iter().all(|&x| x == 0xAA));
        assert!(back[4096..4608].iter().all(|&x| x == 0));
        // Discard: zeros where the filesystem punched a hole, the old data where it refused.
        let discarded = &back[8192..12288];
        assert!(discarded.iter().all(|&x| x == 0) || discarded.iter().all(|&x| x == 0xAA));
        assert_eq!(b.size_bytes(), 16384, "KEEP_SIZE keeps the file's size");
    }
}
