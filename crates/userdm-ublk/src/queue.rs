//! The data plane: one thread per queue, one task per tag.
//!
//! A queue thread owns a [`Reactor`], the queue's mmapped `ublksrv_io_desc` array and one page
//! aligned buffer per tag, all made before the first FETCH. Each tag runs one task, spawned once,
//! that loops: submit FETCH (first time) or COMMIT_AND_FETCH (after), wait for the CQE, read the
//! descriptor, serve the request through [`BlockDevice::io`] on the same reactor, and commit the
//! result with the next command. The ublk commands and the backend's own IO share one ring and
//! one `io_uring_enter` per loop turn. Nothing is allocated per request.
//!
//! On 6.12 the kernel accepts a queue's commands only from the task that fetched them, which is
//! why every command of a queue is submitted from its thread.
//!
//! A tag task ends when its command completes with `UBLK_IO_RES_ABORT` (the device is stopping,
//! or being quiesced for recovery); the thread ends when every tag task has.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types};
use userdm_io::{Errno, IoFlags, IoHeader, IoOp, SECTOR_SIZE};
use userdm_ublk_sys as sys;
use userdm_uring::Reactor;

use crate::backend::{DirectTarget, UblkBackend};
use crate::os::{self, Mapping};
use crate::zc::{self, ZcRing};
use crate::UblkError;

/// The index of `/dev/ublkcN` among a queue ring's fixed files.
const CDEV_FIXED: u32 = 0;

/// How request data moves between the kernel and the server's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataMode {
    /// The kernel copies into and out of the tag buffer named in each command.
    Copy,
    /// As `Copy`, but WRITEs arrive in two steps (`UBLK_F_NEED_GET_DATA`).
    NeedGetData,
    /// The server copies with pread/pwrite on `/dev/ublkcN` (`UBLK_F_USER_COPY`).
    UserCopy,
    /// Zero copy: the kernel registers each request's pages as fixed buffer `tag` of the
    /// queue's command ring (`UBLK_F_AUTO_BUF_REG` with fallback). Requests with a
    /// [`DirectTarget`] move by fixed-buffer IO on that ring; the rest reach the backend by user
    /// copy (the device is created with `UBLK_F_USER_COPY` too).
    AutoBufReg,
}

impl DataMode {
    /// The mode a device with negotiated `flags` uses.
    pub(crate) fn from_flags(flags: u64) -> DataMode {
        if flags & sys::UBLK_F_AUTO_BUF_REG != 0 {
            DataMode::AutoBufReg
        } else if flags & sys::UBLK_F_USER_COPY != 0 {
            DataMode::UserCopy
        } else if flags & sys::UBLK_F_NEED_GET_DATA != 0 {
            DataMode::NeedGetData
        } else {
            DataMode::Copy
        }
    }

    fn user_copy(self) -> bool {
        matches!(self, DataMode::UserCopy | DataMode::AutoBufReg)
    }
}

/// What a queue thread needs to start.
pub(crate) struct QueueConfig {
    pub(crate) dev_id: u32,
    pub(crate) q_id: u16,
    pub(crate) depth: u16,
    pub(crate) max_io_bytes: u32,
    pub(crate) mode: DataMode,
    /// Kernel cpumask of the CPUs that submit to this queue; empty: no pinning.
    pub(crate) affinity: Vec<u8>,
    pub(crate) batch_scheduling: bool,
    pub(crate) io_flusher: bool,
    pub(crate) private_mount_ns: bool,
}

/// One queue's counters, written by its thread only (plain load and store, no atomic
/// read-modify-write) and padded so queues never share a cache line.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct QueueStats {
    /// Requests served.
    pub(crate) requests: AtomicU64,
    /// Requests that failed at the backend.
    pub(crate) errors: AtomicU64,
    /// Requests served by zero-copy fixed-buffer IO.
    pub(crate) direct: AtomicU64,
}

