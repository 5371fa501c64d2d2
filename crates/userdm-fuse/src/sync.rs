//! Small futures plumbing for the data path: a sector range lock shared by every worker
//! thread, a per-thread reader token, and a fixed group of tasks polled as one future.
//!
//! The group exists because `Reactor::spawn` wants `'static` tasks, which would have to own an
//! `Rc<Reactor>`; a reactor owning tasks that own it is a cycle, and a leaked reactor would keep
//! its `/dev/fuse` reads in flight forever, so the connection would never end. Polling the
//! tasks inside `block_on`'s main future lets them borrow the reactor, and dropping the main
//! future cancels their IO before the reactor goes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;

/// Locks byte ranges, rounded out to sectors, against each other.
///
/// Every modifying request holds the range it touches for its whole duration, so that a
/// read-modify-write of a partial sector never interleaves with another write of that sector
/// (which would resurrect stale bytes). Reads take no lock: a reader racing a writer sees old or
/// new data per sector, as on a real disk.
pub(crate) struct RangeLock {
    inner: Mutex<RangeInner>,
}

struct RangeInner {
    /// Ranges held, `[start, end)` in bytes. Each task holds at most one, so the preallocated
    /// capacity (the number of tasks) is never exceeded.
    held: Vec<(u64, u64)>,
    waiters: Vec<Waker>,
}

impl RangeLock {
    pub(crate) fn new(tasks: usize) -> RangeLock {
        RangeLock {
            inner: Mutex::new(RangeInner {
                held: Vec::with_capacity(tasks),
                waiters: Vec::with_capacity(tasks),
            }),
        }
    }

    /// Waits until `[start, end)` overlaps no held range, then holds it until the guard drops.
    pub(crate) async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        debug_assert!(start < end);
        poll_fn(|cx| {
            let mut inner = self.inner.lock();
            if inner.held.iter().any(|&(s, e)| s < end && start < e) {
                if !inner.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    inner.waiters.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            inner.held.push((start, end));
            Poll::Ready(())
        })
        .await;
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.inner.lock().held.len()
    }
}

/// A held range; released on drop.
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.lock.inner.lock();
        if let Some(i) = inner.held.iter().position(|&r| r == self.range) {
            inner.held.swap_remove(i);
        }
        // Wake every waiter: each re-checks its own range. Contention is rare (overlapping
        // writes), so the herd is small and simpler than tracking who waits for what.
        for w in inner.waiters.drain(..) {
            w.wake();
        }
    }
}

/// Lets one task of a thread at a time wait on the thread's `/dev/fuse` descriptor.
///
/// With every idle task reading, each request would wake them all (a poll wakes every waiter)
/// and all but one would find nothing. The holder reads one request, hands the token on, then
/// serves the request while the next task waits for the next one.
pub(crate) struct ReaderToken {
    held: Cell<bool>,
    waiters: RefCell<VecDeque<Waker>>,
}

impl ReaderToken {
    pub(crate) fn new(tasks: usize) -> ReaderToken {
        ReaderToken {
            held: Cell::new(false),
            waiters: RefCell::new(VecDeque::with_capacity(tasks)),
        }
    }

    pub(crate) async fn acquire(&self) -> ReaderGuard<'_> {
        poll_fn(|cx| {
            if !self.held.get() {
                self.held.set(true);
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push_back(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        ReaderGuard { token: self }
    }
}

pub(crate) struct ReaderGuard<'a> {
    token: &'a ReaderToken,
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.token.held.set(false);
        if let Some(w) = self.token.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}

/// The most tasks one [`Group`] polls (one bit each in a `u64`).
pub(crate) const GROUP_TASKS_MAX: usize = 64;

/// Wake state shared by a group's member wakers: which members are ready, and the waker of
/// whoever polls the group.
struct GroupShared {
    ready: AtomicU64,
    parent: Mutex<Option<Waker>>,
}

struct MemberWaker {
    shared: Arc<GroupShared>,
    bit: u64,
}

impl Wake for MemberWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.ready.fetch_or(self.bit, Ordering::AcqRel);
        if let Some(parent) = self.shared.parent.lock().as_ref() {
            parent.wake_by_ref();
        }
    }
}

