//! Starting, recovering, stopping and deleting ublk devices.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userdm_device::BlockDevice;

use crate::backend::UblkBackend;
use userdm_io::limits::{IO_BYTES_MAX, QUEUE_DEPTH_DEFAULT};
use userdm_ublk_sys as sys;

use crate::ctrl::{Control, Wait, CONTROL_PATH};
use crate::info::{feature_info, DevInfo, DevState, Features};
use crate::os;
use crate::params::{build_params, DeviceShape};
use crate::queue::{queue_main, DataMode, DeviceShared, QueueConfig, QueueExit};
use crate::UblkError;

/// How a device is served. `Default` gives one queue of depth 128, 512 KiB requests, the kernel
/// copying data, no recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// The device id to ask for (N in `/dev/ublkbN`); `None` lets the kernel pick.
    pub id: Option<u32>,
    /// Hardware queues, each served by its own thread (the kernel caps this at the CPU count).
    pub queues: u16,
    /// Tags (requests in flight) per queue.
    pub depth: u16,
    /// Largest request, in bytes: a multiple of 4096, at most `IO_BYTES_MAX`.
    pub max_io_bytes: u32,
    /// Let the device outlive its server (`UBLK_F_USER_RECOVERY` + `_REISSUE`): after the
    /// server dies the device is QUIESCED, holds new IO, and [`UblkServer::recover`] resumes it
    /// with nothing lost.
    pub recovery: bool,
    /// Copy data with pread/pwrite on `/dev/ublkcN` (`UBLK_F_USER_COPY`, Linux 6.5+).
    pub user_copy: bool,
    /// Ask for zero copy (`UBLK_F_AUTO_BUF_REG` with fallback, Linux 6.16+). See the crate docs
    /// for what this does today.
    pub zero_copy: bool,
    /// Two-step WRITEs (`UBLK_F_NEED_GET_DATA`); only without user or zero copy.
    pub need_get_data: bool,
    /// The control device (tests point this elsewhere to simulate a kernel without ublk).
    pub control_path: PathBuf,
    /// How long ADD_DEV may take before it is declared hung.
    pub add_timeout: Duration,
    /// How long START_DEV and END_USER_RECOVERY may wait for the queues to fetch.
    pub start_timeout: Duration,
    /// How long recovery waits for the dead server to be fully gone (START_USER_RECOVERY and
    /// opening `/dev/ublkcN` return EBUSY until then).
    pub recover_timeout: Duration,
    /// Put each queue thread in a private mount namespace (see
    /// [`enter_private_mount_namespace`](crate::enter_private_mount_namespace)).
    pub private_mount_ns: bool,
    /// Mark queue threads with `PR_SET_IO_FLUSHER`.
    pub io_flusher: bool,
    /// Run queue threads under `SCHED_BATCH`, so that a request's arrival does not preempt the
    /// process that submitted it.
    ///
    /// Why: a queue thread shares its CPU with the queue's submitters (GET_QUEUE_AFFINITY pins
    /// it there). Under the default policy each new request wakes the thread and preempts the
    /// submitter in the middle of queueing its batch, so the thread serves one or two requests
    /// per wakeup and the two take turns, request by request. Without wakeup preemption the
    /// submitter queues its whole batch and blocks, and the thread serves the batch in one
    /// turn. Measured on 6.12 under TCG, 4k random reads, 2 queues, 2 jobs x QD16: 10-13k IOPS
    /// with SCHED_OTHER, 20-30k with SCHED_BATCH; QD1 unchanged (the submitter blocks at once).
    pub batch_scheduling: bool,
}

impl Default for UblkOptions {
    fn default() -> UblkOptions {
        UblkOptions {
            id: None,
            queues: 1,
            depth: QUEUE_DEPTH_DEFAULT,
            max_io_bytes: 512 << 10,
            recovery: false,
            user_copy: false,
            zero_copy: false,
            need_get_data: false,
            control_path: CONTROL_PATH.into(),
            add_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            recover_timeout: Duration::from_secs(10),
            private_mount_ns: true,
            io_flusher: true,
            batch_scheduling: true,
        }
    }
}