impl QueueStats {
    fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// State every queue thread of a device shares with its handle.
pub(crate) struct DeviceShared {
    /// Set when any tag failed for a reason other than the device going away.
    failed: AtomicBool,
    /// The first such failure, for messages.
    first_error: Mutex<Option<String>>,
    /// Per-queue counters, indexed by queue id.
    pub(crate) stats: Box<[QueueStats]>,
}

impl DeviceShared {
    pub(crate) fn new(queues: u16) -> DeviceShared {
        DeviceShared {
            failed: AtomicBool::new(false),
            first_error: Mutex::new(None),
            stats: (0..queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// Requests served, failed, and served zero-copy, over all queues.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        self.stats.iter().fold((0, 0, 0), |(r, e, d), s| {
            (
                r + s.requests.load(Ordering::Relaxed),
                e + s.errors.load(Ordering::Relaxed),
                d + s.direct.load(Ordering::Relaxed),
            )
        })
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cold]
    fn fail(&self, what: String) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(what);
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// How a queue thread ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct QueueExit {
    /// Tags whose command ended with ABORT.
    pub(crate) aborted: u32,
    /// Tags that ended on an error.
    pub(crate) failed: u32,
}

/// The body of a queue thread. Reports setup success or failure on `ready` before serving.
pub(crate) fn queue_main<B: UblkBackend>(
    cfg: QueueConfig,
    cdev: Arc<File>,
    backend: Arc<B>,
    shared: Arc<DeviceShared>,
    ready: mpsc::Sender<Result<(), UblkError>>,
) -> QueueExit {
    prepare_thread(&cfg);
    let q_id = cfg.q_id;
    let ctx = match QueueCtx::new(cfg, cdev, backend, shared) {
        Ok(ctx) => Rc::new(ctx),
        Err(e) => {
            let _ = ready.send(Err(e));
            return QueueExit {
                aborted: 0,
                failed: 0,
            };
        }
    };
    for tag in 0..ctx.cfg.depth {
        ctx.rt.spawn(serve_tag(ctx.clone(), tag));
    }
    if ctx.zc.is_some() {
        let q = ctx.clone();
        ctx.rt.spawn(async move {
            if let Some(zc) = &q.zc {
                zc::drive(&q.rt, zc).await;
            }
            q.driver_done.set(true);
            q.wake_all_done();
        });
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    ctx.rt.block_on(AllTagsDone { ctx: &ctx });
    let exit = QueueExit {
        aborted: ctx.aborted.get(),
        failed: ctx.failed.get(),
    };
    if exit.failed > 0 {
        ctx.shared
            .fail(format!("queue {q_id}: {} tags failed", exit.failed));
    }
    drop_ctx(ctx);
    exit
}

/// Places the thread: CPU affinity, batch scheduling, IO flusher, private mount namespace.
/// Failures are not fatal; each only loses an optimisation or a safety net, so they are
/// reported on stderr.
fn prepare_thread(cfg: &QueueConfig) {
    if let Err(e) = os::set_thread_affinity(&cfg.affinity) {
        eprintln!(
            "ublk{}: queue {}: cannot set CPU affinity: {e}",
            cfg.dev_id, cfg.q_id
        );
    }
    if cfg.batch_scheduling {
        if let Err(e) = userdm_uring::thread::set_batch_scheduling() {
            eprintln!(
                "ublk{}: queue {}: cannot switch to SCHED_BATCH: {e}",
                cfg.dev_id, cfg.q_id
            );
        }
    }
    if cfg.io_flusher {
        if let Err(e) = os::set_io_flusher() {
            eprintln!(
                "ublk{}: queue {}: PR_SET_IO_FLUSHER failed: {e} (needs CAP_SYS_RESOURCE)",
                cfg.dev_id, cfg.q_id
            );
        }
    }
    if cfg.private_mount_ns {
        if let Err(e) = os::enter_private_mount_namespace() {
            eprintln!(
                "ublk{}: queue {}: cannot enter a private mount namespace: {e}",
                cfg.dev_id, cfg.q_id
            );
        }
    }
}

/// Drops the queue state, keeping the tag buffers mapped if any tag ended abnormally: the kernel
/// may then still hold a buffer address, and unmapping it could let a later mapping at the same
/// address be written by a late copy.
fn drop_ctx<B: UblkBackend>(ctx: Rc<QueueCtx<B>>) {
    let clean = ctx.failed.get() == 0;
    match Rc::try_unwrap(ctx) {
        Ok(ctx) => {
            let QueueCtx { rt, zc, bufs, .. } = ctx;
            // The command ring first: closing it cancels what the kernel still holds.
            drop(zc);
            drop(rt);
            if clean {
                drop(bufs);
            } else {
                std::mem::forget(bufs);
            }
        }
        // A task is still alive (it cannot be: block_on returned after the last one ended).
        Err(ctx) => std::mem::forget(ctx),
    }
}

/// Of each tag buffer, the part made resident when the queue starts: most requests fit in it.
const PREFAULT_BYTES: usize = 128 << 10;

/// Readies the tag buffers: small pages, and the first `PREFAULT_BYTES` of each buffer resident.
///
/// Why: a buffer page the server never wrote is the shared zero page, which the kernel's fast
/// page lookup refuses, so copying a READ's data out of it (copy mode, a backend that leaves the
/// buffer alone) takes the slow path at every request; and a first touch on the data path is a
/// page fault. With transparent huge pages, one 4 KiB write made 2 MiB resident, so the
/// buffers of a queue (depth x 512 KiB) became 64 MiB resident after a few requests; with small
/// pages and the prefault it is depth x 128 KiB (16 MiB at depth 128), plus what larger
/// requests touch. Measured in the VM (6.12, 128k reads at QD8 after 4k writes, medians of 5):
/// no change in throughput, 18 MiB resident instead of 64 MiB. Failures only lose that.
fn prepare_buffers(bufs: &Mapping, depth: u16, max_io_bytes: u32) {
    let _ = bufs.no_huge_pages();
    let stride = max_io_bytes as usize;
    let prefault = PREFAULT_BYTES.min(stride);
    for tag in 0..usize::from(depth) {
        if bufs.populate(tag * stride, prefault).is_err() {
            // Kernels before 5.14 do not have MADV_POPULATE_WRITE: pages fault in on use.
            break;
        }
    }
}

/// One queue's state, shared by its tag tasks on its thread.
struct QueueCtx<B> {
    rt: Reactor,
    cfg: QueueConfig,
    cdev: Arc<File>,
    backend: Arc<B>,
    shared: Arc<DeviceShared>,
    iods: IoDescs,
    /// `depth` buffers of `max_io_bytes`, back to back; tag `t` owns the t-th.
    bufs: Mapping,
    /// Zero-copy mode: the ring that carries the ublk commands and fixed-buffer IO.
    zc: Option<ZcRing>,
    /// Whether the zero-copy ring's driver task has ended (true when there is none).
    driver_done: Cell<bool>,
    live_tags: Cell<u32>,
    aborted: Cell<u32>,
    failed: Cell<u32>,
    all_done: RefCell<Option<Waker>>,
}

impl<B: UblkBackend> QueueCtx<B> {
    fn new(
        cfg: QueueConfig,
        cdev: Arc<File>,
        backend: Arc<B>,
        shared: Arc<DeviceShared>,
    ) -> Result<QueueCtx<B>, UblkError> {
        let queue_err = |what: String| UblkError::Queue {
            queue: cfg.q_id,
            what,
        };
        let iods = IoDescs::map(&cdev, cfg.q_id, cfg.depth)
            .map_err(|e| queue_err(format!("cannot map the io descriptors: {e}")))?;
        let buf_bytes = usize::from(cfg.depth) * cfg.max_io_bytes as usize;
        let bufs = Mapping::anonymous(buf_bytes)
            .map_err(|e| queue_err(format!("cannot map {buf_bytes} bytes of buffers: {e}")))?;
        prepare_buffers(&bufs, cfg.depth, cfg.max_io_bytes);
        let entries = (u32::from(cfg.depth) * 2).clamp(64, 4096);
        let rt = Reactor::new(entries)
            .map_err(|e| queue_err(format!("cannot create the queue's ring: {e}")))?;
        // Commands name the char device as fixed file 0: see `Reactor::register_files`.
        rt.register_files(&[cdev.as_raw_fd()])
            .map_err(|e| queue_err(format!("cannot register /dev/ublkc{}: {e}", cfg.dev_id)))?;
        let zc = match cfg.mode {
            DataMode::AutoBufReg => Some(
                ZcRing::new(
                    u32::from(cfg.depth) * 2,
                    u32::from(cfg.depth),
                    &[cdev.as_raw_fd()],
                )
                .map_err(|e| queue_err(format!("cannot create the zero-copy ring: {e}")))?,
            ),
            _ => None,
        };
        Ok(QueueCtx {
            rt,
            driver_done: Cell::new(zc.is_none()),
            zc,
            live_tags: Cell::new(u32::from(cfg.depth)),
            cfg,
            cdev,
            backend,
            shared,
            iods,
            bufs,
            aborted: Cell::new(0),
            failed: Cell::new(0),
            all_done: RefCell::new(None),
        })
    }

    /// The address of tag `tag`'s buffer.
    fn buf_addr(&self, tag: u16) -> u64 {
        let offset = usize::from(tag) * self.cfg.max_io_bytes as usize;
        self.bufs.as_ptr() as u64 + offset as u64
    }

    /// What FETCH passes in `ublksrv_io_cmd.addr`.
    fn fetch_addr(&self, tag: u16) -> u64 {
        match self.cfg.mode {
            DataMode::Copy => self.buf_addr(tag),
            DataMode::NeedGetData | DataMode::UserCopy | DataMode::AutoBufReg => 0,
        }
    }

    /// What COMMIT_AND_FETCH passes in `ublksrv_io_cmd.addr` after serving `op`: the buffer the
    /// kernel copies a READ's data from (and the next request's buffer), or nothing.
    fn commit_addr(&self, tag: u16, op: Option<IoOp>) -> u64 {
        match self.cfg.mode {
            DataMode::Copy => self.buf_addr(tag),
            DataMode::NeedGetData if op == Some(IoOp::Read) => self.buf_addr(tag),
            DataMode::NeedGetData | DataMode::UserCopy | DataMode::AutoBufReg => 0,
        }
    }

    /// Submits one IO command for `tag` and waits for its CQE.
    async fn io_cmd(&self, cmd_op: u32, tag: u16, result: i32, addr: u64) -> i32 {
        let cmd = sys::ublksrv_io_cmd {
            q_id: self.cfg.q_id,
            tag,
            result,
            addr,
        };
        let mut entry =
            opcode::UringCmd16::new(types::Fixed(CDEV_FIXED), cmd_op).cmd(encode_io_cmd(&cmd));
        if self.cfg.mode == DataMode::AutoBufReg {
            let reg = sys::ublk_auto_buf_reg {
                index: tag,
                flags: sys::UBLK_AUTO_BUF_REG_FALLBACK,
                reserved0: 0,
                reserved1: 0,
            };
            entry = entry.addr(Some(sys::ublk_auto_buf_reg_to_sqe_addr(reg)));
        }
        let entry = entry.build();
        match &self.zc {
            // SAFETY: in zero-copy mode the command names no user memory (the buffer is the
            // request's own pages, registered by the kernel); the descriptor is the ring's
            // fixed file; tag tasks await every operation to its end.
            Some(zc) => unsafe { zc.submit(entry) }.await,
            // SAFETY: the command names at most this tag's buffer, which lives in `bufs` until
            // the thread ends (longer if a tag ended abnormally); the descriptor is the ring's
            // fixed file.
            None => unsafe { self.rt.submit(entry) }.await,
        }
    }

    /// Serves the request now in `tag`'s descriptor; returns the result to commit and the op.
    async fn serve(&self, tag: u16) -> (i32, Option<IoOp>) {
        let Some(iod) = self.iods.get(tag) else {
            return (-libc::EINVAL, None);
        };
        let Some(op) = IoOp::from_ublk(sys::ublksrv_get_op(iod.op_flags)) else {
            return (-libc::EOPNOTSUPP, None);
        };
        // A FLUSH carries no range (the kernel leaves its sector at -1): give targets zeros.
        let (sector, len_bytes) = if op.has_range() {
            (iod.start_sector, u64::from(iod.nr_sectors) * SECTOR_SIZE)
        } else {
            (0, 0)
        };
        let header = IoHeader {
            op,
            flags: IoFlags::from_ublk(iod.op_flags),
            sector,
            len_bytes,
        };
        let carries_data = op.carries_write_data() || op.returns_data();
        let res = if carries_data {
            match self.direct(iod.op_flags, &header) {
                Some((zc, target)) => self.serve_direct(zc, tag, header, target).await,
                None => self.serve_data(tag, header).await,
            }
        } else {
            self.backend.io(&self.rt, header, &mut []).await
        };
        let stats = self.shared.stats.get(usize::from(self.cfg.q_id));
        if let Some(stats) = stats {
            QueueStats::bump(&stats.requests);
        }
        let result = match res {
            // A data request reports its bytes; a short READ would be retried by the kernel
            // and a zero-byte one turned into EIO, so always report all of them.
            Ok(()) if carries_data => len_bytes as i32,
            Ok(()) => 0,
            Err(e) => {
                if let Some(stats) = stats {
                    QueueStats::bump(&stats.errors);
                }
                -e.get()
            }
        };
        (result, Some(op))
    }

    /// The zero-copy route for this request, if there is one: zero-copy mode, the kernel
    /// registered the pages (no NEED_REG_BUF fallback), a READ or WRITE, and the backend names
    /// where the data lives.
    fn direct(&self, op_flags: u32, header: &IoHeader) -> Option<(&ZcRing, DirectTarget)> {
        let zc = self.zc.as_ref()?;
        if op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 {
            return None;
        }
        if !matches!(header.op, IoOp::Read | IoOp::Write) {
            return None;
        }
        self.backend.direct_target(header).map(|t| (zc, t))
    }

    /// Moves a request's data straight between its registered pages (fixed buffer `tag`) and
    /// the backend's file, on the zero-copy ring.
    async fn serve_direct(
        &self,
        zc: &ZcRing,
        tag: u16,
        header: IoHeader,
        target: DirectTarget,
    ) -> Result<(), Errno> {
        let len = u32::try_from(header.len_bytes).map_err(|_| Errno::EINVAL)?;
        let fd = types::Fd(target.fd);
        let mut done = 0u32;
        while done < len {
            let offset = target.offset_bytes + u64::from(done);
            // The address of a kernel-registered buffer is the offset into it.
            let at = done as usize as *mut u8;
            let entry = match header.op {
                IoOp::Read => opcode::ReadFixed::new(fd, at, len - done, tag)
                    .offset(offset)
                    .build(),
                _ => opcode::WriteFixed::new(fd, at, len - done, tag)
                    .offset(offset)
                    .build(),
            };
            // SAFETY: the entry names the request's registered pages (kernel memory, alive
            // until this tag commits) and the backend's descriptor, which `direct_target`
            // promises stays open; the operation is awaited to its end.
            let res = unsafe { zc.submit(entry) }.await;
            match u32::try_from(res) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => done += n,
                Err(_) => return Err(Errno::from_neg(res)),
            }
        }
        if header.op == IoOp::Write && header.flags.contains(IoFlags::FUA) {
            let entry = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: names only the backend's descriptor.
            let res = unsafe { zc.submit(entry) }.await;
            if res < 0 {
                return Err(Errno::from_neg(res));
            }
        }
        if let Some(stats) = self.shared.stats.get(usize::from(self.cfg.q_id)) {
            QueueStats::bump(&stats.direct);
        }
        Ok(())
    }

    async fn serve_data(&self, tag: u16, header: IoHeader) -> Result<(), Errno> {
        let len = usize::try_from(header.len_bytes).map_err(|_| Errno::EINVAL)?;
        if len > self.cfg.max_io_bytes as usize {
            return Err(Errno::EINVAL);
        }
        // SAFETY: tag `tag`'s buffer is `max_io_bytes` long at `buf_addr(tag)`, inside the live
        // `bufs` mapping; only this tag's task makes slices of it, one at a time, and the kernel
        // touches it only while this task is parked in `io_cmd` (before completion or after
        // commit), never while this slice exists.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf_addr(tag) as *mut u8, len) };
        let user_copy = self.cfg.mode.user_copy() && self.backend.moves_data();
        if user_copy && header.op.carries_write_data() {
            self.copy_from_request(tag, buf)?;
        }
        self.backend.io(&self.rt, header, buf).await?;
        if user_copy && header.op.returns_data() {
            self.copy_to_request(tag, buf)?;
        }
        Ok(())
    }

    /// USER_COPY: reads the request's data (a WRITE's payload) from `/dev/ublkcN`. A plain
    /// pread: it is a memory copy in the kernel that never blocks on IO, so a ring round trip
    /// (which the char device would punt to an io-wq worker) would only add latency.
    fn copy_from_request(&self, tag: u16, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let pos = self.user_copy_pos(tag, done)?;
            match os::pread(&*self.cdev, &mut buf[done..], pos) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(Errno::from(e)),
            }
        }
        Ok(())
    }

    /// USER_COPY: writes a READ's data into the request.
    fn copy_to_request(&self, tag: u16, buf: &[u8]) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let pos = self.user_copy_pos(tag, done)?;
            match os::pwrite(&*self.cdev, &buf[done..], pos) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(Errno::from(e)),
            }
        }
        Ok(())
    }

    fn user_copy_pos(&self, tag: u16, offset: usize) -> Result<u64, Errno> {
        let offset = u32::try_from(offset).map_err(|_| Errno::EINVAL)?;
        sys::ublk_user_copy_pos(self.cfg.q_id, tag, offset).ok_or(Errno::EINVAL)
    }

    fn tag_ended(&self, tag: u16, end: TagEnd) {
        match end {
            TagEnd::Aborted => self.aborted.set(self.aborted.get() + 1),
            TagEnd::Failed(res) => {
                self.failed.set(self.failed.get() + 1);
                self.shared.fail(format!(
                    "queue {} tag {tag}: command failed: {}",
                    self.cfg.q_id,
                    std::io::Error::from_raw_os_error(res.saturating_neg())
                ));
            }
        }
        let left = self.live_tags.get().saturating_sub(1);
        self.live_tags.set(left);
        if left == 0 {
            if let Some(zc) = &self.zc {
                zc.stop_driver();
            }
            self.wake_all_done();
        }
    }

    fn wake_all_done(&self) {
        if let Some(waker) = self.all_done.borrow_mut().take() {
            waker.wake();
        }
    }
}

