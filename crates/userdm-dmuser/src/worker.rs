//! The endpoint thread: accepts daemons, hands them requests and reads their replies.
//!
//! One thread per endpoint runs an epoll loop over the listening socket, an eventfd that the
//! data path signals when it queues a request, and every channel. Channels are non-blocking
//! and registered edge-triggered, so a daemon consuming what we sent wakes us (`EPOLLOUT` fires
//! on every read that frees socket memory); `SIOCOUTQ` then says whether it has read all of it.
//!
//! **Which channel gets a request.** dm-user hands a message to whichever channel calls `read()`
//! first. A socket cannot tell us that a daemon is blocked in `read()`, so we approximate it: a
//! channel may hold at most one request that its daemon has not finished reading, and a queued
//! request goes to the channel that has been idle (everything read) the longest.

use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use userdm_io::Errno;

use crate::shared::{Dispatched, Shared};
use crate::sys::{self, Epoll, Event};
use crate::wire::{self, DmUserMessage, MessageHandler, MessageReader, HEADER_BYTES};

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;
/// Most daemons connected to one endpoint at once; more are refused.
pub(crate) const CHANNELS_MAX: usize = 256;
/// Bytes read from a channel per `recv` when not reading straight into a request's buffer.
const STAGING_BYTES: usize = 64 << 10;
/// A payload at least this long is received straight into the request's buffer.
const DIRECT_RECV_BYTES: u64 = 4096;
/// How often an offered request is re-checked when no wakeup came (a safety net only).
const OFFERED_RECHECK: Duration = Duration::from_millis(10);

/// Who may connect.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Access {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
}

impl Access {
    /// root, our own user, the owner, and (with mode 0660) members of the owning group.
    pub(crate) fn allows(&self, cred: &libc::ucred) -> bool {
        let (euid, _) = sys::effective_ids();
        if cred.uid == 0 || cred.uid == euid || cred.uid == self.uid {
            return true;
        }
        if self.mode & 0o060 == 0 {
            return false;
        }
        cred.gid == self.gid || sys::process_groups(cred.pid).contains(&self.gid)
    }
}

/// A request sent in full on a channel, awaiting its reply.
#[derive(Clone, Copy)]
struct InFlight {
    slot: u32,
    msg: DmUserMessage,
}

/// A request being written to a channel.
struct Outgoing {
    slot: u32,
    msg: DmUserMessage,
    header: [u8; HEADER_BYTES],
    /// Bytes written so far, header included.
    sent: usize,
    total: usize,
}

struct Channel {
    stream: UnixStream,
    generation: u32,
    serial: u64,
    pid: i32,
    reader: MessageReader,
    in_flight: Vec<InFlight>,
    out: Option<Outgoing>,
    /// Sent in full but not yet read in full by the daemon.
    offered: Option<u64>,
    /// In the idle queue.
    idle: bool,
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    listener: UnixListener,
    access: Access,
    epoll: Epoll,
    channels: Vec<Option<Channel>>,
    idle: std::collections::VecDeque<usize>,
    generation: u32,
    serial: u64,
    staging: Vec<u8>,
    depth: usize,
}

