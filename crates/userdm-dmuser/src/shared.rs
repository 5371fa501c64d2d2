//! What the data path and the endpoint thread share: a fixed table of request slots and the
//! queue of requests no daemon has been handed yet.
//!
//! Lock order: `Shared::inner` before any slot lock; a slot lock is never held while taking
//! `inner`. The endpoint thread holds a slot's lock while it copies that request's data, so a
//! data-path thread that cancels a request (its future dropped) waits at the slot lock until the
//! copy is over, and from then on the thread never touches the caller's buffer again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use userdm_io::{Errno, IoError, IoResult};
use userdm_uring::sync::Notify;

use crate::params::OnClose;
use crate::sys::EventFd;
use crate::wire::DmUserMessage;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks aborts the process (panic = "abort"), so a
    // poisoned lock can only be seen in unit tests; the data is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not in use.
    Free,
    /// In the queue, not handed to a channel.
    Queued,
    /// Handed to a channel (being sent, or waiting for its reply).
    Channel,
    /// Finished; `result` is waiting for the data path.
    Done,
}

/// Per-target behaviour carried by each of its requests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub(crate) target: u64,
    pub(crate) on_close: OnClose,
    pub(crate) timeout: Option<Duration>,
}

/// One request slot.
pub(crate) struct Slot {
    pub(crate) phase: Phase,
    pub(crate) msg: DmUserMessage,
    /// The caller's buffer; null once the request is abandoned or finished.
    buf: *mut u8,
    buf_len: usize,
    /// The WRITE payload of an abandoned request whose sending had begun.
    detached: Option<Vec<u8>>,
    abandoned: bool,
    waker: Option<Waker>,
    result: IoResult,
    policy: Policy,
    waiting_since: Instant,
}

// SAFETY: `buf` is only dereferenced by the endpoint thread while it holds this slot's lock, and
// the data-path future that owns the memory clears it under the same lock before the borrow
// ends (completion or drop); see `Shared::with_payload` and `Shared::cancel`.
unsafe impl Send for Slot {}

impl Slot {
    fn new(now: Instant) -> Slot {
        Slot {
            phase: Phase::Free,
            msg: DmUserMessage::default(),
            buf: std::ptr::null_mut(),
            buf_len: 0,
            detached: None,
            abandoned: false,
            waker: None,
            result: Ok(()),
            policy: Policy {
                target: 0,
                on_close: OnClose::Requeue,
                timeout: None,
            },
            waiting_since: now,
        }
    }

    fn reset(&mut self) {
        self.phase = Phase::Free;
        self.buf = std::ptr::null_mut();
        self.buf_len = 0;
        self.detached = None;
        self.abandoned = false;
        self.waker = None;
    }

    /// Ends the request; returns the waker to call once the lock is released.
    fn finish(&mut self, result: IoResult) -> Option<Waker> {
        self.phase = Phase::Done;
        self.result = result;
        self.buf = std::ptr::null_mut();
        self.buf_len = 0;
        self.detached = None;
        self.waker.take()
    }
}

/// Counters shown by `dmsetup status`.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requeued: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) refused: AtomicU64,
}

pub(crate) struct Inner {
    free: Vec<u32>,
    queue: VecDeque<u32>,
    next_seq: u64,
    pub(crate) channels: usize,
    no_daemon_since: Instant,
    pub(crate) shutdown: bool,
    /// Targets suspended with noflush: their queued requests go back to the device.
    suspended: Vec<u64>,
    in_flight: usize,
}

/// The request table of one endpoint.
pub(crate) struct Shared {
    pub(crate) ctl: String,
    inner: Mutex<Inner>,
    slots: Box<[Mutex<Slot>]>,
    slot_freed: Notify,
    pub(crate) wake: EventFd,
    pub(crate) stats: Stats,
}

/// What the endpoint thread sends for one request.
pub(crate) struct Dispatched {
    pub(crate) slot: u32,
    pub(crate) msg: DmUserMessage,
}