/// A fixed set of futures polled as one, each only when its own waker fired. Built once per
/// thread; polling allocates nothing.
pub(crate) struct Group<F> {
    members: Vec<Option<Pin<Box<F>>>>,
    wakers: Vec<Waker>,
    shared: Arc<GroupShared>,
    live: usize,
}

impl<F: Future<Output = ()>> Group<F> {
    pub(crate) fn new(members: impl IntoIterator<Item = F>) -> Group<F> {
        let members: Vec<_> = members.into_iter().map(|f| Some(Box::pin(f))).collect();
        assert!(
            members.len() <= GROUP_TASKS_MAX,
            "too many tasks in a group"
        );
        let shared = Arc::new(GroupShared {
            // Every member starts ready so that each is polled once.
            ready: AtomicU64::new(if members.len() == 64 {
                u64::MAX
            } else {
                (1u64 << members.len()) - 1
            }),
            parent: Mutex::new(None),
        });
        let wakers = (0..members.len())
            .map(|i| {
                Waker::from(Arc::new(MemberWaker {
                    shared: shared.clone(),
                    bit: 1 << i,
                }))
            })
            .collect();
        let live = members.len();
        Group {
            members,
            wakers,
            shared,
            live,
        }
    }

    /// Polls the members that were woken; ready when every member has finished.
    pub(crate) fn poll_members(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut parent = self.shared.parent.lock();
            if !parent.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *parent = Some(cx.waker().clone());
            }
        }
        loop {
            let ready = self.shared.ready.swap(0, Ordering::AcqRel);
            if ready == 0 {
                break;
            }
            for (i, member) in self.members.iter_mut().enumerate() {
                if ready & (1 << i) == 0 {
                    continue;
                }
                let Some(fut) = member else { continue };
                let mut member_cx = Context::from_waker(&self.wakers[i]);
                if fut.as_mut().poll(&mut member_cx).is_ready() {
                    *member = None;
                    self.live -= 1;
                }
            }
        }
        if self.live == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use userdm_uring::Reactor;

    #[test]
    fn overlapping_ranges_serialize() {
        let rt = Reactor::new(8).unwrap();
        let lock = RangeLock::new(4);
        let order = RefCell::new(Vec::new());
        let task = |id: u32, start: u64, end: u64| {
            let (rt, lock, order) = (&rt, &lock, &order);
            async move {
                let _g = lock.lock(start, end).await;
                order.borrow_mut().push((id, true));
                rt.sleep(std::time::Duration::from_millis(5)).await;
                order.borrow_mut().push((id, false));
            }
        };
        let mut group = Group::new([task(0, 0, 512), task(1, 256, 1024), task(2, 1024, 2048)]);
        rt.block_on(poll_fn(|cx| group.poll_members(cx)));
        drop(group);
        let order = order.into_inner();
        // Task 1 overlaps task 0, so it starts only after 0 ends; task 2 runs beside 0.
        let pos = |e| order.iter().position(|x| *x == e).unwrap();
        assert!(pos((1, true)) > pos((0, false)));
        assert!(pos((2, true)) < pos((0, false)));
        assert_eq!(lock.held(), 0);
    }

    #[test]
    fn reader_token_is_exclusive_and_fair() {
        let rt = Reactor::new(8).unwrap();
        let token = ReaderToken::new(3);
        let inside = Cell::new(0);
        let max_inside = Cell::new(0);
        let turns = Rc::new(RefCell::new(Vec::new()));
        let task = |id: u32| {
            let (rt, token, inside, max_inside, turns) =
                (&rt, &token, &inside, &max_inside, turns.clone());
            async move {
                for _ in 0..3 {
                    let _g = token.acquire().await;
                    inside.set(inside.get() + 1);
                    max_inside.set(max_inside.get().max(inside.get()));
                    turns.borrow_mut().push(id);
                    rt.sleep(std::time::Duration::from_micros(200)).await;
                    inside.set(inside.get() - 1);
                }
            }
        };
        let mut group = Group::new([task(0), task(1), task(2)]);
        rt.block_on(poll_fn(|cx| group.poll_members(cx)));
        assert_eq!(max_inside.get(), 1);
        assert_eq!(turns.borrow().len(), 9);
    }
}
