//! The ring, the operation slots and the loop that drives them.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use userdm_io::Errno;

use crate::executor::{Shared, TaskWaker, Tasks, MAIN_TASK};
use crate::ops::{Op, Pending};

/// `user_data` of the eventfd read that remote wakers complete.
const EVENTFD_TOKEN: u64 = u64::MAX;
/// `user_data` of cancellations, whose own completions carry nothing we need.
const CANCEL_TOKEN: u64 = u64::MAX - 1;
/// The longest transfer one SQE may describe.
const SQE_LEN_MAX: usize = 1 << 30;

enum Slot {
    Free,
    InFlight(Option<Waker>),
    Done(i32),
    /// The future was dropped; the CQE still has to arrive before the slot can be reused.
    Orphaned,
}

/// Counters of one reactor, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Operations pushed to the submission queue.
    pub ops_submitted: u64,
    /// Completions reaped.
    pub ops_completed: u64,
    /// `io_uring_enter` calls that waited.
    pub waits: u64,
    /// `io_uring_enter` calls in all (submitting, waiting or both).
    pub enters: u64,
    /// Times an operation waited for a free slot.
    pub slot_waits: u64,
    /// Completions of the eventfd read, i.e. wakes that had to come through the kernel (from
    /// another thread, while this one slept).
    pub eventfd_wakes: u64,
    /// Idle periods in which the thread spun before sleeping.
    pub spins: u64,
    /// Spins that found work.
    pub spin_hits: u64,
}

/// One thread's ring and executor. Not `Send`: it lives and dies on the thread that made it.
pub struct Reactor {
    ring: RefCell<IoUring>,
    /// The longest a spin may last; 0: never spin.
    spin_ns: Cell<u64>,
    /// How often work came within `spin_ns` of the thread running dry, lately: a moving average
    /// in 1/`SPIN_SCALE` units. The thread spins only while this says a spin usually pays.
    spin_hits: Cell<u32>,
    /// Idle periods so far, for spinning now and then while spinning does not pay.
    idle_periods: Cell<u32>,
    /// Operations in flight on kernel worker threads (`IOSQE_ASYNC`).
    offloaded: Cell<u32>,
    slots: RefCell<Vec<Slot>>,
    free_slots: RefCell<Vec<u32>>,
    /// Timeouts need a timespec that stays put until the CQE; one per slot, never moved.
    timespecs: Box<[UnsafeCell<types::Timespec>]>,
    slot_waiters: RefCell<VecDeque<Waker>>,
    tasks: RefCell<Tasks>,
    shared: Arc<Shared>,
    /// Target of the armed eventfd read; boxed so its address is stable.
    eventfd_buf: Box<UnsafeCell<u64>>,
    running: Cell<bool>,
    /// Entries pushed since the last `io_uring_enter`: with none, a turn reaps without a syscall.
    unsubmitted: Cell<u32>,
    stats: Cell<ReactorStats>,
    /// The waker of `block_on`'s future, made once so that `block_on` does not allocate.
    main_waker: (Arc<TaskWaker>, Waker),
    /// Keeps the reactor on the thread that made it, whatever its fields are: a
    /// SINGLE_ISSUER ring refuses submissions from any other thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Reactor {
    /// Makes a reactor whose ring has `entries` submission entries.
    ///
    /// The number of operations in flight at once is not limited by `entries`: a full
    /// submission queue is flushed to the kernel and refilled.
    pub fn new(entries: u32) -> io::Result<Reactor> {
        let entries = entries.clamp(8, 4096);
        let ring = build_ring(entries)?;
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let slot_count = (entries as usize * 4).max(256);
        let slots = (0..slot_count).map(|_| Slot::Free).collect();
        let free_slots = (0..slot_count as u32).rev().collect();
        let timespecs = (0..slot_count)
            .map(|_| UnsafeCell::new(types::Timespec::new()))
            .collect();
        let shared = Arc::new(Shared::new(eventfd, 1024));
        let main_tw = TaskWaker::new(shared.clone(), MAIN_TASK);
        let main_waker = (main_tw.clone(), Waker::from(main_tw));
        let rt = Reactor {
            ring: RefCell::new(ring),
            spin_ns: Cell::new(default_spin_ns()),
            spin_hits: Cell::new(SPIN_SCALE),
            idle_periods: Cell::new(0),
            offloaded: Cell::new(0),
            slots: RefCell::new(slots),
            free_slots: RefCell::new(free_slots),
            timespecs,
            slot_waiters: RefCell::new(VecDeque::with_capacity(64)),
            tasks: RefCell::new(Tasks::new()),
            shared,
            eventfd_buf: Box::new(UnsafeCell::new(0)),
            running: Cell::new(false),
            unsubmitted: Cell::new(0),
            stats: Cell::new(ReactorStats::default()),
            main_waker,
            _not_send: std::marker::PhantomData,
        };
        rt.arm_eventfd();
        Ok(rt)
    }

