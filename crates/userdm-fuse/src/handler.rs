//! Serving one request: FUSE operations mapped onto device IO.
//!
//! FUSE offsets are bytes; the device takes whole sectors. Aligned reads and writes go straight
//! to the device from the task's buffer. A write that starts or ends inside a sector becomes a
//! read-modify-write of the partial sectors and one device write of the whole covering range,
//! done while holding that range in the export's [`RangeLock`](crate::sync::RangeLock), which
//! every modifying request takes, so two writers of one sector cannot interleave. An unaligned
//! read reads the covering sectors and replies from the middle of them, with no copy.

use std::sync::atomic::Ordering;

use userdm_device::BlockDevice;
use userdm_io::limits::IO_BYTES_MAX;
use userdm_io::{Errno, IoFlags, IoHeader, IoOp, SECTOR_SIZE};

use crate::export::{now, CacheMode};
use crate::proto::abi::{self, falloc, fattr, fopen, write_flags, Wire};
use crate::proto::{parse_request, Operation};
use crate::worker::{TaskBuf, ThreadCtx};

const SECTOR: u64 = SECTOR_SIZE;
/// The largest fixed-size reply body (`fuse_attr_out`).
const SMALL_BODY_BYTES: usize = 104;
/// DISCARD and WRITE_ZEROES carry no data, so they are split only to keep each device request
/// to a sane size, not to the data limit.
const NODATA_CHUNK_BYTES: u64 = 1 << 30;
/// The block size reported by `stat` and `statfs`.
const BLOCK_BYTES: u32 = 4096;
const SEEK_DATA: u32 = 3;
const SEEK_HOLE: u32 = 4;

/// Where a reply's body is.
enum Reply {
    /// No body.
    Empty,
    /// `len` bytes after the header in the small reply buffer.
    Small(usize),
    /// `len` bytes at `at` in the task buffer; the header goes in the 16 bytes before.
    Data { at: usize, len: usize },
}

fn round_down(x: u64) -> u64 {
    x - x % SECTOR
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(SECTOR) * SECTOR
}

/// Serves the request of `len` bytes at the start of `buf`'s request area, and replies.
pub(crate) async fn handle<B: BlockDevice>(ctx: &ThreadCtx<'_, B>, buf: &mut TaskBuf, len: usize) {
    let stats = &ctx.shared.control.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let start = buf.request_range().start;
    // Copy out the header and arguments, so the buffer is free for the reply; a WRITE's
    // payload is found again by position (it starts the data area).
    let parsed =
        parse_request(&buf.mem_ref()[start..start + len]).map(|r| (r.header, r.op.detach()));
    let (header, op) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            if let Some(unique) = e.unique() {
                let mut small = [0u8; abi::OutHeader::SIZE];
                send(ctx, buf, &mut small, unique, Err(Errno::EINVAL)).await;
            }
            return;
        }
    };
    if !op.expects_reply() {
        return;
    }
    let mut small = [0u8; abi::OutHeader::SIZE + SMALL_BODY_BYTES];
    let result = dispatch(ctx, buf, &mut small, op).await;
    send(ctx, buf, &mut small, header.unique, result).await;
}

async fn dispatch<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    small: &mut [u8],
    op: Operation<'_>,
) -> Result<Reply, Errno> {
    match op {
        Operation::Read(r) => read(ctx, buf, r).await,
        Operation::Write(w, _) => write(ctx, buf, w, small).await,
        Operation::Getattr(_) => Ok(body(small, &attr_out(ctx))),
        Operation::Setattr(s) => setattr(ctx, s).map(|out| body(small, &out)),
        Operation::Open(o) => open(ctx, o).map(|out| body(small, &out)),
        Operation::Release(_) => {
            release(ctx);
            Ok(Reply::Empty)
        }
        Operation::Fsync(_) | Operation::Flush(_) => flush(ctx).await.map(|()| Reply::Empty),
        Operation::Fallocate(f) => fallocate(ctx, buf, f).await.map(|()| Reply::Empty),
        Operation::Lseek(l) => lseek(ctx, l).map(|out| body(small, &out)),
        Operation::Statfs => Ok(body(small, &statfs(ctx))),
        Operation::Access(a) => {
            if a.mask & libc::W_OK as u32 != 0 && ctx.shared.device.read_only() {
                Err(Errno::EROFS)
            } else {
                Ok(Reply::Empty)
            }
        }
        Operation::Destroy => Ok(Reply::Empty),
        // The root is a regular file: there are no names to look up.
        Operation::Lookup => Err(Errno::new(libc::ENOENT)),
        // INIT was answered at start; a second one is a protocol error.
        Operation::Init(_) => Err(Errno::new(libc::EPROTO)),
        _ => Err(Errno::new(libc::ENOSYS)),
    }
}

