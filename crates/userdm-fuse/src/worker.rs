//! The data path: worker threads, each with its own reactor, `/dev/fuse` clone and a fixed set
//! of tasks that read a request, serve it and write the reply.

use std::cell::Cell;
use std::fs::File;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::Poll;

use userdm_device::BlockDevice;
use userdm_uring::Reactor;

use crate::export::Shared;
use crate::sync::{Group, ReaderToken};
use crate::{handler, sys};

/// Bytes before the data area: room for a request header in front of a write payload, a reply
/// header in front of read data, and the head of a read-modify-write. One page, so that the
/// data area, where write payloads land and reads are served from, is page aligned.
pub(crate) const SLACK_BYTES: usize = 4096;
/// `fuse_in_header` + `fuse_write_in`: where a WRITE's payload starts in a request.
pub(crate) const WRITE_HEADER_BYTES: usize = 80;
/// Bytes after `max_write` in the data area: the tail of a read-modify-write, the sectors an
/// unaligned read covers beyond its end, and the kernel's minimum read size for small
/// `max_write` values.
const TAIL_BYTES: usize = 4096;

/// One task's preallocated memory: every request it serves uses only this.
pub(crate) struct TaskBuf {
    mem: Box<[u8]>,
    /// Offset of the page-aligned data area in `mem`.
    data: usize,
    max_write: usize,
}

impl TaskBuf {
    pub(crate) fn new(max_write: usize) -> TaskBuf {
        let mem = vec![0u8; 4096 + SLACK_BYTES + max_write + TAIL_BYTES].into_boxed_slice();
        // Alignment only helps backends that do O_DIRECT IO from our buffer; if the allocator
        // cannot tell us an offset, run unaligned rather than fail.
        let align = match mem.as_ptr().align_offset(4096) {
            a if a < 4096 => a,
            _ => 0,
        };
        TaskBuf {
            mem,
            data: align + SLACK_BYTES,
            max_write,
        }
    }

    /// Where a request is read: placed so that a WRITE's payload starts the data area.
    pub(crate) fn request_range(&self) -> std::ops::Range<usize> {
        let start = self.data - WRITE_HEADER_BYTES;
        start..start + self.max_write + TAIL_BYTES
    }

    pub(crate) fn data_offset(&self) -> usize {
        self.data
    }

    pub(crate) fn max_write(&self) -> usize {
        self.max_write
    }

    pub(crate) fn mem_ref(&self) -> &[u8] {
        &self.mem
    }

    pub(crate) fn mem(&mut self) -> &mut [u8] {
        &mut self.mem
    }
}

/// What the tasks of one thread share.
pub(crate) struct ThreadCtx<'a, B: BlockDevice> {
    pub(crate) rt: &'a Reactor,
    pub(crate) fd: &'a File,
    pub(crate) shared: &'a Shared<B>,
    token: ReaderToken,
    /// Tasks serving a request right now; a stopping thread waits for zero.
    busy: Cell<usize>,
    stopping: Cell<bool>,
}

/// Runs one worker thread until the connection ends or the export stops. Reports startup
/// through `ready` so that `start` fails rather than returning a half-started export.
pub(crate) fn run_thread<B: BlockDevice>(
    shared: Arc<Shared<B>>,
    fd: File,
    ready: Sender<std::io::Result<()>>,
) {
    let depth = shared.config.queue_depth;
    // Each task has at most a read or poll, a device op and a reply in flight.
    let rt = match Reactor::new((depth * 4 + 8) as u32) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut bufs: Vec<TaskBuf> = (0..depth)
        .map(|_| TaskBuf::new(shared.config.max_write as usize))
        .collect();
    let _ = ready.send(Ok(()));
    let ctx = ThreadCtx {
        rt: &rt,
        fd: &fd,
        shared: &shared,
        token: ReaderToken::new(depth),
        busy: Cell::new(0),
        stopping: Cell::new(false),
    };
    let group = Group::new(bufs.iter_mut().map(|buf| serve(&ctx, buf)));
    rt.block_on(thread_main(&ctx, group));
}

async fn thread_main<B: BlockDevice, F: Future<Output = ()>>(
    ctx: &ThreadCtx<'_, B>,
    mut group: Group<F>,
) {
    let control = &ctx.shared.control;
    loop {
        let generation = control.notify.generation();
        if control.stop.load(Ordering::Acquire) {
            break;
        }
        let mut stop = pin!(control.notify.wait(generation));
        let tasks_done = poll_fn(|cx| {
            if group.poll_members(cx).is_ready() {
                return Poll::Ready(true);
            }
            stop.as_mut().poll(cx).map(|()| false)
        })
        .await;
        if tasks_done {
            // Every task saw the connection end (unmounted from outside, or aborted).
            return;
        }
    }
    // Stopping: requests being served finish and get their replies; no task reads another.
    // Returning drops the tasks, which cancels their pending reads of /dev/fuse.
    ctx.stopping.set(true);
    poll_fn(|cx| {
        if group.poll_members(cx).is_ready() || ctx.busy.get() == 0 {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}

/// One task: read a request, serve it, reply; until the connection ends or the export stops.
async fn serve<B: BlockDevice>(ctx: &ThreadCtx<'_, B>, buf: &mut TaskBuf) {
    loop {
        let len = {
            let _token = ctx.token.acquire().await;
            if ctx.stopping.get() {
                return;
            }
            match read_request(ctx, buf).await {
                Some(len) => len,
                None => return,
            }
        };
        ctx.busy.set(ctx.busy.get() + 1);
        handler::handle(ctx, buf, len).await;
        ctx.busy.set(ctx.busy.get() - 1);
        if ctx.stopping.get() {
            return;
        }
    }
}

/// Reads one request; `None` when the connection is gone.
///
/// The descriptor is non-blocking, and each read is linked behind a poll for readability
/// (`IOSQE_IO_LINK`): one submission that completes when a request is there, with no EAGAIN
/// round trip when the queue is empty and no extra wait when it is not (the poll completes at
/// once). A blocking descriptor would instead park an io-wq thread per read, or block this
/// thread inside `io_uring_enter` when another reader took the request first.
async fn read_request<B: BlockDevice>(ctx: &ThreadCtx<'_, B>, buf: &mut TaskBuf) -> Option<usize> {
    let range = buf.request_range();
    loop {
        let area = &mut buf.mem()[range.clone()];
        match sys::poll_then_read(ctx.rt, ctx.fd, area).await {
            Ok(len) => return Some(len),
            // Another reader took the request between the poll and our read; a signal; or a
            // request that was interrupted and vanished meanwhile: try again.
            Err(e) if matches!(e.get(), libc::EAGAIN | libc::EINTR | libc::ENOENT) => {}
            // ENODEV: unmounted or aborted. Anything else would repeat forever; stop this task
            // and let the others notice on their own reads.
            Err(_) => return None,
        }
    }
}

impl<B: BlockDevice> ThreadCtx<'_, B> {
    /// Writes a reply. The kernel takes it whole or not at all; ENOENT (the request was
    /// interrupted and is gone) and ENODEV (the connection ended) are expected and dropped.
    pub(crate) async fn send_reply(&self, bytes: &[u8]) {
        if self.rt.write_at(self.fd, bytes, 0).await.is_err() {
            self.shared
                .control
                .stats
                .reply_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
