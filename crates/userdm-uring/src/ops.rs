//! One submitted operation, as a future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use io_uring::squeue::Entry;

use crate::reactor::Reactor;

pub(crate) enum Pending {
    Entry(Entry),
    Timeout(Duration),
}

enum State {
    /// Not yet given a slot: slots are claimed on first poll, so building an `Op` never fails.
    Unsubmitted(Pending),
    Submitted(u32),
    Finished,
}

/// A future for one io_uring operation; its output is the CQE's `res`.
///
/// Dropping an `Op` whose operation is still in the kernel cancels it and, for operations that
/// touch memory, waits for the CQE before returning, so a buffer borrowed by the operation is
/// never written after its owner is gone.
#[must_use = "an Op does nothing until awaited"]
pub struct Op<'a> {
    rt: &'a Reactor,
    state: State,
    touches_memory: bool,
}

impl<'a> Op<'a> {
    pub(crate) fn new(rt: &'a Reactor, pending: Pending, touches_memory: bool) -> Op<'a> {
        Op {
            rt,
            state: State::Unsubmitted(pending),
            touches_memory,
        }
    }
}

impl Future for Op<'_> {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = &mut *self;
        loop {
            match &this.state {
                State::Unsubmitted(pending) => {
                    let Some(slot) = this.rt.claim_slot(cx) else {
                        return Poll::Pending;
                    };
                    this.rt.push_pending(slot, pending);
                    this.state = State::Submitted(slot);
                }
                State::Submitted(slot) => {
                    let slot = *slot;
                    return match this.rt.poll_slot(slot, cx) {
                        Poll::Ready(res) => {
                            this.state = State::Finished;
                            Poll::Ready(res)
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                State::Finished => return Poll::Ready(-libc::EINVAL),
            }
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if let State::Submitted(slot) = self.state {
            self.rt.abandon_slot(slot, self.touches_memory);
        }
    }
}
