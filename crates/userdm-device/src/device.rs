//! The device: metadata, table slots, lifecycle commands and the IO entry point.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;
use userdm_io::limits::{DEVICE_NAME_BYTES_MAX, DEVICE_UUID_BYTES_MAX};
use userdm_io::{Errno, IoError, IoHeader, IoOp};
use userdm_table::{Allocation, Dep, MessageError, Table, Target};
use userdm_uring::Reactor;

use crate::gate::Gate;
use crate::{DeviceInfo, IoStats};

/// Why a lifecycle command failed. Messages follow the kernel's reasons where it has one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The name is empty, too long, or contains '/' (or is `.`, `..`, `control`).
    #[error("invalid device name '{0}': {1}")]
    InvalidName(String, &'static str),
    /// The uuid is too long.
    #[error("invalid uuid '{0}': {1}")]
    InvalidUuid(String, &'static str),
    /// A uuid may be set only once.
    #[error("device {0} already has uuid {1}; a uuid can be set only once")]
    UuidAlreadySet(String, String),
    /// The device is open and removal was not deferred.
    #[error(
        "device {name} is busy: open count {open_count}; use --deferred to remove it on last close"
    )]
    Busy {
        /// Device name.
        name: String,
        /// Current opens.
        open_count: i32,
    },
    /// `resume` or `table --inactive` with no inactive table where one is needed.
    #[error("device {0} has no inactive table")]
    NoInactiveTable(String),
    /// A command that needs a live table.
    #[error("device {0} has no live table")]
    NoLiveTable(String),
    /// The message failed.
    #[error("{0}")]
    Message(#[from] MessageError),
    /// Geometry outside the kernel's limits.
    #[error("invalid geometry: {0}")]
    Geometry(String),
    /// Suspend did not drain in time.
    #[error("device {0}: in-flight IO did not finish within {1:?}")]
    SuspendTimeout(String, Duration),
}

/// Disk geometry set with `setgeometry`, as the kernel's `struct hd_geometry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Cylinders (at most 65535).
    pub cylinders: u32,
    /// Heads (at most 255).
    pub heads: u32,
    /// Sectors per track (at most 255).
    pub sectors: u32,
    /// Start sector.
    pub start: u64,
}

struct Meta<T> {
    name: String,
    uuid: Option<String>,
    inactive: Option<Arc<Table<T>>>,
    read_only: bool,
    deferred_remove: bool,
    removed: bool,
    geometry: Option<Geometry>,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    others: AtomicU64,
    errors: AtomicU64,
    requeues: AtomicU64,
}

/// One mapped device. Shared as `Arc<Device<T>>` between the control thread and every data-path
/// thread of its exports.
pub struct Device<T> {
    meta: Mutex<Meta<T>>,
    /// The live table; read once per request (an `Arc` clone), written by `resume`.
    live: RwLock<Option<Arc<Table<T>>>>,
    /// Fixed at creation; kept outside `meta` so that writes do not all take one lock.
    read_only: bool,
    gate: Gate,
    event_nr: Mutex<u32>,
    event_cv: Condvar,
    open_count: AtomicI32,
    /// Serialises lifecycle commands, as the kernel's per-device suspend lock does, so that
    /// suspend/resume/load from two clients cannot interleave.
    lifecycle: Mutex<()>,
    counters: Counters,
}

