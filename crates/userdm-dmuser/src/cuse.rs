//! dm-user's character device, byte for byte, through CUSE: `/dev/dm-user/<ctl>`, whose every
//! `open()` is one channel, so daemons written for the kernel's dm-user run unchanged.
//!
//! Each open file is bridged to a connection to the endpoint's own socket, made by this
//! process: the socket side (message order, partial reads and writes, `seq` checks, re-queue
//! when a channel closes) is the one the socket daemons use, with no second implementation. A
//! `read()` of the device is answered with what that connection receives, and only while a
//! `read()` waits, so the endpoint offers a message to whichever open file reads first, as
//! dm-user does; a `write()` is sent on it. When the endpoint closes the connection, the file
//! fails as dm-user's does: `ENOTBLK` once the target is gone, `EINVAL` after a protocol error.
//!
//! Threads: one reads `/dev/cuse` and hands each request to the thread of its open file; each
//! open file has one thread, which blocks on its connection. Replies are written to
//! `/dev/cuse` by whichever thread has them (each reply is one `write`).
//!
//! Turned on with `USERDM_DMUSER_CUSE=1` where `/dev/cuse` exists.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shared::Shared;
use crate::sys::EventFd;

/// The environment variable that turns the character device on.
pub const CUSE_ENV: &str = "USERDM_DMUSER_CUSE";
/// CUSE's control device.
const CUSE_PATH: &str = "/dev/cuse";

/// FUSE opcodes CUSE uses.
mod op {
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INTERRUPT: u32 = 36;
    pub const POLL: u32 = 40;
    pub const CUSE_INIT: u32 = 4096;
}

/// `struct fuse_in_header`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InHeader {
    len: u32,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: u32,
    total_extlen: u16,
    padding: u16,
}

/// `struct fuse_out_header`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct OutHeader {
    len: u32,
    error: i32,
    unique: u64,
}

/// `struct cuse_init_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CuseInitIn {
    major: u32,
    minor: u32,
    unused: u32,
    flags: u32,
}

/// `struct cuse_init_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CuseInitOut {
    major: u32,
    minor: u32,
    unused: u32,
    flags: u32,
    max_read: u32,
    max_write: u32,
    dev_major: u32,
    dev_minor: u32,
    spare: [u32; 10],
}

/// `struct fuse_open_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct OpenOut {
    fh: u64,
    open_flags: u32,
    backing_id: i32,
}

/// `struct fuse_read_in` and `struct fuse_write_in` share this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RwIn {
    fh: u64,
    offset: u64,
    size: u32,
    rw_flags: u32,
    lock_owner: u64,
    flags: u32,
    padding: u32,
}

/// `struct fuse_write_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct WriteOut {
    size: u32,
    padding: u32,
}

/// `struct fuse_interrupt_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InterruptIn {
    unique: u64,
}

/// `struct fuse_release_in`: only `fh` is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ReleaseIn {
    fh: u64,
    flags: u32,
    release_flags: u32,
    lock_owner: u64,
}

const _: () = {
    assert!(std::mem::size_of::<InHeader>() == 40);
    assert!(std::mem::offset_of!(InHeader, unique) == 8);
    assert!(std::mem::offset_of!(InHeader, uid) == 24);
    assert!(std::mem::offset_of!(InHeader, total_extlen) == 36);
    assert!(std::mem::size_of::<OutHeader>() == 16);
    assert!(std::mem::offset_of!(OutHeader, unique) == 8);
    assert!(std::mem::size_of::<CuseInitIn>() == 16);
    assert!(std::mem::size_of::<CuseInitOut>() == 72);
    assert!(std::mem::offset_of!(CuseInitOut, max_read) == 16);
    assert!(std::mem::offset_of!(CuseInitOut, dev_major) == 24);
    assert!(std::mem::size_of::<OpenOut>() == 16);
    assert!(std::mem::size_of::<RwIn>() == 40);
    assert!(std::mem::offset_of!(RwIn, size) == 16);
    assert!(std::mem::offset_of!(RwIn, lock_owner) == 24);
    assert!(std::mem::size_of::<WriteOut>() == 8);
    assert!(std::mem::size_of::<InterruptIn>() == 8);
    assert!(std::mem::size_of::<ReleaseIn>() == 24);
};

/// The FUSE protocol version we speak (7.31: the minor the kernel settles with us is the
/// lower of this and its own).
const FUSE_MAJOR: u32 = 7;
const FUSE_MINOR: u32 = 31;
/// `CUSE_UNRESTRICTED_IOCTL`: not asked for; dm-user has no ioctls.
const CUSE_FLAGS: u32 = 0;
/// The largest read or write the kernel hands us in one request.
const MAX_IO: u32 = 1 << 20;
/// How often a blocked read looks for an interrupt or a release.
const READ_POLL: Duration = Duration::from_millis(50);

