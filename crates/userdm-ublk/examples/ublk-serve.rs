//! Serves a memory, null or file backed block device over ublk, for tests and benchmarks.
//!
//! ```text
//! ublk-serve [SERVE OPTIONS]              create a device, print /dev/ublkbN, serve until
//!                                         SIGTERM/SIGINT (then stop and delete it)
//! ublk-serve --recover ID [SERVE OPTIONS] take over device ID after its server died
//! ublk-serve --delete ID [--force]        stop and delete device ID
//! ublk-serve --list                       list devices
//! ublk-serve --features                   print what the driver offers
//!
//! SERVE OPTIONS
//!   --backend memory|null|file   (default memory)
//!   --file PATH                  backing file (file backend)
//!   --size SIZE                  memory/null size, e.g. 256M (default 256M)
//!   -q, --queues N  -d, --depth N  --id N  --max-io BYTES
//!   --recovery  --user-copy  --zero-copy  --need-get-data
//!   --control PATH               control device (default /dev/ublk-control)
//!   --no-private-ns              stay in the caller's mount namespace
//! ```
//!
//! SIGUSR1 re-reads the backing file's size and tells the kernel (UPDATE_SIZE). SIGUSR2 stops
//! and deletes the device unless it is in use ("busy: ..." and keep serving). SIGHUP quiesces
//! the device and exits, leaving it for `--recover` (a live upgrade; needs --recovery, 6.16+).
//! On SIGTERM the server prints how many heap allocations the whole process made while the
//! device was live ("allocations while serving: N"): with the null backend that is the
//! frontend's own count, which tests check stays flat however many requests were served.
//! Exit status: 0 done, 1 runtime failure, 2 bad usage.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use userdm_io::{Errno, IoFlags, IoHeader, IoOp, OpSet};
use userdm_table::TargetLimits;
use userdm_ublk::{
    BlockDevice, Control, DeleteMode, DirectTarget, UblkBackend, UblkError, UblkHandle,
    UblkOptions, UblkServer,
};
use userdm_uring::Reactor;

/// Counts heap allocations, to show the serving path makes none per request.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Chunk size of the memory backend: chunks are allocated on first write.
const CHUNK_BYTES: u64 = 1 << 20;

/// A sparse in-memory disk: 1 MiB chunks allocated on first write, read as zeros before.
struct MemDisk {
    size: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl MemDisk {
    fn new(size: u64) -> MemDisk {
        let n = size.div_ceil(CHUNK_BYTES) as usize;
        MemDisk {
            size,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    /// Calls `f(chunk_index, offset_in_chunk, range_in_request)` over the chunks `[off, off+len)`.
    fn for_chunks(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let idx = (pos / CHUNK_BYTES) as usize;
            let in_chunk = (pos % CHUNK_BYTES) as usize;
            let n = (CHUNK_BYTES - pos % CHUNK_BYTES).min(len - done);
            f(idx, in_chunk, done as usize..(done + n) as usize);
            done += n;
        }
    }

    fn check(&self, io: &IoHeader) -> Result<u64, Errno> {
        let off = io.offset_bytes().ok_or(Errno::EOVERFLOW)?;
        match off.checked_add(io.len_bytes) {
            Some(end) if end <= self.size => Ok(off),
            _ => Err(Errno::EOVERFLOW),
        }
    }
}

impl BlockDevice for MemDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }
    fn limits(&self) -> TargetLimits {
        TargetLimits {
            volatile_cache: false,
            ..TargetLimits::default()
        }
    }
    async fn io(&self, _rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> Result<(), Errno> {
        if io.op == IoOp::Flush {
            return Ok(());
        }
        let off = self.check(&io)?;
        match io.op {
            IoOp::Read => self.for_chunks(off, io.len_bytes, |i, at, r| {
                let chunk = self.chunks[i].read().unwrap_or_else(|p| p.into_inner());
                match chunk.as_deref() {
                    Some(c) => buf[r.clone()].copy_from_slice(&c[at..at + r.len()]),
                    None => buf[r].fill(0),
                }
            }),
            IoOp::Write => self.for_chunks(off, io.len_bytes, |i, at, r| {
                let mut chunk = self.chunks[i].write().unwrap_or_else(|p| p.into_inner());
                let c = chunk.get_or_insert_with(|| vec![0u8; CHUNK_BYTES as usize].into());
                c[at..at + r.len()].copy_from_slice(&buf[r]);
            }),
            IoOp::Discard | IoOp::WriteZeroes => self.for_chunks(off, io.len_bytes, |i, at, r| {
                let mut chunk = self.chunks[i].write().unwrap_or_else(|p| p.into_inner());
                if r.len() as u64 == CHUNK_BYTES {
                    *chunk = None;
                } else if let Some(c) = chunk.as_deref_mut() {
                    c[at..at + r.len()].fill(0);
                }
            }),
            _ => return Err(Errno::EOPNOTSUPP),
        }
        Ok(())
    }
}

impl UblkBackend for MemDisk {}

/// Reads nothing, stores nothing: the fastest possible backend, for benchmarks.
struct NullDisk {
    size: u64,
}

impl BlockDevice for NullDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }
    fn limits(&self) -> TargetLimits {
        TargetLimits {
            volatile_cache: false,
            ..TargetLimits::default()
        }
    }
    async fn io(&self, _rt: &Reactor, _io: IoHeader, _buf: &mut [u8]) -> Result<(), Errno> {
        Ok(())
    }
}

