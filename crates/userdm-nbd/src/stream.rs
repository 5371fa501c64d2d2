//! The connection socket: a Unix or TCP stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One client connection. Blocking `Read + Write` for the handshake; its descriptor is driven
/// through the connection's io_uring ring afterwards.
#[derive(Debug)]
pub enum Stream {
    /// A Unix-domain socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    /// Shuts down one or both directions; errors (already closed) are ignored because the only
    /// goal is to make pending and future IO on the socket finish.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    /// The socket on standard input, for inetd-style service (libnbd's `nbd_connect_command`
    /// runs the server with a connected Unix socket as its standard input and output). Standard
    /// input is duplicated, so the process's own descriptor 0 stays as it was. Fails unless it is
    /// a Unix or TCP stream socket.
    pub fn from_stdin() -> io::Result<Stream> {
        use std::os::fd::AsFd;
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        let unix = UnixStream::from(fd);
        if unix.local_addr().is_ok() {
            return Ok(Stream::Unix(unix));
        }
        let tcp = TcpStream::from(std::os::fd::OwnedFd::from(unix));
        if tcp.local_addr().is_ok() {
            return Ok(Stream::from(tcp));
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "standard input is not a connected Unix or TCP socket",
        ))
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Bounds how long one blocking read or write of the handshake may take.
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        // Replies are written whole; Nagle would only delay the small ones.
        let _ = s.set_nodelay(true);
        Stream::Tcp(s)
    }
}
