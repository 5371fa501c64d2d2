//! The transmission phase: one thread per connection, driven by that thread's io_uring ring.
//!
//! Tasks of one connection, all on its [`Reactor`]:
//!
//! - the **reader** (the `block_on` future) receives each request header, validates it, takes a
//!   free tag, receives any payload into that tag's buffer, and hands the request to the tag;
//! - one **tag task** per tag (`ServerConfig::queue_depth`) executes its request against the
//!   [`Backend`] and sends the reply from its own buffer. Tags finish in any order, so replies go
//!   out of order, as the protocol allows.
//!
//! Replies leave through one **writer** task per connection: a tag frames its whole reply in its
//! own buffer (each tag buffer has room for a reply header in front of its data, so a header and
//! its data are contiguous), hands the buffer to the writer's queue in FIFO order
//! (`SendQueue` turns), and waits for it to come back. The writer sends everything queued
//! with one `sendmsg` (up to `SEND_BATCH_MAX` replies), so under load one syscall carries many
//! replies; replies never interleave mid-message and are never copied.
//!
//! Every buffer is allocated when the connection starts; serving a request allocates nothing.
//! A request larger than a tag buffer is served in buffer-sized pieces: one structured chunk
//! per piece, or, with simple replies, the header and then the data streamed piece by piece while
//! the tag holds the send queue (an error after the header is a hard disconnect, as the
//! specification requires). Writes larger than the buffer are received and written piece by piece
//! by the reader itself.
//!
//! Nothing the client sends can panic the server: every header goes through the codec's
//! validation and [`validate`]; a bad magic or an oversized payload ends the connection; every
//! other mistake gets the protocol's error reply.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use userdm_io::limits::IO_BYTES_MAX;
use userdm_io::{Errno, IoFlags, IoHeader, IoOp, SECTOR_SHIFT};
use userdm_uring::Reactor;

use crate::backend::{errno_to_nbd, Backend, Extent};
use crate::handshake::Negotiated;
use crate::proto::{
    block_status_chunk, block_status_prefix_bytes, descriptor_bytes, encode_block_status_prefix,
    encode_descriptor, encode_error_payload, encode_offset_hole, AllocationFlags, ChunkHeader,
    ChunkType, CommandFlags, CommandType, HeaderStyle, NbdError, ProtoError, ReplyFlags, Request,
    SimpleReply, TransmissionFlags, HEADER_BYTES_MAX, OFFSET_DATA_PREFIX_BYTES,
};
use crate::stream::Stream;

/// Tuning of the transmission phase.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Requests one connection serves at once (tags), each with its own buffer.
    pub queue_depth: u16,
    /// Size of each tag's buffer: the largest piece of a READ or WRITE handled in one go. At
    /// least 64 KiB, because a DF read of up to 64 KiB must fit in one chunk.
    pub buffer_bytes: usize,
    /// Submission queue entries of each connection's ring.
    pub ring_entries: u32,
    /// Handshake limits.
    pub handshake: crate::handshake::HandshakeConfig,
    /// How long one blocking read or write of the handshake may take before the connection is
    /// dropped, so a silent client cannot hold a thread forever.
    pub handshake_timeout: Option<std::time::Duration>,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub connections_max: usize,
    /// The send buffer asked for on each Unix-socket connection (`SO_SNDBUFFORCE`, or
    /// `SO_SNDBUF` up to `net.core.wmem_max` without CAP_NET_ADMIN); `None` keeps the
    /// system's. TCP keeps the kernel's autotuning, which a fixed size would turn off.
    pub unix_send_buffer_bytes: Option<usize>,
    /// Run each connection's thread under `SCHED_BATCH` (see
    /// [`userdm_uring::thread::set_batch_scheduling`]), so that a local client's requests do not
    /// preempt the client while it sends its batch. Measured with fio's nbd engine over a Unix
    /// socket on the 2-vCPU machine, 4 alternating runs each: 128k sequential reads at QD32
    /// 25.2k -> 27.8k IOPS (nbdkit 22.5k), 4k random reads at QD32 about the same.
    pub batch_scheduling: bool,
}

/// The default of [`ServerConfig::unix_send_buffer_bytes`]: 4 MiB.
///
/// Why: the default (208 KiB) holds fewer than two 128 KiB replies, so the thread sending a
/// batch of READ replies sleeps until the client has read most of them, and the connection's
/// pipeline stalls behind the client. With 4 MiB a batch leaves in one go. Measured with
/// `bench/nbd/run.sh`'s 128k sequential reads on the 2-vCPU machine: 1 connection 23-24k ->
/// 29-32k IOPS, 4 connections 25-29k -> 31-33k (nbdkit: 26-28k).
pub const UNIX_SEND_BUFFER_BYTES: usize = 4 << 20;

/// Asks for a send buffer of `bytes` on `stream`; failure keeps the old size, which works.
fn grow_send_buffer(stream: &std::os::unix::net::UnixStream, bytes: usize) {
    if rustix::net::sockopt::set_socket_send_buffer_size_force(stream, bytes).is_err() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(stream, bytes);
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            queue_depth: 64,
            buffer_bytes: 256 << 10,
            ring_entries: 256,
            handshake: crate::handshake::HandshakeConfig::default(),
            handshake_timeout: Some(std::time::Duration::from_secs(30)),
            connections_max: 256,
            unix_send_buffer_bytes: Some(UNIX_SEND_BUFFER_BYTES),
            batch_scheduling: true,
        }
    }
}