/// Like null_blk: data is never looked at, so with user copy nothing is copied at all.
impl UblkBackend for NullDisk {
    fn moves_data(&self) -> bool {
        false
    }
}

/// A file: IO through the queue's ring; FLUSH is fdatasync, DISCARD punches a hole,
/// WRITE_ZEROES zeroes the range.
struct FileDisk {
    file: File,
    size: AtomicU64,
}

impl FileDisk {
    fn open(path: &str) -> Result<FileDisk, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open backing file '{path}': {e}"))?;
        let size = file
            .metadata()
            .map_err(|e| format!("cannot stat '{path}': {e}"))?
            .len();
        if size < 4096 {
            return Err(format!("backing file '{path}' is smaller than 4096 bytes"));
        }
        Ok(FileDisk {
            file,
            size: AtomicU64::new(size & !511),
        })
    }

    fn refresh_size(&self) -> u64 {
        let size = self.file.metadata().map(|m| m.len() & !511).unwrap_or(0);
        self.size.store(size, Ordering::Release);
        size
    }
}

/// Zero copy: every request maps to the same range of the file, which stays open.
impl UblkBackend for FileDisk {
    fn direct_target(&self, io: &IoHeader) -> Option<DirectTarget> {
        let offset_bytes = io.offset_bytes()?;
        if offset_bytes.checked_add(io.len_bytes)? > self.size_bytes() {
            return None;
        }
        Some(DirectTarget {
            fd: self.file.as_raw_fd(),
            offset_bytes,
        })
    }
}