enum TagEnd {
    Aborted,
    Failed(i32),
}

/// One tag's whole life: FETCH, then serve and COMMIT_AND_FETCH until the device goes away.
async fn serve_tag<B: UblkBackend>(q: Rc<QueueCtx<B>>, tag: u16) {
    let mut cmd_op = sys::UBLK_U_IO_FETCH_REQ;
    let mut result = 0;
    let mut addr = q.fetch_addr(tag);
    let end = loop {
        match q.io_cmd(cmd_op, tag, result, addr).await {
            sys::UBLK_IO_RES_OK => {
                let (res, op) = q.serve(tag).await;
                cmd_op = sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ;
                result = res;
                addr = q.commit_addr(tag, op);
            }
            sys::UBLK_IO_RES_NEED_GET_DATA => {
                cmd_op = sys::UBLK_U_IO_NEED_GET_DATA;
                result = 0;
                addr = q.buf_addr(tag);
            }
            sys::UBLK_IO_RES_ABORT => break TagEnd::Aborted,
            other => break TagEnd::Failed(other),
        }
    };
    q.tag_ended(tag, end);
}

/// Resolves when every tag task of the queue has ended.
struct AllTagsDone<'a, B> {
    ctx: &'a QueueCtx<B>,
}

impl<B: UblkBackend> Future for AllTagsDone<'_, B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ctx.live_tags.get() == 0 && self.ctx.driver_done.get() {
            return Poll::Ready(());
        }
        *self.ctx.all_done.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The queue's `ublksrv_io_desc` array, mapped read-only from `/dev/ublkcN`. The kernel writes
