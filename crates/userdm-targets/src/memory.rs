//! `memory [<#options> [chunk_bytes <n>] [max_allocated_bytes <n>]]`: userdm's sparse RAM disk
//! (no kernel equivalent).
//!
//! The row's length is its size. Storage is allocated in chunks (64 KiB unless `chunk_bytes`
//! says otherwise) the first time a chunk is written with anything but zeros, so a huge virtual
//! size costs nothing until written. Chunks hang off a two-level table: a top array made at
//! construction, with one slot per leaf of [`LEAF_CHUNKS`] chunks, and leaves allocated on first
//! write. Each chunk has its own lock, so queue threads working on different chunks never wait
//! for each other. Unwritten chunks read as zeros; discard and zeroing free whole chunks and zero
//! the parts of partial ones. With `max_allocated_bytes`, a write that needs a chunk beyond the
//! limit fails with ENOSPC.
//!
//! Where the context names a memory directory (a device served over ublk with recovery), the
//! bytes live in a sparse file there instead, one per row, so that they outlive a server killed
//! with SIGKILL: the server that `userdm recover` starts opens the same file and finds every
//! completed write. The chunk table then only records which chunks hold storage; it is rebuilt
//! from the file's data extents (SEEK_DATA) when the file is opened again. Chunks are reserved
//! with `fallocate` when first written, so a full filesystem is an ENOSPC for that write, never
//! a lost one. The file is removed with the row; only a crash leaves it behind.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

use userdm_io::{Errno, IoError, IoFlags, IoHeader, IoOp, IoResult, OpSet, SECTOR_SIZE};
use userdm_table::{RowSpec, TableError};

use crate::args::{parse_u64, target_error, ArgSet};
use crate::sys::Seek;

const NAME: &str = "memory";

/// Chunks per leaf of the table. A leaf of 4096 chunk slots costs 128 KiB and covers 256 MiB of
/// 64 KiB chunks: 0.05% overhead once touched.
pub const LEAF_CHUNKS: u64 = 4096;
/// The default allocation unit.
pub const CHUNK_BYTES_DEFAULT: u64 = 64 * 1024;
/// The smallest and largest allocation units.
pub const CHUNK_BYTES_MIN: u64 = 4096;
/// See [`CHUNK_BYTES_MIN`].
pub const CHUNK_BYTES_MAX: u64 = 1 << 20;
/// The most leaves one memory row may have, so that the top array made at construction stays
/// small (24 MiB at most): with 64 KiB chunks, rows of up to 256 TiB.
pub const LEAVES_MAX: u64 = 1 << 20;

/// One chunk: `None` until written.
type Chunk = RwLock<Option<Box<[u8]>>>;
type Leaf = Box<[Chunk]>;

/// A run of the device that is all allocated or all unallocated, for NBD's `BLOCK_STATUS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Whether the run holds allocated storage (it may still contain zeros). Unallocated runs
    /// read as zeros.
    pub allocated: bool,
    /// Length of the run in bytes, at least 1 unless the query was empty.
    pub len_bytes: u64,
}

/// A sparse RAM disk.
#[derive(Debug)]
pub struct Memory {
    size_bytes: u64,
    chunk_bytes: u64,
    /// Zero means no limit.
    max_allocated_bytes: u64,
    allocated_bytes: AtomicU64,
    leaves: Box<[OnceLock<Leaf>]>,
    /// The file holding the bytes, when they must outlive the process; chunks then hold an
    /// empty marker instead of their data.
    backing: Option<Backing>,
}

/// A row's storage file (see the module documentation).
#[derive(Debug)]
struct Backing {
    file: File,
    path: PathBuf,
    /// False only in tests that play a crash: the file closes but stays.
    remove_on_drop: bool,
}

impl Drop for Backing {
    fn drop(&mut self) {
        // The row is gone for good (removal, or a reload that dropped it); only a crash, which
        // runs no destructor, leaves the file for a recovering server.
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Zeros for filling ranges where a filesystem cannot punch holes.
static ZEROS: [u8; 4096] = [0; 4096];

impl Backing {
    fn read(&self, buf: &mut [u8], offset: u64) -> IoResult {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_errno(&e).into())
    }

    fn write(&self, buf: &[u8], offset: u64) -> IoResult {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_errno(&e).into())
    }

