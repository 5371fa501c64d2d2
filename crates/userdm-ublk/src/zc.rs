//! The zero-copy command ring of a queue.
//!
//! With `UBLK_F_AUTO_BUF_REG` the kernel registers each request's pages as a fixed buffer of the
//! io_uring that carries the request's FETCH / COMMIT_AND_FETCH, so that ring needs a buffer
//! table, and the fixed-buffer READ/WRITE that move the data must run on it too. The queue's
//! [`Reactor`] does not expose its ring for registration, so in zero-copy mode each queue
//! thread owns a second, small ring for exactly these commands: its buffer table has one slot
//! per tag (slot `t` holds tag `t`'s request while the server handles it).
//!
//! The ring is driven from inside the reactor: one driver task submits what tag tasks pushed
//! (once per reactor turn, however many were pushed) and waits for completions with a poll on
//! the ring's descriptor, then wakes the tag tasks whose operations finished. Slots for
//! operations are preallocated; nothing is allocated per request.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, squeue, IoUring};
use userdm_uring::Reactor;

enum Slot {
    Free,
    Pending(Option<Waker>),
    Done(i32),
}

/// A private ring with a sparse buffer table, shared by a queue's tasks.
pub(crate) struct ZcRing {
    ring: RefCell<IoUring<squeue::Entry, cqueue::Entry>>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Entries pushed since the driver last submitted.
    unsubmitted: Cell<bool>,
    driver: RefCell<Option<Waker>>,
    stopping: Cell<bool>,
}

impl ZcRing {
    /// A ring with room for `ops` operations in flight, `buffers` sparse buffer slots, and
    /// `files` as its fixed files (see `Reactor::register_files`).
    pub(crate) fn new(ops: u32, buffers: u32, files: &[RawFd]) -> io::Result<ZcRing> {
        let entries = ops.next_power_of_two().clamp(8, 4096);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        ring.submitter().register_buffers_sparse(buffers)?;
        ring.submitter().register_files(files)?;
        let slot_count = entries as usize * 2;
        Ok(ZcRing {
            ring: RefCell::new(ring),
            slots: RefCell::new((0..slot_count).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..slot_count as u32).rev().collect()),
            unsubmitted: Cell::new(false),
            driver: RefCell::new(None),
            stopping: Cell::new(false),
        })
    }

    /// Runs one operation on the ring; resolves to its CQE's `res`.
    ///
    /// # Safety
    /// Every buffer and descriptor the entry names must stay valid until the future resolves.
    /// The future must not be dropped before it resolves (the queue's tag tasks never drop
    /// one: they await each to the end).
    pub(crate) unsafe fn submit(&self, entry: squeue::Entry) -> ZcOp<'_> {
        ZcOp {
            ring: self,
            entry: Some(entry),
            slot: None,
        }
    }

    fn push(&self, slot: u32, entry: &squeue::Entry) {
        let entry = entry.clone().user_data(u64::from(slot));
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: the caller of `submit` keeps the entry's memory valid until completion.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // Full: hand what is queued to the kernel now. More slots than ring entries
            // cannot be in flight unsubmitted, so this frees room.
            let _ = ring.submit();
        }
        drop(ring);
        self.unsubmitted.set(true);
        if let Some(driver) = self.driver.borrow_mut().take() {
            driver.wake();
        }
    }

    /// Moves every available CQE into its slot and wakes the waiter.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            let Some(slot) = slots.get_mut(cqe.user_data() as usize) else {
                continue;
            };
            if !matches!(slot, Slot::Pending(_)) {
                // Not ours to finish (cannot happen: every CQE answers a pending slot).
                continue;
            }
            if let Slot::Pending(Some(waker)) = std::mem::replace(slot, Slot::Done(cqe.result())) {
                waker.wake();
            }
        }
    }

    /// Tells the driver to return once nothing is pending.
    pub(crate) fn stop_driver(&self) {
        self.stopping.set(true);
        if let Some(driver) = self.driver.borrow_mut().take() {
            driver.wake();
        }
    }

    fn in_flight(&self) -> bool {
        self.slots
            .borrow()
            .iter()
            .any(|s| matches!(s, Slot::Pending(_)))
    }
}