    /// A snapshot of this reactor's counters.
    pub fn stats(&self) -> ReactorStats {
        self.stats.get()
    }

    /// Adds a task, polled from the next turn of [`Reactor::block_on`] until it finishes.
    ///
    /// Spawning allocates the task once; make tasks at start (one per tag, one per reader), not
    /// per request.
    pub fn spawn(&self, task: impl Future<Output = ()> + 'static) {
        let mut tasks = self.tasks.borrow_mut();
        let index = tasks.add(&self.shared, Box::pin(task));
        tasks.wakers[index].1.wake_by_ref();
    }

    /// Runs `main` and every spawned task until `main` finishes, then returns its output.
    ///
    /// Tasks that are still pending when `main` finishes stay spawned and run again at the next
    /// `block_on`; they are dropped with the reactor.
    ///
    /// # Panics
    /// If called from inside a task of the same reactor.
    pub fn block_on<F: Future>(&self, main: F) -> F::Output {
        assert!(
            !self.running.replace(true),
            "Reactor::block_on is not reentrant"
        );
        let _running = self.shared.enter_running();
        let mut main = pin!(main);
        let (main_tw, main_waker) = &self.main_waker;
        main_waker.wake_by_ref();
        let out = loop {
            if let Some(out) = self.run_ready(&mut main, main_tw, main_waker) {
                break out;
            }
            // Look at the completion queue without a syscall. If that made tasks ready, keep
            // going (submitting what is queued, so IO flows while tasks keep busy); if not, the
            // waiting enter below submits what is queued and waits in one syscall, returning at
            // once for operations that complete inline (a send on a socket with room).
            self.reap();
            if self.shared.has_ready() {
                if self.unsubmitted.get() > 0 {
                    self.enter(false);
                }
                continue;
            }
            self.idle();
        };
        self.running.set(false);
        out
    }

    fn run_ready<F: Future>(
        &self,
        main: &mut std::pin::Pin<&mut F>,
        main_tw: &Arc<TaskWaker>,
        main_waker: &Waker,
    ) -> Option<F::Output> {
        while let Some(index) = self.shared.pop_ready() {
            if index == MAIN_TASK {
                main_tw.clear_queued();
                let mut cx = Context::from_waker(main_waker);
                if let Poll::Ready(out) = main.as_mut().poll(&mut cx) {
                    return Some(out);
                }
                continue;
            }
            // Take the task out while polling it, so that it can spawn others.
            let (task, waker) = {
                let mut tasks = self.tasks.borrow_mut();
                let Some(task) = tasks.futures.get_mut(index).and_then(Option::take) else {
                    continue;
                };
                tasks.wakers[index].0.clear_queued();
                (task, tasks.wakers[index].1.clone())
            };
            let mut task = task;
            let mut cx = Context::from_waker(&waker);
            if task.as_mut().poll(&mut cx).is_pending() {
                self.tasks.borrow_mut().futures[index] = Some(task);
            }
        }
        None
    }

    /// Waits for work when no task is ready: spins first where spinning has been paying off,
    /// then sleeps in the kernel.
    ///
    /// Each spin teaches the policy whether work came within the budget (a hit) or not (a
    /// miss), and the thread spins only while most recent spins hit; while they miss, it still
    /// spins in one idle period of every `SPIN_PROBE_EVERY`, so that it notices when spinning
    /// would pay again. Why: a spin only pays when the next request comes from another CPU
    /// within the budget; when it comes from a process that needs this CPU (a ublk queue pinned
    /// to its submitters' one CPU), or only after a long time (an idle client, an emulated
    /// machine), spinning burns the CPU the work waits for. Timing sleeps instead of probing
    /// would not do: a sleep lasts the gap plus the time to wake up, which on a VM alone
    /// exceeds the budget, so spinning, once off, would never come back.
    fn idle(&self) {
        let budget = self.spin_ns.get();
        // A kernel worker doing this thread's work needs a CPU, maybe this one: spinning
        // would only delay the completion it waits for.
        if budget == 0 || self.offloaded.get() > 0 {
            return self.sleep_for_work();
        }
        let idles = self.idle_periods.get().wrapping_add(1);
        self.idle_periods.set(idles);
        if self.spin_hits.get() < SPIN_SCALE / 2 && idles % SPIN_PROBE_EVERY != 0 {
            return self.sleep_for_work();
        }
        let hit = self.spin_for_work(budget);
        self.bump(|s| {
            s.spins += 1;
            s.spin_hits += u64::from(hit);
        });
        self.learn_spin(hit);
        if !hit {
            self.sleep_for_work();
        }
    }