impl UblkOptions {
    fn validate(&self) -> Result<(), UblkError> {
        let bad = |s: String| Err(UblkError::InvalidOption(s));
        if self.queues == 0 || u32::from(self.queues) > sys::UBLK_MAX_NR_QUEUES {
            return bad(format!(
                "queues must be 1..={}, not {}",
                sys::UBLK_MAX_NR_QUEUES,
                self.queues
            ));
        }
        if self.depth == 0 || self.depth > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!(
                "depth must be 1..={}, not {}",
                sys::UBLK_MAX_QUEUE_DEPTH,
                self.depth
            ));
        }
        if self.max_io_bytes % 4096 != 0
            || self.max_io_bytes == 0
            || u64::from(self.max_io_bytes) > IO_BYTES_MAX
        {
            return bad(format!(
                "max_io_bytes must be a multiple of 4096 up to {IO_BYTES_MAX}, not {}",
                self.max_io_bytes
            ));
        }
        if self.need_get_data && (self.user_copy || self.zero_copy) {
            return bad("need_get_data cannot be combined with user or zero copy".into());
        }
        if self.id.is_some_and(|id| id >= 1 << 20) {
            return bad("device ids are below 1048576".into());
        }
        Ok(())
    }

    /// The flags to ask ADD_DEV for, checked against what the driver offers.
    fn flags(&self, offered: Option<Features>) -> Result<u64, UblkError> {
        let mut want = 0;
        if self.recovery {
            want |= sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;
        }
        if self.user_copy {
            want |= sys::UBLK_F_USER_COPY;
        }
        if self.zero_copy {
            want |= sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY;
        }
        if self.need_get_data {
            want |= sys::UBLK_F_NEED_GET_DATA;
        }
        let Some(offered) = offered else {
            // No GET_FEATURES (before 6.5): only the 6.0/6.1 flags can be trusted.
            let old = sys::UBLK_F_USER_RECOVERY
                | sys::UBLK_F_USER_RECOVERY_REISSUE
                | sys::UBLK_F_NEED_GET_DATA;
            return require(want, Features::from_bits(old)).map(|()| want);
        };
        require(want, offered)?;
        // Optional extras, taken when offered.
        for extra in [sys::UBLK_F_UPDATE_SIZE, sys::UBLK_F_SAFE_STOP_DEV] {
            if offered.contains(extra) {
                want |= extra;
            }
        }
        if self.recovery && offered.contains(sys::UBLK_F_QUIESCE) {
            want |= sys::UBLK_F_QUIESCE;
        }
        Ok(want)
    }
}

/// Fails with the first flag of `want` not in `have`.
fn require(want: u64, have: Features) -> Result<(), UblkError> {
    for bit in 0..64 {
        let flag = 1u64 << bit;
        if want & flag != 0 && !have.contains(flag) {
            let info = feature_info(flag);
            return Err(UblkError::FeatureMissing {
                what: info.map_or("an unknown feature", |i| i.what),
                flag: info.map_or("UBLK_F_?", |i| i.name),
                since: info.map_or("?", |i| i.since),
            });
        }
    }
    Ok(())
}

/// What the handle needs of a backend after start, without its type.
trait BackendHooks: Send + Sync {
    fn size_bytes(&self) -> u64;
    fn close(&self) -> bool;
}

impl<B: BlockDevice> BackendHooks for B {
    fn size_bytes(&self) -> u64 {
        BlockDevice::size_bytes(self)
    }
    fn close(&self) -> bool {
        BlockDevice::close(self)
    }
}

/// Entry points that start serving a device.
pub struct UblkServer;