impl Shared {
    pub(crate) fn new(ctl: String, depth: usize, wake: EventFd) -> Shared {
        let now = Instant::now();
        Shared {
            ctl,
            inner: Mutex::new(Inner {
                free: (0..depth as u32).rev().collect(),
                queue: VecDeque::with_capacity(depth),
                next_seq: 0,
                channels: 0,
                no_daemon_since: now,
                shutdown: false,
                suspended: Vec::with_capacity(8),
                in_flight: 0,
            }),
            slots: (0..depth).map(|_| Mutex::new(Slot::new(now))).collect(),
            slot_freed: Notify::with_capacity(64),
            wake,
            stats: Stats::default(),
        }
    }

    pub(crate) fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn slot(&self, index: u32) -> MutexGuard<'_, Slot> {
        lock(&self.slots[index as usize])
    }

    // ---- data path ----

    /// Waits for a free slot.
    pub(crate) async fn acquire(&self) -> Result<u32, Errno> {
        loop {
            let seen = self.slot_freed.generation();
            {
                let mut inner = self.inner();
                if inner.shutdown {
                    return Err(Errno::EIO);
                }
                if let Some(slot) = inner.free.pop() {
                    inner.in_flight += 1;
                    return Ok(slot);
                }
            }
            self.slot_freed.wait(seen).await;
        }
    }

    /// Takes a free slot if there is one (a shut-down endpoint has none).
    pub(crate) fn try_acquire(&self) -> Option<u32> {
        let mut inner = self.inner();
        if inner.shutdown {
            return None;
        }
        let slot = inner.free.pop()?;
        inner.in_flight += 1;
        Some(slot)
    }

    fn release(&self, inner: &mut Inner, slot: u32) {
        debug_assert!(!inner.free.contains(&slot));
        inner.free.push(slot);
        inner.in_flight -= 1;
    }

    /// Gives a slot back without having queued it.
    pub(crate) fn release_unused(&self, slot: u32) {
        {
            let mut inner = self.inner();
            self.release(&mut inner, slot);
        }
        self.slot_freed.notify_all();
    }

    /// Queues a request in an acquired slot. `buf` must stay valid until the request finishes
    /// or is cancelled (see the module docs).
    pub(crate) fn submit(
        &self,
        slot: u32,
        mut msg: DmUserMessage,
        buf: *mut u8,
        buf_len: usize,
        policy: Policy,
        waker: &Waker,
    ) -> IoResult {
        let mut inner = self.inner();
        if inner.shutdown {
            drop(inner);
            self.release_unused(slot);
            return Err(Errno::EIO.into());
        }
        if inner.suspended.contains(&policy.target) {
            drop(inner);
            self.release_unused(slot);
            return Err(IoError::Requeue);
        }
        msg.seq = inner.next_seq;
        inner.next_seq += 1;
        {
            let mut s = self.slot(slot);
            debug_assert_eq!(s.phase, Phase::Free);
            s.phase = Phase::Queued;
            s.msg = msg;
            s.buf = buf;
            s.buf_len = buf_len;
            s.policy = policy;
            s.waiting_since = Instant::now();
            s.waker = Some(waker.clone());
        }
        inner.queue.push_back(slot);
        drop(inner);
        self.wake.signal();
        Ok(())
    }

    /// Polls a submitted request; on completion frees the slot.
    pub(crate) fn poll(&self, slot: u32, cx: &mut Context<'_>) -> Poll<IoResult> {
        let result = {
            let mut s = self.slot(slot);
            if s.phase != Phase::Done {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let r = s.result;
            s.reset();
            r
        };
        self.release_unused(slot);
        Poll::Ready(result)
    }

    /// The future of a submitted request was dropped: take it back if no channel has it, or
    /// make sure the endpoint thread never touches the caller's buffer again.
    pub(crate) fn cancel(&self, slot: u32) {
        let mut inner = self.inner();
        let mut s = self.slot(slot);
        match s.phase {
            Phase::Queued => {
                inner.queue.retain(|&q| q != slot);
                s.reset();
                drop(s);
                self.release(&mut inner, slot);
                drop(inner);
                self.slot_freed.notify_all();
            }
            Phase::Channel => {
                // The endpoint thread may be part way through sending a WRITE: keep what it still
                // has to send, so the daemon sees the data the request had (a cold path).
                if s.msg.request_payload_bytes() > 0 && !s.buf.is_null() {
                    // SAFETY: the buffer is still borrowed by the dropping future, which is
                    // blocked here, and the endpoint thread cannot touch it while we hold the
                    // slot lock.
                    let data = unsafe { std::slice::from_raw_parts(s.buf, s.buf_len) };
                    s.detached = Some(data.to_vec());
                }
                s.buf = std::ptr::null_mut();
                s.buf_len = 0;
                s.abandoned = true;
                s.waker = None;
            }
            Phase::Done => {
                s.reset();
                drop(s);
                self.release(&mut inner, slot);
                drop(inner);
                self.slot_freed.notify_all();
            }
            Phase::Free => {}
        }
    }

    /// Stops handing out requests of `target` and gives back those still queued
    /// (`presuspend(noflush=true)`).
    pub(crate) fn suspend_target(&self, target: u64) {
        let mut wakers = Vec::new();
        {
            let mut inner = self.inner();
            if !inner.suspended.contains(&target) {
                inner.suspended.push(target);
            }
            let mut kept = VecDeque::with_capacity(inner.queue.capacity());
            while let Some(q) = inner.queue.pop_front() {
                let mut s = self.slot(q);
                if s.policy.target == target {
                    wakers.extend(s.finish(Err(IoError::Requeue)));
                } else {
                    kept.push_back(q);
                }
            }
            inner.queue = kept;
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Lets requests of `target` through again.
    pub(crate) fn resume_target(&self, target: u64) {
        self.inner().suspended.retain(|&t| t != target);
    }

    // ---- endpoint thread ----

    /// Whether requests are waiting for a channel.
    pub(crate) fn has_queued(&self) -> bool {
        !self.inner().queue.is_empty()
    }

    /// (queued, in flight on channels) for status.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let inner = self.inner();
        let queued = inner.queue.len();
        (inner.channels, queued, inner.in_flight - queued)
    }

    /// Takes the oldest queued request for a channel.
    pub(crate) fn dispatch_next(&self) -> Option<Dispatched> {
        let mut inner = self.inner();
        let slot = inner.queue.pop_front()?;
        let mut s = self.slot(slot);
        debug_assert_eq!(s.phase, Phase::Queued);
        s.phase = Phase::Channel;
        Some(Dispatched { slot, msg: s.msg })
    }

    /// Calls `f` with the WRITE payload of `slot` from `offset` on (the caller's buffer, or the
    /// detached copy of an abandoned request), under the slot lock.
    pub(crate) fn with_payload<R>(
        &self,
        slot: u32,
        offset: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> R {
        let s = self.slot(slot);
        if !s.buf.is_null() {
            let len = s.buf_len.saturating_sub(offset);
            // SAFETY: the request is in a channel and not abandoned, so the future that lent the
            // buffer is alive and waits at this lock before it could release it; the range is
            // inside the buffer.
            let data = unsafe { std::slice::from_raw_parts(s.buf.add(offset.min(s.buf_len)), len) };
            return f(data);
        }
        match &s.detached {
            Some(d) => f(d.get(offset..).unwrap_or(&[])),
            None => f(&[]),
        }
    }

    /// Calls `f` with the READ destination of `slot` from `offset` on, or `None` when the
    /// request was abandoned (the data is then read and dropped), under the slot lock.
    pub(crate) fn with_destination<R>(
        &self,
        slot: u32,
        offset: usize,
        f: impl FnOnce(Option<&mut [u8]>) -> R,
    ) -> R {
        let s = self.slot(slot);
        if s.buf.is_null() || offset >= s.buf_len {
            return f(None);
        }
        // SAFETY: as `with_payload`; the caller's future does not touch the buffer while the
        // request is pending, so this is the only access.
        let data = unsafe { std::slice::from_raw_parts_mut(s.buf.add(offset), s.buf_len - offset) };
        f(Some(data))
    }

    /// Finishes a request that a channel answered.
    pub(crate) fn complete(&self, slot: u32, result: IoResult) {
        let abandoned = {
            let mut s = self.slot(slot);
            if s.phase != Phase::Channel {
                return;
            }
            if s.abandoned {
                s.reset();
                true
            } else {
                if let Some(w) = s.finish(result) {
                    drop(s);
                    w.wake();
                }
                false
            }
        };
        if abandoned {
            self.release_unused(slot);
        }
    }

    /// A channel holding these requests closed: queue them again at the front (oldest first),
    /// or fail them, as their targets say. `slots` are in the order the channel received them.
    pub(crate) fn channel_closed(&self, slots: &[u32]) {
        let mut wakers = Vec::new();
        let mut freed = false;
        {
            let mut inner = self.inner();
            let now = Instant::now();
            for &slot in slots.iter().rev() {
                let mut s = self.slot(slot);
                if s.phase != Phase::Channel {
                    continue;
                }
                if s.abandoned {
                    s.reset();
                    drop(s);
                    self.release(&mut inner, slot);
                    freed = true;
                } else if inner.shutdown {
                    wakers.extend(s.finish(Err(Errno::EIO.into())));
                } else if inner.suspended.contains(&s.policy.target) {
                    wakers.extend(s.finish(Err(IoError::Requeue)));
                } else if s.policy.on_close == OnClose::Fail {
                    wakers.extend(s.finish(Err(Errno::EIO.into())));
                } else {
                    s.phase = Phase::Queued;
                    s.waiting_since = now;
                    drop(s);
                    inner.queue.push_front(slot);
                    self.stats.requeued.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if freed {
            self.slot_freed.notify_all();
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Counts a channel in or out.
    pub(crate) fn set_channels(&self, delta: isize) -> usize {
        let mut inner = self.inner();
        inner.channels = inner.channels.saturating_add_signed(delta);
        if inner.channels == 0 {
            inner.no_daemon_since = Instant::now();
        }
        inner.channels
    }

    /// With no daemon connected, fails queued requests whose target's timeout has passed;
    /// returns the next deadline, if any request has one.
    pub(crate) fn expire(&self, now: Instant) -> Option<Instant> {
        let mut wakers = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut inner = self.inner();
            if inner.channels > 0 || inner.queue.is_empty() {
                return None;
            }
            let since = inner.no_daemon_since;
            let mut i = 0;
            while i < inner.queue.len() {
                let slot = inner.queue[i];
                let mut s = self.slot(slot);
                let Some(timeout) = s.policy.timeout else {
                    i += 1;
                    continue;
                };
                let deadline = s.waiting_since.max(since) + timeout;
                if deadline <= now {
                    wakers.extend(s.finish(Err(Errno::EIO.into())));
                    drop(s);
                    inner.queue.remove(i);
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    i += 1;
                }
            }
        }
        if !wakers.is_empty() {
            eprintln!(
                "userdm: user {}: {} request(s) failed: no daemon connected within the timeout",
                self.ctl,
                wakers.len()
            );
        }
        wakers.into_iter().for_each(Waker::wake);
        next
    }

    /// The endpoint is going away: fail everything still queued, refuse new requests.
    pub(crate) fn shut_down(&self) {
        let mut wakers = Vec::new();
        {
            let mut inner = self.inner();
            inner.shutdown = true;
            while let Some(slot) = inner.queue.pop_front() {
                wakers.extend(self.slot(slot).finish(Err(Errno::EIO.into())));
            }
        }
        wakers.into_iter().for_each(Waker::wake);
        self.slot_freed.notify_all();
    }
}
