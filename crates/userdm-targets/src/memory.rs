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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

use userdm_io::{Errno, IoError, IoFlags, IoHeader, IoOp, IoResult, OpSet, SECTOR_SIZE};
use userdm_table::{RowSpec, TableError};

use crate::args::{parse_u64, target_error, ArgSet};

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
        let Some(stores) = &ctx.memory_stores else {
            return Ok(Arc::new(Memory::construct(row)?));
        };
        let key = (row.start, row.len, row.args().join(" "));
        let mut rows = stores.rows.lock().unwrap_or_else(PoisonError::into_inner);
        rows.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = rows.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let memory = Arc::new(Memory::construct(row)?);
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
        })
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
            IoOp::Read => {
                self.read(offset, buf);
                Ok(())
            }
            IoOp::Write => self.write(offset, buf),
            IoOp::Flush => Ok(()),
            IoOp::Discard => {
                self.zero(offset, io.len_bytes, true);
                Ok(())
            }
            IoOp::WriteZeroes => {
                self.zero(offset, io.len_bytes, !io.flags.contains(IoFlags::NOUNMAP));
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP.into()),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        for (index, at, n) in self.pieces(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            match self.chunk(index).map(read) {
                Some(guard) => match guard.as_deref() {
                    Some(data) => out.copy_from_slice(&data[at..at + n]),
                    None => out.fill(0),
                },
                None => out.fill(0),
            }
            done += n;
        }
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
            if let Some(storage) = guard.as_deref_mut() {
                storage[at..at + n].copy_from_slice(data);
            }
        }
        Ok(())
    }

    /// Makes a range read as zeros: whole chunks are freed when `unmap`, other parts zeroed in
    /// place.
    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        for (index, at, n) in self.pieces(offset, len) {
            let Some(chunk) = self.chunk(index) else {
                continue;
            };
            let mut guard = write(chunk);
            let whole = at == 0 && n as u64 == self.chunk_bytes;
            if whole && unmap {
                if guard.take().is_some() {
                    self.unreserve();
                }
            } else if let Some(storage) = guard.as_deref_mut() {
                storage[at..at + n].fill(0);
            }
        }
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
