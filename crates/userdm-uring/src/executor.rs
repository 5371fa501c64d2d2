//! The task side of the reactor: a fixed set of tasks and a ready queue shared with wakers.

use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Wake, Waker};

/// Index of the future passed to `block_on`, which is not stored in the task table.
pub(crate) const MAIN_TASK: usize = usize::MAX;

thread_local! {
    /// The `Shared` of the reactor whose `block_on` runs on this thread, if any.
    static RUNNING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

/// What wakers share with the reactor's thread. `Send + Sync`, because a waker can be called
/// from any thread.
///
/// Wakes come in two kinds. Almost all come from the reactor's own thread while it runs (a
/// completion reaped, a task waking another): those go to `local`, with no lock and no atomic
/// read-modify-write. Wakes from other threads go to `remote`, under a lock, and kick the
/// eventfd if the reactor sleeps.
pub(crate) struct Shared {
    /// Tasks woken on the reactor's thread, in wake order. Touched only by that thread: see
    /// [`Shared::on_owner_thread`].
    local: UnsafeCell<VecDeque<usize>>,
    /// Tasks woken from other threads. Preallocated, as `local` is, so a wake does not allocate.
    remote: Mutex<VecDeque<usize>>,
    /// Whether `remote` may hold tasks; lets the reactor look without taking the lock.
    remote_ready: AtomicBool,
    /// Set while the reactor thread blocks in `io_uring_enter`; a waker that sees it writes the
    /// eventfd so the thread returns.
    sleeping: AtomicBool,
    /// Written by remote wakers; the reactor always has a read armed on it.
    pub(crate) eventfd: OwnedFd,
}

// SAFETY: every field but `local` is Sync. `local` is touched only on the thread that runs the
// reactor's `block_on`, which is the only thread where `RUNNING` points at this `Shared` (the
// reactor is not `Send`), and by the reactor's own methods, which run on that same thread.
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn new(eventfd: OwnedFd, capacity: usize) -> Shared {
        Shared {
            local: UnsafeCell::new(VecDeque::with_capacity(capacity)),
            remote: Mutex::new(VecDeque::with_capacity(capacity)),
            remote_ready: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            eventfd,
        }
    }

    /// Marks this thread as running the reactor's `block_on` until the guard drops.
    pub(crate) fn enter_running(&self) -> RunningGuard {
        let previous = RUNNING.with(|r| r.replace(self as *const Shared));
        RunningGuard { previous }
    }

    fn on_owner_thread(&self) -> bool {
        RUNNING.with(|r| std::ptr::eq(r.get(), self))
    }

    /// The owner thread's queue.
    ///
    /// # Safety
    /// Only the reactor's own thread may call this (its methods, or a wake while its
    /// `block_on` runs), and the reference must not outlive the current statement.
    #[allow(clippy::mut_from_ref)]
    unsafe fn local(&self) -> &mut VecDeque<usize> {
        // SAFETY: the caller is on the owner thread, which never holds two of these at once.
        unsafe { &mut *self.local.get() }
    }

    fn push_ready(&self, index: usize) {
        if self.on_owner_thread() {
            // SAFETY: on the owner thread (checked just above).
            unsafe { self.local() }.push_back(index);
            // The thread is awake: it is the one waking.
            return;
        }
        // A poisoned lock only means another thread panicked while pushing an index; the queue
        // itself is still a valid VecDeque, so keep going rather than spread the panic.
        {
            let mut remote = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
            remote.push_back(index);
            self.remote_ready.store(true, Ordering::SeqCst);
        }
        // SeqCst pairs with the reactor's store of `sleeping` followed by its look at
        // `remote_ready`: either it sees our index, or we see it sleeping and kick the eventfd.
        if self.sleeping.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own; the result is ignored
        // because the only failure (counter overflow, EAGAIN) still leaves the fd readable.
        unsafe {
            libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// The next task to poll. Reactor thread only.
    pub(crate) fn pop_ready(&self) -> Option<usize> {
        // SAFETY: called by the reactor's methods, on its thread.
        if let Some(index) = unsafe { self.local() }.pop_front() {
            return Some(index);
        }
        if !self.remote_ready.load(Ordering::SeqCst) {
            return None;
        }
        let mut remote = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
        self.remote_ready.store(false, Ordering::SeqCst);
        // SAFETY: as above; `extend` from a drain of the preallocated queue does not allocate
        // while the two together hold no more than the number of tasks.
        let local = unsafe { self.local() };
        local.extend(remote.drain(..));
        local.pop_front()
    }

    /// Whether a task waits to be polled. Reactor thread only.
    pub(crate) fn has_ready(&self) -> bool {
        // SAFETY: called by the reactor's methods, on its thread.
        !unsafe { self.local() }.is_empty() || self.remote_ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }
}

/// Restores the previous reactor mark of the thread when `block_on` returns (or unwinds).
pub(crate) struct RunningGuard {
    previous: *const Shared,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.previous));
    }
}

/// The waker of one task. Made once per task, so waking never allocates.
pub(crate) struct TaskWaker {
    shared: Arc<Shared>,
    index: usize,
    /// Whether the index is already in the ready queue: a task is queued at most once, which
    /// bounds the queue by the number of tasks.
    queued: AtomicBool,
}

impl TaskWaker {
    pub(crate) fn new(shared: Arc<Shared>, index: usize) -> Arc<TaskWaker> {
        Arc::new(TaskWaker {
            shared,
            index,
            queued: AtomicBool::new(false),
        })
    }

    /// Called just before polling, so that a wake during the poll queues the task again.
    pub(crate) fn clear_queued(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.shared.push_ready(self.index);
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// Spawned tasks and their wakers, indexed alike.
pub(crate) struct Tasks {
    pub(crate) futures: Vec<Option<Task>>,
    pub(crate) wakers: Vec<(Arc<TaskWaker>, Waker)>,
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks {
            futures: Vec::new(),
            wakers: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, shared: &Arc<Shared>, task: Task) -> usize {
        let index = self.futures.len();
        let tw = TaskWaker::new(shared.clone(), index);
        let waker = Waker::from(tw.clone());
        self.futures.push(Some(task));
        self.wakers.push((tw, waker));
        index
    }
}
