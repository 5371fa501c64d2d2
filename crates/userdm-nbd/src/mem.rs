//! A sparse in-memory [`Backend`], for tests, examples and benchmarks of the NBD path.

use std::future::Future;
use std::sync::{PoisonError, RwLock};

use userdm_io::{Errno, IoFlags, IoHeader, IoOp, OpSet};
use userdm_uring::Reactor;

use crate::backend::{Backend, BackendProperties, Extent};

/// Allocation granularity: pages never written (or trimmed whole) are holes that read as zeroes.
pub const MEM_PAGE_BYTES: usize = 4096;

/// A sparse RAM disk.
///
/// Pages are allocated on first write; TRIM and WRITE_ZEROES (without NO_HOLE) free whole pages,
/// so block status and sparse reads have real holes to report. It is a test backend: it takes a
/// lock and may allocate per request, which the server itself never does.
pub struct MemBackend {
    size_bytes: u64,
    read_only: bool,
    properties: BackendProperties,
    pages: RwLock<Vec<Option<Box<[u8]>>>>,
}

impl MemBackend {
    /// An empty (all-hole) disk of `size_bytes`, rounded down to whole sectors.
    pub fn new(size_bytes: u64) -> MemBackend {
        let size_bytes = size_bytes / 512 * 512;
        let pages = usize::try_from(size_bytes.div_ceil(MEM_PAGE_BYTES as u64)).unwrap_or(0);
        MemBackend {
            size_bytes,
            read_only: false,
            properties: BackendProperties {
                fast_zero: true,
                cache: true,
                sparse_reads: true,
                ..BackendProperties::default()
            },
            pages: RwLock::new((0..pages).map(|_| None).collect()),
        }
    }

    /// The same disk, refusing writes.
    pub fn read_only(mut self) -> MemBackend {
        self.read_only = true;
        self
    }

    /// The same disk with other advertised properties.
    pub fn with_properties(mut self, properties: BackendProperties) -> MemBackend {
        self.properties = properties;
        self
    }

    /// Copies out `len` bytes at `offset` (test helper; holes read as zeroes).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.read(offset, &mut out);
        out
    }

    /// Number of allocated pages.
    pub fn allocated_pages(&self) -> usize {
        self.pages
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .count()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        let pages = self.pages.read().unwrap_or_else(PoisonError::into_inner);
        for_each_page(offset, buf.len(), |page, within, at, len| {
            let dst = &mut buf[at..at + len];
            match pages.get(page).and_then(Option::as_ref) {
                Some(p) => dst.copy_from_slice(&p[within..within + len]),
                None => dst.fill(0),
            }
        });
    }

    fn write(&self, offset: u64, buf: &[u8]) {
        let mut pages = self.pages.write().unwrap_or_else(PoisonError::into_inner);
        for_each_page(offset, buf.len(), |page, within, at, len| {
            if let Some(slot) = pages.get_mut(page) {
                let p = slot.get_or_insert_with(|| vec![0u8; MEM_PAGE_BYTES].into_boxed_slice());
                p[within..within + len].copy_from_slice(&buf[at..at + len]);
            }
        });
    }

    /// Zeroes a range: whole pages are freed unless `keep` (NO_HOLE), partial ones zeroed.
    fn zero(&self, offset: u64, len: usize, keep: bool) {
        let mut pages = self.pages.write().unwrap_or_else(PoisonError::into_inner);
        for_each_page(offset, len, |page, within, _, len| {
            let Some(slot) = pages.get_mut(page) else {
                return;
            };
            if len == MEM_PAGE_BYTES && !keep {
                *slot = None;
            } else if keep {
                let p = slot.get_or_insert_with(|| vec![0u8; MEM_PAGE_BYTES].into_boxed_slice());
                p[within..within + len].fill(0);
            } else if let Some(p) = slot {
                p[within..within + len].fill(0);
            }
        });
    }

    fn extent(&self, offset: u64, len_bytes: u64) -> Extent {
        let pages = self.pages.read().unwrap_or_else(PoisonError::into_inner);
        let page_bytes = MEM_PAGE_BYTES as u64;
        let first = usize::try_from(offset / page_bytes).unwrap_or(usize::MAX);
        let hole = pages.get(first).is_none_or(Option::is_none);
        // Scan no further than asked (rounded up to a page), so one query stays cheap.
        let end = offset.saturating_add(len_bytes).min(self.size_bytes);
        let mut page = first;
        let mut at = offset;
        while at < end && pages.get(page).is_some_and(|p| p.is_none() == hole) {
            at = (u64::try_from(page).unwrap_or(u64::MAX) + 1) * page_bytes;
            page += 1;
        }
        let len = at.min(self.size_bytes).saturating_sub(offset).max(512);
        if hole {
            Extent::hole(len)
        } else {
            Extent::data(len)
        }
    }
}

