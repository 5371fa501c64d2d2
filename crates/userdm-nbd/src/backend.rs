//! What the transmission server serves: the [`Backend`] trait, and an adapter for any
//! `userdm_device::BlockDevice`.

use std::future::Future;
use std::sync::Arc;

use userdm_device::BlockDevice;
use userdm_io::{Errno, IoHeader, IoOp, OpSet};
use userdm_uring::Reactor;

use crate::handshake::{BlockSizes, ExportFeatures, ExportInfo};
use crate::proto::NbdError;

/// The allocation state of a range, as `base:allocation` reports it and as READ uses to send
/// holes instead of zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, nonzero; a multiple of the export's minimum block size unless it ends at
    /// the end of the export. It may run past the range asked about.
    pub len_bytes: u64,
    /// Not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`); a READ of it is answered with `OFFSET_HOLE`.
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown contents: what a backend without allocation information says.
    pub const fn data(len_bytes: u64) -> Extent {
        Extent {
            len_bytes,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated range that reads as zeroes.
    pub const fn hole(len_bytes: u64) -> Extent {
        Extent {
            len_bytes,
            hole: true,
            zero: true,
        }
    }
}

/// Properties of a backend that shape what the server advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendProperties {
    /// Block size constraints (minimum at least 512: requests reach the backend in sectors).
    pub block_sizes: BlockSizes,
    /// WRITE_ZEROES is fast (no slower than TRIM), so `NBD_CMD_FLAG_FAST_ZERO` may succeed.
    pub fast_zero: bool,
    /// A flush on one connection covers writes completed on every connection.
    pub multi_conn: bool,
    /// The storage is rotational.
    pub rotational: bool,
    /// `NBD_CMD_CACHE` is advertised and served by reading the range (warming a cache below).
    pub cache: bool,
    /// Structured READs ask [`Backend::allocation`] and send holes as `OFFSET_HOLE` chunks.
    /// Only for backends whose answer costs next to nothing: a file's `SEEK_HOLE` walks the
    /// whole data run on some filesystems (tmpfs), far too slow to ask on every read. Sparse
    /// copies do not need it: they ask BLOCK_STATUS, which always uses the allocation.
    pub sparse_reads: bool,
}

impl Default for BackendProperties {
    fn default() -> BackendProperties {
        BackendProperties {
            block_sizes: BlockSizes::DEFAULT,
            fast_zero: false,
            multi_conn: true,
            rotational: false,
            cache: false,
            sparse_reads: false,
        }
    }
}

/// A block device the NBD server exports.
///
/// Shared by every connection (behind an `Arc`); [`Backend::io`] and [`Backend::allocation`] run
/// on a connection's thread inside that thread's [`Reactor`], everything else may be called from
/// any thread.
///
/// `io` has the engine's contract (`userdm_table::Target::io`): `io.sector` is device-relative;
/// `buf` is exactly `io.len_bytes` long for READ and WRITE and empty otherwise; the buffer
/// belongs to the caller and is valid until the future completes. The server checks ranges,
/// alignment and [`Backend::ops`] first, and splits requests larger than
/// `userdm_io::limits::IO_BYTES_MAX`, so a backend sees only what it declared. FUA arrives as
/// `IoFlags::FUA` and NBD's NO_HOLE as `IoFlags::NOUNMAP`; both must be honoured.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes; a multiple of the minimum block size.
    fn size_bytes(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Operations served: READ always; WRITE, FLUSH, DISCARD (TRIM), WRITE_ZEROES optionally.
    fn ops(&self) -> OpSet;
    /// Advertised properties.
    fn properties(&self) -> BackendProperties {
        BackendProperties::default()
    }
    /// Serves one request.
    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), Errno>>;
    /// The allocation state of the extent starting at `offset_bytes` (a multiple of the minimum
    /// block size, inside the export); `len_bytes` is how far the caller is interested.
    ///
    /// The default reports everything as data, which is always correct.
    fn allocation(
        &self,
        rt: &Reactor,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Extent, Errno>> {
        let _ = (rt, offset_bytes);
        std::future::ready(Ok(Extent::data(len_bytes)))
    }
    /// A connection opened this backend (after its handshake).
    fn open(&self) {}
    /// A connection closed.
    fn close(&self) {}
}

impl<B: Backend> Backend for Arc<B> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn ops(&self) -> OpSet {
        (**self).ops()
    }
    fn properties(&self) -> BackendProperties {
        (**self).properties()
    }
    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), Errno>> {
        (**self).io(rt, io, buf)
    }
    fn allocation(
        &self,
        rt: &Reactor,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Extent, Errno>> {
        (**self).allocation(rt, offset_bytes, len_bytes)
    }
    fn open(&self) {
        (**self).open()
    }
    fn close(&self) {
        (**self).close()
    }
}