impl BlockDevice for FileDisk {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }
    fn limits(&self) -> TargetLimits {
        TargetLimits::default()
    }
    async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> Result<(), Errno> {
        if io.op == IoOp::Flush {
            return rt.fsync(&self.file, true).await;
        }
        let off = io.offset_bytes().ok_or(Errno::EOVERFLOW)?;
        if off.saturating_add(io.len_bytes) > self.size_bytes() {
            return Err(Errno::EOVERFLOW);
        }
        match io.op {
            IoOp::Read => rt.read_exact_at(&self.file, buf, off).await,
            IoOp::Write => {
                rt.write_all_at(&self.file, buf, off).await?;
                if io.flags.contains(IoFlags::FUA) {
                    rt.fsync(&self.file, true).await?;
                }
                Ok(())
            }
            IoOp::Discard => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                rt.fallocate(&self.file, mode, off, io.len_bytes).await
            }
            IoOp::WriteZeroes => {
                let mode = if io.flags.contains(IoFlags::NOUNMAP) {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                rt.fallocate(&self.file, mode, off, io.len_bytes).await
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }
}

enum Command {
    Serve,
    Recover(u32),
    Delete { id: u32, force: bool },
    List,
    Features,
}

struct Args {
    command: Command,
    backend: String,
    file: Option<String>,
    size: u64,
    opts: UblkOptions,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid size '{s}'"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        command: Command::Serve,
        backend: "memory".into(),
        file: None,
        size: 256 << 20,
        opts: UblkOptions::default(),
    };
    let mut force = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u32>()
                .map_err(|_| format!("{name} needs a number, not '{v}'"))
        };
        match arg.as_str() {
            "--backend" => args.backend = value("--backend")?,
            "--file" => args.file = Some(value("--file")?),
            "--size" => args.size = parse_size(&value("--size")?)?,
            "-q" | "--queues" => {
                let v = value("--queues")?;
                args.opts.queues =
                    u16::try_from(number("--queues", v)?).map_err(|e| e.to_string())?;
            }
            "-d" | "--depth" => {
                let v = value("--depth")?;
                args.opts.depth =
                    u16::try_from(number("--depth", v)?).map_err(|e| e.to_string())?;
            }
            "--id" => args.opts.id = Some(number("--id", value("--id")?)?),
            "--max-io" => args.opts.max_io_bytes = parse_size(&value("--max-io")?)? as u32,
            "--recovery" => args.opts.recovery = true,
            "--user-copy" => args.opts.user_copy = true,
            "--zero-copy" => args.opts.zero_copy = true,
            "--need-get-data" => args.opts.need_get_data = true,
            "--control" => args.opts.control_path = value("--control")?.into(),
            "--no-private-ns" => args.opts.private_mount_ns = false,
            "--recover" => {
                args.command = Command::Recover(number("--recover", value("--recover")?)?)
            }
            "--delete" => {
                let id = number("--delete", value("--delete")?)?;
                args.command = Command::Delete { id, force: false };
            }
            "--force" => force = true,
            "--list" => args.command = Command::List,
            "--features" => args.command = Command::Features,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if let Command::Delete { force: f, .. } = &mut args.command {
        *f = force;
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("ublk-serve: {e}");
            }
            eprintln!(
                "usage: ublk-serve [--backend memory|null|file] [--file PATH] [--size SIZE] \
                       [-q N] [-d N] [--id N] [--recovery] [--user-copy] [--zero-copy] \
                       [--need-get-data] [--control PATH] | --recover ID | --delete ID [--force] \
                       | --list | --features"
            );
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let control_path = args.opts.control_path.clone();
    let control = || Control::open(&control_path).map_err(|e| e.to_string());
    match args.command {
        Command::List => {
            for d in userdm_ublk::list(&mut control()?).map_err(|e| e.to_string())? {
                println!(
                    "dev {} queues {} depth {} max_io {} state {} pid {} flags {:#x} {}",
                    d.id,
                    d.queues,
                    d.depth,
                    d.max_io_bytes,
                    d.state.name(),
                    d.server_pid.unwrap_or(-1),
                    d.flags.bits(),
                    d.flags.names().join(",")
                );
            }
            Ok(())
        }
        Command::Features => {
            let f = userdm_ublk::features(&control_path).map_err(|e| e.to_string())?;
            println!("{:#x} {}", f.bits(), f.names().join(","));
            Ok(())
        }
        Command::Delete { id, force } => {
            let mode = if force {
                DeleteMode::Force
            } else {
                DeleteMode::Safe
            };
            let check =
                userdm_ublk::delete(&mut control()?, id, mode).map_err(|e| e.to_string())?;
            eprintln!("ublk-serve: deleted device {id} (busy check: {check:?})");
            Ok(())
        }
        Command::Serve | Command::Recover(_) => serve(args),
    }
}

