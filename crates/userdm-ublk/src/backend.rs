//! What the ublk export needs of a device beyond [`BlockDevice`].

use std::os::fd::RawFd;

use userdm_device::{BlockDevice, Device};
use userdm_io::IoHeader;
use userdm_table::Target;

/// Where a request's data lives, for zero copy: one contiguous byte range of one file or block
/// device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectTarget {
    /// The file or block device. It must stay open while requests are in flight.
    pub fd: RawFd,
    /// Byte offset of the request's first byte in it.
    pub offset_bytes: u64,
}

/// A [`BlockDevice`] as the ublk export serves it.
///
/// Every method has a default, so `impl UblkBackend for MyDevice {}` is enough; [`Device`]
/// implements it with the defaults.
pub trait UblkBackend: BlockDevice {
    /// Where `io`'s data lives, when the frontend may move it itself: in zero-copy mode, READ and
    /// WRITE requests with a direct target are served by fixed-buffer reads and writes between
    /// that file and the request's own pages (a WRITE with FUA is followed by fdatasync), without
    /// calling [`BlockDevice::io`] and without any copy through user memory.
    ///
    /// Called on the queue's thread for every READ and WRITE in zero-copy mode. Only a device
    /// whose mapping cannot change under a request (no table reload, no suspend) may answer;
    /// the default, `None`, serves every request through [`BlockDevice::io`].
    fn direct_target(&self, io: &IoHeader) -> Option<DirectTarget> {
        let _ = io;
        None
    }

    /// Whether [`BlockDevice::io`] reads a WRITE's data and fills a READ's buffer. A backend
    /// that ignores data altogether (a null device, like the kernel's null_blk) answers false;
    /// with user or zero copy the frontend then copies nothing (READs return whatever the
    /// request's pages held). The default is true.
    fn moves_data(&self) -> bool {
        true
    }
}

/// A mapped device can reload its table or be suspended at any time, so its requests always go
/// through the engine.
impl<T: Target + 'static> UblkBackend for Device<T> {}