/// Exports any [`BlockDevice`] (a userdm mapped device) as an NBD [`Backend`].
///
/// Block sizes come from the device's limits (logical block → minimum, physical block →
/// preferred). A mapped device is one shared state behind every connection, and a FLUSH goes to
/// every row of its live table, so multi-conn is advertised. Allocation comes from the device's
/// targets ([`BlockDevice::allocation`]): memory rows, holes in backing files, zero rows.
pub struct DeviceBackend<D>(pub Arc<D>);

impl<D: BlockDevice> Backend for DeviceBackend<D> {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn ops(&self) -> OpSet {
        self.0.ops()
    }
    fn properties(&self) -> BackendProperties {
        let limits = self.0.limits();
        let min = limits.logical_block_bytes.clamp(512, 65536);
        let preferred = limits.physical_block_bytes.max(min);
        BackendProperties {
            block_sizes: BlockSizes {
                min,
                preferred,
                max: BlockSizes::DEFAULT.max.max(preferred),
            },
            rotational: limits.rotational,
            ..BackendProperties::default()
        }
    }
    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), Errno>> {
        self.0.io(rt, io, buf)
    }
    fn allocation(
        &self,
        _rt: &Reactor,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Extent, Errno>> {
        let a = self.0.allocation(offset_bytes, len_bytes);
        std::future::ready(Ok(Extent {
            len_bytes: a.len_bytes,
            hole: a.hole,
            zero: a.zero,
        }))
    }
    fn open(&self) {
        self.0.open();
    }
    fn close(&self) {
        // A deferred removal completing is the device owner's business, not the export's.
        let _ = self.0.close();
    }
}

/// Describes a backend as the handshake advertises it.
pub fn export_info<B: Backend>(name: &str, description: &str, backend: &B) -> ExportInfo {
    let ops = backend.ops();
    let props = backend.properties();
    let writable = ops.contains(IoOp::Write) && !backend.read_only();
    ExportInfo {
        name: name.to_owned(),
        description: description.to_owned(),
        size_bytes: backend.size_bytes(),
        read_only: !writable,
        features: ExportFeatures {
            flush: ops.contains(IoOp::Flush),
            // FUA is passed to the backend as IoFlags::FUA, which every backend must honour.
            fua: writable,
            trim: ops.contains(IoOp::Discard),
            write_zeroes: ops.contains(IoOp::WriteZeroes),
            fast_zero: props.fast_zero,
            cache: props.cache,
            multi_conn: props.multi_conn,
            rotational: props.rotational,
        },
        block_sizes: props.block_sizes,
    }
}

/// Maps a backend's errno to the error values NBD allows, in one place.
///
/// The protocol allows only eight values. Read-only and quota errors get the closest allowed
/// meaning (EPERM, ENOSPC, as the specification recommends for EDQUOT and EFBIG); everything
/// else becomes EIO, which clients treat as a plain failure.
pub fn errno_to_nbd(errno: Errno) -> NbdError {
    const EPERM: i32 = 1;
    const EFBIG: i32 = 27;
    const EROFS: i32 = 30;
    const ESHUTDOWN: i32 = 108;
    const EDQUOT: i32 = 122;
    match errno.get() {
        EPERM | EROFS => NbdError::EPERM,
        5 => NbdError::EIO,
        12 => NbdError::ENOMEM,
        22 => NbdError::EINVAL,
        28 | EFBIG | EDQUOT => NbdError::ENOSPC,
        75 => NbdError::EOVERFLOW,
        95 => NbdError::ENOTSUP,
        ESHUTDOWN => NbdError::ESHUTDOWN,
        _ => NbdError::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_covers_every_nbd_error() {
        let cases = [
            (Errno::new(1), NbdError::EPERM),
            (Errno::EROFS, NbdError::EPERM),
            (Errno::EIO, NbdError::EIO),
            (Errno::ENOMEM, NbdError::ENOMEM),
            (Errno::EINVAL, NbdError::EINVAL),
            (Errno::ENOSPC, NbdError::ENOSPC),
            (Errno::new(27), NbdError::ENOSPC),
            (Errno::new(122), NbdError::ENOSPC),
            (Errno::EOVERFLOW, NbdError::EOVERFLOW),
            (Errno::EOPNOTSUPP, NbdError::ENOTSUP),
            (Errno::new(108), NbdError::ESHUTDOWN),
            (Errno::EBUSY, NbdError::EIO),
            (Errno::ETIMEDOUT, NbdError::EIO),
            (Errno::EAGAIN, NbdError::EIO),
            (Errno::ENODEV, NbdError::EIO),
            (Errno::new(9999), NbdError::EIO),
        ];
        for (errno, nbd) in cases {
            assert_eq!(errno_to_nbd(errno), nbd, "{errno:?}");
        }
        // Every value maps to one the protocol defines.
        for e in 1..200 {
            assert!(errno_to_nbd(Errno::new(e)).is_known());
        }
    }
}