    fn learn_spin(&self, hit: bool) {
        let hits = self.spin_hits.get();
        let hits = hits - hits / 8 + if hit { SPIN_SCALE / 8 } else { 0 };
        self.spin_hits.set(hits);
    }

    /// Sleeps in the kernel until a completion or a wake, submitting what is queued.
    fn sleep_for_work(&self) {
        self.shared.set_sleeping(true);
        if !self.shared.has_ready() {
            self.enter(true);
        }
        self.shared.set_sleeping(false);
    }

    /// Busy-waits up to `budget` ns for a completion or a wake; true if one came.
    fn spin_for_work(&self, budget: u64) -> bool {
        if self.unsubmitted.get() > 0 {
            self.enter(false);
            if self.shared.has_ready() {
                return true;
            }
        }
        let start = std::time::Instant::now();
        loop {
            {
                let mut ring = self.ring.borrow_mut();
                let pending = !ring.completion().is_empty();
                let taskrun = ring.submission().taskrun();
                drop(ring);
                if taskrun {
                    // Completions wait as task work, which any syscall runs.
                    self.enter(false);
                } else if pending {
                    self.reap();
                }
            }
            if self.shared.has_ready() {
                return true;
            }
            if start.elapsed().as_nanos() as u64 >= budget {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Registers `fds` as the ring's fixed files: operations then name descriptor `i` as
    /// `io_uring::types::Fixed(i)`. The kernel takes its references once, here, instead of at
    /// every operation: for a descriptor that several threads' rings use at once (a ublk
    /// device's `/dev/ublkcN`), each per-operation reference is an atomic update of a cache
    /// line that those CPUs would pass back and forth.
    ///
    /// Only one set may be registered; the descriptors must stay open while operations use
    /// them (the ring keeps the files alive, but the numbers mean nothing to other code).
    pub fn register_files(&self, fds: &[RawFd]) -> io::Result<()> {
        self.ring.borrow().submitter().register_files(fds)
    }

    /// Sets how long the thread may busy-wait for work before it sleeps in the kernel (see
    /// [`DEFAULT_SPIN`]); zero turns spinning off.
    pub fn set_spin(&self, spin: Duration) {
        self.spin_ns.set(spin.as_nanos() as u64);
        self.spin_hits.set(SPIN_SCALE);
    }

    /// Submits queued SQEs and reaps completions, waiting for at least one if `wait`.
    fn enter(&self, wait: bool) {
        self.unsubmitted.set(0);
        {
            let ring = self.ring.borrow();
            let res = if wait {
                ring.submit_and_wait(1)
            } else {
                ring.submit()
            };
            if let Err(e) = res {
                // EINTR and EBUSY (completion queue full) resolve themselves once we reap;
                // anything else would repeat forever, so it is a broken ring.
                let errno = e.raw_os_error().unwrap_or(0);
                assert!(
                    errno == libc::EINTR || errno == libc::EBUSY || errno == libc::EAGAIN,
                    "io_uring_enter failed: {e}"
                );
            }
        }
        if wait {
            // Awake again: the wakes `reap` is about to make come from this thread and must not
            // kick the eventfd (a write, a completion and a re-arm, each for nothing).
            self.shared.set_sleeping(false);
        }
        self.bump(|s| s.enters += 1);
        if wait {
            self.bump(|s| s.waits += 1);
        }
        self.reap();
    }

    fn reap(&self) {
        let mut rearm = false;
        let mut completed = 0;
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                let token = cqe.user_data();
                if token == EVENTFD_TOKEN {
                    rearm = true;
                    self.bump(|s| s.eventfd_wakes += 1);
                    continue;
                }
                if token == CANCEL_TOKEN {
                    continue;
                }
                completed += 1;
                let Some(slot) = slots.get_mut(token as usize) else {
                    continue;
                };
                match std::mem::replace(slot, Slot::Done(cqe.result())) {
                    Slot::InFlight(Some(waker)) => waker.wake(),
                    Slot::InFlight(None) => {}
                    Slot::Orphaned => {
                        *slot = Slot::Free;
                        self.release_slot_locked(token as u32);
                    }
                    // A completion for a slot that is not in flight cannot come from us; keep
                    // the slot as it was rather than corrupt another operation.
                    other => *slot = other,
                }
            }
        }
        self.bump(|s| s.ops_completed += completed);
        if rearm {
            self.arm_eventfd();
        }
    }

    fn bump(&self, f: impl FnOnce(&mut ReactorStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn arm_eventfd(&self) {
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.eventfd_buf.get().cast(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        // SAFETY: the buffer is a boxed u64 owned by the reactor, which outlives the ring's
        // operations (the ring is dropped first, see the Drop impl).
        unsafe { self.push(&entry) };
    }

    /// # Safety
    /// Every buffer the entry points to must stay valid until its completion is reaped.
    unsafe fn push(&self, entry: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive the operation.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                break;
            }
            // The submission queue is full: hand what is queued to the kernel and retry.
            if ring.submit().is_err() {
                drop(ring);
                self.reap();
                ring = self.ring.borrow_mut();
            }
        }
        drop(ring);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.bump(|s| s.ops_submitted += 1);
    }

    pub(crate) fn claim_slot(&self, cx: &mut Context<'_>) -> Option<u32> {
        if let Some(slot) = self.free_slots.borrow_mut().pop() {
            return Some(slot);
        }
        self.bump(|s| s.slot_waits += 1);
        self.slot_waiters.borrow_mut().push_back(cx.waker().clone());
        None
    }

    fn release_slot_locked(&self, slot: u32) {
        self.free_slots.borrow_mut().push(slot);
        // Wake every waiter, not one: a waiter whose future was dropped would swallow a single
        // wake and strand the others. This path runs only when the slot table was exhausted.
        for waiter in self.slot_waiters.borrow_mut().drain(..) {
            waiter.wake();
        }
    }

    pub(crate) fn push_pending(&self, slot: u32, pending: &Pending) {
        self.slots.borrow_mut()[slot as usize] = Slot::InFlight(None);
        let entry = match pending {
            Pending::Entry(entry) => entry.clone().user_data(u64::from(slot)),
            Pending::Timeout(d) => {
                let ts = &self.timespecs[slot as usize];
                // SAFETY: the slot is ours until its CQE, so nothing else reads or writes this
                // timespec; the kernel reads it only after the push below.
                unsafe { *ts.get() = types::Timespec::from(*d) };
                opcode::Timeout::new(ts.get())
                    .build()
                    .user_data(u64::from(slot))
            }
        };
        // SAFETY: entries come from `Reactor::submit`, whose caller promised buffer validity,
        // or from our own timespec table, which outlives the ring.
        unsafe { self.push(&entry) };
    }

    pub(crate) fn poll_slot(&self, slot: u32, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.slots.borrow_mut();
        match &mut slots[slot as usize] {
            Slot::Done(res) => {
                let res = *res;
                slots[slot as usize] = Slot::Free;
                drop(slots);
                self.release_slot_locked(slot);
                Poll::Ready(res)
            }
            Slot::InFlight(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Free | Slot::Orphaned => Poll::Ready(-libc::EINVAL),
        }
    }

    /// Called when an `Op` is dropped before completing.
    pub(crate) fn abandon_slot(&self, slot: u32, wait_for_completion: bool) {
        {
            let mut slots = self.slots.borrow_mut();
            match slots[slot as usize] {
                Slot::Done(_) => {
                    slots[slot as usize] = Slot::Free;
                    drop(slots);
                    self.release_slot_locked(slot);
                    return;
                }
                Slot::InFlight(_) => slots[slot as usize] = Slot::Orphaned,
                Slot::Free | Slot::Orphaned => return,
            }
        }
        let cancel = opcode::AsyncCancel::new(u64::from(slot))
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: a cancellation points at no memory.
        unsafe { self.push(&cancel) };
        if !wait_for_completion {
            return;
        }
        // The operation may still write into memory its owner is about to free: block until
        // the kernel is done with it. Only teardown paths drop operations early.
        while !matches!(self.slots.borrow()[slot as usize], Slot::Free) {
            self.enter(true);
        }
    }

    /// Submits a raw SQE; the future resolves to the CQE's `res`.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry refers to must stay valid until the returned
    /// future completes or is dropped (dropping waits for the kernel to finish with them).
    /// Leaking the future with `mem::forget` while the operation is in flight is not allowed.
    pub unsafe fn submit(&self, entry: squeue::Entry) -> Op<'_> {
        Op::new(self, Pending::Entry(entry), true)
    }

    /// Sleeps for `duration` on the ring's clock.
    pub async fn sleep(&self, duration: Duration) {
        // A timeout's only memory is the reactor's own timespec, so an early drop need not wait.
        Op::new(self, Pending::Timeout(duration), false).await;
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end of file).
    pub async fn read_at(
        &self,
        fd: &impl AsRawFd,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize, Errno> {
        let len = buf.len().min(SQE_LEN_MAX) as u32;
        let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: `buf` is mutably borrowed for the whole life of this future, and dropping the
        // future waits for the operation, so the kernel never writes a dead buffer.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res)
    }

    /// Fills `buf` from `offset`, looping over short reads. End of file before `buf` is full is
    /// an EIO: a target never invents data.
    pub async fn read_exact_at(
        &self,
        fd: &impl AsRawFd,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .read_at(fd, &mut buf[done..], offset + done as u64)
                .await?;
            if n == 0 {
                return Err(Errno::EIO);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes up to `buf.len()` bytes at `offset`; returns how many were written.
    pub async fn write_at(
        &self,
        fd: &impl AsRawFd,
        buf: &[u8],
        offset: u64,
    ) -> Result<usize, Errno> {
        let len = buf.len().min(SQE_LEN_MAX) as u32;
        let entry = opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len)
            .offset(offset)
            .build();
        // SAFETY: `buf` is borrowed for the life of this future; see `read_at`.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res)
    }

    /// Writes all of `buf` at `offset`, looping over short writes.
    pub async fn write_all_at(
        &self,
        fd: &impl AsRawFd,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .write_at(fd, &buf[done..], offset + done as u64)
                .await?;
            if n == 0 {
                return Err(Errno::EIO);
            }
            done += n;
        }
        Ok(())
    }

    /// `fsync`, or `fdatasync` when `data_only`.
    pub async fn fsync(&self, fd: &impl AsRawFd, data_only: bool) -> Result<(), Errno> {
        let mut op = opcode::Fsync::new(types::Fd(fd.as_raw_fd()));
        if data_only {
            op = op.flags(types::FsyncFlags::DATASYNC);
        }
        // SAFETY: fsync touches no user memory.
        let res = unsafe { self.submit(op.build()) }.await;
        result_len(res).map(drop)
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub async fn fallocate(
        &self,
        fd: &impl AsRawFd,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let entry = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: fallocate touches no user memory.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res).map(drop)
    }

    /// Receives up to `buf.len()` bytes from a socket; 0 means the peer closed.
    pub async fn recv(&self, fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
        let len = buf.len().min(SQE_LEN_MAX) as u32;
        let entry = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len).build();
        // SAFETY: as `read_at`.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res)
    }

    /// Fills `buf` from a socket. A peer that closes early gives `Err(ECONNRESET)`... reported
    /// as [`Errno`] 104.
    pub async fn recv_exact(&self, fd: RawFd, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.recv(fd, &mut buf[done..]).await?;
            if n == 0 {
                return Err(Errno::new(libc::ECONNRESET));
            }
            done += n;
        }
        Ok(())
    }

    /// Sends up to `buf.len()` bytes on a socket. `more` sets `MSG_MORE`, to coalesce a reply
    /// header with the data that follows it.
    pub async fn send(&self, fd: RawFd, buf: &[u8], more: bool) -> Result<usize, Errno> {
        let len = buf.len().min(SQE_LEN_MAX) as u32;
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        let entry = opcode::Send::new(types::Fd(fd), buf.as_ptr(), len)
            .flags(flags)
            .build();
        // SAFETY: as `write_at`.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res)
    }

    /// Sends all of `buf`.
    pub async fn send_all(&self, fd: RawFd, buf: &[u8], more: bool) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.send(fd, &buf[done..], more).await?;
            if n == 0 {
                return Err(Errno::new(libc::EPIPE));
            }
            done += n;
        }
        Ok(())
    }

    /// Sends the bytes of `bufs`, in order, with one `sendmsg`; returns how many were sent (a
    /// stream socket may take fewer than all). At most `IOV_MAX` (1024) slices are looked at.
    /// `more` sets `MSG_MORE`. `offload` sets `IOSQE_ASYNC`: a kernel worker thread does the
    /// send, so copying a large message into the socket runs on another CPU while this thread
    /// goes on (for small messages the hand-off costs more than it saves).
    pub async fn send_vectored(
        &self,
        fd: RawFd,
        bufs: &[std::io::IoSlice<'_>],
        more: bool,
        offload: bool,
    ) -> Result<usize, Errno> {
        const IOV_MAX: usize = 1024;
        // SAFETY: msghdr is plain data; all-zero is a valid value (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is documented to be ABI-compatible with `struct iovec` on Unix.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
        msg.msg_iovlen = bufs.len().min(IOV_MAX) as _;
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        let mut entry = opcode::SendMsg::new(types::Fd(fd), &msg)
            .flags(flags as u32)
            .build();
        let mut _offloaded = None;
        if offload {
            entry = entry.flags(squeue::Flags::ASYNC);
            _offloaded = Some(Offloaded::new(&self.offloaded));
        }
        // SAFETY: `msg` lives in this future, which is pinned from its first poll (when the
        // entry is pushed) until it completes or is dropped, and dropping waits for the CQE;
        // `bufs` and the memory its slices point at are borrowed for the same time.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res)
    }

    /// Sends all the bytes of `bufs`, in order, looping over short sends (see
    /// [`Reactor::send_vectored`] for `more` and `offload`).
    pub async fn send_all_vectored(
        &self,
        fd: RawFd,
        mut bufs: &mut [std::io::IoSlice<'_>],
        more: bool,
        offload: bool,
    ) -> Result<(), Errno> {
        // Bounded: every turn sends at least one byte or fails.
        while bufs.iter().any(|b| !b.is_empty()) {
            let n = self.send_vectored(fd, bufs, more, offload).await?;
            if n == 0 {
                return Err(Errno::new(libc::EPIPE));
            }
            std::io::IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    /// Waits until `fd` is readable (or hung up).
    pub async fn poll_readable(&self, fd: RawFd) -> Result<(), Errno> {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        // SAFETY: a poll touches no user memory.
        let res = unsafe { self.submit(entry) }.await;
        result_len(res).map(drop)
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Tasks may own buffers that in-flight operations point into. Dropping a task drops its
        // `Op`s, which wait for their CQEs, so drop tasks while the ring is still alive.
        let futures = std::mem::take(&mut self.tasks.get_mut().futures);
        drop(futures);
    }
}

fn result_len(res: i32) -> Result<usize, Errno> {
    if res < 0 {
        Err(Errno::from_neg(res))
    } else {
        Ok(res as usize)
    }
}

/// Counts one operation handed to a kernel worker, while it lives.
struct Offloaded<'a>(&'a Cell<u32>);

impl<'a> Offloaded<'a> {
    fn new(count: &'a Cell<u32>) -> Offloaded<'a> {
        count.set(count.get() + 1);
        Offloaded(count)
    }
}

impl Drop for Offloaded<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// The longest a data-path thread busy-waits for work before it sleeps, unless
/// `USERDM_SPIN_US` says otherwise (0 turns spinning off).
///
/// Why spin at all: a sleeping thread is woken by an inter-processor interrupt, and on a virtual
/// machine waking a halted vCPU costs tens of microseconds, more than serving a 4 KiB request.
/// A spin keeps the thread on its CPU across the gap between a reply and the client's next
/// request. How long that gap is depends on the machine: on one 2-vCPU VM, 4k QD1 reads over
/// NBD (`bench/nbd/run.sh`) went from 14k to 33-39k IOPS with 20 us; on another the gap was
/// longer, and 20 us gave 9-10k (nbdkit: 12-14k), 40 us 22-23k, 60-200 us 24-31k. The cost is
/// bounded by the spin policy (see `Reactor::idle`): a thread whose spins keep missing stops
/// spinning, so a longer budget costs CPU only where it finds work, and nothing while the
/// device is idle.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Fixed-point one of `Reactor::spin_hits`.
const SPIN_SCALE: u32 = 1024;
/// While spinning does not pay, the thread still spins in one idle period of this many.
const SPIN_PROBE_EVERY: u32 = 16;

fn default_spin_ns() -> u64 {
    match std::env::var("USERDM_SPIN_US") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map_or(DEFAULT_SPIN.as_nanos() as u64, |us| us.saturating_mul(1000)),
        Err(_) => DEFAULT_SPIN.as_nanos() as u64,
    }
}

/// Whether rings defer completion work to the thread's next `io_uring_enter`
/// (`IORING_SETUP_DEFER_TASKRUN`), unless `USERDM_URING_DEFER=0` says otherwise.
fn defer_taskrun_wanted() -> bool {
    std::env::var("USERDM_URING_DEFER").map_or(true, |v| v.trim() != "0")
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    // DEFER_TASKRUN (6.1+) queues completion work (a ublk command's, a socket's) on the ring
    // and runs it only when this thread enters the kernel to look for completions: no
    // interrupt of a running thread, and completions are reaped in batches. It needs
    // SINGLE_ISSUER, which a reactor is: it never leaves the thread that made it.
    // COOP_TASKRUN is the older, weaker form of the same (5.19+). TASKRUN_FLAG tells a
    // spinning thread (see `DEFAULT_SPIN`) that such work waits; `submit` then enters with
    // GETEVENTS, which runs it. Each step falls back to the next for older kernels.
    if defer_taskrun_wanted() {
        match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
        {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(explain_ring_error(e)),
        }
    }
    match IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
    {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        Err(e) => Err(explain_ring_error(e)),
    }
}

fn explain_ring_error(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) => io::Error::new(
            e.kind(),
            format!(
                "cannot create an io_uring ring: {e}; likely cause: io_uring is disabled by \
                 sysctl, try 'sysctl -w kernel.io_uring_disabled=0'"
            ),
        ),
        Some(libc::ENOSYS) => io::Error::new(
            e.kind(),
            format!("cannot create an io_uring ring: {e}; this kernel has no io_uring"),
        ),
        _ => io::Error::new(e.kind(), format!("cannot create an io_uring ring: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::rc::Rc;

    #[test]
    fn file_round_trip() {
        let rt = Reactor::new(16).unwrap();
        let mut file = tempfile();
        file.write_all(&[0u8; 8192]).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        rt.block_on(rt.write_all_at(&file, &data, 4096)).unwrap();
        let mut back = vec![0u8; 4096];
        rt.block_on(rt.read_exact_at(&file, &mut back, 4096))
            .unwrap();
        assert_eq!(back, data);
        rt.block_on(rt.fsync(&file, true)).unwrap();
        let mut past_end = vec![0u8; 16];
        assert_eq!(
            rt.block_on(rt.read_exact_at(&file, &mut past_end, 8192)),
            Err(Errno::EIO)
        );
    }

    #[test]
    fn many_tasks_interleave() {
        let rt = Rc::new(Reactor::new(8).unwrap());
        let done = Rc::new(Cell::new(0));
        // More concurrent sleeps than ring entries and slots, to exercise queue flushing and
        // slot waiting.
        for i in 0..600u64 {
            let rt2 = rt.clone();
            let done = done.clone();
            rt.spawn(async move {
                rt2.sleep(Duration::from_micros(100 + i % 7)).await;
                done.set(done.get() + 1);
            });
        }
        let rt2 = rt.clone();
        let d2 = done.clone();
        rt.block_on(async move {
            while d2.get() < 600 {
                rt2.sleep(Duration::from_millis(1)).await;
            }
        });
        assert_eq!(done.get(), 600);
        assert!(rt.stats().slot_waits > 0);
    }

    #[test]
    fn completions_wake_tasks_without_the_eventfd() {
        let rt = Rc::new(Reactor::new(8).unwrap());
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut b = b;
            for i in 0..20u8 {
                std::thread::sleep(Duration::from_millis(2));
                b.write_all(&[i]).unwrap();
            }
        });
        // Each recv completes while the thread sleeps in io_uring_enter; the wake of the
        // waiting task happens on this thread, after the kernel returned.
        rt.block_on(async {
            let mut buf = [0u8; 1];
            for _ in 0..20 {
                rt.recv_exact(a.as_raw_fd(), &mut buf).await.unwrap();
            }
        });
        writer.join().unwrap();
        assert_eq!(rt.stats().eventfd_wakes, 0, "{:?}", rt.stats());
        assert!(rt.stats().waits >= 10);
    }

    #[test]
    fn a_round_trip_costs_two_enters() {
        use std::io::{Read, Write};
        let rt = Reactor::new(8).unwrap();
        // Spinning trades enters for latency; this counts the sleeping path.
        rt.set_spin(Duration::ZERO);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while b.read_exact(&mut byte).is_ok() {
                b.write_all(&byte).unwrap();
            }
        });
        const ROUNDS: u64 = 200;
        rt.block_on(async {
            let mut byte = [0u8; 1];
            for i in 0..ROUNDS {
                rt.send_all(a.as_raw_fd(), &[i as u8], false).await.unwrap();
                rt.recv_exact(a.as_raw_fd(), &mut byte).await.unwrap();
                assert_eq!(byte[0], i as u8);
            }
        });
        drop(a);
        echo.join().unwrap();
        // One enter submits the send (which completes inline) and returns; one submits the
        // recv and waits for it.
        let stats = rt.stats();
        assert!(stats.enters <= 2 * ROUNDS + 4, "{stats:?}");
    }

    #[test]
    fn a_spinning_thread_reaps_replies_without_sleeping() {
        use std::io::{Read, Write};
        let rt = Reactor::new(8).unwrap();
        // Long enough that no reply on an echo over a socket pair outlasts it.
        rt.set_spin(Duration::from_millis(200));
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while b.read_exact(&mut byte).is_ok() {
                b.write_all(&byte).unwrap();
            }
        });
        const ROUNDS: u64 = 200;
        rt.block_on(async {
            let mut byte = [0u8; 1];
            for i in 0..ROUNDS {
                rt.send_all(a.as_raw_fd(), &[i as u8], false).await.unwrap();
                rt.recv_exact(a.as_raw_fd(), &mut byte).await.unwrap();
                assert_eq!(byte[0], i as u8);
            }
        });
        drop(a);
        echo.join().unwrap();
        // The replies arrive as task work while the thread spins; it runs them with a
        // non-waiting enter instead of sleeping.
        let stats = rt.stats();
        assert!(stats.waits <= 2, "{stats:?}");
    }

    #[test]
    fn spinning_stops_when_work_comes_too_late_to_catch() {
        let rt = Reactor::new(8).unwrap();
        rt.set_spin(Duration::from_micros(100));
        // Work that comes 2 ms after the thread runs dry: every spin would miss.
        rt.block_on(async {
            for _ in 0..40 {
                rt.sleep(Duration::from_millis(2)).await;
            }
        });
        let stats = rt.stats();
        // Six misses bring the hit rate below one half; later idle periods sleep at once,
        // but for a probing spin in one of every SPIN_PROBE_EVERY.
        assert_eq!(stats.spin_hits, 0, "{stats:?}");
        assert!(
            stats.spins <= 6 + 41 / u64::from(SPIN_PROBE_EVERY),
            "{stats:?}"
        );
        assert!(stats.waits >= 40, "{stats:?}");
    }

    #[test]
    fn spinning_resumes_when_work_comes_soon_again() {
        use std::io::{Read, Write};
        let rt = Reactor::new(8).unwrap();
        // First teach it that spinning misses: idle periods longer than the budget.
        rt.set_spin(Duration::from_millis(1));
        rt.block_on(async {
            for _ in 0..20 {
                rt.sleep(Duration::from_millis(5)).await;
            }
        });
        let before = rt.stats();
        assert!(
            before.spins <= 6 + 21 / u64::from(SPIN_PROBE_EVERY),
            "{before:?}"
        );
        // Then work that comes at once (an echo over a socket pair, well within 1 ms): the
        // probing spins hit, and spinning comes back.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while b.read_exact(&mut byte).is_ok() {
                b.write_all(&byte).unwrap();
            }
        });
        rt.block_on(async {
            let mut byte = [0u8; 1];
            for i in 0..200u32 {
                rt.send_all(a.as_raw_fd(), &[i as u8], false).await.unwrap();
                rt.recv_exact(a.as_raw_fd(), &mut byte).await.unwrap();
            }
        });
        drop(a);
        echo.join().unwrap();
        let after = rt.stats();
        assert!(after.spins > before.spins, "{before:?} -> {after:?}");
        assert!(after.spin_hits > 0, "{after:?}");
    }

    #[test]
    fn remote_wake() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;
        let rt = Reactor::new(8).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let slot: Arc<Mutex<Option<Waker>>> = Arc::new(Mutex::new(None));
        let (f2, s2) = (flag.clone(), slot.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.store(true, Ordering::SeqCst);
            if let Some(w) = s2.lock().unwrap().take() {
                w.wake();
            }
        });
        rt.block_on(std::future::poll_fn(|cx| {
            *slot.lock().unwrap() = Some(cx.waker().clone());
            if flag.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        t.join().unwrap();
    }

    #[test]
    fn dropping_a_read_waits_for_it() {
        let rt = Reactor::new(8).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        rt.block_on(async {
            let mut buf = vec![0u8; 64];
            let read = rt.recv(a.as_raw_fd(), &mut buf);
            let timeout = rt.sleep(Duration::from_millis(10));
            // Whichever finishes first wins; the recv never does, so it is dropped in flight.
            let mut read = pin!(read);
            let mut timeout = pin!(timeout);
            std::future::poll_fn(|cx| {
                if read.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                timeout.as_mut().poll(cx)
            })
            .await;
        });
        drop(b);
        assert!(rt.stats().ops_completed >= 2);
    }

    #[test]
    fn vectored_sends_arrive_in_order() {
        use std::io::{IoSlice, Read};
        let rt = Reactor::new(8).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Larger than the socket buffer, so that some sends come back short and are resumed.
        let big = vec![7u8; 4 << 20];
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).unwrap();
            all
        });
        let parts: [&[u8]; 4] = [b"head", &[], &big, b"tail"];
        let mut slices = parts.map(IoSlice::new);
        rt.block_on(rt.send_all_vectored(a.as_raw_fd(), &mut slices, false, false))
            .unwrap();
        // Offloaded to a kernel worker: the same bytes, in order.
        let mut slices = [IoSlice::new(b"[off]"), IoSlice::new(&big[..1 << 20])];
        rt.block_on(rt.send_all_vectored(a.as_raw_fd(), &mut slices, false, true))
            .unwrap();
        let n = rt
            .block_on(rt.send_vectored(a.as_raw_fd(), &[IoSlice::new(b"!")], false, false))
            .unwrap();
        assert_eq!(n, 1);
        drop(a);
        let all = reader.join().unwrap();
        let tail = 4 + big.len();
        assert_eq!(all.len(), tail + 4 + 5 + (1 << 20) + 1);
        assert_eq!(&all[..4], b"head");
        assert!(all[4..tail].iter().all(|&x| x == 7));
        assert_eq!(&all[tail..tail + 9], b"tail[off]");
        assert!(all[tail + 9..all.len() - 1].iter().all(|&x| x == 7));
        assert_eq!(all.last(), Some(&b'!'));
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("userdm-uring-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