impl UblkServer {
    /// Creates a ublk device for `backend` and serves it until the handle is stopped.
    ///
    /// Sequence: GET_FEATURES, ADD_DEV (bounded by `add_timeout`), SET_PARAMS from the backend's
    /// size, limits and operations, one thread per queue (each pinned to the CPUs
    /// GET_QUEUE_AFFINITY names, fetching every tag), START_DEV (bounded by `start_timeout`,
    /// abandoned early if a queue fails). Any failure after ADD_DEV deletes the device again.
    ///
    /// Threads: the calling thread runs only control commands and returns; the queue threads
    /// belong to the returned handle, which joins them in [`UblkHandle::stop`] (or on drop).
    /// Counts one opener in on the backend ([`BlockDevice::open`]); stop counts it out.
    pub fn start<B: UblkBackend>(
        backend: Arc<B>,
        opts: UblkOptions,
    ) -> Result<UblkHandle, UblkError> {
        opts.validate()?;
        let mut control = Control::open(&opts.control_path)?;
        let offered = match control.features() {
            Ok(f) => Some(f),
            Err(UblkError::FeatureMissing { .. }) => None,
            Err(e) => return Err(e),
        };
        let flags = opts.flags(offered)?;
        let shape = DeviceShape {
            size_bytes: backend.size_bytes(),
            read_only: backend.read_only(),
            ops: backend.ops(),
            limits: backend.limits(),
            max_io_bytes: opts.max_io_bytes,
        };
        let params = build_params(&shape, os::page_size())?;
        let request = sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: opts.queues,
            queue_depth: opts.depth,
            max_io_buf_bytes: opts.max_io_bytes,
            dev_id: opts.id.unwrap_or(u32::MAX),
            flags,
            ..Default::default()
        };
        let info = control.add_dev(request, opts.add_timeout)?;
        let id = info.dev_id;
        let started = (|| {
            // Flags the kernel silently dropped (6.12 strips zero copy, for one).
            require(flags, Features::from_bits(info.flags))?;
            control.set_params(id, &params)?;
            let cdev = open_cdev(id, Duration::from_secs(5))?;
            let mut handle = UblkHandle::new(control, DevInfo::from_raw(&info), cdev, &backend);
            handle.spawn_queues(&backend, &opts)?;
            let shared = handle.shared.clone();
            let abort = move || shared.failed();
            let wait = Wait::at_most_unless(opts.start_timeout, &abort);
            let res = handle.control.start_dev(id, os::pid(), wait);
            handle.check_started(res)?;
            Ok(handle)
        })();
        match started {
            Ok(mut handle) => {
                handle.refresh_devt()?;
                backend.open();
                handle.opened = true;
                Ok(handle)
            }
            Err(e) => {
                // Best effort: the device must not outlive a failed start.
                if let Ok(mut c) = Control::open(&opts.control_path) {
                    let _ = c.stop_dev(id);
                    let _ = c.del_dev(id, Duration::from_secs(5));
                }
                Err(e)
            }
        }
    }

    /// Takes over a recoverable device whose server died, serving it from `backend` (which must
    /// hold the same data). The queue count, depth, request size and data mode are the
    /// device's; `opts` supplies the timeouts and thread placement.
    ///
    /// Sequence: GET_DEV_INFO (must be QUIESCED or FAIL_IO with USER_RECOVERY), START_USER_RECOVERY
    /// (retried while the old server is still exiting), open `/dev/ublkcN`, queue threads,
    /// END_USER_RECOVERY. IO held while the device was quiesced then resumes; with REISSUE the
    /// requests the dead server had taken are sent again.
    pub fn recover<B: UblkBackend>(
        id: u32,
        backend: Arc<B>,
        opts: UblkOptions,
    ) -> Result<UblkHandle, UblkError> {
        let mut control = Control::open(&opts.control_path)?;
        let info = control.dev_info(id)?;
        let not = |why: String| UblkError::NotRecoverable { id, why };
        if !info.recoverable() {
            return Err(not(
                "it was created without recovery (UBLK_F_USER_RECOVERY)".into(),
            ));
        }
        match info.state {
            DevState::Quiesced | DevState::FailIo => {}
            DevState::Live => {
                return Err(not(match info.server_pid {
                    Some(pid) => format!("it is live, served by process {pid}"),
                    None => "it is live".into(),
                }))
            }
            state => return Err(not(format!("its state is {}", state.name()))),
        }
        retry_busy(opts.recover_timeout, || control.start_user_recovery(id))?;
        let cdev = open_cdev(id, opts.recover_timeout)?;
        let mut handle = UblkHandle::new(control, info, cdev, &backend);
        let queue_opts = UblkOptions {
            queues: info.queues,
            depth: info.depth,
            max_io_bytes: info.max_io_bytes,
            ..opts.clone()
        };
        let resumed = handle.spawn_queues(&backend, &queue_opts).and_then(|()| {
            let shared = handle.shared.clone();
            let abort = move || shared.failed();
            let wait = Wait::at_most_unless(opts.start_timeout, &abort);
            let res = handle.control.end_user_recovery(id, os::pid(), wait);
            handle.check_started(res)
        });
        if let Err(e) = resumed {
            // Stopping would destroy the device being rescued, and the queue threads cannot be
            // ended without stopping it: leave both, so that the device stays recoverable once
            // this process exits.
            handle.detach();
            return Err(UblkError::NotRecoverable {
                id,
                why: format!(
                    "{e}; the device is left waiting for recovery: end this process and retry"
                ),
            });
        }
        handle.refresh_devt()?;
        backend.open();
        handle.opened = true;
        let size_sectors = backend.size_bytes() >> userdm_io::SECTOR_SHIFT;
        if size_sectors != handle.size_sectors && info.flags.contains(sys::UBLK_F_UPDATE_SIZE) {
            handle.update_size()?;
        }
        Ok(handle)
    }
}

