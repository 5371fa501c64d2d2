//! The task side of the reactor: a fixed set of tasks and a ready queue shared with wakers.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Wake, Waker};

/// Index of the future passed to `block_on`, which is not stored in the task table.
pub(crate) const MAIN_TASK: usize = usize::MAX;

/// What wakers share with the reactor's thread. `Send + Sync`, because a waker can be called
/// from any thread.
pub(crate) struct Shared {
    /// Tasks to poll, in wake order. Preallocated so that a wake does not allocate.
    ready: Mutex<VecDeque<usize>>,
    /// Set while the reactor thread blocks in `io_uring_enter`; a waker that sees it writes the
    /// eventfd so the thread returns.
    sleeping: AtomicBool,
    /// Written by remote wakers; the reactor always has a read armed on it.
    pub(crate) eventfd: OwnedFd,
}

impl Shared {
    pub(crate) fn new(eventfd: OwnedFd, capacity: usize) -> Shared {
        Shared {
            ready: Mutex::new(VecDeque::with_capacity(capacity)),
            sleeping: AtomicBool::new(false),
            eventfd,
        }
    }

    fn push_ready(&self, index: usize) {
        // A poisoned lock only means another thread panicked while pushing an index; the queue
        // itself is still a valid VecDeque, so keep going rather than spread the panic.
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(index);
        // SeqCst pairs with the reactor's store of `sleeping` followed by its check of the
        // queue: either it sees our index, or we see it sleeping and kick the eventfd.
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

    pub(crate) fn pop_ready(&self) -> Option<usize> {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    pub(crate) fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
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
