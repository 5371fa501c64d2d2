//! Ready-made handlers: a RAM disk and a file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use userdm_io::IoFlags;

use crate::{Handler, Status};

fn range(sector: u64, len: usize, size: u64) -> Option<(u64, usize)> {
    let offset = sector.checked_mul(512)?;
    let end = offset.checked_add(len as u64)?;
    (end <= size).then_some((offset, len))
}

/// A disk in memory, zero-filled at start.
pub struct MemoryDisk {
    data: Mutex<Vec<u8>>,
}

impl MemoryDisk {
    /// A disk of `size_bytes` zeros.
    pub fn new(size_bytes: usize) -> MemoryDisk {
        MemoryDisk {
            data: Mutex::new(vec![0; size_bytes]),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.data.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn zero(&self, sector: u64, len: u64) -> Status {
        self.with(|d| {
            let Some((off, len)) = usize::try_from(len)
                .ok()
                .and_then(|l| range(sector, l, d.len() as u64))
            else {
                return Status::Error;
            };
            d[off as usize..off as usize + len].fill(0);
            Status::Success
        })
    }
}

impl Handler for MemoryDisk {
    fn read(&self, sector: u64, buf: &mut [u8]) -> Status {
        self.with(|d| match range(sector, buf.len(), d.len() as u64) {
            Some((off, len)) => {
                buf.copy_from_slice(&d[off as usize..off as usize + len]);
                Status::Success
            }
            None => Status::Error,
        })
    }

    fn write(&self, sector: u64, data: &[u8], _flags: IoFlags) -> Status {
        self.with(|d| match range(sector, data.len(), d.len() as u64) {
            Some((off, len)) => {
                d[off as usize..off as usize + len].copy_from_slice(data);
                Status::Success
            }
            None => Status::Error,
        })
    }

    fn discard(&self, sector: u64, len: u64) -> Status {
        self.zero(sector, len)
    }

    fn write_zeroes(&self, sector: u64, len: u64, _flags: IoFlags) -> Status {
        self.zero(sector, len)
    }

    fn secure_erase(&self, sector: u64, len: u64) -> Status {
        self.zero(sector, len)
    }
}

/// A disk backed by a file: positional reads and writes, `fdatasync` for FLUSH and FUA writes.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    /// Serves `file`, whose current length is the disk's size.
    pub fn new(file: File) -> std::io::Result<FileDisk> {
        let size = file.metadata()?.len();
        Ok(FileDisk { file, size })
    }

    fn write_zeros_at(&self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

fn status(r: std::io::Result<()>) -> Status {
    match r {
        Ok(()) => Status::Success,
        Err(_) => Status::Error,
    }
}

impl Handler for FileDisk {
    fn read(&self, sector: u64, buf: &mut [u8]) -> Status {
        match range(sector, buf.len(), self.size) {
            Some((off, _)) => status(self.file.read_exact_at(buf, off)),
            None => Status::Error,
        }
    }

    fn write(&self, sector: u64, data: &[u8], flags: IoFlags) -> Status {
        let Some((off, _)) = range(sector, data.len(), self.size) else {
            return Status::Error;
        };
        let mut r = self.file.write_all_at(data, off);
        if r.is_ok() && flags.contains(IoFlags::FUA) {
            r = self.file.sync_data();
        }
        status(r)
    }

    fn flush(&self) -> Status {
        status(self.file.sync_data())
    }

    fn discard(&self, sector: u64, len: u64) -> Status {
        // Reads of discarded blocks may return anything; keeping the old data is allowed.
        match usize::try_from(len)
            .ok()
            .and_then(|l| range(sector, l, self.size))
        {
            Some(_) => Status::Success,
            None => Status::Error,
        }
    }

    fn write_zeroes(&self, sector: u64, len: u64, flags: IoFlags) -> Status {
        let Some((off, l)) = usize::try_from(len)
            .ok()
            .and_then(|l| range(sector, l, self.size))
        else {
            return Status::Error;
        };
        let mut r = self.write_zeros_at(off, l as u64);
        if r.is_ok() && flags.contains(IoFlags::FUA) {
            r = self.file.sync_data();
        }
        status(r)
    }
}