/// Reads a `T` from the front of `bytes` (unaligned), if it is long enough.
fn read_struct<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; T is a plain-old-data repr(C)
    // struct of integers, valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The bytes of a plain-old-data `T`.
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a repr(C) struct of integers with no padding bytes (sizes asserted above).
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// Whether endpoints should offer the character device.
pub(crate) fn enabled() -> bool {
    std::env::var_os(CUSE_ENV).is_some_and(|v| v == "1") && Path::new(CUSE_PATH).exists()
}

/// Who may open the device (the endpoint's owner rules).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Owner {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
}

/// A running character device; dropping it removes the device.
pub(crate) struct CuseDevice {
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CuseDevice {
    /// Creates `/dev/dm-user/<ctl>` served through the endpoint socket at `socket`.
    pub(crate) fn start(
        ctl: &str,
        socket: PathBuf,
        shared: Arc<Shared>,
        owner: Owner,
    ) -> io::Result<CuseDevice> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CUSE_PATH)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {CUSE_PATH}: {e}")))?;
        let dev = Arc::new(dev);
        let devname = format!("dm-user/{ctl}");
        handshake(&dev, &devname)?;
        let node = PathBuf::from(format!("/dev/{devname}"));
        give_node(&node, owner);
        let stop = Arc::new(EventFd::new()?);
        let stopping = Arc::new(AtomicBool::new(false));
        let session = Session {
            dev,
            socket,
            shared,
            owner,
            stop: stop.clone(),
            stopping: stopping.clone(),
            opens: HashMap::new(),
            next_fh: 1,
        };
        let thread = std::thread::Builder::new()
            .name(format!("cuse-{ctl}"))
            .spawn(move || session.run())?;
        Ok(CuseDevice {
            stop,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for CuseDevice {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends CUSE_INIT's reply: our protocol version and the device's name. devtmpfs then makes
/// the node.
fn handshake(dev: &File, devname: &str) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let n = (&*dev).read(&mut buf)?;
    let header: InHeader = read_struct(&buf[..n])
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "short CUSE_INIT"))?;
    if header.opcode != op::CUSE_INIT {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("expected CUSE_INIT, got opcode {}", header.opcode),
        ));
    }
    let init: CuseInitIn = read_struct(&buf[40..n])
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "short CUSE_INIT"))?;
    if init.major != FUSE_MAJOR {
        return Err(io::Error::new(
            ErrorKind::Unsupported,
            format!(
                "the kernel speaks FUSE {}.{}, not 7.x",
                init.major, init.minor
            ),
        ));
    }
    let out = CuseInitOut {
        major: FUSE_MAJOR,
        minor: init.minor.min(FUSE_MINOR),
        flags: CUSE_FLAGS,
        max_read: MAX_IO,
        max_write: MAX_IO,
        ..Default::default()
    };
    let info = format!("DEVNAME={devname}\0");
    reply(dev, header.unique, 0, &[bytes_of(&out), info.as_bytes()])
}

/// Sets the node's owner and mode as the endpoint's, once devtmpfs has made it.
fn give_node(node: &Path, owner: Owner) {
    for _ in 0..100 {
        if node.exists() {
            let _ = std::fs::set_permissions(
                node,
                std::os::unix::fs::PermissionsExt::from_mode(owner.mode),
            );
            let _ = crate::sys::chown(node, owner.uid, owner.gid);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("userdm: {} did not appear", node.display());
}

/// The most payload slices one reply has (CUSE_INIT's struct and device name).
const REPLY_PARTS_MAX: usize = 2;

/// Writes one reply: header and payload in one `writev`, as the FUSE device requires. No
/// allocation: replies to READs are on every request's path.
fn reply(dev: &File, unique: u64, error: i32, parts: &[&[u8]]) -> io::Result<()> {
    debug_assert!(parts.len() <= REPLY_PARTS_MAX);
    let parts = &parts[..parts.len().min(REPLY_PARTS_MAX)];
    let len = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
    let header = OutHeader {
        len: len as u32,
        error,
        unique,
    };
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty; REPLY_PARTS_MAX + 1];
    iov[0] = libc::iovec {
        iov_base: bytes_of(&header).as_ptr() as *mut libc::c_void,
        iov_len: 16,
    };
    for (slot, p) in iov[1..].iter_mut().zip(parts) {
        *slot = libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        };
    }
    // SAFETY: the first 1 + parts.len() iovecs point into slices that live across the call.
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), 1 + parts.len() as i32) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted and is gone; nothing to answer.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

