//! An in-memory [`BlockDevice`] for tests, examples and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use userdm_device::BlockDevice;
use userdm_io::{Errno, IoHeader, IoOp, OpSet, SECTOR_SIZE};
use userdm_table::TargetLimits;
use userdm_uring::Reactor;

/// A RAM disk that counts the requests it serves. DISCARD and WRITE_ZEROES zero the range.
pub struct MemDevice {
    /// `size` bytes from `base` on are the device; the rest aligns them.
    data: RwLock<Vec<u8>>,
    base: usize,
    size: usize,
    ops: OpSet,
    read_only: bool,
    delay: Option<Duration>,
    counts: [AtomicU64; 4],
}

/// Request counts of a [`MemDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemCounts {
    /// WRITE requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// DISCARD requests.
    pub discards: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
}

impl MemDevice {
    /// A zeroed device of `size_bytes`, serving READ, WRITE, FLUSH, DISCARD and WRITE_ZEROES.
    /// The memory is allocated zeroed, so untouched pages cost nothing.
    pub fn new(size_bytes: u64) -> MemDevice {
        MemDevice::with_ops(size_bytes, OpSet::STORAGE)
    }

    /// A device serving only `ops`.
    pub fn with_ops(size_bytes: u64, ops: OpSet) -> MemDevice {
        // Page-align the device's first byte, as a real RAM disk's pages are: copies between a
        // page-aligned request buffer and a destination 16 bytes off a page boundary (where
        // malloc puts a large Vec) run several times slower on some x86 CPUs.
        let size = size_bytes as usize;
        let data = vec![0u8; size + 4096];
        let base = match data.as_ptr().align_offset(4096) {
            a if a < 4096 => a,
            _ => 0,
        };
        MemDevice {
            data: RwLock::new(data),
            base,
            size,
            ops,
            read_only: false,
            delay: None,
            counts: Default::default(),
        }
    }

    /// The same device, refusing writes.
    pub fn read_only(mut self) -> MemDevice {
        self.read_only = true;
        self
    }

    /// The same device, sleeping `delay` on the ring before every read and write, so that
    /// requests overlap in time as they would on a real disk (tests of concurrent writers).
    pub fn with_io_delay(mut self, delay: Duration) -> MemDevice {
        self.delay = Some(delay);
        self
    }

    /// Copies `len` bytes at `offset` out of the device.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let at = self.base + offset as usize;
        self.data.read()[at..at + len].to_vec()
    }

    /// Writes `bytes` at `offset` behind any export's back.
    pub fn write(&self, offset: u64, bytes: &[u8]) {
        let at = self.base + offset as usize;
        self.data.write()[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Request counts so far.
    pub fn counts(&self) -> MemCounts {
        let get = |i: usize| self.counts[i].load(Ordering::Relaxed);
        MemCounts {
            writes: get(0),
            flushes: get(1),
            discards: get(2),
            write_zeroes: get(3),
        }
    }

    fn count(&self, i: usize) {
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn ops(&self) -> OpSet {
        self.ops
    }

    fn limits(&self) -> TargetLimits {
        TargetLimits::default()
    }

    async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> Result<(), Errno> {
        if !self.ops.contains(io.op) {
            return Err(Errno::EOPNOTSUPP);
        }
        if let Some(delay) = self.delay {
            rt.sleep(delay).await;
        }
        if io.op == IoOp::Flush {
            self.count(1);
            return Ok(());
        }
        let start = io.sector.checked_mul(SECTOR_SIZE).ok_or(Errno::EOVERFLOW)?;
        let end = start.checked_add(io.len_bytes).ok_or(Errno::EOVERFLOW)?;
        if end > self.size_bytes() || io.len_bytes % SECTOR_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let range = self.base + start as usize..self.base + end as usize;
        match io.op {
            IoOp::Read if buf.len() == range.len() => buf.copy_from_slice(&self.data.read()[range]),
            IoOp::Write if buf.len() == range.len() => {
                if self.read_only {
                    return Err(Errno::EROFS);
                }
                self.count(0);
                self.data.write()[range].copy_from_slice(buf);
            }
            IoOp::Discard | IoOp::WriteZeroes => {
                self.count(if io.op == IoOp::Discard { 2 } else { 3 });
                self.data.write()[range].fill(0);
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }
}
