//! std-only async: a reader thread per channel feeds futures; replies go out from any thread.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use crate::channel::{Channel, ChannelWriter, Request};
use crate::Status;

#[derive(Default)]
struct Inbox {
    requests: VecDeque<Request>,
    /// The reader thread has stopped: `Ok` at end of stream, or its error.
    ended: Option<io::Result<()>>,
    waker: Option<Waker>,
}

/// A channel whose requests arrive as futures. A thread reads requests as soon as they come (so
/// userdm hands this channel the next request while the daemon is still busy with earlier ones)
/// and queues them; [`AsyncChannel::next_request`] takes them in order. Reply through a
/// [`Responder`], from any thread or task, in any order.
pub struct AsyncChannel {
    inbox: Arc<Mutex<Inbox>>,
    responder: Responder,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Replies on an [`AsyncChannel`]. Cheap to clone; each reply is written whole under a lock,
/// so replies from several threads never interleave.
#[derive(Clone)]
pub struct Responder {
    writer: Arc<Mutex<ChannelWriter>>,
}

impl Responder {
    /// As [`Channel::reply`].
    pub fn reply(&self, seq: u64, status: Status, data: &[u8]) -> io::Result<()> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reply(seq, status, data)
    }
}

impl AsyncChannel {
    /// Connects to a control endpoint (or opens a control device) and starts its reader thread.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<AsyncChannel> {
        AsyncChannel::new(Channel::connect(path)?)
    }

    /// Wraps a channel, which must block (the default).
    pub fn new(mut channel: Channel) -> io::Result<AsyncChannel> {
        let writer = channel.try_clone_writer()?;
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let inbox2 = Arc::clone(&inbox);
        let reader = std::thread::Builder::new()
            .name("dmuser-reader".into())
            .spawn(move || loop {
                let next = channel.read_request();
                let mut inbox = inbox2.lock().unwrap_or_else(PoisonError::into_inner);
                let done = match next {
                    Ok(Some(req)) => {
                        inbox.requests.push_back(req);
                        false
                    }
                    Ok(None) => {
                        inbox.ended = Some(Ok(()));
                        true
                    }
                    Err(e) => {
                        inbox.ended = Some(Err(e));
                        true
                    }
                };
                if let Some(w) = inbox.waker.take() {
                    w.wake();
                }
                if done {
                    return;
                }
            })?;
        Ok(AsyncChannel {
            inbox,
            responder: Responder {
                writer: Arc::new(Mutex::new(writer)),
            },
            reader: Some(reader),
        })
    }

    /// The next request; resolves to `Ok(None)` when the target is gone.
    pub fn next_request(&self) -> NextRequest<'_> {
        NextRequest { channel: self }
    }

    /// A handle for replying.
    pub fn responder(&self) -> Responder {
        self.responder.clone()
    }
}

impl Drop for AsyncChannel {
    fn drop(&mut self) {
        // The reader thread ends with the stream; do not wait for it here (the target may live
        // on), just let it go.
        drop(self.reader.take());
    }
}

/// The future of [`AsyncChannel::next_request`].
pub struct NextRequest<'a> {
    channel: &'a AsyncChannel,
}

impl Future for NextRequest<'_> {
    type Output = io::Result<Option<Request>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inbox = self
            .channel
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(req) = inbox.requests.pop_front() {
            return Poll::Ready(Ok(Some(req)));
        }
        match &inbox.ended {
            Some(Ok(())) => return Poll::Ready(Ok(None)),
            Some(Err(e)) => return Poll::Ready(Err(io::Error::new(e.kind(), e.to_string()))),
            None => {}
        }
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

struct ThreadWaker {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        *self.woken.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_one();
    }
}

/// Runs a future to completion on the current thread: the smallest executor, for daemons that
/// bring none.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let tw = Arc::new(ThreadWaker {
        woken: Mutex::new(false),
        cv: Condvar::new(),
    });
    let waker = Waker::from(Arc::clone(&tw));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        let mut woken = tw.woken.lock().unwrap_or_else(PoisonError::into_inner);
        while !*woken {
            woken = tw.cv.wait(woken).unwrap_or_else(PoisonError::into_inner);
        }
        *woken = false;
    }
}