/// it, so it is read only through volatile copies, never through references.
struct IoDescs {
    map: Mapping,
    depth: u16,
}

impl IoDescs {
    fn map(cdev: &File, q_id: u16, depth: u16) -> std::io::Result<IoDescs> {
        let page = os::page_size();
        let desc = size_of::<sys::ublksrv_io_desc>();
        let stride = os::round_up(usize::from(sys::UBLK_MAX_QUEUE_DEPTH) * desc, page)
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let len = os::round_up(usize::from(depth) * desc, page)
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let offset = sys::UBLKSRV_CMD_BUF_OFFSET + u64::from(q_id) * stride as u64;
        let map = Mapping::shared_read_only(cdev.as_raw_fd(), len, offset)?;
        Ok(IoDescs { map, depth })
    }

    /// A copy of tag `tag`'s descriptor; `None` for a tag out of range.
    fn get(&self, tag: u16) -> Option<sys::ublksrv_io_desc> {
        if tag >= self.depth {
            return None;
        }
        let base = self.map.as_ptr().cast::<sys::ublksrv_io_desc>();
        // SAFETY: `tag < depth`, and the mapping holds `depth` descriptors (rounded up to a
        // page), aligned because mappings are page aligned; a volatile read copies the bytes the
        // kernel wrote before completing the command, without forming a reference.
        Some(unsafe { std::ptr::read_volatile(base.add(usize::from(tag))) })
    }
}