fn token(index: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | index as u64
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        listener: UnixListener,
        access: Access,
        depth: usize,
    ) -> io::Result<Worker> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.add(listener.as_raw_fd(), libc::EPOLLIN as u32, TOKEN_LISTENER)?;
        epoll.add(shared.wake.raw(), libc::EPOLLIN as u32, TOKEN_WAKE)?;
        Ok(Worker {
            shared,
            listener,
            access,
            epoll,
            channels: Vec::new(),
            idle: std::collections::VecDeque::new(),
            generation: 0,
            serial: 0,
            staging: vec![0; STAGING_BYTES],
            depth,
        })
    }

    /// Runs until the endpoint shuts down.
    pub(crate) fn run(mut self) {
        let mut events = [Event {
            token: 0,
            events: 0,
        }; 64];
        loop {
            let timeout = self.timeout_ms();
            let n = self.epoll.wait(&mut events, timeout);
            for ev in &events[..n] {
                match ev.token {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_WAKE => self.shared.wake.drain(),
                    t => self.channel_event(t, ev.events),
                }
            }
            if self.shared.inner().shutdown {
                break;
            }
            self.check_offered();
            self.dispatch();
            self.shared.expire(Instant::now());
        }
        for index in 0..self.channels.len() {
            self.close_channel(index, None);
        }
    }

    fn timeout_ms(&self) -> i32 {
        let mut timeout: Option<Duration> = None;
        let queued = self.shared.has_queued();
        if queued && self.channels.iter().flatten().any(|c| c.offered.is_some()) {
            timeout = Some(OFFERED_RECHECK);
        }
        if queued && self.shared.inner().channels == 0 {
            if let Some(deadline) = self.shared.expire(Instant::now()) {
                let left = deadline.saturating_duration_since(Instant::now());
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
        }
        match timeout {
            // Round up so that we do not wake just before a deadline and spin.
            Some(t) => i32::try_from(t.as_millis() + 1).unwrap_or(i32::MAX),
            None => -1,
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the connection pending and try again later.
                    eprintln!("userdm: user {}: accept failed: {e}", self.shared.ctl);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream) {
        let ctl = &self.shared.ctl;
        let cred = match sys::peer_cred(stream.as_raw_fd()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("userdm: user {ctl}: refusing a daemon: SO_PEERCRED failed: {e}");
                return;
            }
        };
        if !self.access.allows(&cred) {
            self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "userdm: user {ctl}: refusing pid {} (uid {}, gid {}): the endpoint belongs to \
                 {}:{} mode {:04o}",
                cred.pid, cred.uid, cred.gid, self.access.uid, self.access.gid, self.access.mode
            );
            return;
        }
        if self.channels.iter().flatten().count() >= CHANNELS_MAX {
            eprintln!(
                "userdm: user {ctl}: refusing pid {}: {CHANNELS_MAX} channels already",
                cred.pid
            );
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let index = match self.channels.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.channels.push(None);
                self.channels.len() - 1
            }
        };
        self.generation = self.generation.wrapping_add(1);
        self.serial += 1;
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self
            .epoll
            .add(stream.as_raw_fd(), events, token(index, self.generation))
        {
            eprintln!("userdm: user {ctl}: cannot watch a new channel: {e}");
            return;
        }
        self.channels[index] = Some(Channel {
            stream,
            generation: self.generation,
            serial: self.serial,
            pid: cred.pid,
            reader: MessageReader::new(),
            in_flight: Vec::with_capacity(self.depth),
            out: None,
            offered: None,
            idle: true,
        });
        self.idle.push_back(index);
        self.shared.set_channels(1);
    }

    fn channel_event(&mut self, token: u64, events: u32) {
        let index = (token & 0xffff_ffff) as usize;
        let generation = (token >> 32) as u32;
        let live = matches!(self.channels.get(index), Some(Some(c)) if c.generation == generation);
        if !live {
            return;
        }
        let readable = (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
        if events & readable != 0 {
            if let Err(reason) = self.read_replies(index) {
                self.close_channel(index, reason);
                return;
            }
        }
        if events & libc::EPOLLOUT as u32 != 0 {
            if let Err(reason) = self.write_request(index) {
                self.close_channel(index, reason);
            }
        }
    }

    /// Reads until the socket is empty. `Err(None)` is an orderly close, `Err(Some(..))` a
    /// failure to log.
    fn read_replies(&mut self, index: usize) -> Result<(), Option<String>> {
        let shared = Arc::clone(&self.shared);
        let Some(ch) = self.channels[index].as_mut() else {
            return Ok(());
        };
        let fd = ch.stream.as_raw_fd();
        loop {
            // A long READ payload goes straight into the request's buffer.
            if let Some((msg, offset, left)) = ch.reader.payload_pending() {
                if left >= DIRECT_RECV_BYTES {
                    let slot = ch
                        .in_flight
                        .iter()
                        .find(|f| f.msg.seq == msg.seq)
                        .map(|f| f.slot);
                    let res = match slot {
                        Some(slot) => {
                            recv_direct(&shared, fd, slot, offset, left, &mut self.staging)
                        }
                        None => recv_into(fd, &mut self.staging, left),
                    };
                    match res {
                        Ok(0) => return Err(None),
                        Ok(n) => {
                            let mut h = ReplyHandler::new(&shared, ch);
                            let mut reader = std::mem::take(&mut h.ch.reader);
                            reader.payload_received(n as u64, &mut h);
                            h.ch.reader = reader;
                            continue;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Some(format!("read failed: {e}"))),
                    }
                }
            }
            let n = match recv_into(fd, &mut self.staging, STAGING_BYTES as u64) {
                Ok(0) => return Err(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Some(format!("read failed: {e}"))),
            };
            let mut reader = std::mem::take(&mut ch.reader);
            let mut h = ReplyHandler::new(&shared, ch);
            let res = reader.feed(&self.staging[..n], &mut h);
            let why = h.why.take();
            ch.reader = reader;
            if let Err(e) = res {
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                let why = why.unwrap_or_else(|| "protocol error".to_string());
                return Err(Some(format!("{why} ({}); closing the channel", e.name())));
            }
            if ch.offered.is_none() && ch.out.is_none() && !ch.idle {
                ch.idle = true;
                self.idle.push_back(index);
            }
        }
    }

    /// Continues sending the channel's request; when it is all sent, checks whether the daemon
    /// has read it.
    fn write_request(&mut self, index: usize) -> Result<(), Option<String>> {
        let shared = Arc::clone(&self.shared);
        let Some(ch) = self.channels[index].as_mut() else {
            return Ok(());
        };
        let fd = ch.stream.as_raw_fd();
        while let Some(out) = ch.out.as_mut() {
            let res = if out.sent < HEADER_BYTES {
                let rest = &out.header[out.sent..];
                // SAFETY: `rest` is a live slice of the header.
                unsafe { sys::send_raw(fd, rest.as_ptr(), rest.len()) }
            } else {
                let offset = out.sent - HEADER_BYTES;
                let want = out.total - out.sent;
                shared.with_payload(out.slot, offset, |data| {
                    if data.len() < want {
                        // Cannot happen (the buffer is the request's length); fail the channel
                        // rather than send a short message.
                        return Err(io::Error::new(ErrorKind::InvalidData, "short payload"));
                    }
                    // SAFETY: `data` is live for the call and holds at least `want` bytes.
                    unsafe { sys::send_raw(fd, data.as_ptr(), want) }
                })
            };
            match res {
                Ok(n) => out.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Err(None),
                Err(e) => return Err(Some(format!("write failed: {e}"))),
            }
            if out.sent == out.total {
                ch.in_flight.push(InFlight {
                    slot: out.slot,
                    msg: out.msg,
                });
                ch.offered = Some(out.msg.seq);
                ch.out = None;
            }
        }
        self.refresh_offered(index);
        Ok(())
    }

    /// If the channel's offered request has been read in full, the channel is idle again.
    fn refresh_offered(&mut self, index: usize) {
        let Some(ch) = self.channels[index].as_mut() else {
            return;
        };
        if ch.offered.is_some() && read_in_full(&ch.stream) {
            ch.offered = None;
        }
        if ch.offered.is_none() && ch.out.is_none() && !ch.idle {
            ch.idle = true;
            self.idle.push_back(index);
        }
    }

    fn check_offered(&mut self) {
        if !self.shared.has_queued() {
            return;
        }
        for index in 0..self.channels.len() {
            if matches!(&self.channels[index], Some(c) if c.offered.is_some()) {
                self.refresh_offered(index);
            }
        }
    }

    fn dispatch(&mut self) {
        while let Some(&index) = self.idle.front() {
            let ready = matches!(&self.channels[index], Some(c) if c.idle && c.out.is_none() && c.offered.is_none());
            if !ready {
                if let Some(Some(c)) = self.channels.get_mut(index) {
                    c.idle = false;
                }
                self.idle.pop_front();
                continue;
            }
            let Some(Dispatched { slot, msg }) = self.shared.dispatch_next() else {
                return;
            };
            self.idle.pop_front();
            let Some(ch) = self.channels[index].as_mut() else {
                continue;
            };
            ch.idle = false;
            let total = usize::try_from(msg.request_payload_bytes())
                .map_or(usize::MAX, |p| p.saturating_add(HEADER_BYTES));
            ch.out = Some(Outgoing {
                slot,
                msg,
                header: msg.to_bytes(),
                sent: 0,
                total,
            });
            if let Err(reason) = self.write_request(index) {
                self.close_channel(index, reason);
            }
        }
    }

    fn close_channel(&mut self, index: usize, reason: Option<String>) {
        let Some(ch) = self.channels.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.epoll.delete(ch.stream.as_raw_fd());
        let mut slots: Vec<u32> = ch.in_flight.iter().map(|f| f.slot).collect();
        slots.extend(ch.out.as_ref().map(|o| o.slot));
        let left = self.shared.set_channels(-1);
        let ctl = &self.shared.ctl;
        if let Some(reason) = reason {
            eprintln!(
                "userdm: user {ctl}: channel {} (pid {}): {reason}; {} request(s) in flight",
                ch.serial,
                ch.pid,
                slots.len()
            );
        } else if !slots.is_empty() {
            eprintln!(
                "userdm: user {ctl}: channel {} (pid {}) closed with {} request(s) in flight; \
                 {left} channel(s) left",
                ch.serial,
                ch.pid,
                slots.len()
            );
        }
        self.shared.channel_closed(&slots);
        drop(ch);
    }
}