/// The smallest tag buffer: the specification requires DF reads of up to 64 KiB to work.
pub const BUFFER_BYTES_MIN: usize = 64 << 10;
/// Room in front of every buffer's data for reply headers (and whole small replies).
const PREFIX_BYTES: usize = 4096;
/// Data alignment in tag buffers, so backends can use O_DIRECT.
const BUFFER_ALIGN: usize = 4096;
/// Payloads up to this size are never treated as a denial of service (the specification's
/// 32 MiB), even if larger than the advertised maximum: they are drained and refused instead.
const PAYLOAD_DOS_BYTES: u64 = 32 << 20;
/// Descriptors in one block status reply, at most (the specification's recommended cap).
const DESCRIPTORS_MAX: usize = 1 << 20;

/// Why a connection ended other than by the client's DISC or disconnect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration cannot work.
    #[error("invalid server configuration: {0}")]
    Config(&'static str),
    /// The connection's ring could not be made.
    #[error("cannot create the connection's io_uring ring")]
    CreateReactor(#[source] io::Error),
    /// The client broke the framing (a bad request magic); the server hard-disconnected.
    #[error("protocol violation")]
    Protocol(#[source] ProtoError),
    /// The client announced a payload too large to accept or skip.
    #[error("payload of {0} bytes is too large")]
    PayloadTooLarge(u64),
    /// Sending failed, or a simple-reply READ failed after its header was sent; the server
    /// hard-disconnected.
    #[error("connection dropped")]
    Dropped,
}

/// How replies are framed on this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// What the validation of a request needs to know about the connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) style: HeaderStyle,
    pub(crate) structured: bool,
    pub(crate) flags: TransmissionFlags,
    pub(crate) size_bytes: u64,
    pub(crate) min_block: u64,
    pub(crate) max_payload: u64,
    pub(crate) buffer_bytes: u64,
    pub(crate) meta_contexts: bool,
    pub(crate) fast_zero: bool,
}

/// An error reply decided before or instead of touching data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub(crate) error: NbdError,
    pub(crate) message: &'static str,
}

const fn reject(error: NbdError, message: &'static str) -> Reject {
    Reject { error, message }
}