/// Retries `f` while it fails with EBUSY, for up to `timeout`.
fn retry_busy<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, UblkError>,
) -> Result<T, UblkError> {
    let start = Instant::now();
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Opens `/dev/ublkcN`, waiting for the node to appear (udev may be slow) and for a dying
/// previous server to let go of it (EBUSY).
fn open_cdev(id: u32, timeout: Duration) -> Result<Arc<File>, UblkError> {
    let path = format!("/dev/ublkc{id}");
    let start = Instant::now();
    loop {
        let res = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path);
        match res {
            Ok(f) => return Ok(Arc::new(f)),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY))
                    && start.elapsed() < timeout =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(UblkError::os(format!("cannot open {path}"), e)),
        }
    }
}

/// A served ublk device. Owns the queue threads; stopping (or dropping) the handle stops the
/// device, joins them and deletes the device.
pub struct UblkHandle {
    control: Control,
    info: DevInfo,
    devt: (u32, u32),
    size_sectors: u64,
    cdev: Option<Arc<File>>,
    threads: Vec<JoinHandle<QueueExit>>,
    shared: Arc<DeviceShared>,
    backend: Arc<dyn BackendHooks>,
    /// Whether `backend.open()` was called (so `close()` is owed).
    opened: bool,
    /// Set once the device is stopped, quiesced or handed off: nothing left to do on drop.
    done: bool,
}

impl std::fmt::Debug for UblkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkHandle")
            .field("info", &self.info)
            .field("devt", &self.devt)
            .finish_non_exhaustive()
    }
}

impl UblkHandle {
    fn new<B: UblkBackend>(
        control: Control,
        info: DevInfo,
        cdev: Arc<File>,
        backend: &Arc<B>,
    ) -> UblkHandle {
        let hooks: Arc<dyn BackendHooks> = backend.clone();
        UblkHandle {
            control,
            info,
            devt: (0, 0),
            size_sectors: 0,
            cdev: Some(cdev),
            threads: Vec::new(),
            shared: Arc::new(DeviceShared::new(info.queues)),
            backend: hooks,
            opened: false,
            done: false,
        }
    }

