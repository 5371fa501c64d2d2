//! The meeting point of the data path and suspend: who may start IO, and when IO has drained.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use userdm_uring::sync::Notify;

/// Counts IO in flight and holds new IO while the device is suspended.
pub struct Gate {
    suspended: AtomicBool,
    inflight: AtomicU64,
    /// Wakes IO parked at the gate when the device resumes.
    resumed: Notify,
    /// Wakes a suspender waiting for in-flight IO to drain.
    drained_lock: Mutex<()>,
    drained: Condvar,
}

impl Gate {
    /// A gate that starts open.
    pub fn new_open() -> Gate {
        Gate {
            suspended: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            resumed: Notify::with_capacity(256),
            drained_lock: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    /// Whether new IO is held.
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    /// IO currently inside the table.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until IO may start, then counts it in. Pair with [`Gate::leave`].
    pub async fn enter(&self) {
        loop {
            let seen = self.resumed.generation();
            if !self.is_suspended() {
                self.inflight.fetch_add(1, Ordering::SeqCst);
                // A suspend that raced with us may already be counting on zero: back out.
                if !self.is_suspended() {
                    return;
                }
                self.leave();
            }
            self.resumed.wait(seen).await;
        }
    }

    /// Counts IO out.
    pub fn leave(&self) {
        let before = self.inflight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "gate left more often than entered");
        if before == 1 && self.is_suspended() {
            let _guard = self.drained_lock.lock();
            self.drained.notify_all();
        }
    }

    /// Holds new IO from now on. Returns whether the gate was open before.
    pub fn close(&self) -> bool {
        !self.suspended.swap(true, Ordering::SeqCst)
    }

    /// Waits until no IO is in flight, or `timeout` passes; returns whether it drained.
    pub fn wait_drained(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut guard = self.drained_lock.lock();
        while self.inflight() > 0 {
            match deadline {
                Some(d) => {
                    if self.drained.wait_until(&mut guard, d).timed_out() {
                        return self.inflight() == 0;
                    }
                }
                None => self.drained.wait(&mut guard),
            }
        }
        true
    }

    /// Lets IO through again and wakes what was held.
    pub fn open(&self) {
        self.suspended.store(false, Ordering::SeqCst);
        self.resumed.notify_all();
    }
}