fn body<W: Wire>(small: &mut [u8], w: &W) -> Reply {
    // `small` is sized for the largest body, so this cannot fail; if it ever did, an empty
    // body makes the kernel fail the request (EIO) rather than read garbage.
    match w.encode(&mut small[abi::OutHeader::SIZE..]) {
        Some(()) => Reply::Small(W::SIZE),
        None => Reply::Empty,
    }
}

async fn send<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    small: &mut [u8],
    unique: u64,
    result: Result<Reply, Errno>,
) {
    let (reply, error) = match result {
        Ok(reply) => (reply, 0),
        Err(e) => {
            ctx.shared
                .control
                .stats
                .errors
                .fetch_add(1, Ordering::Relaxed);
            (Reply::Empty, -e.get())
        }
    };
    let hsize = abi::OutHeader::SIZE;
    let (bytes, header_at, total) = match reply {
        Reply::Empty => (small, 0, hsize),
        Reply::Small(len) => (small, 0, hsize + len),
        Reply::Data { at, len } => (buf.mem(), at - hsize, hsize + len),
    };
    let header = abi::OutHeader {
        len: total as u32,
        error,
        unique,
    };
    let Some(region) = bytes.get_mut(header_at..header_at + total) else {
        return;
    };
    if header.encode(region).is_some() {
        ctx.send_reply(region).await;
    }
}

/// Runs a data-carrying request in pieces of at most `IO_BYTES_MAX`.
async fn device_rw<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    op: IoOp,
    flags: IoFlags,
    offset: u64,
    data: &mut [u8],
) -> Result<(), Errno> {
    debug_assert_eq!(offset % SECTOR, 0);
    debug_assert_eq!(data.len() as u64 % SECTOR, 0);
    let mut done = 0usize;
    while done < data.len() {
        let n = (data.len() - done).min(IO_BYTES_MAX as usize);
        let io = IoHeader {
            op,
            flags,
            sector: (offset + done as u64) / SECTOR,
            len_bytes: n as u64,
        };
        ctx.shared
            .device
            .io(ctx.rt, io, &mut data[done..done + n])
            .await?;
        done += n;
    }
    Ok(())
}

/// Runs DISCARD or WRITE_ZEROES over `[start, end)` (sector aligned) in large pieces.
async fn device_nodata<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    op: IoOp,
    flags: IoFlags,
    start: u64,
    end: u64,
) -> Result<(), Errno> {
    let mut at = start;
    while at < end {
        let n = (end - at).min(NODATA_CHUNK_BYTES);
        let io = IoHeader {
            op,
            flags,
            sector: at / SECTOR,
            len_bytes: n,
        };
        ctx.shared.device.io(ctx.rt, io, &mut []).await?;
        at += n;
    }
    Ok(())
}

async fn read<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    r: abi::ReadIn,
) -> Result<Reply, Errno> {
    let data = buf.data_offset();
    if r.size as usize > buf.max_write() {
        return Err(Errno::EINVAL);
    }
    let size = ctx.shared.device.size_bytes();
    if r.offset >= size || r.size == 0 {
        return Ok(Reply::Data { at: data, len: 0 });
    }
    let end = r.offset.saturating_add(u64::from(r.size)).min(size);
    let (cover_start, cover_end) = (round_down(r.offset), round_up(end));
    let cover = (cover_end - cover_start) as usize;
    let region = &mut buf.mem()[data..data + cover];
    device_rw(ctx, IoOp::Read, IoFlags::empty(), cover_start, region).await?;
    let len = (end - r.offset) as usize;
    ctx.shared
        .control
        .stats
        .read_bytes
        .fetch_add(len as u64, Ordering::Relaxed);
    Ok(Reply::Data {
        at: data + (r.offset - cover_start) as usize,
        len,
    })
}