fn reply_error(dev: &File, unique: u64, errno: i32) {
    let _ = reply(dev, unique, -errno, &[]);
}

/// What the session thread hands an open file's thread. Writes are not among them: the
/// session thread sends a write's data on the file's connection itself, from the buffer it
/// read the request into (no copy; the endpoint reads replies as they come, so the send does
/// not wait long).
enum Work {
    Read { unique: u64, size: usize },
    Interrupt { unique: u64 },
    Release { unique: u64 },
}

/// An open file as the session thread holds it.
struct Open {
    tx: Sender<Work>,
    thread: JoinHandle<()>,
    /// The file's connection to the endpoint (a clone of the one its thread reads).
    stream: UnixStream,
    /// 0, or the errno every later read and write gets: the endpoint closed the connection.
    failed: Arc<AtomicI32>,
}

/// The errno of a connection the endpoint closed: ENOTBLK once the target is gone, EINVAL
/// otherwise (it closes a channel on a protocol error), remembered in `failed`.
fn closed_errno(shared: &Shared, failed: &AtomicI32) -> i32 {
    let errno = if shared.inner().shutdown {
        libc::ENOTBLK
    } else {
        libc::EINVAL
    };
    failed.store(errno, Ordering::SeqCst);
    errno
}

struct Session {
    dev: Arc<File>,
    socket: PathBuf,
    shared: Arc<Shared>,
    owner: Owner,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    opens: HashMap<u64, Open>,
    next_fh: u64,
}

impl Session {
    fn run(mut self) {
        let mut buf = vec![0u8; MAX_IO as usize + 4096];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.dev.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.raw(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            if fds[0].revents == 0 {
                continue;
            }
            let len = match (&*self.dev).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::ENOENT)
                    ) =>
                {
                    continue
                }
                // ENODEV: the device was torn down.
                Err(_) => break,
            };
            self.handle(&buf[..len]);
        }
        // Open files' threads end when their connections close, which the endpoint's
        // shutdown does; closing /dev/cuse removes the node.
        for (_, open) in self.opens.drain() {
            drop(open.tx);
            let _ = open.thread.join();
        }
    }

    fn handle(&mut self, msg: &[u8]) {
        let Some(header) = read_struct::<InHeader>(msg) else {
            return;
        };
        let body = &msg[40.min(msg.len())..];
        let dev = &self.dev;
        match header.opcode {
            op::OPEN => self.open(&header),
            op::READ | op::WRITE => {
                let Some(rw) = read_struct::<RwIn>(body) else {
                    return reply_error(dev, header.unique, libc::EINVAL);
                };
                let Some(open) = self.opens.get(&rw.fh) else {
                    return reply_error(dev, header.unique, libc::EBADF);
                };
                if header.opcode == op::WRITE {
                    let data = body.get(40..40 + rw.size as usize);
                    return write(dev, &self.shared, open, header.unique, data);
                }
                let work = Work::Read {
                    unique: header.unique,
                    size: rw.size as usize,
                };
                if open.tx.send(work).is_err() {
                    reply_error(dev, header.unique, libc::EINVAL);
                }
            }
            op::INTERRUPT => {
                if let Some(int) = read_struct::<InterruptIn>(body) {
                    for open in self.opens.values() {
                        let _ = open.tx.send(Work::Interrupt { unique: int.unique });
                    }
                }
            }
            op::RELEASE => {
                let fh = read_struct::<ReleaseIn>(body).map_or(0, |r| r.fh);
                match self.opens.remove(&fh) {
                    Some(open) => {
                        let _ = open.tx.send(Work::Release {
                            unique: header.unique,
                        });
                        drop(open.tx);
                        let _ = open.thread.join();
                    }
                    None => {
                        let _ = reply(dev, header.unique, 0, &[]);
                    }
                }
            }
            op::FLUSH | op::FSYNC => {
                let _ = reply(dev, header.unique, 0, &[]);
            }
            op::POLL => reply_error(dev, header.unique, libc::ENOSYS),
            _ => reply_error(dev, header.unique, libc::ENOSYS),
        }
    }

    fn open(&mut self, header: &InHeader) {
        let dev = &self.dev;
        let allowed = header.uid == 0
            || header.uid == self.owner.uid
            || (self.owner.mode & 0o060 != 0 && header.gid == self.owner.gid);
        if !allowed {
            return reply_error(dev, header.unique, libc::EACCES);
        }
        if self.shared.inner().shutdown {
            return reply_error(dev, header.unique, libc::ENOTBLK);
        }
        let stream = match UnixStream::connect(&self.socket) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("userdm: cuse: cannot reach {}: {e}", self.socket.display());
                return reply_error(dev, header.unique, libc::EIO);
            }
        };
        let _ = stream.set_read_timeout(Some(READ_POLL));
        let Ok(writer) = stream.try_clone() else {
            return reply_error(dev, header.unique, libc::EMFILE);
        };
        let fh = self.next_fh;
        self.next_fh += 1;
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicI32::new(0));
        let file = OpenFile {
            dev: dev.clone(),
            stream,
            shared: self.shared.clone(),
            rx,
            interrupted: Arc::new(AtomicU64::new(0)),
            failed: failed.clone(),
        };
        let thread = match std::thread::Builder::new()
            .name(format!("cuse-open{fh}"))
            .spawn(move || file.run())
        {
            Ok(t) => t,
            Err(_) => return reply_error(dev, header.unique, libc::ENOMEM),
        };
        self.opens.insert(
            fh,
            Open {
                tx,
                thread,
                stream: writer,
                failed,
            },
        );
        let out = OpenOut {
            fh,
            // FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE: a stream, as dm-user's misc device.
            open_flags: 1 | (1 << 2),
            backing_id: 0,
        };
        let _ = reply(dev, header.unique, 0, &[bytes_of(&out)]);
    }
}