/// Whether the peer has read everything we sent. `SIOCOUTQ` may read 1 for an instant after the
/// peer's read (the kernel releases a socket's write memory in two steps), and any unread
/// message counts hundreds of bytes, so 1 counts as read.
fn read_in_full(stream: &UnixStream) -> bool {
    sys::unread_bytes(stream.as_raw_fd()).map_or(true, |n| n <= 1)
}

fn recv_into(fd: i32, staging: &mut [u8], max: u64) -> io::Result<usize> {
    let len = usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(staging.len());
    // SAFETY: `staging` is a live, exclusively borrowed buffer of at least `len` bytes.
    unsafe { sys::recv_raw(fd, staging.as_mut_ptr(), len) }
}

fn recv_direct(
    shared: &Shared,
    fd: i32,
    slot: u32,
    offset: u64,
    left: u64,
    staging: &mut [u8],
) -> io::Result<usize> {
    let offset = usize::try_from(offset).unwrap_or(usize::MAX);
    shared.with_destination(slot, offset, |dest| match dest {
        Some(dest) => {
            let len = usize::try_from(left).unwrap_or(usize::MAX).min(dest.len());
            // SAFETY: `dest` is the request's buffer, borrowed exclusively under the slot lock.
            unsafe { sys::recv_raw(fd, dest.as_mut_ptr(), len) }
        }
        None => recv_into(fd, staging, left),
    })
}