/// Checks one request against the negotiated state; `Ok` means the backend may see it.
///
/// The order follows the specification's preferences: unknown commands and flags are EINVAL;
/// writes to a read-only export are EPERM; out-of-range writes ENOSPC, other out-of-range
/// requests EINVAL; misaligned requests EINVAL; oversized READs EINVAL (simple replies) or
/// EOVERFLOW (structured), oversized WRITEs EINVAL.
pub(crate) fn validate(req: &Request, l: &Limits) -> Result<(), Reject> {
    use CommandType as C;
    let flags = req.flags;
    let mut allowed = CommandFlags::empty();
    if l.flags.contains(TransmissionFlags::SEND_FUA) {
        // Valid on every command once negotiated; "MUST accept ... (even by ignoring the bit)".
        allowed |= CommandFlags::FUA;
    }
    let writes = matches!(req.command, C::WRITE | C::TRIM | C::WRITE_ZEROES);
    match req.command {
        C::READ if l.flags.contains(TransmissionFlags::SEND_DF) => allowed |= CommandFlags::DF,
        C::WRITE if l.style == HeaderStyle::Extended => allowed |= CommandFlags::PAYLOAD_LEN,
        C::WRITE_ZEROES => {
            allowed |= CommandFlags::NO_HOLE;
            if l.flags.contains(TransmissionFlags::SEND_FAST_ZERO) {
                allowed |= CommandFlags::FAST_ZERO;
            }
        }
        C::BLOCK_STATUS => allowed |= CommandFlags::REQ_ONE,
        C::READ | C::WRITE | C::FLUSH | C::TRIM | C::CACHE => {}
        _ => return Err(reject(NbdError::EINVAL, "unknown command")),
    }
    if flags.without(allowed).bits() != 0 {
        return Err(reject(
            NbdError::EINVAL,
            "command flag not valid for this command",
        ));
    }
    if writes && l.flags.contains(TransmissionFlags::READ_ONLY) {
        return Err(reject(NbdError::EPERM, "export is read-only"));
    }
    let needed = match req.command {
        C::FLUSH => Some(TransmissionFlags::SEND_FLUSH),
        C::TRIM => Some(TransmissionFlags::SEND_TRIM),
        C::WRITE_ZEROES => Some(TransmissionFlags::SEND_WRITE_ZEROES),
        _ => None,
    };
    if needed.is_some_and(|f| !l.flags.contains(f)) {
        return Err(reject(NbdError::EINVAL, "command not negotiated"));
    }
    if req.command == C::FLUSH {
        return Ok(());
    }
    if req.command == C::BLOCK_STATUS && !(l.meta_contexts && l.structured) {
        return Err(reject(NbdError::EINVAL, "no metadata context negotiated"));
    }
    let in_range = req
        .offset
        .checked_add(req.length)
        .is_some_and(|end| end <= l.size_bytes);
    if !in_range {
        let error = if matches!(req.command, C::WRITE | C::WRITE_ZEROES) {
            NbdError::ENOSPC
        } else {
            NbdError::EINVAL
        };
        return Err(reject(error, "request beyond the end of the export"));
    }
    if req.offset % l.min_block != 0 || req.length % l.min_block != 0 {
        return Err(reject(
            NbdError::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    match req.command {
        C::READ if req.length > l.max_payload => Err(if l.structured {
            reject(NbdError::EOVERFLOW, "read larger than the maximum payload")
        } else {
            reject(NbdError::EINVAL, "read larger than the maximum payload")
        }),
        C::READ if flags.contains(CommandFlags::DF) && req.length > l.buffer_bytes => Err(reject(
            NbdError::EOVERFLOW,
            "read too large to send unfragmented",
        )),
        C::WRITE if req.length > l.max_payload => Err(reject(
            NbdError::EINVAL,
            "write larger than the maximum payload",
        )),
        C::WRITE_ZEROES if flags.contains(CommandFlags::FAST_ZERO) && !l.fast_zero => Err(reject(
            NbdError::ENOTSUP,
            "zeroing is not faster than writing",
        )),
        C::BLOCK_STATUS if req.length == 0 => {
            Err(reject(NbdError::EINVAL, "block status of an empty range"))
        }
        _ => Ok(()),
    }
}

/// Replies one `sendmsg` carries at most.
const SEND_BATCH_MAX: usize = 64;
/// From this many bytes on, a batch is sent by a kernel worker (`IOSQE_ASYNC`): copying it into
/// the socket then runs on another CPU while this connection's thread serves the next requests.
/// With 128 KiB reads over four connections this doubled throughput on a 2-vCPU machine; below
/// it the hand-off costs more than the copy.
const SEND_OFFLOAD_BYTES: usize = 64 << 10;

/// A tag's buffer: `PREFIX_BYTES` of header room, then `capacity` bytes of aligned data.
struct TagBuf {
    storage: Box<[u8]>,
    data_start: usize,
    capacity: usize,
    /// The tag that owns it, where the writer returns it.
    tag: usize,
}

impl TagBuf {
    /// A placeholder left in a tag while its buffer is with the writer (allocates nothing).
    fn placeholder(tag: usize) -> TagBuf {
        TagBuf {
            storage: Box::default(),
            data_start: 0,
            capacity: 0,
            tag,
        }
    }

    fn new(capacity: usize) -> TagBuf {
        let storage = vec![0u8; PREFIX_BYTES + capacity + BUFFER_ALIGN].into_boxed_slice();
        // The first aligned address at least PREFIX_BYTES in; `align_offset` is always below
        // BUFFER_ALIGN for a byte pointer, so the data fits in the slack allocated above.
        let skew = storage[PREFIX_BYTES..].as_ptr().align_offset(BUFFER_ALIGN);
        let data_start = PREFIX_BYTES + skew.min(BUFFER_ALIGN - 1);
        TagBuf {
            storage,
            data_start,
            capacity,
            tag: 0,
        }
    }

    fn data(&mut self, len: usize) -> &mut [u8] {
        let start = self.data_start;
        &mut self.storage[start..start + len.min(self.capacity)]
    }

    /// Writes `parts` back to back so they end where the data starts, and returns where they
    /// and the first `data_len` data bytes lie, as one contiguous message.
    fn frame(&mut self, parts: &[&[u8]], data_len: usize) -> std::ops::Range<usize> {
        let prefix: usize = parts.iter().map(|p| p.len()).sum();
        let prefix = prefix.min(PREFIX_BYTES);
        let mut at = self.data_start - prefix;
        let start = at;
        for part in parts {
            let n = part.len().min(self.data_start - at);
            self.storage[at..at + n].copy_from_slice(&part[..n]);
            at += n;
        }
        start..self.data_start + data_len.min(self.capacity)
    }
}

/// A reply handed to the writer: the buffer and where the message lies in it.
struct Outgoing {
    buf: TagBuf,
    range: std::ops::Range<usize>,
}

/// A fair FIFO lock over the socket's sending side: the per-connection send queue.
struct SendQueue {
    next_ticket: Cell<u64>,
    serving: Cell<u64>,
    waiters: RefCell<VecDeque<(u64, Waker)>>,
}

impl SendQueue {
    fn new(capacity: usize) -> SendQueue {
        SendQueue {
            next_ticket: Cell::new(0),
            serving: Cell::new(0),
            waiters: RefCell::new(VecDeque::with_capacity(capacity)),
        }
    }

    /// Waits for this caller's turn to send.
    async fn turn(&self) -> SendTurn<'_> {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        poll_fn(|cx| {
            if self.serving.get() == ticket {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            match waiters.iter_mut().find(|(t, _)| *t == ticket) {
                Some((_, w)) => w.clone_from(cx.waker()),
                None => waiters.push_back((ticket, cx.waker().clone())),
            }
            Poll::Pending
        })
        .await;
        SendTurn { queue: self }
    }
}

/// The right to send, until dropped.
struct SendTurn<'a> {
    queue: &'a SendQueue,
}

impl Drop for SendTurn<'_> {
    fn drop(&mut self) {
        let next = self.queue.serving.get() + 1;
        self.queue.serving.set(next);
        let mut waiters = self.queue.waiters.borrow_mut();
        if let Some(i) = waiters.iter().position(|(t, _)| *t == next) {
            if let Some((_, w)) = waiters.remove(i) {
                w.wake();
            }
        }
    }
}

/// Size of the reader's read-ahead buffer: room for many pipelined request headers.
const RECV_BUFFER_BYTES: usize = 64 << 10;

/// Bytes received but not yet consumed: `buf[start..end]`.
struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// How much one refill may read: all of `buf`, or just one request header while the
    /// client sends large WRITEs, whose payloads are then received straight into tag buffers
    /// instead of being copied out of the read-ahead.
    fill_max: usize,
}

/// What a tag must do with a request.
enum Action {
    Execute,
    Reply(Result<(), Reject>),
}

struct Job {
    req: Request,
    buf: TagBuf,
    action: Action,
}

struct Tag {
    job: Cell<Option<Job>>,
    waker: Cell<Option<Waker>>,
    /// The buffer, back from the writer once its reply is sent.
    returned: Cell<Option<TagBuf>>,
    return_waker: Cell<Option<Waker>>,
}

