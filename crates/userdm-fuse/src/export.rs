//! The public face: starting, waiting for and stopping an export.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use userdm_device::BlockDevice;
use userdm_io::SECTOR_SIZE;
use userdm_uring::sync::Notify;

use crate::proto::abi::{self, init_flags, Wire};
use crate::proto::{parse_request, Operation};
use crate::sync::{RangeLock, GROUP_TASKS_MAX};
use crate::{mountpoint, sys, worker};

/// How opens that did not ask for `O_DIRECT` are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Every open bypasses the kernel page cache (`FOPEN_DIRECT_IO`), as qemu-storage-daemon's
    /// FUSE export does. The default: the device may be exported over NBD or ublk at the same
    /// time, and writes made there would never invalidate pages cached here.
    #[default]
    Direct,
    /// Opens without `O_DIRECT` use the page cache, which is dropped at each open. Faster for
    /// cached re-reads, but only coherent with other exports of the device across reopens.
    PageCache,
}

/// How an export runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseOptions {
    /// Worker threads, each with its own io_uring ring and `/dev/fuse` clone (1..=64).
    pub threads: usize,
    /// Requests each thread serves at once (1..=64); each has a `max_write_bytes` buffer.
    pub queue_depth: usize,
    /// The largest request, in bytes: a multiple of 4096 from 4096 to 1 MiB.
    pub max_write_bytes: u32,
    /// Page-cache policy for opens without `O_DIRECT`.
    pub cache: CacheMode,
    /// How long the kernel may cache the file's attributes (size, mode, times).
    pub attr_timeout: Duration,
}

impl Default for FuseOptions {
    fn default() -> FuseOptions {
        FuseOptions {
            threads: 2,
            queue_depth: 16,
            max_write_bytes: 1 << 20,
            cache: CacheMode::Direct,
            attr_timeout: Duration::from_secs(1),
        }
    }
}

/// Why an export could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuseError {
    /// An option is out of range.
    #[error("invalid FUSE export options: {0}")]
    InvalidOptions(String),
    /// The device has no bytes to export.
    #[error("cannot export a device of size 0 as a FUSE file")]
    EmptyDevice,
    /// The device's size is not whole sectors.
    #[error("device size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// PATH is a directory; the export is a single file.
    #[error("{0}: is a directory; a FUSE export is mounted over a regular file (or a missing path, which is created)")]
    IsDirectory(PathBuf),
    /// PATH exists but is not a regular file.
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// PATH was missing and could not be created.
    #[error("cannot create {path} (does its directory exist?)")]
    Create {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// PATH could not be inspected.
    #[error("cannot inspect {path}")]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// PATH is a FUSE mount whose server is gone.
    #[error("{0}: is a FUSE mount whose server is gone (ENOTCONN); clean it up with 'fusermount3 -u {0}' or 'umount -l {0}'")]
    StaleMount(PathBuf),
    /// Something is already mounted on PATH.
    #[error("{0}: something is already mounted here (another export?); stop it, or unmount with 'umount -l {0}'")]
    AlreadyMounted(PathBuf),
    /// `/dev/fuse` could not be opened.
    #[error("cannot open /dev/fuse (likely cause: no FUSE support in this kernel, or a container without the device; try 'modprobe fuse')")]
    OpenDevice(#[source] io::Error),
    /// mount(2) failed.
    #[error(
        "cannot mount a FUSE file on {path} (EPERM means CAP_SYS_ADMIN is missing: run as root)"
    )]
    Mount {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel's INIT request was missing or unacceptable.
    #[error("FUSE handshake failed: {0}")]
    Handshake(String),
    /// A worker could not be set up.
    #[error("cannot start a FUSE worker")]
    Worker(#[source] io::Error),
    /// Unmounting failed.
    #[error("cannot unmount {path}")]
    Unmount {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Counters of one export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FuseStats {
    /// Requests read from the kernel.
    pub requests: u64,
    /// Bytes returned by READ.
    pub read_bytes: u64,
    /// Bytes accepted by WRITE.
    pub write_bytes: u64,
    /// Writes (and edges of fallocate ranges) that needed a read-modify-write.
    pub rmw: u64,
    /// FLUSH requests sent to the device.
    pub device_flushes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Replies the kernel refused (usually: the request was interrupted meanwhile).
    pub reply_errors: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) write_bytes: AtomicU64,
    pub(crate) rmw: AtomicU64,
    pub(crate) device_flushes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) reply_errors: AtomicU64,
}

/// The non-generic part of an export's state, which the handle keeps.
pub(crate) struct Control {
    pub(crate) stop: AtomicBool,
    pub(crate) notify: Notify,
    pub(crate) stats: Counters,
}

/// Negotiated, immutable settings.
pub(crate) struct Config {
    pub(crate) max_write: u32,
    pub(crate) queue_depth: usize,
    pub(crate) cache: CacheMode,
    pub(crate) attr_timeout: Duration,
}

/// Attributes the kernel may change: only metadata; the size is the device's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileMeta {
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) atime: (u64, u32),
    pub(crate) mtime: (u64, u32),
    pub(crate) ctime: (u64, u32),
}

