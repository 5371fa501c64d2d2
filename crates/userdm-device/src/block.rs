//! The interface every export (ublk, NBD, FUSE) serves a device through.

use std::future::Future;

use userdm_io::{Errno, IoHeader, OpSet};
use userdm_table::{Allocation, Target, TargetLimits};
use userdm_uring::Reactor;

use crate::Device;

/// A block device as an export sees it: a size, some properties, and requests.
///
/// Exports are generic over this trait rather than tied to [`Device`], so each can be tested
/// against a plain in-memory implementation, and so that a stacked or remote device can be
/// exported the same way.
///
/// `io` is called on the export's data-path threads, each with its own [`Reactor`]; everything
/// else may be called from any thread. Offsets in `io` are device-relative.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes. May change across a table reload.
    fn size_bytes(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Operations the device serves everywhere (requests for others fail EOPNOTSUPP).
    fn ops(&self) -> OpSet;
    /// Block sizes and cache properties.
    fn limits(&self) -> TargetLimits;
    /// Serves one request.
    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), Errno>>;
    /// The allocation state of the run starting at device-relative byte `offset_bytes` (a
    /// multiple of 512), at most `max_len_bytes` long; nonzero and no longer than asked.
    ///
    /// Synchronous and cheap (no IO; at most a couple of syscalls), called on data-path threads.
    /// The default, "all data", is always correct.
    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        let _ = offset_bytes;
        Allocation::data(max_len_bytes)
    }
    /// Counts an opener in: an export calls this per connection or per kernel open.
    fn open(&self) {}
    /// Counts an opener out. Returns true when the caller should now remove the device
    /// (a deferred removal completed).
    fn close(&self) -> bool {
        false
    }
}

impl<T: Target + 'static> BlockDevice for Device<T> {
    fn size_bytes(&self) -> u64 {
        self.size_sectors() * userdm_io::SECTOR_SIZE
    }

    fn read_only(&self) -> bool {
        Device::read_only(self)
    }

    fn ops(&self) -> OpSet {
        self.live_table().map_or(OpSet::EMPTY, |t| t.ops())
    }

    fn limits(&self) -> TargetLimits {
        self.live_table()
            .map_or_else(TargetLimits::default, |t| t.limits())
    }

    async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> Result<(), Errno> {
        Device::io(self, rt, io, buf).await
    }

    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        Device::allocation(self, offset_bytes, max_len_bytes)
    }

    fn open(&self) {
        Device::open(self);
    }

    fn close(&self) -> bool {
        Device::close(self)
    }
}