/// One connection's state, shared by its tasks.
struct Conn<B> {
    rt: Reactor,
    backend: Arc<B>,
    stream: Stream,
    fd: RawFd,
    mode: ReplyMode,
    limits: Limits,
    meta_id: u32,
    cache: bool,
    /// READ asks the backend for holes (cheap allocation answers).
    sparse_reads: bool,
    tags: Box<[Tag]>,
    free: RefCell<Vec<(usize, TagBuf)>>,
    reader_waker: Cell<Option<Waker>>,
    send: SendQueue,
    /// Replies waiting for the writer, in the order they must leave.
    outgoing: RefCell<VecDeque<Outgoing>>,
    writer_waker: Cell<Option<Waker>>,
    live_tags: Cell<usize>,
    closing: Cell<bool>,
    dead: Cell<bool>,
}

/// Serves the transmission phase of one negotiated connection on the calling thread, until the
/// client disconnects or breaks the protocol. In-flight requests always finish first.
pub fn serve_connection<B: Backend>(
    stream: Stream,
    negotiated: Negotiated<Arc<B>>,
    config: &ServerConfig,
) -> Result<(), ServeError> {
    let bs = negotiated.info.block_sizes;
    if config.buffer_bytes < BUFFER_BYTES_MIN || config.queue_depth == 0 {
        return Err(ServeError::Config(
            "buffer_bytes below 64 KiB or queue_depth zero",
        ));
    }
    if !bs.is_valid() {
        return Err(ServeError::Config("invalid block sizes"));
    }
    if let (Stream::Unix(unix), Some(bytes)) = (&stream, config.unix_send_buffer_bytes) {
        grow_send_buffer(unix, bytes);
    }
    if config.batch_scheduling {
        // Not fatal: the connection only loses an optimisation.
        let _ = userdm_uring::thread::set_batch_scheduling();
    }
    let rt = Reactor::new(config.ring_entries).map_err(ServeError::CreateReactor)?;
    let depth = usize::from(config.queue_depth);
    let capacity = config.buffer_bytes - config.buffer_bytes % bs.min as usize;
    let style = if negotiated.extended {
        HeaderStyle::Extended
    } else {
        HeaderStyle::Compact
    };
    let mode = match (negotiated.extended, negotiated.structured) {
        (true, _) => ReplyMode::Extended,
        (false, true) => ReplyMode::Structured,
        (false, false) => ReplyMode::Simple,
    };
    let props = negotiated.export.properties();
    let conn = Rc::new(Conn {
        rt,
        fd: stream.as_raw_fd(),
        stream,
        mode,
        limits: Limits {
            style,
            structured: mode != ReplyMode::Simple,
            flags: negotiated.flags,
            size_bytes: negotiated.info.size_bytes,
            min_block: u64::from(bs.min),
            max_payload: u64::from(bs.max),
            buffer_bytes: capacity as u64,
            meta_contexts: negotiated.meta_contexts.any(),
            fast_zero: props.fast_zero,
        },
        meta_id: negotiated.meta_contexts.base_allocation.unwrap_or(0),
        cache: negotiated.flags.contains(TransmissionFlags::SEND_CACHE),
        sparse_reads: props.sparse_reads,
        backend: negotiated.export,
        tags: (0..depth)
            .map(|_| Tag {
                job: Cell::new(None),
                waker: Cell::new(None),
                returned: Cell::new(None),
                return_waker: Cell::new(None),
            })
            .collect(),
        free: RefCell::new(
            (0..depth)
                .rev()
                .map(|i| {
                    let mut buf = TagBuf::new(capacity);
                    buf.tag = i;
                    (i, buf)
                })
                .collect(),
        ),
        reader_waker: Cell::new(None),
        send: SendQueue::new(depth + 1),
        outgoing: RefCell::new(VecDeque::with_capacity(depth + 1)),
        writer_waker: Cell::new(None),
        // The tags and the writer.
        live_tags: Cell::new(depth + 1),
        closing: Cell::new(false),
        dead: Cell::new(false),
    });
    conn.backend.open();
    conn.rt.spawn(writer_task(conn.clone()));
    for index in 0..depth {
        conn.rt.spawn(tag_task(conn.clone(), index));
    }
    let result = conn.rt.block_on(conn.run());
    conn.backend.close();
    conn.stream.shutdown(Shutdown::Both);
    // Every tag task has finished (`run` waits for them), so this is the last reference and the
    // reactor, its ring and the buffers are freed here.
    drop(conn);
    result
}

async fn tag_task<B: Backend>(conn: Rc<Conn<B>>, index: usize) {
    while let Some(Job {
        req,
        mut buf,
        action,
    }) = conn.next_job(index).await
    {
        match action {
            Action::Execute => conn.execute(&req, &mut buf).await,
            Action::Reply(result) => conn.reply_status(&req, &mut buf, result).await,
        }
        conn.free.borrow_mut().push((index, buf));
        conn.wake_reader();
    }
    conn.live_tags.set(conn.live_tags.get() - 1);
    conn.wake_reader();
    conn.wake_writer();
}