/// The 16-byte command area of an IO command.
pub(crate) fn encode_io_cmd(c: &sys::ublksrv_io_cmd) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..2].copy_from_slice(&c.q_id.to_ne_bytes());
    out[2..4].copy_from_slice(&c.tag.to_ne_bytes());
    out[4..8].copy_from_slice(&c.result.to_ne_bytes());
    out[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_cmd_encoding_matches_the_struct_layout() {
        let c = sys::ublksrv_io_cmd {
            q_id: 3,
            tag: 127,
            result: -5,
            addr: 0xdead_beef_0000,
        };
        let bytes = encode_io_cmd(&c);
        // SAFETY: ublksrv_io_cmd is 16 bytes of plain integers.
        let back: sys::ublksrv_io_cmd = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back, c);
    }

    #[test]
    fn data_mode_follows_the_negotiated_flags() {
        assert_eq!(DataMode::from_flags(0), DataMode::Copy);
        assert_eq!(
            DataMode::from_flags(sys::UBLK_F_NEED_GET_DATA),
            DataMode::NeedGetData
        );
        assert_eq!(
            DataMode::from_flags(sys::UBLK_F_USER_COPY),
            DataMode::UserCopy
        );
        assert_eq!(
            DataMode::from_flags(sys::UBLK_F_USER_COPY | sys::UBLK_F_AUTO_BUF_REG),
            DataMode::AutoBufReg
        );
    }
}