/// Matches replies to the requests a channel holds.
struct ReplyHandler<'a> {
    shared: &'a Shared,
    ch: &'a mut Channel,
    /// Why the stream failed, for the log.
    why: Option<String>,
}

impl<'a> ReplyHandler<'a> {
    fn new(shared: &'a Shared, ch: &'a mut Channel) -> ReplyHandler<'a> {
        ReplyHandler {
            shared,
            ch,
            why: None,
        }
    }

    fn find(&self, seq: u64) -> Option<InFlight> {
        self.ch.in_flight.iter().find(|f| f.msg.seq == seq).copied()
    }
}

impl MessageHandler for ReplyHandler<'_> {
    fn header(&mut self, reply: &DmUserMessage) -> Result<u64, Errno> {
        let Some(req) = self.find(reply.seq) else {
            let sending = self.ch.out.as_ref().is_some_and(|o| o.msg.seq == reply.seq);
            self.why = Some(if sending {
                format!("reply to seq {} before the request was read", reply.seq)
            } else {
                format!("reply with unknown seq {}", reply.seq)
            });
            return Err(Errno::EINVAL);
        };
        if self.ch.offered == Some(reply.seq) {
            if !read_in_full(&self.ch.stream) {
                self.why = Some(format!(
                    "reply to seq {} before the request was read",
                    reply.seq
                ));
                return Err(Errno::EINVAL);
            }
            self.ch.offered = None;
        }
        Ok(req.msg.reply_payload_bytes(reply.kind))
    }

    fn payload(&mut self, reply: &DmUserMessage, offset: u64, data: &[u8]) {
        let Some(req) = self.find(reply.seq) else {
            return;
        };
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        self.shared.with_destination(req.slot, offset, |dest| {
            if let Some(dest) = dest {
                let n = dest.len().min(data.len());
                dest[..n].copy_from_slice(&data[..n]);
            }
        });
    }

    fn complete(&mut self, reply: &DmUserMessage) {
        let Some(pos) = self
            .ch
            .in_flight
            .iter()
            .position(|f| f.msg.seq == reply.seq)
        else {
            return;
        };
        let req = self.ch.in_flight.remove(pos);
        self.shared.complete(
            req.slot,
            wire::response_result(reply.kind).map_err(Into::into),
        );
    }
}