    /// Reserves the blocks of `offset..offset + len`, so that later writes cannot fail for space.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), Errno> {
        match crate::sys::fallocate(&self.file, 0, offset, len) {
            Ok(()) => Ok(()),
            // A filesystem without fallocate: the write itself will allocate.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(io_errno(&e)),
        }
    }

    /// Makes `offset..offset + len` read as zeros, freeing its blocks where it can.
    fn zero(&self, offset: u64, len: u64) -> IoResult {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if crate::sys::fallocate(&self.file, mode, offset, len).is_ok() {
            return Ok(());
        }
        let mut at = 0;
        // Bounded by `len`.
        while at < len {
            let n = (len - at).min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

/// The `memory` rows of one device's tables, so that a reload keeps their contents.
///
/// A RAM disk that a table reload wiped would make `load` + `resume` destroy data, which no one
/// expects of a mapping change: a new table's `memory` row at the same start, with the same
/// length and options, takes over the storage of the row it replaces. Entries are weak, so
/// storage is freed with the last table that uses it. One per device (in its
/// [`crate::TargetContext`]); without one, every construction makes a fresh disk.
#[derive(Debug, Default)]
pub struct MemoryStores {
    rows: Mutex<HashMap<(u64, u64, String), Weak<Memory>>>,
}

impl Memory {
    /// Builds a row's RAM disk, reusing the storage of the same row in the device's live or
    /// inactive table when the context carries [`MemoryStores`].
    pub(crate) fn construct_shared(
        ctx: &crate::TargetContext,
        row: &RowSpec,
    ) -> Result<Arc<Memory>, TableError> {
        let make = || match &ctx.memory_dir {
            Some(dir) => Memory::construct_in(row, dir),
            None => Memory::construct(row),
        };
        let Some(stores) = &ctx.memory_stores else {
            return Ok(Arc::new(make()?));
        };
        let key = (row.start, row.len, row.args().join(" "));
        let mut rows = stores.rows.lock().unwrap_or_else(PoisonError::into_inner);
        rows.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = rows.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let memory = Arc::new(make()?);
        rows.insert(key, Arc::downgrade(&memory));
        Ok(memory)
    }

    pub(crate) fn construct(row: &RowSpec) -> Result<Memory, TableError> {
        let words = row.args();
        let mut args = ArgSet::new(&words);
        let (chunk_bytes, max_allocated_bytes) = parse_options(&mut args)?;
        if args.remaining() > 0 {
            return Err(target_error(
                NAME,
                format!(
                    "Too many arguments: unexpected '{}'",
                    words[words.len() - args.remaining()]
                ),
            ));
        }
        let size_bytes = row
            .len
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| target_error(NAME, "Target too large"))?;
        let chunks = size_bytes.div_ceil(chunk_bytes);
        let leaves = chunks.div_ceil(LEAF_CHUNKS);
        if leaves > LEAVES_MAX {
            return Err(target_error(
                NAME,
                format!(
                    "Target too large: {size_bytes} bytes; with chunk_bytes {chunk_bytes} a \
                     memory row holds at most {} bytes",
                    LEAVES_MAX * LEAF_CHUNKS * chunk_bytes
                ),
            ));
        }
        let mut top = Vec::new();
        top.try_reserve_exact(leaves as usize)
            .map_err(|_| target_error(NAME, "Cannot allocate the chunk table"))?;
        top.resize_with(leaves as usize, OnceLock::new);
        Ok(Memory {
            size_bytes,
            chunk_bytes,
            max_allocated_bytes,
            allocated_bytes: AtomicU64::new(0),
            leaves: top.into_boxed_slice(),
            backing: None,
        })
    }

    /// Builds a row whose bytes live in a file under `dir`, named after the row's start, length
    /// and options; an existing file (left by a server that crashed) is opened with its data.
    pub(crate) fn construct_in(row: &RowSpec, dir: &Path) -> Result<Memory, TableError> {
        let mut memory = Memory::construct(row)?;
        // The options passed `parse_options`, so they are numbers and option names: safe in a
        // file name.
        let mut name = format!("{}-{}", row.start, row.len);
        for word in row.args() {
            name.push('-');
            name.push_str(&word);
        }
        name.push_str(".mem");
        let path = dir.join(name);
        let fail = |what: &str, e: std::io::Error| {
            target_error(NAME, format!("{what} {}: {e}", path.display()))
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("Cannot create the storage directory of", e))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail("Cannot open the storage file", e))?;
        // Two servers writing one file would corrupt it; the lock goes with the process.
        if let Err(e) = crate::sys::lock_exclusive(&file) {
            return Err(target_error(
                NAME,
                format!(
                    "Storage file {} is in use by another userdm server ({e})",
                    path.display()
                ),
            ));
        }
        let len = file
            .metadata()
            .map_err(|e| fail("Cannot stat the storage file", e))?
            .len();
        if len != memory.size_bytes {
            if len != 0 {
                return Err(target_error(
                    NAME,
                    format!(
                        "Storage file {} holds {len} bytes, not the row's {}; remove it to                          start empty",
                        path.display(),
                        memory.size_bytes
                    ),
                ));
            }
            file.set_len(memory.size_bytes)
                .map_err(|e| fail("Cannot size the storage file", e))?;
        }
        memory.backing = Some(Backing {
            file,
            path,
            remove_on_drop: true,
        });
        memory.adopt_file_extents()?;
        Ok(memory)
    }

    /// Marks every chunk that holds data in the backing file as allocated.
    fn adopt_file_extents(&mut self) -> Result<(), TableError> {
        let Some(backing) = &self.backing else {
            return Ok(());
        };
        let file = &backing.file;
        let all = self.size_bytes.div_ceil(self.chunk_bytes);
        // Chunk ranges holding data; a filesystem without SEEK_DATA reports everything as data.
        let mut chunks = Vec::new();
        let mut at: u64 = 0;
        // Bounded: each turn moves past one data extent.
        while at < self.size_bytes {
            let data = match crate::sys::seek_data(file, at) {
                Ok(Seek::At(d)) => d,
                Ok(Seek::NoMore) => break,
                Err(_) => {
                    chunks.push((at / self.chunk_bytes, all));
                    break;
                }
            };
            let hole = match crate::sys::seek_hole(file, data) {
                Ok(Seek::At(h)) => h.min(self.size_bytes),
                _ => self.size_bytes,
            };
            if hole <= data {
                break;
            }
            chunks.push((data / self.chunk_bytes, hole.div_ceil(self.chunk_bytes)));
            at = hole;
        }
        for (first, end) in chunks {
            for index in first..end.min(all) {
                let chunk = self
                    .chunk_or_make(index)
                    .map_err(|_| target_error(NAME, "Cannot allocate the chunk table"))?;
                let mut guard = write(chunk);
                if guard.is_none() {
                    *guard = Some(Box::default());
                    self.allocated_bytes
                        .fetch_add(self.chunk_bytes, Ordering::AcqRel);
                }
            }
        }
        Ok(())
    }

    /// Where the storage file lives, if the row has one.
    pub fn storage_path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    pub(crate) fn table_params(&self) -> String {
        let mut options = Vec::new();
        if self.chunk_bytes != CHUNK_BYTES_DEFAULT {
            options.push(format!("chunk_bytes {}", self.chunk_bytes));
        }
        if self.max_allocated_bytes != 0 {
            options.push(format!("max_allocated_bytes {}", self.max_allocated_bytes));
        }
        if options.is_empty() {
            return String::new();
        }
        format!("{} {}", options.len() * 2, options.join(" "))
    }

    /// `<allocated_bytes> <size_bytes>`.
    pub(crate) fn status(&self) -> String {
        format!("{} {}", self.allocated_bytes(), self.size_bytes)
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    /// Bytes of storage allocated now.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes.load(Ordering::Acquire)
    }

    /// The size of the row in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The allocation unit.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Whether any storage is allocated in `offset..offset + len` (row-relative bytes).
    pub fn is_allocated(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        let mut at = offset_bytes;
        let end = offset_bytes.saturating_add(len_bytes).min(self.size_bytes);
        // Bounded: each turn moves past one extent.
        while at < end {
            let extent = self.allocation_extent(at, end - at);
            if extent.allocated {
                return true;
            }
            at += extent.len_bytes.max(1);
        }
        false
    }

    /// The run starting at `offset_bytes` (row-relative) that is all allocated or all not, cut
    /// at `max_len_bytes` and at the end of the row.
    pub fn allocation_extent(&self, offset_bytes: u64, max_len_bytes: u64) -> Extent {
        let end = offset_bytes
            .saturating_add(max_len_bytes)
            .min(self.size_bytes);
        if offset_bytes >= end {
            return Extent {
                allocated: false,
                len_bytes: 0,
            };
        }
        let first = self.chunk_allocated(offset_bytes / self.chunk_bytes);
        let mut at = offset_bytes;
        // Bounded by the chunks in the range; unallocated leaves are skipped whole.
        while at < end {
            let index = at / self.chunk_bytes;
            let leaf_missing = self.leaf(index).is_none();
            let next = if leaf_missing {
                ((index / LEAF_CHUNKS) + 1) * LEAF_CHUNKS * self.chunk_bytes
            } else {
                (index + 1) * self.chunk_bytes
            };
            let allocated = !leaf_missing && self.chunk_allocated(index);
            if allocated != first {
                break;
            }
            at = next.min(end);
        }
        Extent {
            allocated: first,
            len_bytes: at - offset_bytes,
        }
    }

    fn leaf(&self, chunk: u64) -> Option<&Leaf> {
        self.leaves
            .get((chunk / LEAF_CHUNKS) as usize)
            .and_then(OnceLock::get)
    }

    fn chunk(&self, chunk: u64) -> Option<&Chunk> {
        self.leaf(chunk)
            .and_then(|leaf| leaf.get((chunk % LEAF_CHUNKS) as usize))
    }

    fn chunk_allocated(&self, chunk: u64) -> bool {
        self.chunk(chunk).is_some_and(|c| read(c).is_some())
    }

    /// The chunk slot, making its leaf if needed. Fails only when memory runs out.
    fn chunk_or_make(&self, chunk: u64) -> Result<&Chunk, Errno> {
        let slot = self
            .leaves
            .get((chunk / LEAF_CHUNKS) as usize)
            .ok_or(Errno::EINVAL)?;
        if slot.get().is_none() {
            let mut leaf = Vec::new();
            leaf.try_reserve_exact(LEAF_CHUNKS as usize)
                .map_err(|_| Errno::ENOMEM)?;
            leaf.resize_with(LEAF_CHUNKS as usize, || RwLock::new(None));
            // Another thread may have set it first; then ours is dropped and theirs used.
            let _ = slot.set(leaf.into_boxed_slice());
        }
        slot.get()
            .and_then(|leaf| leaf.get((chunk % LEAF_CHUNKS) as usize))
            .ok_or(Errno::EIO)
    }

    /// Takes `chunk_bytes` from the limit, or fails with ENOSPC.
    fn reserve(&self) -> Result<(), Errno> {
        let chunk = self.chunk_bytes;
        let limit = self.max_allocated_bytes;
        self.allocated_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let next = used.checked_add(chunk)?;
                (limit == 0 || next <= limit).then_some(next)
            })
            .map(drop)
            .map_err(|_| Errno::ENOSPC)
    }

    fn unreserve(&self) {
        self.allocated_bytes
            .fetch_sub(self.chunk_bytes, Ordering::AcqRel);
    }

    /// Splits `offset..offset + len` at chunk boundaries: (chunk index, offset in chunk, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let mut at = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = at / self.chunk_bytes;
            let in_chunk = at % self.chunk_bytes;
            let n = (self.chunk_bytes - in_chunk).min(end - at);
            at += n;
            Some((index, in_chunk as usize, n as usize))
        })
    }

    pub(crate) fn io(&self, io: IoHeader, buf: &mut [u8]) -> IoResult {
        let offset = io
            .sector
            .checked_mul(SECTOR_SIZE)
            .filter(|o| o.saturating_add(io.len_bytes) <= self.size_bytes)
            .ok_or(IoError::Failed(Errno::EOVERFLOW))?;
        match io.op {
            IoOp::Read => self.read(offset, buf),
            IoOp::Write => self.write(offset, buf),
            IoOp::Flush => Ok(()),
            IoOp::Discard => self.zero(offset, io.len_bytes, true),
            IoOp::WriteZeroes => {
                self.zero(offset, io.len_bytes, !io.flags.contains(IoFlags::NOUNMAP))
            }
            _ => Err(Errno::EOPNOTSUPP.into()),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        let mut done = 0;
        for (index, at, n) in self.pieces(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            match self.chunk(index).map(read) {
                Some(guard) => match (guard.as_deref(), &self.backing) {
                    (Some(_), Some(b)) => b.read(out, index * self.chunk_bytes + at as u64)?,
                    (Some(data), None) => out.copy_from_slice(&data[at..at + n]),
                    (None, _) => out.fill(0),
                },
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> IoResult {
        let mut done = 0;
        for (index, at, n) in self.pieces(offset, buf.len() as u64) {
            let data = &buf[done..done + n];
            done += n;
            // Zeros into an unallocated chunk change nothing: stay sparse (mkfs zeroes a lot).
            let all_zero = data.iter().all(|&b| b == 0);
            if all_zero && !self.chunk_allocated(index) {
                continue;
            }
            let chunk = self.chunk_or_make(index)?;
            let mut guard = write(chunk);
            if guard.is_none() {
                if all_zero {
                    continue;
                }
                self.reserve()?;
                if let Some(b) = &self.backing {
                    if let Err(e) = b.reserve(index * self.chunk_bytes, self.chunk_bytes) {
                        self.unreserve();
                        return Err(e.into());
                    }
                    *guard = Some(Box::default());
                    b.write(data, index * self.chunk_bytes + at as u64)?;
                    continue;
                }
                let mut storage = Vec::new();
                if storage
                    .try_reserve_exact(self.chunk_bytes as usize)
                    .is_err()
                {
                    self.unreserve();
                    return Err(Errno::ENOMEM.into());
                }
                storage.resize(self.chunk_bytes as usize, 0);
                *guard = Some(storage.into_boxed_slice());
            }
            match (guard.as_deref_mut(), &self.backing) {
                (Some(_), Some(b)) => b.write(data, index * self.chunk_bytes + at as u64)?,
                (Some(storage), None) => storage[at..at + n].copy_from_slice(data),
                (None, _) => {}
            }
        }
        Ok(())
    }

    /// Makes a range read as zeros: whole chunks are freed when `unmap`, other parts zeroed in
    /// place.
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> IoResult {
        for (index, at, n) in self.pieces(offset, len) {
            let Some(chunk) = self.chunk(index) else {
                continue;
            };
            let mut guard = write(chunk);
            if guard.is_none() {
                continue;
            }
            let whole = at == 0 && n as u64 == self.chunk_bytes;
            let start = index * self.chunk_bytes + at as u64;
            if let Some(b) = &self.backing {
                b.zero(start, n as u64)?;
            }
            if whole && unmap {
                guard.take();
                self.unreserve();
            } else if let (Some(storage), None) = (guard.as_deref_mut(), &self.backing) {
                storage[at..at + n].fill(0);
            }
        }
        Ok(())
    }
}

fn read(chunk: &Chunk) -> RwLockReadGuard<'_, Option<Box<[u8]>>> {
    // A chunk is a plain byte buffer: whatever a panicking writer left is still valid bytes.
    chunk.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(chunk: &Chunk) -> RwLockWriteGuard<'_, Option<Box<[u8]>>> {
    chunk.write().unwrap_or_else(PoisonError::into_inner)
}

fn parse_options(args: &mut ArgSet<'_>) -> Result<(u64, u64), TableError> {
    let mut chunk_bytes = None;
    let mut max_allocated_bytes = None;
    if args.remaining() == 0 {
        return Ok((CHUNK_BYTES_DEFAULT, 0));
    }
    let mut count = args
        .read_group(0, 4)
        .ok_or_else(|| target_error(NAME, "Invalid number of optional args"))?;
    // Bounded by `count`, at most 4.
    while count > 0 {
        let name = args
            .shift()
            .ok_or_else(|| target_error(NAME, "Insufficient optional arguments"))?;
        count -= 1;
        let slot = if name.eq_ignore_ascii_case("chunk_bytes") {
            &mut chunk_bytes
        } else if name.eq_ignore_ascii_case("max_allocated_bytes") {
            &mut max_allocated_bytes
        } else {
            return Err(target_error(
                NAME,
                format!("Unrecognised memory option '{name}'"),
            ));
        };
        if slot.is_some() {
            return Err(target_error(NAME, format!("Option {name} duplicated")));
        }
        if count == 0 {
            return Err(target_error(
                NAME,
                format!("Option {name} requires a parameter"),
            ));
        }
        let word = args.shift().unwrap_or_default();
        count -= 1;
        *slot = Some(
            parse_u64(word)
                .ok_or_else(|| target_error(NAME, format!("Invalid {name} '{word}'")))?,
        );
    }
    let chunk_bytes = chunk_bytes.unwrap_or(CHUNK_BYTES_DEFAULT);
    if !chunk_bytes.is_power_of_two() || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&chunk_bytes)
    {
        return Err(target_error(
            NAME,
            format!(
                "Invalid chunk_bytes {chunk_bytes}: must be a power of 2 from {CHUNK_BYTES_MIN} \
                 to {CHUNK_BYTES_MAX}"
            ),
        ));
    }
    Ok((chunk_bytes, max_allocated_bytes.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use userdm_table::parse_table_text;

    fn row(text: &str) -> RowSpec {
        parse_table_text(text).unwrap().remove(0)
    }

    fn io(op: IoOp, sector: u64, len_bytes: u64) -> IoHeader {
        IoHeader {
            op,
            flags: IoFlags::empty(),
            sector,
            len_bytes,
        }
    }

    /// What a SIGKILL leaves: the descriptor (and its lock) closed, the file in place.
    fn crash(mut memory: Memory) {
        if let Some(b) = memory.backing.as_mut() {
            b.remove_on_drop = false;
        }
    }

    #[test]
    fn a_file_backed_row_keeps_its_bytes_across_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let spec = row("0 2048 memory 2 chunk_bytes 8192");
        let m = Memory::construct_in(&spec, dir.path()).unwrap();
        let path = m.storage_path().unwrap().to_path_buf();
        assert_eq!(path, dir.path().join("0-2048-2-chunk_bytes-8192.mem"));
        let mut a = vec![0xa5u8; 12288];
        m.io(io(IoOp::Write, 8, 12288), &mut a).unwrap();
        let mut b = vec![0x3cu8; 4096];
        m.io(io(IoOp::Write, 1000, 4096), &mut b).unwrap();
        // Zeros into a fresh chunk stay sparse; a discard frees the whole chunk it covers.
        m.io(io(IoOp::Write, 1600, 4096), &mut vec![0u8; 4096])
            .unwrap();
        m.io(io(IoOp::Discard, 16, 8192), &mut []).unwrap();
        assert_eq!(m.allocated_bytes(), 2 * 8192);
        crash(m);
        assert!(path.exists());

        let m = Memory::construct_in(&spec, dir.path()).unwrap();
        let mut got = vec![0u8; 12288];
        m.io(io(IoOp::Read, 8, 12288), &mut got).unwrap();
        let mut want = vec![0xa5u8; 12288];
        want[4096..12288].fill(0);
        assert!(got == want, "the bytes before the crash are not read back");
        let mut got = vec![0u8; 4096];
        m.io(io(IoOp::Read, 1000, 4096), &mut got).unwrap();
        assert!(got == b);
        // Chunks 0 and 62 hold data; the discarded chunk 1 went back to a hole.
        assert_eq!(m.allocated_bytes(), 2 * 8192, "{}", m.status());
        assert!(!m.is_allocated(8192, 8192));
        assert!(!m.is_allocated(1600 * 512, 4096));
        drop(m);
        assert!(!path.exists(), "a row that goes for good takes its file");
    }

    #[test]
    fn a_storage_file_serves_one_server_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let spec = row("0 64 memory");
        let first = Memory::construct_in(&spec, dir.path()).unwrap();
        let e = Memory::construct_in(&spec, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by another userdm server"), "{e}");
        drop(first);
        Memory::construct_in(&spec, dir.path()).unwrap();
    }

    #[test]
    fn a_storage_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0-64.mem"), [1u8; 100]).unwrap();
        let e = Memory::construct_in(&row("0 64 memory"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds 100 bytes, not the row's 32768"), "{e}");
    }

    #[test]
    fn a_file_backed_row_honours_its_allocation_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spec = row("0 256 memory 4 chunk_bytes 4096 max_allocated_bytes 8192");
        let m = Memory::construct_in(&spec, dir.path()).unwrap();
        let mut data = vec![7u8; 4096];
        m.io(io(IoOp::Write, 0, 4096), &mut data).unwrap();
        m.io(io(IoOp::Write, 8, 4096), &mut data).unwrap();
        assert_eq!(
            m.io(io(IoOp::Write, 16, 4096), &mut data),
            Err(IoError::Failed(Errno::ENOSPC))
        );
        m.io(io(IoOp::WriteZeroes, 0, 4096), &mut []).unwrap();
        m.io(io(IoOp::Write, 16, 4096), &mut data).unwrap();
    }
}