/// Sends queued replies, many per `sendmsg`, and gives each buffer back to its tag. Ends when the
/// connection is closing and every tag has finished.
async fn writer_task<B: Backend>(conn: Rc<Conn<B>>) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(SEND_BATCH_MAX);
    loop {
        let more = poll_fn(|cx| {
            if !conn.outgoing.borrow().is_empty() {
                return Poll::Ready(true);
            }
            // Only the writer itself is left.
            if conn.closing.get() && conn.live_tags.get() == 1 {
                return Poll::Ready(false);
            }
            conn.writer_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if !more {
            break;
        }
        {
            let mut queue = conn.outgoing.borrow_mut();
            let n = queue.len().min(SEND_BATCH_MAX);
            batch.extend(queue.drain(..n));
        }
        if !conn.dead.get() {
            let mut iov = [std::io::IoSlice::new(&[]); SEND_BATCH_MAX];
            for (slot, out) in iov.iter_mut().zip(batch.iter()) {
                *slot = std::io::IoSlice::new(&out.buf.storage[out.range.clone()]);
            }
            let bytes: usize = batch.iter().map(|out| out.range.len()).sum();
            let offload = bytes >= SEND_OFFLOAD_BYTES;
            let sent = conn
                .rt
                .send_all_vectored(conn.fd, &mut iov[..batch.len()], false, offload)
                .await;
            if sent.is_err() {
                conn.kill();
            }
        }
        for out in batch.drain(..) {
            let tag = &conn.tags[out.buf.tag];
            tag.returned.set(Some(out.buf));
            if let Some(w) = tag.return_waker.take() {
                w.wake();
            }
        }
    }
    conn.live_tags.set(conn.live_tags.get() - 1);
    conn.wake_reader();
}

impl<B: Backend> Conn<B> {
    async fn run(&self) -> Result<(), ServeError> {
        let result = self.read_requests().await;
        if result.is_err() {
            self.kill();
        }
        // Let in-flight requests finish (a DISC requires it), then stop the idle tags.
        self.closing.set(true);
        for tag in self.tags.iter() {
            if let Some(w) = tag.waker.take() {
                w.wake();
            }
        }
        self.wake_writer();
        poll_fn(|cx| {
            if self.live_tags.get() == 0 {
                Poll::Ready(())
            } else {
                self.reader_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        if self.dead.get() && result.is_ok() {
            return Err(ServeError::Dropped);
        }
        result
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader_waker.take() {
            w.wake();
        }
    }

    /// Hard disconnect: later sends fail at once and the reader's recv returns.
    #[cold]
    fn kill(&self) {
        self.dead.set(true);
        self.stream.shutdown(Shutdown::Both);
    }

    async fn next_job(&self, index: usize) -> Option<Job> {
        let tag = &self.tags[index];
        poll_fn(|cx| {
            if let Some(job) = tag.job.take() {
                return Poll::Ready(Some(job));
            }
            if self.closing.get() {
                return Poll::Ready(None);
            }
            tag.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    async fn free_tag(&self) -> (usize, TagBuf) {
        poll_fn(|cx| match self.free.borrow_mut().pop() {
            Some(tag) => Poll::Ready(tag),
            None => {
                self.reader_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// The reader: returns `Ok` when the client sends DISC or goes away.
    async fn read_requests(&self) -> Result<(), ServeError> {
        let style = self.limits.style;
        let mut header = [0u8; HEADER_BYTES_MAX];
        // Read ahead: one recv usually brings several pipelined requests, so headers cost a
        // copy instead of an io_uring round trip each. Allocated once, when the connection starts.
        let mut rb = RecvBuf {
            buf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            fill_max: RECV_BUFFER_BYTES,
        };
        let header = &mut header[..style.request_bytes()];
        // Payloads up to the larger of the advertised maximum and 32 MiB are received (or
        // drained); anything larger could only be a denial of service.
        let payload_limit = self.limits.max_payload.max(PAYLOAD_DOS_BYTES);
        while !self.dead.get() {
            if !self.recv_into(&mut rb, header).await {
                return Ok(());
            }
            let req = Request::decode(style, header).map_err(ServeError::Protocol)?;
            if req.command == CommandType::DISC {
                return Ok(());
            }
            let payload = req.payload_bytes(style);
            if payload > payload_limit {
                return Err(ServeError::PayloadTooLarge(payload));
            }
            rb.fill_max = if payload >= (RECV_BUFFER_BYTES / 2) as u64 {
                style.request_bytes()
            } else {
                RECV_BUFFER_BYTES
            };
            let (index, mut buf) = self.free_tag().await;
            let mut action = match validate(&req, &self.limits) {
                Ok(()) => Action::Execute,
                Err(r) => Action::Reply(Err(r)),
            };
            if payload > 0 {
                let received = match action {
                    Action::Execute if payload <= buf.capacity as u64 => {
                        let len = buf.capacity.min(payload as usize);
                        self.recv_into(&mut rb, buf.data(len)).await
                    }
                    Action::Execute => match self.write_streamed(&mut rb, &req, &mut buf).await {
                        Some(result) => {
                            action = Action::Reply(result);
                            true
                        }
                        None => false,
                    },
                    Action::Reply(_) => self.drain(&mut rb, payload, &mut buf).await,
                };
                if !received {
                    return Ok(());
                }
            }
            self.tags[index].job.set(Some(Job { req, buf, action }));
            if let Some(w) = self.tags[index].waker.take() {
                w.wake();
            }
        }
        Ok(())
    }

    /// Fills `dst` from the read-ahead buffer, then from the socket; false if the client went
    /// away. Large remainders are received straight into `dst`, so payloads are not copied twice.
    async fn recv_into(&self, rb: &mut RecvBuf, dst: &mut [u8]) -> bool {
        let buffered = (rb.end - rb.start).min(dst.len());
        dst[..buffered].copy_from_slice(&rb.buf[rb.start..rb.start + buffered]);
        rb.start += buffered;
        let mut done = buffered;
        if done == dst.len() {
            return true;
        }
        // The read-ahead buffer is empty now.
        rb.start = 0;
        rb.end = 0;
        if dst.len() - done >= rb.buf.len() / 2 {
            return self.rt.recv_exact(self.fd, &mut dst[done..]).await.is_ok();
        }
        while done < dst.len() {
            let fill = rb.fill_max.clamp(1, rb.buf.len());
            match self.rt.recv(self.fd, &mut rb.buf[..fill]).await {
                Ok(0) | Err(_) => return false,
                Ok(got) => {
                    let n = got.min(dst.len() - done);
                    dst[done..done + n].copy_from_slice(&rb.buf[..n]);
                    done += n;
                    rb.start = n;
                    rb.end = got;
                }
            }
        }
        true
    }

    /// Receives and discards `len` payload bytes; false if the connection failed.
    async fn drain(&self, rb: &mut RecvBuf, mut len: u64, buf: &mut TagBuf) -> bool {
        while len > 0 {
            let n = buf.capacity.min(usize::try_from(len).unwrap_or(usize::MAX));
            if !self.recv_into(rb, buf.data(n)).await {
                return false;
            }
            len -= n as u64;
        }
        true
    }

    /// A WRITE larger than a tag buffer: received and written piece by piece. Returns the
    /// request's result, or `None` if the connection failed. After a failed piece the rest of
    /// the payload is still received, so the stream stays in step.
    async fn write_streamed(
        &self,
        rb: &mut RecvBuf,
        req: &Request,
        buf: &mut TagBuf,
    ) -> Option<Result<(), Reject>> {
        let piece = buf.capacity.min(IO_BYTES_MAX as usize);
        let mut result = Ok(());
        let mut at = 0u64;
        while at < req.length {
            let n = piece.min(usize::try_from(req.length - at).unwrap_or(usize::MAX));
            if !self.recv_into(rb, buf.data(n)).await {
                return None;
            }
            if result.is_ok() {
                let io = io_header(IoOp::Write, io_flags(req), req.offset + at, n as u64);
                result = self
                    .backend
                    .io(&self.rt, io, buf.data(n))
                    .await
                    .map_err(backend_reject);
            }
            at += n as u64;
        }
        Some(result)
    }

    async fn execute(&self, req: &Request, buf: &mut TagBuf) {
        let result = match req.command {
            CommandType::READ => return self.read(req, buf).await,
            CommandType::BLOCK_STATUS => return self.block_status(req, buf).await,
            CommandType::WRITE => {
                let len = buf.capacity.min(req.length as usize);
                let io = io_header(IoOp::Write, io_flags(req), req.offset, req.length);
                self.backend
                    .io(&self.rt, io, buf.data(len))
                    .await
                    .map_err(backend_reject)
            }
            CommandType::FLUSH => {
                let io = io_header(IoOp::Flush, IoFlags::empty(), 0, 0);
                self.backend
                    .io(&self.rt, io, &mut [])
                    .await
                    .map_err(backend_reject)
            }
            CommandType::TRIM => self.ranged(IoOp::Discard, req, io_flags(req)).await,
            CommandType::WRITE_ZEROES => {
                let mut flags = io_flags(req);
                if req.flags.contains(CommandFlags::NO_HOLE) {
                    flags |= IoFlags::NOUNMAP;
                }
                self.ranged(IoOp::WriteZeroes, req, flags).await
            }
            CommandType::CACHE => self.cache(req, buf).await,
            // `validate` admits no other command.
            _ => Err(reject(NbdError::EINVAL, "unknown command")),
        };
        self.reply_status(req, buf, result).await
    }

    /// TRIM and WRITE_ZEROES, split at the engine's largest request.
    async fn ranged(&self, op: IoOp, req: &Request, flags: IoFlags) -> Result<(), Reject> {
        let mut at = 0;
        while at < req.length {
            let n = (req.length - at).min(IO_BYTES_MAX);
            let io = io_header(op, flags, req.offset + at, n);
            self.backend
                .io(&self.rt, io, &mut [])
                .await
                .map_err(backend_reject)?;
            at += n;
        }
        Ok(())
    }

    /// CACHE reads the range (warming whatever cache the backend has) when advertised; a client
    /// that sends it anyway gets a success, since the command never changes semantics.
    async fn cache(&self, req: &Request, buf: &mut TagBuf) -> Result<(), Reject> {
        if !self.cache {
            return Ok(());
        }
        let piece = buf.capacity.min(IO_BYTES_MAX as usize) as u64;
        let mut at = 0;
        while at < req.length {
            let n = (req.length - at).min(piece);
            let io = io_header(IoOp::Read, IoFlags::empty(), req.offset + at, n);
            self.backend
                .io(&self.rt, io, buf.data(n as usize))
                .await
                .map_err(backend_reject)?;
            at += n;
        }
        Ok(())
    }

    /// Frames `parts` and `data_len` data bytes as one message and sends it, in turn; returns
    /// once `buf` is back (the message has left, or the connection is dead).
    async fn send_framed(&self, buf: &mut TagBuf, parts: &[&[u8]], data_len: usize) {
        let range = buf.frame(parts, data_len);
        let turn = self.send.turn().await;
        self.queue(buf, range);
        drop(turn);
        self.take_back(buf).await;
    }

    /// Sends while the caller holds the turn; false if the connection is dead.
    async fn send_held(&self, buf: &mut TagBuf, parts: &[&[u8]], data_len: usize) -> bool {
        let range = buf.frame(parts, data_len);
        self.queue(buf, range);
        self.take_back(buf).await;
        !self.dead.get()
    }

    /// Hands `buf` to the writer.
    fn queue(&self, buf: &mut TagBuf, range: std::ops::Range<usize>) {
        let owned = std::mem::replace(buf, TagBuf::placeholder(buf.tag));
        self.outgoing
            .borrow_mut()
            .push_back(Outgoing { buf: owned, range });
        self.wake_writer();
    }

    /// Waits for the writer to give `buf` back.
    async fn take_back(&self, buf: &mut TagBuf) {
        let tag = &self.tags[buf.tag];
        *buf = poll_fn(|cx| match tag.returned.take() {
            Some(b) => Poll::Ready(b),
            None => {
                tag.return_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }

    fn chunk_header(
        &self,
        req: &Request,
        flags: ReplyFlags,
        kind: ChunkType,
        len: u64,
    ) -> ([u8; 32], usize) {
        let header = ChunkHeader {
            flags,
            kind,
            cookie: req.cookie,
            offset: req.offset,
            length: len,
        };
        let mut out = [0u8; 32];
        // The header buffer is as large as the largest header, and compact lengths are bounded
        // by the buffer size, so encoding cannot fail; a zero length would send nothing.
        let n = header.encode(self.limits.style, &mut out).unwrap_or(0);
        (out, n)
    }

    /// Replies with a status and no data.
    async fn reply_status(&self, req: &Request, buf: &mut TagBuf, result: Result<(), Reject>) {
        match (self.mode, result) {
            (ReplyMode::Simple, r) => {
                let error = r.err().map_or(0, |r| r.error.0);
                let reply = SimpleReply {
                    error,
                    cookie: req.cookie,
                }
                .encode();
                self.send_framed(buf, &[&reply], 0).await;
            }
            // Structured replies allow a simple reply without payload, except for READ.
            (ReplyMode::Structured, Ok(())) if req.command != CommandType::READ => {
                let reply = SimpleReply {
                    error: 0,
                    cookie: req.cookie,
                }
                .encode();
                self.send_framed(buf, &[&reply], 0).await;
            }
            (_, Ok(())) => {
                let (h, n) = self.chunk_header(req, ReplyFlags::DONE, ChunkType::NONE, 0);
                self.send_framed(buf, &[&h[..n]], 0).await;
            }
            (_, Err(r)) => self.send_error(req, buf, r, None).await,
        }
    }

    /// An ERROR (or, with an offset, ERROR_OFFSET) chunk that ends the reply.
    async fn send_error(&self, req: &Request, buf: &mut TagBuf, r: Reject, offset: Option<u64>) {
        let mut payload = [0u8; 256];
        let mut n = encode_error_payload(r.error.0, r.message, &mut payload).unwrap_or(0);
        let kind = match offset {
            Some(offset) => {
                payload[n..n + 8].copy_from_slice(&offset.to_be_bytes());
                n += 8;
                ChunkType::ERROR_OFFSET
            }
            None => ChunkType::ERROR,
        };
        let (h, hn) = self.chunk_header(req, ReplyFlags::DONE, kind, n as u64);
        self.send_framed(buf, &[&h[..hn], &payload[..n]], 0).await;
    }

    async fn read(&self, req: &Request, buf: &mut TagBuf) {
        if req.length == 0 {
            return self.reply_status(req, buf, Ok(())).await;
        }
        match self.mode {
            ReplyMode::Simple => self.read_simple(req, buf).await,
            _ => self.read_structured(req, buf).await,
        }
    }

    async fn read_simple(&self, req: &Request, buf: &mut TagBuf) {
        let piece = buf.capacity.min(IO_BYTES_MAX as usize) as u64;
        let header = SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode();
        if req.length <= piece {
            let io = io_header(IoOp::Read, IoFlags::empty(), req.offset, req.length);
            let len = req.length as usize;
            match self.backend.io(&self.rt, io, buf.data(len)).await {
                Ok(()) => self.send_framed(buf, &[&header], len).await,
                Err(e) => self.reply_status(req, buf, Err(backend_reject(e))).await,
            }
            return;
        }
        // Larger than one piece: the header and all the data must be contiguous on the wire,
        // so hold the send queue for the whole reply.
        let turn = self.send.turn().await;
        let mut at = 0;
        while at < req.length {
            let n = (req.length - at).min(piece);
            let io = io_header(IoOp::Read, IoFlags::empty(), req.offset + at, n);
            let result = self.backend.io(&self.rt, io, buf.data(n as usize)).await;
            let sent = match (result, at) {
                (Ok(()), 0) => self.send_held(buf, &[&header], n as usize).await,
                (Ok(()), _) => self.send_held(buf, &[], n as usize).await,
                (Err(e), 0) => {
                    let error = errno_to_nbd(e).0;
                    let reply = SimpleReply {
                        error,
                        cookie: req.cookie,
                    }
                    .encode();
                    self.send_held(buf, &[&reply], 0).await;
                    break;
                }
                (Err(_), _) => {
                    // The header promised data that cannot be delivered: the specification
                    // requires a hard disconnect.
                    self.kill();
                    break;
                }
            };
            if !sent {
                break;
            }
            at += n;
        }
        drop(turn);
    }

    async fn read_structured(&self, req: &Request, buf: &mut TagBuf) {
        let end = req.offset + req.length;
        let piece = buf.capacity.min(IO_BYTES_MAX as usize) as u64;
        let df = req.flags.contains(CommandFlags::DF);
        let mut at = req.offset;
        while at < end && !self.dead.get() {
            // DF wants one content chunk; `validate` made sure it fits the buffer.
            let extent = if df || !self.sparse_reads {
                Extent::data(end - at)
            } else {
                self.extent(at, end - at).await
            };
            let len = extent.len_bytes.min(end - at);
            if extent.zero {
                // OFFSET_HOLE carries a 32-bit size: larger holes take several chunks.
                let hole_max = u64::from(u32::MAX) - u64::from(u32::MAX) % self.limits.min_block;
                let n = len.min(hole_max);
                let last = at + n == end;
                let payload = encode_offset_hole(at, n as u32);
                let flags = if last {
                    ReplyFlags::DONE
                } else {
                    ReplyFlags::empty()
                };
                let (h, hn) =
                    self.chunk_header(req, flags, ChunkType::OFFSET_HOLE, payload.len() as u64);
                self.send_framed(buf, &[&h[..hn], &payload], 0).await;
                at += n;
                continue;
            }
            let n = len.min(piece);
            let io = io_header(IoOp::Read, IoFlags::empty(), at, n);
            if let Err(e) = self.backend.io(&self.rt, io, buf.data(n as usize)).await {
                return self.send_error(req, buf, backend_reject(e), Some(at)).await;
            }
            // The data is in memory before its chunk is sent, so no error can follow it and the
            // last chunk may carry DONE, saving a NONE chunk.
            let last = at + n == end;
            let flags = if last {
                ReplyFlags::DONE
            } else {
                ReplyFlags::empty()
            };
            let length = OFFSET_DATA_PREFIX_BYTES as u64 + n;
            let (h, hn) = self.chunk_header(req, flags, ChunkType::OFFSET_DATA, length);
            self.send_framed(buf, &[&h[..hn], &at.to_be_bytes()], n as usize)
                .await;
            at += n;
        }
    }

    /// The allocation extent at `offset`, clipped to `len`, nonzero and aligned; a backend error
    /// reads as "data", which is always a correct answer.
    async fn extent(&self, offset: u64, len: u64) -> Extent {
        let min = self.limits.min_block;
        let extent = self.backend.allocation(&self.rt, offset, len).await;
        let mut extent = extent.unwrap_or(Extent::data(len));
        let clipped = extent.len_bytes.min(len);
        let aligned = clipped - clipped % min;
        extent.len_bytes = if aligned == 0 { min.min(len) } else { aligned };
        if extent.len_bytes == 0 {
            extent.len_bytes = len;
        }
        extent
    }

    async fn block_status(&self, req: &Request, buf: &mut TagBuf) {
        let style = self.limits.style;
        let width = descriptor_bytes(style);
        let max = if req.flags.contains(CommandFlags::REQ_ONE) {
            1
        } else {
            (buf.capacity / width).min(DESCRIPTORS_MAX)
        };
        // Compact descriptors carry 32-bit lengths.
        let len_max = match style {
            HeaderStyle::Compact => {
                u64::from(u32::MAX) - u64::from(u32::MAX) % self.limits.min_block
            }
            HeaderStyle::Extended => u64::MAX,
        };
        let end = req.offset + req.length;
        let (mut at, mut count) = (req.offset, 0usize);
        // The extent being built: consecutive extents with the same status are merged.
        let mut pending: Option<(u64, u64)> = None;
        while at < end {
            let extent = self.extent(at, end - at).await;
            let status = AllocationFlags::empty()
                .set(AllocationFlags::HOLE, extent.hole)
                .set(AllocationFlags::ZERO, extent.zero)
                .bits();
            let (n, status) = (extent.len_bytes.min(len_max), u64::from(status));
            pending = match pending {
                Some((len, s)) if s == status && len.saturating_add(n) <= len_max => {
                    Some((len + n, s))
                }
                Some((len, s)) => {
                    let _ = encode_descriptor(
                        style,
                        len,
                        s,
                        &mut buf.data(buf.capacity)[count * width..],
                    );
                    count += 1;
                    if count == max {
                        pending = None;
                        break;
                    }
                    Some((n, status))
                }
                None => Some((n, status)),
            };
            at += n;
        }
        // `count < max` here: the loop stops at `max` only with nothing pending.
        if let Some((len, s)) = pending {
            let _ = encode_descriptor(style, len, s, &mut buf.data(buf.capacity)[count * width..]);
            count += 1;
        }
        let mut prefix = [0u8; 8];
        let count32 = u32::try_from(count).unwrap_or(u32::MAX);
        let pn = encode_block_status_prefix(style, self.meta_id, count32, &mut prefix).unwrap_or(0);
        let length = (block_status_prefix_bytes(style) + count * width) as u64;
        let (h, hn) = self.chunk_header(req, ReplyFlags::DONE, block_status_chunk(style), length);
        self.send_framed(buf, &[&h[..hn], &prefix[..pn]], count * width)
            .await;
    }
}

fn io_header(op: IoOp, flags: IoFlags, offset: u64, len_bytes: u64) -> IoHeader {
    // Offsets reaching the backend are aligned to the minimum block size, at least a sector.
    IoHeader {
        op,
        flags,
        sector: offset >> SECTOR_SHIFT,
        len_bytes,
    }
}

fn io_flags(req: &Request) -> IoFlags {
    if req.flags.contains(CommandFlags::FUA) {
        IoFlags::FUA
    } else {
        IoFlags::empty()
    }
}

#[cold]
fn backend_reject(e: Errno) -> Reject {
    let message = match errno_to_nbd(e) {
        NbdError::EPERM => "operation not permitted",
        NbdError::ENOSPC => "no space left",
        NbdError::ENOMEM => "out of memory",
        NbdError::EINVAL => "invalid request",
        NbdError::ENOTSUP => "not supported",
        NbdError::EOVERFLOW => "value too large",
        NbdError::ESHUTDOWN => "server is shutting down",
        _ => "input/output error",
    };
    Reject {
        error: errno_to_nbd(e),
        message,
    }
}

#[cfg(test)]
mod tests;