    fn spawn_queues<B: UblkBackend>(
        &mut self,
        backend: &Arc<B>,
        opts: &UblkOptions,
    ) -> Result<(), UblkError> {
        let cdev = self
            .cdev
            .clone()
            .ok_or(UblkError::NoDevice { id: self.info.id })?;
        let mode = DataMode::from_flags(self.info.flags.bits());
        for q_id in 0..self.info.queues {
            let affinity = self.control.queue_affinity(self.info.id, q_id)?;
            let cfg = QueueConfig {
                dev_id: self.info.id,
                q_id,
                depth: self.info.depth,
                max_io_bytes: opts.max_io_bytes.min(self.info.max_io_bytes),
                mode,
                affinity,
                io_flusher: opts.io_flusher,
                batch_scheduling: opts.batch_scheduling,
                private_mount_ns: opts.private_mount_ns,
            };
            let (tx, rx) = mpsc::channel();
            let (cdev, backend, shared) = (cdev.clone(), backend.clone(), self.shared.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ublk{}q{q_id}", self.info.id))
                .spawn(move || queue_main(cfg, cdev, backend, shared, tx))
                .map_err(|e| UblkError::os("cannot spawn a queue thread", e))?;
            self.threads.push(thread);
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(UblkError::Queue {
                        queue: q_id,
                        what: "the thread ended during setup".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Turns a START_DEV / END_USER_RECOVERY outcome into the more useful error: a queue failure
    /// explains an aborted start better than the cancelled command does.
    fn check_started(&mut self, res: Result<(), UblkError>) -> Result<(), UblkError> {
        match res {
            Ok(()) => Ok(()),
            Err(e) => match self.shared.first_error() {
                Some(what) => Err(UblkError::Queue {
                    queue: 0,
                    what: format!("{what} (while starting: {e})"),
                }),
                None => Err(e),
            },
        }
    }

    /// Forgets the device and the queue threads without stopping anything.
    #[cold]
    fn detach(mut self) {
        self.done = true;
        self.threads.clear();
    }

    fn refresh_devt(&mut self) -> Result<(), UblkError> {
        let params = self.control.params(self.info.id)?;
        self.devt = (params.devt.disk_major, params.devt.disk_minor);
        self.size_sectors = params.basic.dev_sectors;
        self.info = self.control.dev_info(self.info.id)?;
        Ok(())
    }

    /// The device id: N in `/dev/ublkbN`.
    pub fn id(&self) -> u32 {
        self.info.id
    }

    /// `/dev/ublkbN`, the block device.
    pub fn block_path(&self) -> PathBuf {
        self.info.block_path()
    }

    /// `/dev/ublkcN`, the server's char device.
    pub fn char_path(&self) -> PathBuf {
        self.info.char_path()
    }

    /// The block device's major and minor numbers.
    pub fn devt(&self) -> (u32, u32) {
        self.devt
    }

    /// What the kernel reported when the device went live (flags, queues, depth, ...).
    pub fn info(&self) -> DevInfo {
        self.info
    }

    /// Requests served so far, how many of them failed at the backend, and how many moved
    /// their data by zero copy.
    pub fn request_counts(&self) -> (u64, u64, u64) {
        self.shared.totals()
    }

    /// Whether every queue thread has ended: the device was stopped or quiesced from outside
    /// (another process's delete, QUIESCE_DEV), or a queue failed.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// The first queue failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.first_error()
    }

    /// Tells the kernel the backend's current size (after a table reload), with UPDATE_SIZE.
    /// Fails with [`UblkError::FeatureMissing`] on kernels without it (before 6.16).
    pub fn update_size(&mut self) -> Result<(), UblkError> {
        if !self.info.flags.contains(sys::UBLK_F_UPDATE_SIZE) {
            return Err(UblkError::FeatureMissing {
                what: "resizing a live device",
                flag: "UBLK_F_UPDATE_SIZE",
                since: "6.16",
            });
        }
        let sectors = self.backend.size_bytes() >> userdm_io::SECTOR_SHIFT;
        self.control.update_size(self.info.id, sectors)?;
        self.size_sectors = sectors;
        Ok(())
    }

    /// Stops serving but keeps the device for another server to [`UblkServer::recover`] (a live
    /// upgrade): QUIESCE_DEV waits up to `timeout` for each queue to have an idle tag, then the
    /// kernel holds new IO and aborts the server's commands, and the queue threads end. Needs a
    /// device created with recovery on a kernel with `UBLK_F_QUIESCE` (6.16+).
    pub fn quiesce(mut self, timeout: Duration) -> Result<(), UblkError> {
        if !self.info.flags.contains(sys::UBLK_F_QUIESCE) {
            return Err(UblkError::FeatureMissing {
                what: "quiescing a live device",
                flag: "UBLK_F_QUIESCE",
                since: "6.16",
            });
        }
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.control.quiesce_dev(self.info.id, timeout_ms)?;
        self.join_queues();
        self.done = true;
        self.close_backend();
        Ok(())
    }

    /// Stops the device (STOP_DEV: the disk goes away, IO still queued fails), joins the queue
    /// threads, and deletes it (DEL_DEV). Counts the backend's opener out.
    pub fn stop(mut self) -> Result<(), UblkError> {
        self.stop_inner()
    }

    /// Stops and deletes the device unless it is in use (open, mounted, under another device),
    /// in which case nothing changes and the handle comes back with [`UblkError::Busy`]. Never
    /// waits for users to go away. The check is the kernel's TRY_STOP_DEV (7.0+) or, before,
    /// a user-space scan (see [`BusyCheck`]); the answer says which.
    #[allow(clippy::result_large_err)]
    pub fn try_stop(mut self) -> Result<BusyCheck, (UblkError, UblkHandle)> {
        if self.done {
            return Ok(BusyCheck::None);
        }
        let info = self.info;
        match stop_for_delete(&mut self.control, &info, DeleteMode::Safe) {
            Ok(check) => {
                self.done = true;
                self.finish_stopped().map(|()| check).map_err(|e| (e, self))
            }
            Err(e) => Err((e, self)),
        }
    }

    /// Waits until the device is stopped from outside (see [`UblkHandle::is_finished`]), then
    /// releases it. Deleting is left to whoever stopped it.
    pub fn wait(mut self) -> Result<(), UblkError> {
        self.join_queues();
        self.done = true;
        self.close_backend();
        match self.shared.first_error() {
            Some(what) => Err(UblkError::Queue { queue: 0, what }),
            None => Ok(()),
        }
    }

    fn stop_inner(&mut self) -> Result<(), UblkError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let id = self.info.id;
        let stopped = match self.control.stop_dev(id) {
            Ok(()) | Err(UblkError::NoDevice { .. }) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = stopped {
            // The queue threads only end once the device stops: do not wait for them.
            self.threads.clear();
            self.close_backend();
            return Err(e);
        }
        self.finish_stopped()
    }

    /// After STOP_DEV: joins the queues (their commands were aborted), releases the backend,
    /// deletes the device.
    fn finish_stopped(&mut self) -> Result<(), UblkError> {
        self.join_queues();
        self.close_backend();
        match self.control.del_dev(self.info.id, Duration::from_secs(10)) {
            Ok(()) | Err(UblkError::NoDevice { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn close_backend(&mut self) {
        if std::mem::replace(&mut self.opened, false) {
            self.backend.close();
        }
    }

    fn join_queues(&mut self) {
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The queues unmapped their descriptors; closing the char device drops the last
        // reference DEL_DEV waits for.
        self.cdev = None;
    }
}

impl Drop for UblkHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("ublk{}: stopping on drop: {e}", self.info.id);
        }
    }
}

/// Lists the ublk devices the kernel has, from `/sys/class/ublk-char` and `/dev/ublkc*`.
pub fn list(control: &mut Control) -> Result<Vec<DevInfo>, UblkError> {
    let mut ids = Vec::new();
    for dir in ["/sys/class/ublk-char", "/dev"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_prefix("ublkc"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(id) = id {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // GET_DEV_INFO2 (6.3+) names the char device, as unprivileged devices need.
        let info = match control.dev_info2(id) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                control.dev_info(id)
            }
            other => other,
        };
        match info {
            Ok(info) => out.push(info),
            // Removed since the directory was read.
            Err(UblkError::NoDevice { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// How [`delete`] treats a device that is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteMode {
    /// Refuse with [`UblkError::Busy`] while the block device is open or mounted.
    Safe,
    /// Remove it anyway: its users see IO errors.
    Force,
}

/// How [`delete`] found out the device was not in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyCheck {
    /// The kernel checked atomically (TRY_STOP_DEV, `UBLK_F_SAFE_STOP_DEV`, Linux 7.0+).
    TryStopDev,
    /// User space looked (kernels before 7.0): holders in sysfs, an `O_EXCL` open (mounts,
    /// stacked devices), and open descriptors under `/proc`. Racy: an open after the check is
    /// not seen.
    Scan,
    /// Nothing to check: the disk was already gone, or the deletion was forced.
    None,
}

/// Stops and deletes device `id`. Never hangs on an open device: in [`DeleteMode::Safe`] it
/// answers [`UblkError::Busy`] instead. A device whose server is still running is stopped under
/// it (the server's queues see ABORT and end). Returns how busyness was checked.
pub fn delete(control: &mut Control, id: u32, mode: DeleteMode) -> Result<BusyCheck, UblkError> {
    let info = control.dev_info(id)?;
    let mut check = BusyCheck::None;
    if info.state != DevState::Dead {
        check = stop_for_delete(control, &info, mode)?;
    }
    match control.del_dev(id, Duration::from_secs(10)) {
        Ok(()) | Err(UblkError::NoDevice { .. }) => Ok(check),
        // The server still holds /dev/ublkcN: let the kernel finish when it lets go.
        Err(UblkError::Timeout { .. }) => control.del_dev_async(id).map(|()| check),
        Err(e) => Err(e),
    }
}

fn stop_for_delete(
    control: &mut Control,
    info: &DevInfo,
    mode: DeleteMode,
) -> Result<BusyCheck, UblkError> {
    let id = info.id;
    if mode == DeleteMode::Force {
        control.stop_dev(id)?;
        return Ok(BusyCheck::None);
    }
    if info.flags.contains(sys::UBLK_F_SAFE_STOP_DEV) {
        return match control.try_stop_dev(id) {
            Ok(()) => Ok(BusyCheck::TryStopDev),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(UblkError::Busy {
                id,
                why: "the block device is open (TRY_STOP_DEV refused)".into(),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(BusyCheck::None),
            Err(e) => Err(e),
        };
    }
    let params = control.params(id)?;
    let (major, minor) = (params.devt.disk_major, params.devt.disk_minor);
    if major != 0 {
        if let Some(holder) = os::find_holder(Path::new(&info.block_path()), major, minor) {
            return Err(UblkError::Busy {
                id,
                why: format!("{holder} (found by a sysfs, O_EXCL and /proc scan)"),
            });
        }
    }
    control.stop_dev(id)?;
    Ok(BusyCheck::Scan)
}

/// What the driver offers (GET_FEATURES), through the control device at `control_path`.
pub fn features(control_path: impl AsRef<Path>) -> Result<Features, UblkError> {
    Control::open(control_path)?.features()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        assert!(UblkOptions::default().validate().is_ok());
        let bad = [
            UblkOptions {
                queues: 0,
                ..Default::default()
            },
            UblkOptions {
                depth: 0,
                ..Default::default()
            },
            UblkOptions {
                depth: 4097,
                ..Default::default()
            },
            UblkOptions {
                max_io_bytes: 1000,
                ..Default::default()
            },
            UblkOptions {
                max_io_bytes: 2 << 20,
                ..Default::default()
            },
            UblkOptions {
                need_get_data: true,
                user_copy: true,
                ..Default::default()
            },
        ];
        for opts in bad {
            assert!(
                matches!(opts.validate(), Err(UblkError::InvalidOption(_))),
                "{opts:?}"
            );
        }
    }

    #[test]
    fn flags_follow_options_and_kernel() {
        // What 6.12 offers.
        let k612 = Some(Features::from_bits(0x1fe));
        let opts = UblkOptions {
            recovery: true,
            user_copy: true,
            ..Default::default()
        };
        let flags = opts.flags(k612).unwrap();
        assert_eq!(
            flags,
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE | sys::UBLK_F_USER_COPY
        );
        let zc = UblkOptions {
            zero_copy: true,
            ..Default::default()
        };
        let err = zc.flags(k612).unwrap_err();
        assert!(err.to_string().contains("UBLK_F_AUTO_BUF_REG"), "{err}");
        assert!(err.to_string().contains("6.16"), "{err}");
        // A newer kernel: extras are taken when offered.
        let new = Some(Features::from_bits((1 << 19) - 1));
        let flags = UblkOptions {
            recovery: true,
            ..Default::default()
        }
        .flags(new)
        .unwrap();
        assert!(flags & sys::UBLK_F_UPDATE_SIZE != 0);
        assert!(flags & sys::UBLK_F_QUIESCE != 0);
        assert!(flags & sys::UBLK_F_SAFE_STOP_DEV != 0);
        // No GET_FEATURES: user copy cannot be promised.
        assert!(UblkOptions {
            user_copy: true,
            ..Default::default()
        }
        .flags(None)
        .is_err());
    }

    #[test]
    fn start_without_ublk_says_so() {
        struct Nothing;
        impl BlockDevice for Nothing {
            fn size_bytes(&self) -> u64 {
                1 << 20
            }
            fn read_only(&self) -> bool {
                false
            }
            fn ops(&self) -> userdm_io::OpSet {
                userdm_io::OpSet::RW_FLUSH
            }
            fn limits(&self) -> userdm_table::TargetLimits {
                userdm_table::TargetLimits::default()
            }
            async fn io(
                &self,
                _rt: &userdm_uring::Reactor,
                _io: userdm_io::IoHeader,
                _buf: &mut [u8],
            ) -> Result<(), userdm_io::Errno> {
                Ok(())
            }
        }
        impl UblkBackend for Nothing {}
        let opts = UblkOptions {
            control_path: "/nonexistent/ublk-control".into(),
            ..Default::default()
        };
        let err = UblkServer::start(Arc::new(Nothing), opts).unwrap_err();
        assert!(err.to_string().contains("modprobe ublk_drv"), "{err}");
    }
}

#[cfg(test)]
mod send_tests {
    /// The control plane keeps handles in its own structures and may move them between threads.
    #[test]
    fn handles_and_controls_are_send() {
        fn send<T: Send>() {}
        send::<super::UblkHandle>();
        send::<crate::Control>();
        send::<crate::UblkError>();
    }
}