async fn write<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    w: abi::WriteIn,
    small: &mut [u8],
) -> Result<Reply, Errno> {
    let shared = ctx.shared;
    if shared.device.read_only() {
        return Err(Errno::EROFS);
    }
    let size = shared.device.size_bytes();
    let offset = w.offset;
    if w.size == 0 {
        return Ok(body(small, &abi::WriteOut::default()));
    }
    if offset >= size {
        return Err(Errno::ENOSPC);
    }
    // A write running past the end is cut short there, as on a block device; the kernel
    // reports the short count (or ENOSPC for the remainder) to the writer.
    let end = offset.saturating_add(u64::from(w.size)).min(size);
    let len = (end - offset) as usize;
    let mut flags = IoFlags::empty();
    if w.flags & libc::O_DSYNC as u32 != 0 && w.write_flags & write_flags::CACHE == 0 {
        flags |= IoFlags::FUA;
    }
    let _range = shared.ranges.lock(round_down(offset), round_up(end)).await;
    let head = (offset % SECTOR) as usize;
    let tail = ((SECTOR - end % SECTOR) % SECTOR) as usize;
    let data = buf.data_offset();
    if head != 0 || tail != 0 {
        shared.control.stats.rmw.fetch_add(1, Ordering::Relaxed);
        fill_partial_sectors(ctx, buf, offset, end).await?;
    }
    let region = &mut buf.mem()[data - head..data + len + tail];
    device_rw(ctx, IoOp::Write, flags, offset - head as u64, region).await?;
    shared.dirty.store(true, Ordering::Release);
    shared
        .control
        .stats
        .write_bytes
        .fetch_add(len as u64, Ordering::Relaxed);
    let out = abi::WriteOut {
        size: len as u32,
        padding: 0,
    };
    Ok(body(small, &out))
}

/// Puts the old contents of the partial first and last sectors of `[offset, end)` around the
/// payload at the start of the data area, so that one aligned write covers it all.
async fn fill_partial_sectors<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    offset: u64,
    end: u64,
) -> Result<(), Errno> {
    let data = buf.data_offset();
    let len = (end - offset) as usize;
    let head = (offset % SECTOR) as usize;
    let tail_start = (end % SECTOR) as usize;
    let mut sector = [0u8; SECTOR as usize];
    let mut have = None;
    if head != 0 {
        let at = round_down(offset);
        device_rw(ctx, IoOp::Read, IoFlags::empty(), at, &mut sector).await?;
        have = Some(at);
        buf.mem()[data - head..data].copy_from_slice(&sector[..head]);
    }
    if tail_start != 0 {
        let at = round_down(end);
        if have != Some(at) {
            device_rw(ctx, IoOp::Read, IoFlags::empty(), at, &mut sector).await?;
        }
        buf.mem()[data + len..data + len + (SECTOR as usize - tail_start)]
            .copy_from_slice(&sector[tail_start..]);
    }
    Ok(())
}

async fn flush<B: BlockDevice>(ctx: &ThreadCtx<'_, B>) -> Result<(), Errno> {
    let shared = ctx.shared;
    // FLUSH comes with every close(2): skip the device when no write completed since the last
    // flush started. A write completing during our flush sets `dirty` again for the next one.
    if !shared.dirty.swap(false, Ordering::AcqRel) {
        return Ok(());
    }
    if !shared.device.ops().contains(IoOp::Flush) {
        return Ok(());
    }
    shared
        .control
        .stats
        .device_flushes
        .fetch_add(1, Ordering::Relaxed);
    let io = IoHeader {
        op: IoOp::Flush,
        flags: IoFlags::empty(),
        sector: 0,
        len_bytes: 0,
    };
    let res = shared.device.io(ctx.rt, io, &mut []).await;
    if res.is_err() {
        shared.dirty.store(true, Ordering::Release);
    }
    res
}