/// Everything the workers share.
pub(crate) struct Shared<B> {
    pub(crate) device: Arc<B>,
    pub(crate) control: Arc<Control>,
    pub(crate) config: Config,
    pub(crate) meta: Mutex<FileMeta>,
    pub(crate) ranges: RangeLock,
    /// Writes completed since the last device FLUSH began; lets FLUSH (sent at every close)
    /// and FSYNC skip the device when nothing changed.
    pub(crate) dirty: AtomicBool,
    /// Kernel opens not yet released, so that the device's open count is restored at stop.
    pub(crate) opens: AtomicUsize,
}

/// Starts FUSE exports.
pub struct FuseExport;

impl FuseExport {
    /// Presents `device` as the regular file `path`: creates `path` if it is missing, mounts a
    /// single-file FUSE filesystem over it and serves it on `options.threads` worker threads.
    ///
    /// Needs CAP_SYS_ADMIN and `/dev/fuse`. If the process dies without stopping the export,
    /// the mount stays behind and answers ENOTCONN; clean it with `fusermount3 -u PATH` or
    /// `umount -l PATH`.
    pub fn start<B: BlockDevice>(
        device: Arc<B>,
        path: impl AsRef<Path>,
        options: FuseOptions,
    ) -> Result<FuseHandle, FuseError> {
        check_options(&options)?;
        let size = device.size_bytes();
        if size == 0 {
            return Err(FuseError::EmptyDevice);
        }
        if size % SECTOR_SIZE != 0 {
            return Err(FuseError::UnalignedSize(size));
        }
        let prepared = mountpoint::prepare(path.as_ref())?;
        let mut guard = MountGuard {
            path: prepared.path.clone(),
            created: prepared.created,
            mounted: false,
        };
        let session = sys::open_fuse_device(false).map_err(FuseError::OpenDevice)?;
        mount(&session, &prepared.path, device.read_only())?;
        guard.mounted = true;
        handshake(&session, &options)?;
        let meta = FileMeta {
            perm: prepared.meta.mode() & 0o7777,
            uid: prepared.meta.uid(),
            gid: prepared.meta.gid(),
            atime: (
                prepared.meta.atime() as u64,
                prepared.meta.atime_nsec() as u32,
            ),
            mtime: (
                prepared.meta.mtime() as u64,
                prepared.meta.mtime_nsec() as u32,
            ),
            ctime: (
                prepared.meta.ctime() as u64,
                prepared.meta.ctime_nsec() as u32,
            ),
        };
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            notify: Notify::with_capacity(options.threads),
            stats: Counters::default(),
        });
        let shared = Arc::new(Shared {
            device,
            control: control.clone(),
            config: Config {
                max_write: options.max_write_bytes,
                queue_depth: options.queue_depth,
                cache: options.cache,
                attr_timeout: options.attr_timeout,
            },
            meta: Mutex::new(meta),
            ranges: RangeLock::new(options.threads * options.queue_depth),
            dirty: AtomicBool::new(false),
            opens: AtomicUsize::new(0),
        });
        let mut handle = FuseHandle {
            path: prepared.path,
            created: prepared.created,
            control,
            session: Some(session),
            threads: Vec::with_capacity(options.threads),
            release: None,
        };
        guard.mounted = false; // the handle unmounts from here on
        guard.created = false;
        let shared2 = shared.clone();
        handle.release = Some(Box::new(move || {
            for _ in 0..shared2.opens.swap(0, Ordering::AcqRel) {
                shared2.device.close();
            }
        }));
        for i in 0..options.threads {
            let session = handle
                .session
                .as_ref()
                .ok_or_else(|| FuseError::Worker(io::Error::from_raw_os_error(libc::EBADF)))?;
            let fd = sys::clone_fuse_device(session).map_err(FuseError::Worker)?;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("userdm-fuse-{i}"))
                .spawn(move || worker::run_thread(shared, fd, ready_tx))
                .map_err(FuseError::Worker)?;
            handle.threads.push(thread);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(FuseError::Worker(e)),
                Err(_) => {
                    return Err(FuseError::Worker(io::Error::other("worker thread died")));
                }
            }
        }
        Ok(handle)
    }
}

