//! One channel: a connection to a control endpoint (or an open control device).

use std::fs::File;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::task::Poll;

use userdm_dmuser::wire::{DmUserMessage, HEADER_BYTES};
use userdm_io::{IoFlags, IoOp};

use crate::Status;

/// `ENOTBLK`: what a dm-user kernel returns from `read()` once the target is removed.
const ENOTBLK: i32 = 15;
/// The largest payload accepted from the other side: more than userdm or dm-user ever sends.
const PAYLOAD_BYTES_MAX: u64 = 64 << 20;

/// One request: its header and, for a WRITE, its data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The header as received.
    pub header: DmUserMessage,
    /// The WRITE payload; empty for every other type.
    pub data: Vec<u8>,
}

impl Request {
    /// The operation, if the type is one dm-user defines.
    pub fn op(&self) -> Option<IoOp> {
        self.header.op()
    }

    /// The flags.
    pub fn flags(&self) -> IoFlags {
        IoFlags::from_dm_user(self.header.flags)
    }

    /// The byte offset of the first sector, relative to the device.
    pub fn offset_bytes(&self) -> Option<u64> {
        self.header.sector.checked_mul(512)
    }
}

enum Stream {
    Socket(UnixStream),
    Device(File),
}

/// A channel to a `user` target: a connected endpoint socket or an open control device.
pub struct Channel {
    stream: Stream,
    header: [u8; HEADER_BYTES],
    header_have: usize,
    /// The request whose payload is arriving, and how much of it is in.
    current: Option<(Request, usize)>,
}

impl Channel {
    /// Connects to a control endpoint socket; or, if `path` is a character device (a dm-user
    /// kernel's misc device, or userdm's CUSE device), opens it.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Channel> {
        let path = path.as_ref();
        let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device());
        let stream = if is_device {
            Stream::Device(File::options().read(true).write(true).open(path)?)
        } else {
            Stream::Socket(UnixStream::connect(path)?)
        };
        Ok(Channel::from_stream(stream))
    }

    /// Wraps a connected socket.
    pub fn from_socket(socket: UnixStream) -> Channel {
        Channel::from_stream(Stream::Socket(socket))
    }

    fn from_stream(stream: Stream) -> Channel {
        Channel {
            stream,
            header: [0; HEADER_BYTES],
            header_have: 0,
            current: None,
        }
    }

    /// Makes reads non-blocking, for [`Channel::poll_request`] in an event loop.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.stream {
            Stream::Socket(s) => s.set_nonblocking(nonblocking),
            Stream::Device(_) => Err(io::Error::new(
                ErrorKind::Unsupported,
                "dm-user devices always block (they have no poll)",
            )),
        }
    }

    /// A second handle to the same channel, for replying from another thread.
    pub fn try_clone_writer(&self) -> io::Result<ChannelWriter> {
        Ok(ChannelWriter(match &self.stream {
            Stream::Socket(s) => Stream::Socket(s.try_clone()?),
            Stream::Device(f) => Stream::Device(f.try_clone()?),
        }))
    }

    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Socket(s) => s.read(buf),
            Stream::Device(f) => f.read(buf),
        }
    }

    /// Blocks for the next request. `Ok(None)` means the target is gone (end of stream, or
    /// ENOTBLK from a dm-user kernel): the daemon's work is done.
    pub fn read_request(&mut self) -> io::Result<Option<Request>> {
        loop {
            match self.poll_request()? {
                Poll::Ready(r) => return Ok(r),
                // A blocking channel only gets here if it was made non-blocking behind our back.
                Poll::Pending => std::thread::yield_now(),
            }
        }
    }

    /// Reads what is available without blocking (on a non-blocking channel): a whole request,
    /// `Ready(None)` at the end, or `Pending` when the rest has not arrived yet (partial
    /// headers and payloads are kept for the next call).
    pub fn poll_request(&mut self) -> io::Result<Poll<Option<Request>>> {
        loop {
            if let Some((req, have)) = &mut self.current {
                if *have == req.data.len() {
                    let (req, _) = self.current.take().unwrap_or_default();
                    return Ok(Poll::Ready(Some(req)));
                }
                let at = *have;
                let mut data = std::mem::take(&mut req.data);
                let n = self.read_some(&mut data[at..]);
                if let Some((req, have)) = &mut self.current {
                    req.data = data;
                    match end_or(n)? {
                        None => return Ok(Poll::Ready(None)),
                        Some(None) => return Ok(Poll::Pending),
                        Some(Some(n)) => *have += n,
                    }
                }
                continue;
            }
            let mut header = self.header;
            let n = self.read_some(&mut header[self.header_have..]);
            self.header = header;
            match end_or(n)? {
                None => return Ok(Poll::Ready(None)),
                Some(None) => return Ok(Poll::Pending),
                Some(Some(n)) => self.header_have += n,
            }
            if self.header_have == HEADER_BYTES {
                self.header_have = 0;
                let header = DmUserMessage::from_bytes(&self.header);
                let payload = header.request_payload_bytes();
                if payload > PAYLOAD_BYTES_MAX {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!("request of {payload} bytes is larger than any dm-user sends"),
                    ));
                }
                let req = Request {
                    header,
                    data: vec![0; payload as usize],
                };
                self.current = Some((req, 0));
            }
        }
    }

    /// Answers request `seq` (read on this channel) with `status`; `data` is the READ data and
    /// must be empty for anything but a successful READ.
    pub fn reply(&mut self, seq: u64, status: Status, data: &[u8]) -> io::Result<()> {
        write_reply(&mut self.stream, seq, status, data)
    }
}