fn serve(args: Args) -> Result<(), String> {
    let signals = block_signals();
    if args.opts.private_mount_ns {
        if let Err(e) = userdm_ublk::enter_private_mount_namespace() {
            eprintln!("ublk-serve: warning: cannot enter a private mount namespace: {e}");
        }
    }
    match args.backend.as_str() {
        "memory" => serve_with(Arc::new(MemDisk::new(args.size)), &args, signals, None),
        "null" => serve_with(Arc::new(NullDisk { size: args.size }), &args, signals, None),
        "file" => {
            let path = args
                .file
                .as_deref()
                .ok_or("the file backend needs --file PATH")?;
            let disk = Arc::new(FileDisk::open(path)?);
            let refresh = disk.clone();
            serve_with(
                disk,
                &args,
                signals,
                Some(Box::new(move || refresh.refresh_size())),
            )
        }
        other => Err(format!("unknown backend '{other}' (memory, null or file)")),
    }
}

fn serve_with<B: UblkBackend>(
    backend: Arc<B>,
    args: &Args,
    signals: libc::sigset_t,
    refresh_size: Option<Box<dyn Fn() -> u64>>,
) -> Result<(), String> {
    let handle = match args.command {
        Command::Recover(id) => UblkServer::recover(id, backend, args.opts.clone()),
        _ => UblkServer::start(backend, args.opts.clone()),
    }
    .map_err(|e: UblkError| e.to_string())?;
    let (major, minor) = handle.devt();
    println!("{}", handle.block_path().display());
    eprintln!(
        "ublk-serve: serving {} ({major}:{minor}), id {}, {} queue(s) of depth {}, flags {}",
        handle.block_path().display(),
        handle.id(),
        handle.info().queues,
        handle.info().depth,
        handle.info().flags.names().join(",")
    );
    let allocations_at_start = ALLOCATIONS.load(Ordering::Relaxed);
    wait_for_signal(handle, signals, refresh_size, allocations_at_start)
}

fn wait_for_signal(
    mut handle: UblkHandle,
    signals: libc::sigset_t,
    refresh_size: Option<Box<dyn Fn() -> u64>>,
    allocations_at_start: u64,
) -> Result<(), String> {
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: waits for signals in a valid, initialised set; `ts` is a valid timespec.
        let sig = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &ts) };
        match sig {
            libc::SIGTERM | libc::SIGINT => {
                let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_at_start;
                eprintln!("ublk-serve: allocations while serving: {allocations}");
                eprintln!("ublk-serve: stopping device {}", handle.id());
                let (requests, errors, direct) = handle.request_counts();
                eprintln!(
                    "ublk-serve: served {requests} requests, {errors} failed, {direct} by zero copy"
                );
                return handle.stop().map_err(|e| e.to_string());
            }
            libc::SIGHUP => {
                if !handle
                    .info()
                    .flags
                    .contains(userdm_ublk::sys::UBLK_F_QUIESCE)
                {
                    eprintln!(
                        "ublk-serve: cannot quiesce: {}",
                        UblkError::FeatureMissing {
                            what: "quiescing a live device",
                            flag: "UBLK_F_QUIESCE",
                            since: "6.16",
                        }
                    );
                    continue;
                }
                eprintln!("ublk-serve: quiescing device {} for recovery", handle.id());
                return handle
                    .quiesce(std::time::Duration::from_secs(10))
                    .map_err(|e| e.to_string());
            }
            libc::SIGUSR2 => match handle.try_stop() {
                Ok(check) => {
                    eprintln!("ublk-serve: stopped (busy check: {check:?})");
                    return Ok(());
                }
                Err((e, back)) => {
                    eprintln!("ublk-serve: not stopping: {e}");
                    handle = back;
                }
            },
            libc::SIGUSR1 => {
                if let Some(refresh) = &refresh_size {
                    let size = refresh();
                    match handle.update_size() {
                        Ok(()) => eprintln!("ublk-serve: size updated to {size} bytes"),
                        Err(e) => eprintln!("ublk-serve: cannot update the size: {e}"),
                    }
                }
            }
            _ => {
                if handle.is_finished() {
                    eprintln!(
                        "ublk-serve: device {} was stopped from outside",
                        handle.id()
                    );
                    return handle.wait().map_err(|e| e.to_string());
                }
            }
        }
    }
}

/// Blocks SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 in this thread (and so in the queue threads it spawns),
/// to be taken with sigtimedwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a zeroed local set, then pthread_sigmask on it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}