/// Calls `f(page, offset_in_page, offset_in_buffer, len)` for each page a range touches.
fn for_each_page(offset: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut at = 0usize;
    while at < len {
        let abs = offset + at as u64;
        let page = usize::try_from(abs / MEM_PAGE_BYTES as u64).unwrap_or(usize::MAX);
        let within = usize::try_from(abs % MEM_PAGE_BYTES as u64).unwrap_or(0);
        let n = (MEM_PAGE_BYTES - within).min(len - at);
        f(page, within, at, n);
        at += n;
    }
}

impl Backend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    fn properties(&self) -> BackendProperties {
        self.properties
    }

    fn io(
        &self,
        _rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), Errno>> {
        let result = (|| {
            let offset = io.offset_bytes().ok_or(Errno::EINVAL)?;
            let len = usize::try_from(io.len_bytes).map_err(|_| Errno::EINVAL)?;
            let end = offset.checked_add(io.len_bytes).ok_or(Errno::EINVAL)?;
            if end > self.size_bytes {
                return Err(Errno::EINVAL);
            }
            if io.op.modifies() && self.read_only {
                return Err(Errno::EROFS);
            }
            match io.op {
                IoOp::Read => self.read(offset, buf.get_mut(..len).ok_or(Errno::EINVAL)?),
                IoOp::Write => self.write(offset, buf.get(..len).ok_or(Errno::EINVAL)?),
                IoOp::Flush => {}
                IoOp::Discard => self.zero(offset, len, false),
                IoOp::WriteZeroes => self.zero(offset, len, io.flags.contains(IoFlags::NOUNMAP)),
                _ => return Err(Errno::EOPNOTSUPP),
            }
            Ok(())
        })();
        std::future::ready(result)
    }

    fn allocation(
        &self,
        _rt: &Reactor,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Extent, Errno>> {
        std::future::ready(Ok(self.extent(offset_bytes, len_bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(op: IoOp, offset: u64, len: u64, flags: IoFlags) -> IoHeader {
        IoHeader {
            op,
            flags,
            sector: offset / 512,
            len_bytes: len,
        }
    }

    #[test]
    fn sparse_reads_writes_and_holes() {
        let rt = Reactor::new(8).unwrap();
        let m = MemBackend::new(64 << 10);
        assert_eq!(
            rt.block_on(m.allocation(&rt, 0, 64 << 10)),
            Ok(Extent::hole(64 << 10))
        );
        let data = vec![7u8; 1024];
        let mut buf = data.clone();
        rt.block_on(m.io(
            &rt,
            io(IoOp::Write, 4096 + 512, 1024, IoFlags::empty()),
            &mut buf,
        ))
        .unwrap();
        assert_eq!(m.allocated_pages(), 1);
        assert_eq!(m.snapshot(4096 + 512, 1024), data);
        assert_eq!(m.snapshot(4096, 512), vec![0; 512]);
        assert_eq!(
            rt.block_on(m.allocation(&rt, 0, 64 << 10)),
            Ok(Extent::hole(4096))
        );
        assert_eq!(
            rt.block_on(m.allocation(&rt, 4096, 60 << 10)),
            Ok(Extent::data(4096))
        );
        assert_eq!(
            rt.block_on(m.allocation(&rt, 8192, 56 << 10)),
            Ok(Extent::hole(56 << 10))
        );
        // A partial trim zeroes; a whole-page trim frees.
        rt.block_on(m.io(&rt, io(IoOp::Discard, 4096, 512, IoFlags::empty()), &mut []))
            .unwrap();
        assert_eq!(m.allocated_pages(), 1);
        rt.block_on(m.io(
            &rt,
            io(IoOp::Discard, 4096, 4096, IoFlags::empty()),
            &mut [],
        ))
        .unwrap();
        assert_eq!(m.allocated_pages(), 0);
        // NO_HOLE keeps pages allocated.
        rt.block_on(m.io(
            &rt,
            io(IoOp::WriteZeroes, 0, 8192, IoFlags::NOUNMAP),
            &mut [],
        ))
        .unwrap();
        assert_eq!(m.allocated_pages(), 2);
        let mut past = vec![0u8; 512];
        assert_eq!(
            rt.block_on(m.io(
                &rt,
                io(IoOp::Read, 64 << 10, 512, IoFlags::empty()),
                &mut past
            )),
            Err(Errno::EINVAL)
        );
    }
}