/// Replies on a channel from another thread (see [`Channel::try_clone_writer`]).
pub struct ChannelWriter(Stream);

impl ChannelWriter {
    /// As [`Channel::reply`].
    pub fn reply(&mut self, seq: u64, status: Status, data: &[u8]) -> io::Result<()> {
        write_reply(&mut self.0, seq, status, data)
    }
}

/// `Ok(None)`: end of stream; `Ok(Some(None))`: would block; `Ok(Some(Some(n)))`: n bytes.
fn end_or(res: io::Result<usize>) -> io::Result<Option<Option<usize>>> {
    match res {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(Some(n))),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Some(None)),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(Some(Some(0))),
        Err(e) if e.raw_os_error() == Some(ENOTBLK) => Ok(None),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_reply(stream: &mut Stream, seq: u64, status: Status, data: &[u8]) -> io::Result<()> {
    let header = DmUserMessage::reply(seq, status.code()).to_bytes();
    let total = header.len() + data.len();
    let mut sent = 0;
    while sent < total {
        let res = if sent < header.len() {
            let bufs = [IoSlice::new(&header[sent..]), IoSlice::new(data)];
            match stream {
                Stream::Socket(s) => s.write_vectored(&bufs),
                Stream::Device(f) => f.write_vectored(&bufs),
            }
        } else {
            let rest = &data[sent - header.len()..];
            match stream {
                Stream::Socket(s) => s.write(rest),
                Stream::Device(f) => f.write(rest),
            }
        };
        match res {
            Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A non-blocking channel whose socket buffer is full: userdm drains it promptly.
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Socket(s) => s.as_fd(),
            Stream::Device(f) => f.as_fd(),
        }
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userdm_dmuser::wire::DM_USER_REQ_MAP_WRITE;

    #[test]
    fn requests_in_pieces_and_replies() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ch = Channel::from_socket(a);
        ch.set_nonblocking(true).unwrap();
        let h = DmUserMessage {
            seq: 7,
            kind: DM_USER_REQ_MAP_WRITE,
            flags: 0x200,
            sector: 3,
            len: 5,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        for byte in &bytes[..44] {
            b.write_all(std::slice::from_ref(byte)).unwrap();
            assert!(ch.poll_request().unwrap().is_pending());
        }
        b.write_all(&bytes[44..]).unwrap();
        let Poll::Ready(Some(req)) = ch.poll_request().unwrap() else {
            panic!("no request");
        };
        assert_eq!(req.header, h);
        assert_eq!(req.data, b"hello");
        assert!(req.flags().contains(IoFlags::FUA));
        ch.reply(7, Status::Success, &[]).unwrap();
        let mut back = [0u8; 40];
        b.read_exact(&mut back).unwrap();
        assert_eq!(DmUserMessage::from_bytes(&back), DmUserMessage::reply(7, 0));
        drop(b);
        assert!(matches!(ch.poll_request().unwrap(), Poll::Ready(None)));
    }
}