async fn fallocate<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    f: abi::FallocateIn,
) -> Result<(), Errno> {
    let device = &ctx.shared.device;
    if device.read_only() {
        return Err(Errno::EROFS);
    }
    let efbig = Errno::new(libc::EFBIG);
    let mode = f.mode;
    if mode & !(falloc::KEEP_SIZE | falloc::PUNCH_HOLE | falloc::ZERO_RANGE) != 0 {
        // COLLAPSE, INSERT and UNSHARE would move or re-share data: not for a block device.
        return Err(Errno::EOPNOTSUPP);
    }
    let size = device.size_bytes();
    let end = f.offset.checked_add(f.length).ok_or(efbig)?;
    let keep_size = mode & falloc::KEEP_SIZE != 0;
    if mode & falloc::PUNCH_HOLE != 0 {
        if !keep_size || mode & falloc::ZERO_RANGE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if !device.ops().contains(IoOp::Discard) {
            return Err(Errno::EOPNOTSUPP);
        }
        return clear_range(ctx, buf, f.offset, end.min(size), IoOp::Discard).await;
    }
    // The file cannot grow: a range past the end is refused unless the caller asked to keep
    // the size, in which case the part past the end is simply ignored.
    if end > size && !keep_size {
        return Err(efbig);
    }
    if mode & falloc::ZERO_RANGE != 0 {
        return clear_range(ctx, buf, f.offset, end.min(size), IoOp::WriteZeroes).await;
    }
    // Plain allocation: every byte of a block device is already allocated.
    Ok(())
}

/// Discards or zeroes `[start, end)`: whole sectors with `op`, partial edge sectors by
/// writing zeros into them (a punched hole must read as zeros even where the device cannot
/// discard a partial sector).
async fn clear_range<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    start: u64,
    end: u64,
    op: IoOp,
) -> Result<(), Errno> {
    if start >= end {
        return Ok(());
    }
    let shared = ctx.shared;
    let _range = shared.ranges.lock(round_down(start), round_up(end)).await;
    if start % SECTOR != 0 {
        let to = end.min(round_down(start) + SECTOR);
        zero_partial(ctx, start, to).await?;
    }
    if end % SECTOR != 0 && (start % SECTOR == 0 || round_down(end) > round_down(start)) {
        zero_partial(ctx, round_down(end).max(start), end).await?;
    }
    let (inner_start, inner_end) = (round_up(start), round_down(end));
    if inner_start < inner_end {
        if op == IoOp::Discard {
            device_nodata(ctx, op, IoFlags::empty(), inner_start, inner_end).await?;
        } else if shared.device.ops().contains(IoOp::WriteZeroes) {
            // fallocate's ZERO_RANGE leaves the range allocated: ask for no deallocation.
            device_nodata(ctx, op, IoFlags::NOUNMAP, inner_start, inner_end).await?;
        } else {
            write_zeros(ctx, buf, inner_start, inner_end).await?;
        }
    }
    shared.dirty.store(true, Ordering::Release);
    Ok(())
}

/// Zeroes `[from, to)`, which lies inside one sector, by read-modify-write.
async fn zero_partial<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    from: u64,
    to: u64,
) -> Result<(), Errno> {
    let at = round_down(from);
    debug_assert!(to <= at + SECTOR && from < to);
    let mut sector = [0u8; SECTOR as usize];
    device_rw(ctx, IoOp::Read, IoFlags::empty(), at, &mut sector).await?;
    sector[(from - at) as usize..(to - at) as usize].fill(0);
    ctx.shared.control.stats.rmw.fetch_add(1, Ordering::Relaxed);
    device_rw(ctx, IoOp::Write, IoFlags::empty(), at, &mut sector).await
}

/// WRITE_ZEROES for a device without it: writes a zeroed buffer over the range.
async fn write_zeros<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    buf: &mut TaskBuf,
    start: u64,
    end: u64,
) -> Result<(), Errno> {
    let data = buf.data_offset();
    let chunk = buf.max_write().min((end - start) as usize);
    let zeros = &mut buf.mem()[data..data + chunk];
    zeros.fill(0);
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(chunk);
        device_rw(ctx, IoOp::Write, IoFlags::empty(), at, &mut zeros[..n]).await?;
        at += n as u64;
    }
    Ok(())
}

fn lseek<B: BlockDevice>(ctx: &ThreadCtx<'_, B>, l: abi::LseekIn) -> Result<abi::LseekOut, Errno> {
    let size = ctx.shared.device.size_bytes();
    let enxio = Errno::new(libc::ENXIO);
    // BlockDevice cannot report allocation, so the whole file is data, ending in the implicit
    // hole at end of file.
    match l.whence {
        SEEK_DATA if l.offset < size => Ok(abi::LseekOut { offset: l.offset }),
        SEEK_HOLE if l.offset < size => Ok(abi::LseekOut { offset: size }),
        SEEK_DATA | SEEK_HOLE => Err(enxio),
        _ => Err(Errno::EINVAL),
    }
}

