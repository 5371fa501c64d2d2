//! Small synchronisation primitives for tasks, usable across threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

/// A generation counter that tasks can wait on: [`Notify::notify_all`] bumps it and wakes every
/// waiter. Waiting on a generation that has already passed returns at once, so no notification
/// between "check the condition" and "wait" is lost.
#[derive(Default)]
pub struct Notify {
    generation: AtomicU64,
    waiters: Mutex<Vec<Waker>>,
}

impl Notify {
    /// A notifier with room for `capacity` waiters before it allocates.
    pub fn with_capacity(capacity: usize) -> Notify {
        Notify {
            generation: AtomicU64::new(0),
            waiters: Mutex::new(Vec::with_capacity(capacity)),
        }
    }

    /// The current generation; pass it to [`Notify::wait`] after checking your condition.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        for w in waiters.drain(..) {
            w.wake();
        }
    }

    /// Resolves once the generation differs from `seen`.
    pub fn wait(&self, seen: u64) -> Wait<'_> {
        Wait { notify: self, seen }
    }
}

/// The future of [`Notify::wait`].
pub struct Wait<'a> {
    notify: &'a Notify,
    seen: u64,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        let mut waiters = self
            .notify
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Re-check under the lock: notify_all bumps before taking it, so a bump we missed above
        // is visible now.
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reactor;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn notify_across_threads() {
        let rt = Reactor::new(8).unwrap();
        let n = Arc::new(Notify::default());
        let n2 = n.clone();
        let seen = n.generation();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            n2.notify_all();
        });
        rt.block_on(n.wait(seen));
        t.join().unwrap();
        // A wait on a passed generation returns at once.
        rt.block_on(n.wait(seen));
    }
}