/// One open file of the device: its connection to the endpoint.
struct OpenFile {
    dev: Arc<File>,
    stream: UnixStream,
    shared: Arc<Shared>,
    rx: Receiver<Work>,
    interrupted: Arc<AtomicU64>,
    /// See [`Open::failed`].
    failed: Arc<AtomicI32>,
}

/// Sends a WRITE's data on the open file's connection and answers it.
fn write(dev: &File, shared: &Shared, open: &Open, unique: u64, data: Option<&[u8]>) {
    let Some(data) = data else {
        return reply_error(dev, unique, libc::EINVAL);
    };
    let failed = open.failed.load(Ordering::SeqCst);
    if failed != 0 {
        return reply_error(dev, unique, failed);
    }
    match (&open.stream).write_all(data) {
        Ok(()) => {
            let out = WriteOut {
                size: data.len() as u32,
                padding: 0,
            };
            let _ = reply(dev, unique, 0, &[bytes_of(&out)]);
        }
        Err(_) => reply_error(dev, unique, closed_errno(shared, &open.failed)),
    }
}

impl OpenFile {
    fn run(mut self) {
        let mut buf = vec![0u8; MAX_IO as usize];
        while let Ok(work) = self.rx.recv() {
            match work {
                Work::Read { unique, size } => self.read(unique, size, &mut buf),
                Work::Interrupt { unique } => self.interrupted.store(unique, Ordering::SeqCst),
                Work::Release { unique } => {
                    // Dropping the connection re-queues whatever this file had taken.
                    let _ = reply(&self.dev, unique, 0, &[]);
                    return;
                }
            }
        }
    }

    fn read(&mut self, unique: u64, size: usize, buf: &mut [u8]) {
        let failed = self.failed.load(Ordering::SeqCst);
        if failed != 0 {
            return reply_error(&self.dev, unique, failed);
        }
        let size = size.min(buf.len());
        loop {
            match (&self.stream).read(&mut buf[..size]) {
                Ok(0) => {
                    let e = closed_errno(&self.shared, &self.failed);
                    return reply_error(&self.dev, unique, e);
                }
                Ok(n) => {
                    let _ = reply(&self.dev, unique, 0, &[&buf[..n]]);
                    return;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // An interrupt for this read (the reader got a signal), or more work
                    // queued behind it that a release would end.
                    if self.interrupted.swap(0, Ordering::SeqCst) == unique {
                        return reply_error(&self.dev, unique, libc::EINTR);
                    }
                    while let Ok(next) = self.rx.try_recv() {
                        match next {
                            Work::Interrupt { unique: u } if u == unique => {
                                return reply_error(&self.dev, unique, libc::EINTR);
                            }
                            Work::Interrupt { .. } => {}
                            Work::Release { unique: r } => {
                                reply_error(&self.dev, unique, libc::EINTR);
                                let _ = reply(&self.dev, r, 0, &[]);
                                // Closing the stream re-queues this file's requests.
                                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                                self.failed.store(libc::EBADF, Ordering::SeqCst);
                                return;
                            }
                            // A second concurrent read on the same file: answering it after this
                            // one would hand out the stream out of order, so refuse it.
                            Work::Read { unique: u, .. } => {
                                reply_error(&self.dev, u, libc::EAGAIN);
                            }
                        }
                    }
                    if self.shared.inner().shutdown {
                        return reply_error(&self.dev, unique, libc::ENOTBLK);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    let e = closed_errno(&self.shared, &self.failed);
                    return reply_error(&self.dev, unique, e);
                }
            }
        }
    }
}