fn attr_out<B: BlockDevice>(ctx: &ThreadCtx<'_, B>) -> abi::AttrOut {
    let size = ctx.shared.device.size_bytes();
    let meta = *ctx.shared.meta.lock();
    let timeout = ctx.shared.config.attr_timeout;
    abi::AttrOut {
        attr_valid: timeout.as_secs(),
        attr_valid_nsec: timeout.subsec_nanos(),
        dummy: 0,
        attr: abi::AttrField(abi::Attr {
            ino: abi::ROOT_ID,
            size,
            blocks: size / 512,
            atime: meta.atime.0,
            mtime: meta.mtime.0,
            ctime: meta.ctime.0,
            atimensec: meta.atime.1,
            mtimensec: meta.mtime.1,
            ctimensec: meta.ctime.1,
            mode: libc::S_IFREG | meta.perm,
            nlink: 1,
            uid: meta.uid,
            gid: meta.gid,
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        }),
    }
}

fn setattr<B: BlockDevice>(
    ctx: &ThreadCtx<'_, B>,
    s: abi::SetattrIn,
) -> Result<abi::AttrOut, Errno> {
    // The size is the device's: truncate and extend are refused (as ftruncate on a block device
    // is), unless they ask for the size the file already has.
    if s.valid & fattr::SIZE != 0 && s.size != ctx.shared.device.size_bytes() {
        return Err(Errno::EINVAL);
    }
    {
        let mut meta = ctx.shared.meta.lock();
        let now = now();
        if s.valid & fattr::MODE != 0 {
            meta.perm = s.mode & 0o7777;
        }
        if s.valid & fattr::UID != 0 {
            meta.uid = s.uid;
        }
        if s.valid & fattr::GID != 0 {
            meta.gid = s.gid;
        }
        if s.valid & fattr::ATIME_NOW != 0 {
            meta.atime = now;
        } else if s.valid & fattr::ATIME != 0 {
            meta.atime = (s.atime, s.atimensec);
        }
        if s.valid & fattr::MTIME_NOW != 0 {
            meta.mtime = now;
        } else if s.valid & fattr::MTIME != 0 {
            meta.mtime = (s.mtime, s.mtimensec);
        }
        meta.ctime = if s.valid & fattr::CTIME != 0 {
            (s.ctime, s.ctimensec)
        } else {
            now
        };
    }
    Ok(attr_out(ctx))
}

fn open<B: BlockDevice>(ctx: &ThreadCtx<'_, B>, o: abi::OpenIn) -> Result<abi::OpenOut, Errno> {
    let shared = ctx.shared;
    let writable = o.flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
    if writable && shared.device.read_only() {
        return Err(Errno::EROFS);
    }
    let direct = shared.config.cache == CacheMode::Direct || o.flags & libc::O_DIRECT as u32 != 0;
    // Direct IO skips the page cache, so writes made through another export of the device are
    // seen at once; parallel direct writes let the kernel send concurrent writes from one
    // opener (our range lock orders the overlapping ones).
    let open_flags = if direct {
        fopen::DIRECT_IO | fopen::PARALLEL_DIRECT_WRITES
    } else {
        0
    };
    shared.device.open();
    shared.opens.fetch_add(1, Ordering::AcqRel);
    Ok(abi::OpenOut {
        fh: 0,
        open_flags,
        padding: 0,
    })
}

fn release<B: BlockDevice>(ctx: &ThreadCtx<'_, B>) {
    let shared = ctx.shared;
    let had = shared
        .opens
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    if had.is_ok() {
        // The device may ask for a deferred removal here; the export cannot remove devices,
        // the control plane sees the open count reach zero itself.
        let _ = shared.device.close();
    }
}

fn statfs<B: BlockDevice>(ctx: &ThreadCtx<'_, B>) -> abi::StatfsOut {
    let size = ctx.shared.device.size_bytes();
    abi::Kstatfs {
        blocks: size / u64::from(BLOCK_BYTES),
        bfree: 0,
        bavail: 0,
        files: 1,
        ffree: 0,
        bsize: BLOCK_BYTES,
        namelen: 255,
        frsize: BLOCK_BYTES,
        padding: 0,
        spare: [0; 6],
    }
}