impl<T: Target> Device<T> {
    /// A new device: no tables, not suspended, as `DM_DEV_CREATE` leaves it (dmsetup shows a
    /// `--notable` device as ACTIVE with `Tables present: None`). IO fails until a table is
    /// loaded and resumed, because the device's size is zero.
    pub fn new(name: &str, uuid: Option<&str>, read_only: bool) -> Result<Device<T>, DeviceError> {
        check_name(name)?;
        if let Some(u) = uuid {
            check_uuid(u)?;
        }
        Ok(Device {
            meta: Mutex::new(Meta {
                name: name.to_string(),
                uuid: uuid.filter(|u| !u.is_empty()).map(str::to_string),
                inactive: None,
                read_only,
                deferred_remove: false,
                removed: false,
                geometry: None,
            }),
            live: RwLock::new(None),
            read_only,
            gate: Gate::new_open(),
            event_nr: Mutex::new(0),
            event_cv: Condvar::new(),
            open_count: AtomicI32::new(0),
            lifecycle: Mutex::new(()),
            counters: Counters::default(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.meta.lock().name.clone()
    }

    /// The live table, if any.
    pub fn live_table(&self) -> Option<Arc<Table<T>>> {
        self.live.read().clone()
    }

    /// The inactive table, if any.
    pub fn inactive_table(&self) -> Option<Arc<Table<T>>> {
        self.meta.lock().inactive.clone()
    }

    /// Size of the live table in sectors (0 without one).
    pub fn size_sectors(&self) -> u64 {
        self.live.read().as_ref().map_or(0, |t| t.size_sectors())
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The gate, for exports that want to observe suspension.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Loads a table into the inactive slot, replacing any table there.
    pub fn load(&self, table: Table<T>) {
        let _l = self.lifecycle.lock();
        self.meta.lock().inactive = Some(Arc::new(table));
    }

    /// Drops the inactive table.
    pub fn clear(&self) {
        let _l = self.lifecycle.lock();
        self.meta.lock().inactive = None;
    }

    /// Suspends: new IO waits at the gate, IO in flight finishes. With `noflush`, targets that
    /// queue IO may give it back, to be resubmitted after resume. Suspending a suspended device
    /// succeeds and does nothing, as in the kernel.
    pub fn suspend(&self, noflush: bool, timeout: Option<Duration>) -> Result<(), DeviceError> {
        let _l = self.lifecycle.lock();
        self.suspend_locked(noflush, timeout)
    }

    fn suspend_locked(&self, noflush: bool, timeout: Option<Duration>) -> Result<(), DeviceError> {
        if !self.gate.close() {
            return Ok(());
        }
        if let Some(live) = self.live_table() {
            live.presuspend(noflush);
        }
        if !self.gate.wait_drained(timeout) {
            // Leave the device usable rather than half-suspended.
            self.gate.open();
            return Err(DeviceError::SuspendTimeout(
                self.name(),
                timeout.unwrap_or_default(),
            ));
        }
        Ok(())
    }

    /// Resumes: if an inactive table is loaded, it becomes live (suspending first if needed)
    /// and the old live table is destroyed; then held IO goes to the live table.
    pub fn resume(&self) -> Result<(), DeviceError> {
        let _l = self.lifecycle.lock();
        let inactive = self.meta.lock().inactive.take();
        if inactive.is_none() && self.gate.is_suspended() && self.live.read().is_none() {
            // The kernel's dm_resume refuses a suspended device with nothing to serve.
            return Err(DeviceError::NoLiveTable(self.name()));
        }
        if let Some(new) = inactive {
            if let Err(e) = self.suspend_locked(false, None) {
                self.meta.lock().inactive = Some(new);
                return Err(e);
            }
            new.resume();
            let old = self.live.write().replace(new);
            // The old table's targets close their files here, after no IO can reach them.
            drop(old);
        }
        self.gate.open();
        Ok(())
    }

    /// Renames the device. Raises an event if a live table exists, as the kernel's
    /// `dm_hash_rename` does.
    pub fn rename(&self, new_name: &str) -> Result<(), DeviceError> {
        check_name(new_name)?;
        self.meta.lock().name = new_name.to_string();
        self.table_event_if_live();
        Ok(())
    }

    /// Sets the uuid, which may be done only when none is set.
    pub fn set_uuid(&self, uuid: &str) -> Result<(), DeviceError> {
        check_uuid(uuid)?;
        let mut meta = self.meta.lock();
        if let Some(old) = &meta.uuid {
            return Err(DeviceError::UuidAlreadySet(meta.name.clone(), old.clone()));
        }
        meta.uuid = Some(uuid.to_string());
        drop(meta);
        self.table_event_if_live();
        Ok(())
    }

    /// Marks the device for removal. Refused with [`DeviceError::Busy`] while it is open,
    /// unless `deferred`, in which case removal happens at the last close: the returned bool
    /// says whether the caller should remove it now.
    pub fn remove(&self, deferred: bool) -> Result<bool, DeviceError> {
        let _l = self.lifecycle.lock();
        let open_count = self.open_count();
        let mut meta = self.meta.lock();
        if open_count > 0 {
            if deferred {
                meta.deferred_remove = true;
                return Ok(false);
            }
            return Err(DeviceError::Busy {
                name: meta.name.clone(),
                open_count,
            });
        }
        meta.removed = true;
        drop(meta);
        // The kernel raises a table event on removal so that waiters wake up.
        self.table_event_if_live();
        Ok(true)
    }

    /// Cancels a deferred removal (`@cancel_deferred_remove`).
    pub fn cancel_deferred_remove(&self) -> bool {
        std::mem::take(&mut self.meta.lock().deferred_remove)
    }

    /// Whether the device was removed.
    pub fn is_removed(&self) -> bool {
        self.meta.lock().removed
    }

    /// Counts an opener in (an export connection, a kernel opener).
    pub fn open(&self) {
        self.open_count.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts an opener out. Returns true when this was the last close of a device whose removal
    /// was deferred: the caller must now remove it.
    pub fn close(&self) -> bool {
        let before = self.open_count.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.meta.lock().deferred_remove {
            self.meta.lock().removed = true;
            self.table_event_if_live();
            return true;
        }
        false
    }

    /// Current openers.
    pub fn open_count(&self) -> i32 {
        self.open_count.load(Ordering::SeqCst).max(0)
    }

    /// Sets the geometry with the kernel's limits.
    pub fn set_geometry(&self, g: Geometry) -> Result<(), DeviceError> {
        if g.cylinders > 65535 || g.heads > 255 || g.sectors > 255 {
            return Err(DeviceError::Geometry(format!(
                "{} {} {} {}: cylinders must be at most 65535, heads and sectors at most 255",
                g.cylinders, g.heads, g.sectors, g.start
            )));
        }
        let size = self.size_sectors();
        let geometry_sectors = u64::from(g.cylinders) * u64::from(g.heads) * u64::from(g.sectors);
        if geometry_sectors > size {
            return Err(DeviceError::Geometry(format!(
                "{geometry_sectors} sectors of geometry exceed the device's {size} sectors"
            )));
        }
        self.meta.lock().geometry = Some(g);
        Ok(())
    }

    /// The geometry, if set.
    pub fn geometry(&self) -> Option<Geometry> {
        self.meta.lock().geometry
    }

    /// Sends a message to the live table's row at `sector`.
    pub fn message(&self, sector: u64, argv: &[String]) -> Result<Option<String>, DeviceError> {
        let live = self
            .live_table()
            .ok_or_else(|| DeviceError::NoLiveTable(self.name()))?;
        Ok(live.message(sector, argv)?)
    }

    /// Raises a table event: bumps the event number and wakes waiters. Targets call this through
    /// their device hook; the lifecycle calls it where the kernel does.
    pub fn table_event(&self) {
        let mut nr = self.event_nr.lock();
        *nr = nr.wrapping_add(1);
        self.event_cv.notify_all();
    }

    fn table_event_if_live(&self) {
        if self.live.read().is_some() {
            self.table_event();
        }
    }

    /// The current event number.
    pub fn event_nr(&self) -> u32 {
        *self.event_nr.lock()
    }

    /// Blocks until the event number differs from `seen` (at once if it already does), or until
    /// `timeout`; returns the event number then.
    pub fn wait_event(&self, seen: u32, timeout: Option<Duration>) -> u32 {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut nr = self.event_nr.lock();
        while *nr == seen && !self.meta.lock().removed {
            match deadline {
                Some(d) => {
                    if self.event_cv.wait_until(&mut nr, d).timed_out() {
                        break;
                    }
                }
                None => self.event_cv.wait(&mut nr),
            }
        }
        *nr
    }

    /// The facts `dmsetup info` prints.
    pub fn info(&self) -> DeviceInfo {
        let live = self.live_table();
        let meta = self.meta.lock();
        DeviceInfo {
            name: meta.name.clone(),
            uuid: meta.uuid.clone(),
            suspended: self.gate.is_suspended(),
            read_only: meta.read_only,
            live_table: live.is_some(),
            inactive_table: meta.inactive.is_some(),
            open_count: self.open_count(),
            event_nr: self.event_nr(),
            target_count: live.as_ref().map_or(0, |t| t.rows().len() as u32),
            deferred_remove: meta.deferred_remove,
            size_sectors: live.as_ref().map_or(0, |t| t.size_sectors()),
        }
    }

    /// Table lines of the live table, or of the inactive one with `inactive`.
    pub fn table_lines(&self, inactive: bool) -> Vec<String> {
        self.slot(inactive)
            .map_or_else(Vec::new, |t| t.table_lines())
    }

    /// Status lines of the live table, or of the inactive one with `inactive`.
    pub fn status_lines(&self, inactive: bool) -> Vec<String> {
        self.slot(inactive)
            .map_or_else(Vec::new, |t| t.status_lines())
    }

    /// Dependencies of the live table, or of the inactive one with `inactive`.
    pub fn deps(&self, inactive: bool) -> Vec<Dep> {
        self.slot(inactive).map_or_else(Vec::new, |t| t.deps())
    }

    fn slot(&self, inactive: bool) -> Option<Arc<Table<T>>> {
        if inactive {
            self.inactive_table()
        } else {
            self.live_table()
        }
    }

    /// IO counters.
    pub fn io_stats(&self) -> IoStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoStats {
            reads: get(&c.reads),
            writes: get(&c.writes),
            read_bytes: get(&c.read_bytes),
            write_bytes: get(&c.write_bytes),
            others: get(&c.others),
            errors: get(&c.errors),
            requeues: get(&c.requeues),
        }
    }

    /// Serves one request: the entry point of every export's data path.
    ///
    /// Waits while the device is suspended; a request a target gives back during a noflush
    /// suspend waits for resume and is resubmitted to the table live then.
    pub async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> Result<(), Errno> {
        if io.op.modifies() && self.read_only {
            return self.fail(Errno::EROFS);
        }
        loop {
            self.gate.enter().await;
            let live = self.live.read().clone();
            let res = match live {
                Some(table) => table.io(rt, io, buf).await,
                None => Err(IoError::Failed(Errno::EIO)),
            };
            self.gate.leave();
            match res {
                Ok(()) => {
                    self.count_ok(io);
                    return Ok(());
                }
                Err(IoError::Requeue) => {
                    self.counters.requeues.fetch_add(1, Ordering::Relaxed);
                }
                Err(IoError::Failed(e)) => return self.fail(e),
            }
        }
    }

    /// The allocation state of the live table at device-relative byte `offset_bytes`, at most
    /// `max_len_bytes` long and cut at the end of the row holding it (see [`Table::allocation`]).
    ///
    /// Metadata, not IO: it does not pass the gate, so it answers while the device is suspended
    /// (from the table live then). Without a live table, out of range, or misaligned, the answer
    /// is "data" for `max_len_bytes`, which is always correct.
    pub fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        let live = self.live.read().clone();
        live.and_then(|t| t.allocation(offset_bytes, max_len_bytes))
            .unwrap_or(Allocation::data(max_len_bytes))
    }

    #[cold]
    fn fail(&self, e: Errno) -> Result<(), Errno> {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    fn count_ok(&self, io: IoHeader) {
        let c = &self.counters;
        match io.op {
            IoOp::Read => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(io.len_bytes, Ordering::Relaxed);
            }
            IoOp::Write => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.write_bytes.fetch_add(io.len_bytes, Ordering::Relaxed);
            }
            _ => {
                c.others.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The kernel's `check_name` plus its length limit.
fn check_name(name: &str) -> Result<(), DeviceError> {
    let bad = |why| Err(DeviceError::InvalidName(name.to_string(), why));
    if name.is_empty() {
        return bad("a name must not be empty");
    }
    if name.len() > DEVICE_NAME_BYTES_MAX {
        return bad("longer than 127 bytes");
    }
    if name.contains('/') {
        return bad("a name must not contain '/'");
    }
    if name == "." || name == ".." || name == "control" {
        return bad("'.', '..' and 'control' are reserved");
    }
    if name.bytes().any(|b| b.is_ascii_control()) {
        return bad("a name must not contain control characters");
    }
    Ok(())
}

fn check_uuid(uuid: &str) -> Result<(), DeviceError> {
    if uuid.len() > DEVICE_UUID_BYTES_MAX {
        return Err(DeviceError::InvalidUuid(
            uuid.to_string(),
            "longer than 128 bytes",
        ));
    }
    if uuid.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(DeviceError::InvalidUuid(
            uuid.to_string(),
            "contains spaces or control characters",
        ));
    }
    Ok(())
}