fn check_options(o: &FuseOptions) -> Result<(), FuseError> {
    let bad = |s: String| Err(FuseError::InvalidOptions(s));
    if o.threads == 0 || o.threads > 64 {
        return bad(format!("threads must be 1..=64, not {}", o.threads));
    }
    if o.queue_depth == 0 || o.queue_depth > GROUP_TASKS_MAX {
        return bad(format!(
            "queue_depth must be 1..={GROUP_TASKS_MAX}, not {}",
            o.queue_depth
        ));
    }
    let w = o.max_write_bytes;
    if !(4096..=(1 << 20)).contains(&w) || w % 4096 != 0 {
        return bad(format!(
            "max_write_bytes must be a multiple of 4096 from 4096 to 1048576, not {w}"
        ));
    }
    Ok(())
}

/// Undoes a half-done start: unmounts and removes a file we created.
struct MountGuard {
    path: PathBuf,
    created: bool,
    mounted: bool,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            let _ = sys::umount(&self.path, libc::MNT_DETACH);
        }
        if self.created {
            remove_if_empty(&self.path);
        }
    }
}

fn remove_if_empty(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
        let _ = std::fs::remove_file(path);
    }
}

fn mount(session: &File, path: &Path, read_only: bool) -> Result<(), FuseError> {
    use std::os::fd::AsRawFd;
    let (uid, gid) = sys::effective_ids();
    // rootmode is octal: S_IFREG. The kernel lets a filesystem whose root is a regular file be
    // mounted on a regular file. allow_other: the exported file is for every user the mode
    // admits (default_permissions makes the kernel check that mode), as a device node would be.
    let data = format!(
        "fd={},rootmode=100000,user_id={uid},group_id={gid},allow_other,default_permissions",
        session.as_raw_fd()
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    sys::mount("userdm", path, "fuse.userdm", flags, &data).map_err(|source| FuseError::Mount {
        path: path.to_path_buf(),
        source,
    })
}

/// Answers the kernel's INIT on the starting thread, so that `start` returns only once the
/// file is usable, and fails visibly if the kernel speaks a protocol we do not.
fn handshake(session: &File, options: &FuseOptions) -> Result<(), FuseError> {
    let fail = |s: String| FuseError::Handshake(s);
    let ready = sys::poll_readable(session.as_fd(), Duration::from_secs(10))
        .map_err(|e| fail(format!("waiting for INIT: {e}")))?;
    if !ready {
        return Err(fail("no INIT request from the kernel within 10 s".into()));
    }
    let mut buf = vec![0u8; abi::MIN_READ_BUFFER.max(options.max_write_bytes as usize + 4096)];
    let len = (&*session)
        .read(&mut buf)
        .map_err(|e| fail(format!("reading INIT: {e}")))?;
    let req = parse_request(&buf[..len]).map_err(|e| fail(e.to_string()))?;
    let Operation::Init(init) = req.op else {
        return Err(fail(format!(
            "first request is opcode {}, not INIT",
            req.header.opcode
        )));
    };
    let mut out = abi::InitOut {
        major: abi::KERNEL_VERSION,
        minor: abi::KERNEL_MINOR_VERSION,
        ..abi::InitOut::default()
    };
    if init.major != abi::KERNEL_VERSION || init.minor < abi::KERNEL_MINOR_MIN {
        // Replying with our version makes a newer-major kernel retry with 7.x; an older one
        // fails the mount, which is what we want.
        reply(session, req.header.unique, 0, &out)?;
        return Err(fail(format!(
            "kernel speaks FUSE {}.{}; userdm needs 7.{} or later",
            init.major,
            init.minor,
            abi::KERNEL_MINOR_MIN
        )));
    }
    let offered = u64::from(init.flags) | (u64::from(init.flags2) << 32);
    let wanted = init_flags::ASYNC_READ
        | init_flags::BIG_WRITES
        | init_flags::ASYNC_DIO
        | init_flags::MAX_PAGES
        | init_flags::INIT_EXT
        | init_flags::DIRECT_IO_ALLOW_MMAP;
    // Flags2 bits mean nothing unless both sides use INIT_EXT.
    let mut flags = offered & wanted;
    if flags & init_flags::INIT_EXT == 0 {
        flags &= u64::from(u32::MAX);
    }
    let total_tasks = (options.threads * options.queue_depth).min(u16::MAX as usize) as u16;
    out.max_readahead = init.max_readahead;
    out.flags = flags as u32;
    out.flags2 = (flags >> 32) as u32;
    // Async direct IO from one opener can put every task to work; the kernel's default
    // background limit (12) would cap io_uring/libaio clients below our queue depth.
    out.max_background = total_tasks.max(12);
    out.congestion_threshold = (u32::from(out.max_background) * 3 / 4) as u16;
    out.max_write = options.max_write_bytes;
    out.max_pages = (options.max_write_bytes / 4096) as u16;
    out.time_gran = 1;
    reply(session, req.header.unique, 0, &out)
}

fn reply(session: &File, unique: u64, error: i32, body: &abi::InitOut) -> Result<(), FuseError> {
    let mut bytes = [0u8; abi::OutHeader::SIZE + abi::InitOut::SIZE];
    let header = abi::OutHeader {
        len: bytes.len() as u32,
        error,
        unique,
    };
    let encoded = header
        .encode(&mut bytes)
        .and_then(|()| body.encode(&mut bytes[abi::OutHeader::SIZE..]));
    if encoded.is_none() {
        return Err(FuseError::Handshake("INIT reply does not fit".into()));
    }
    (&*session)
        .write_all(&bytes)
        .map_err(|e| FuseError::Handshake(format!("writing the INIT reply: {e}")))
}

/// A running export. Dropping it stops the export, as [`FuseHandle::stop`] does, ignoring
/// errors.
pub struct FuseHandle {
    path: PathBuf,
    created: bool,
    control: Arc<Control>,
    /// The descriptor the mount was made with; closing it (with the clones) ends the
    /// connection, failing whatever the kernel still has queued with ENOTCONN.
    session: Option<File>,
    threads: Vec<JoinHandle<()>>,
    /// Gives the device back the opens the kernel never released.
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl FuseHandle {
    /// The exported file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A snapshot of the export's counters.
    pub fn stats(&self) -> FuseStats {
        let c = &self.control.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FuseStats {
            requests: get(&c.requests),
            read_bytes: get(&c.read_bytes),
            write_bytes: get(&c.write_bytes),
            rmw: get(&c.rmw),
            device_flushes: get(&c.device_flushes),
            errors: get(&c.errors),
            reply_errors: get(&c.reply_errors),
        }
    }

    /// Whether the workers are still serving (false once the file was unmounted from outside
    /// and the kernel ended the connection).
    pub fn is_serving(&self) -> bool {
        self.threads.iter().any(|t| !t.is_finished())
    }

    /// Stops the export: unmounts the file (lazily, so open descriptors keep it alive for their
    /// holders but no new opens reach it), lets requests being served finish, joins the
    /// workers and ends the connection. A loop device still attached to the file sees EIO from
    /// then on. A file created by `start` is removed again.
    pub fn stop(mut self) -> Result<(), FuseError> {
        self.shutdown()
    }

    /// Serves until the file is unmounted from outside (`umount PATH`) and the kernel ends the
    /// connection, then cleans up as [`FuseHandle::stop`].
    pub fn wait(mut self) -> Result<(), FuseError> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FuseError> {
        let mut result = Ok(());
        if self.session.is_some() {
            match sys::umount(&self.path, libc::MNT_DETACH) {
                // EINVAL: no longer a mount point (unmounted from outside); ENOENT: the path
                // itself is gone. Either way there is nothing left to unmount.
                Err(e) if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                    result = Err(FuseError::Unmount {
                        path: self.path.clone(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        self.control.stop.store(true, Ordering::Release);
        self.control.notify.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.session = None;
        if let Some(release) = self.release.take() {
            release();
        }
        if self.created {
            self.created = false;
            remove_if_empty(&self.path);
        }
        result
    }
}

impl Drop for FuseHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl std::fmt::Debug for FuseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseHandle")
            .field("path", &self.path)
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Seconds and nanoseconds since the epoch, for times the kernel asks us to set to "now".
pub(crate) fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}