/// The driver task: submits pushed entries once per wake, reaps completions when the ring's
/// descriptor polls readable. Ends after [`ZcRing::stop_driver`] once nothing is in flight.
pub(crate) async fn drive(rt: &Reactor, zc: &ZcRing) {
    let fd = zc.ring.borrow().as_raw_fd();
    loop {
        zc.reap();
        if zc.stopping.get() && !zc.in_flight() {
            return;
        }
        let mut readable = pin!(rt.poll_readable(fd));
        loop {
            let event = std::future::poll_fn(|cx| {
                if zc.unsubmitted.get() {
                    return Poll::Ready(false);
                }
                if zc.stopping.get() && !zc.in_flight() {
                    return Poll::Ready(true);
                }
                if readable.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(true);
                }
                *zc.driver.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            if event {
                break;
            }
            zc.unsubmitted.set(false);
            // Errors (EINTR, EBUSY with a full completion queue) leave the entries queued for
            // the next submit; reaping below makes room.
            let _ = zc.ring.borrow().submit();
            zc.reap();
        }
    }
}

/// The future of [`ZcRing::submit`].
pub(crate) struct ZcOp<'a> {
    ring: &'a ZcRing,
    entry: Option<squeue::Entry>,
    slot: Option<u32>,
}

impl Future for ZcOp<'_> {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = &mut *self;
        if let Some(entry) = this.entry.take() {
            let Some(slot) = this.ring.free.borrow_mut().pop() else {
                // Every slot is busy: cannot happen with one operation per tag at a time and
                // twice as many slots as tags; fail the operation rather than wait.
                return Poll::Ready(-libc::EBUSY);
            };
            this.ring.slots.borrow_mut()[slot as usize] = Slot::Pending(Some(cx.waker().clone()));
            this.slot = Some(slot);
            this.ring.push(slot, &entry);
            return Poll::Pending;
        }
        let Some(slot) = this.slot else {
            return Poll::Ready(-libc::EINVAL);
        };
        let mut slots = this.ring.slots.borrow_mut();
        match &mut slots[slot as usize] {
            Slot::Done(res) => {
                let res = *res;
                slots[slot as usize] = Slot::Free;
                drop(slots);
                this.ring.free.borrow_mut().push(slot);
                this.slot = None;
                Poll::Ready(res)
            }
            Slot::Pending(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Free => Poll::Ready(-libc::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use io_uring::{opcode, types};

    /// Many tasks run operations on the private ring at once; the driver submits and reaps
    /// them from inside the reactor and stops when asked.
    #[test]
    fn driver_runs_operations_from_many_tasks() {
        let rt = Rc::new(Reactor::new(64).unwrap());
        let null = std::fs::File::open("/dev/null").unwrap();
        let zc = match ZcRing::new(64, 32, &[null.as_raw_fd()]) {
            Ok(zc) => Rc::new(zc),
            // Kernels without sparse buffer tables (before 5.19) cannot run zero copy anyway.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        let done = Rc::new(Cell::new(0u32));
        for i in 0..32u32 {
            let (zc, done) = (zc.clone(), done.clone());
            rt.spawn(async move {
                for _ in 0..10 {
                    // SAFETY: a NOP names no memory.
                    let res = unsafe { zc.submit(opcode::Nop::new().build()) }.await;
                    assert_eq!(res, 0);
                }
                let ts = types::Timespec::from(Duration::from_micros(200 + u64::from(i)));
                let entry = opcode::Timeout::new(&ts).build();
                // SAFETY: `ts` lives in this task until the timeout completes.
                let res = unsafe { zc.submit(entry) }.await;
                assert_eq!(res, -libc::ETIME);
                done.set(done.get() + 1);
            });
        }
        let finished = Rc::new(Cell::new(false));
        {
            let (rt2, zc, finished) = (rt.clone(), zc.clone(), finished.clone());
            rt.spawn(async move {
                drive(&rt2, &zc).await;
                finished.set(true);
            });
        }
        let (rt2, d2) = (rt.clone(), done.clone());
        rt.block_on(async move {
            while d2.get() < 32 {
                rt2.sleep(Duration::from_millis(1)).await;
            }
        });
        assert_eq!(done.get(), 32);
        zc.stop_driver();
        let (rt2, f2) = (rt.clone(), finished.clone());
        rt.block_on(async move {
            while !f2.get() {
                rt2.sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(finished.get());
    }
}
