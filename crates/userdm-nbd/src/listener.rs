//! Listening sockets: accept, negotiate, and run one thread per connection.
//!
//! [`serve_unix`] and [`serve_tcp`] return an [`NbdServer`] handle at once; an acceptor thread
//! accepts connections and gives each its own thread, which runs the handshake and then the
//! transmission phase on its own io_uring ring. Connections share nothing but the backends, so
//! one connection's failure (a hostile client, a broken socket, a failed ring) never touches
//! another. [`NbdServer::shutdown`] stops accepting and drains: every connection's in-flight
//! requests finish and are answered before its socket closes.
//!
//! Two more ways in, so that libnbd can launch the server as a subprocess (its interop tests,
//! `nbdinfo -- [ CMD ]`): [`serve_stream`] serves one already-connected socket on the calling
//! thread (inetd style: `nbd-serve -s` on standard input), and [`serve_listen_fds`] listens on
//! the socket systemd (or libnbd) passed with `LISTEN_FDS`/`LISTEN_PID`.
//!
//! With TLS configured (`ServerConfig::handshake.tls`), a connection that upgrades with
//! STARTTLS is served through [`crate::tls`]'s record pump.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{export_info, Backend};
use crate::handshake::{
    handshake_tls, ExportCatalogue, ExportInfo, HandshakeConfig, HandshakeError,
};
use crate::server::{serve_connection, ServeError, ServerConfig};
use crate::stream::Stream;

/// One named export.
pub struct Export<B> {
    /// The name clients ask for.
    pub name: String,
    /// A human-readable description.
    pub description: String,
    /// What it serves.
    pub backend: Arc<B>,
}

/// The exports of one server, in listing order. With exactly one export, clients may use the
/// empty (default) name.
pub struct Exports<B> {
    list: Vec<Export<B>>,
}

impl<B: Backend> Exports<B> {
    /// No exports.
    pub fn new() -> Exports<B> {
        Exports { list: Vec::new() }
    }

    /// Adds an export.
    pub fn with(mut self, name: &str, description: &str, backend: Arc<B>) -> Exports<B> {
        self.list.push(Export {
            name: name.into(),
            description: description.into(),
            backend,
        });
        self
    }
}

impl<B: Backend> Default for Exports<B> {
    fn default() -> Exports<B> {
        Exports::new()
    }
}

impl<B: Backend> ExportCatalogue for Exports<B> {
    type Export = Arc<B>;

    fn exports(&self) -> Vec<ExportInfo> {
        self.list
            .iter()
            .map(|e| export_info(&e.name, &e.description, &*e.backend))
            .collect()
    }

    fn open(&self, name: &str) -> Option<(ExportInfo, Arc<B>)> {
        let e = self.list.iter().find(|e| e.name == name)?;
        Some((
            export_info(&e.name, &e.description, &*e.backend),
            e.backend.clone(),
        ))
    }

    fn info(&self, name: &str) -> Option<ExportInfo> {
        let e = self.list.iter().find(|e| e.name == name)?;
        Some(export_info(&e.name, &e.description, &*e.backend))
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix-domain socket path.
    Unix(PathBuf),
    /// A TCP address (with the real port when 0 was asked for).
    Tcp(SocketAddr),
}

/// Counters of one server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections being served now (handshake or transmission).
    pub active: u64,
    /// Connections closed at once because `connections_max` were active.
    pub refused: u64,
    /// Handshakes that ended without entering transmission (including clients that aborted).
    pub handshakes_failed: u64,
    /// Transmission phases that ended in a hard disconnect or an error.
    pub connections_failed: u64,
    /// Connections that entered transmission with TLS.
    pub tls: u64,
    /// Connections that entered transmission with extended headers.
    pub extended_headers: u64,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::from(l.accept()?.0),
            Listener::Tcp(l) => Stream::from(l.accept()?.0),
        })
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    handshakes_failed: AtomicU64,
    connections_failed: AtomicU64,
    tls: AtomicU64,
    extended_headers: AtomicU64,
}

/// What the acceptor and the connection threads share with the handle.
struct Shared {
    stopping: Arc<AtomicBool>,
    /// A second handle to every live connection's socket, to shut it down on stop.
    sockets: Mutex<HashMap<u64, Stream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Counters,
}

/// A running NBD server. Dropping it shuts it down, as [`NbdServer::shutdown`] does.
pub struct NbdServer {
    addr: ListenAddr,
    /// The socket file is ours to remove on shutdown (not one systemd or libnbd made).
    owns_path: bool,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// Serves `exports` on a Unix-domain socket at `path`. A stale socket file at `path` is replaced;
/// the file is removed again on shutdown.
pub fn serve_unix<B: Backend>(
    path: impl AsRef<Path>,
    exports: Exports<B>,
    config: ServerConfig,
) -> io::Result<NbdServer> {
    let path = path.as_ref().to_path_buf();
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    start(
        Listener::Unix(listener),
        ListenAddr::Unix(path),
        true,
        exports,
        config,
    )
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Serves `exports` on the listening socket this process was given by systemd socket activation
/// (or libnbd's `nbd_connect_systemd_socket_activation`): `LISTEN_PID` must be this process and
/// `LISTEN_FDS` at least 1; the first descriptor (3), a Unix or TCP listening socket, is used.
/// The variables are removed so that children do not inherit them. The socket file, if any, is
/// left in place on shutdown: it belongs to whoever made it.
pub fn serve_listen_fds<B: Backend>(
    exports: Exports<B>,
    config: ServerConfig,
) -> io::Result<NbdServer> {
    let invalid =
        |why: &str| io::Error::new(ErrorKind::InvalidInput, format!("socket activation: {why}"));
    let pid = std::env::var("LISTEN_PID").map_err(|_| invalid("LISTEN_PID is not set"))?;
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Err(invalid("LISTEN_PID is not this process"));
    }
    let count = std::env::var("LISTEN_FDS").map_err(|_| invalid("LISTEN_FDS is not set"))?;
    match count.trim().parse::<u32>() {
        Ok(n) if n >= 1 => {}
        _ => return Err(invalid("LISTEN_FDS is not a positive number")),
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let fd = crate::sys::adopt_inherited_fd(LISTEN_FDS_START)?;
    let unix = UnixListener::from(fd);
    if let Ok(local) = unix.local_addr() {
        let path = local
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| invalid("the Unix socket has no path"))?;
        return start(
            Listener::Unix(unix),
            ListenAddr::Unix(path),
            false,
            exports,
            config,
        );
    }
    let tcp = TcpListener::from(std::os::fd::OwnedFd::from(unix));
    let local = tcp
        .local_addr()
        .map_err(|_| invalid("descriptor 3 is not a Unix or TCP listening socket"))?;
    start(
        Listener::Tcp(tcp),
        ListenAddr::Tcp(local),
        false,
        exports,
        config,
    )
}

/// Why [`serve_stream`] ended other than by the client disconnecting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The socket could not be set up.
    #[error("cannot set up the connection")]
    Io(#[source] io::Error),
    /// The handshake failed (including a client that aborted it).
    #[error("handshake failed")]
    Handshake(#[source] HandshakeError),
    /// The transmission phase ended in an error.
    #[error("transmission failed")]
    Serve(#[source] ServeError),
}

/// Serves one client on an already-connected socket, on the calling thread: handshake, then
/// transmission, until the client leaves. This is inetd-style service (`nbd-serve -s`, where the
/// socket is standard input; see [`Stream::from_stdin`]) and what libnbd's
/// `nbd_connect_command` expects.
pub fn serve_stream<B: Backend>(
    stream: Stream,
    exports: &Exports<B>,
    config: &ServerConfig,
) -> Result<(), ConnectionError> {
    serve_one(stream, exports, &config.handshake, config, |_, _| {})
}

/// Handshake (with TLS if negotiated), then transmission, on the calling thread.
/// `entered(tls, extended)` is called when the connection enters transmission.
fn serve_one<B: Backend>(
    mut stream: Stream,
    exports: &Exports<B>,
    handshake_config: &HandshakeConfig,
    config: &ServerConfig,
    entered: impl FnOnce(bool, bool),
) -> Result<(), ConnectionError> {
    stream
        .set_timeouts(config.handshake_timeout)
        .map_err(ConnectionError::Io)?;
    let (negotiated, tls) = handshake_tls(&mut stream, exports, handshake_config)
        .map_err(ConnectionError::Handshake)?;
    stream.set_timeouts(None).map_err(ConnectionError::Io)?;
    entered(tls.is_some(), negotiated.extended);
    match tls {
        None => serve_connection(stream, negotiated, config).map_err(ConnectionError::Serve),
        Some(conn) => {
            let (inner, pump) =
                crate::tls::spawn_pump(conn, stream).map_err(ConnectionError::Io)?;
            let result = serve_connection(inner, negotiated, config);
            pump.join();
            result.map_err(ConnectionError::Serve)
        }
    }
}

/// Serves `exports` on TCP at `addr` (port 0 picks a free port; see [`NbdServer::local_addr`]).
pub fn serve_tcp<B: Backend>(
    addr: impl ToSocketAddrs,
    exports: Exports<B>,
    config: ServerConfig,
) -> io::Result<NbdServer> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    start(
        Listener::Tcp(listener),
        ListenAddr::Tcp(local),
        true,
        exports,
        config,
    )
}

fn start<B: Backend>(
    listener: Listener,
    addr: ListenAddr,
    owns_path: bool,
    exports: Exports<B>,
    config: ServerConfig,
) -> io::Result<NbdServer> {
    let shared = Arc::new(Shared {
        stopping: Arc::new(AtomicBool::new(false)),
        sockets: Mutex::new(HashMap::new()),
        threads: Mutex::new(Vec::new()),
        counters: Counters::default(),
    });
    let exports = Arc::new(exports);
    let acceptor_shared = shared.clone();
    let acceptor = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || accept_loop(listener, acceptor_shared, exports, config))?;
    Ok(NbdServer {
        addr,
        owns_path,
        shared,
        acceptor: Some(acceptor),
    })
}

fn accept_loop<B: Backend>(
    listener: Listener,
    shared: Arc<Shared>,
    exports: Arc<Exports<B>>,
    config: ServerConfig,
) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning. Everything else
                // (a client that reset before accept, a signal) concerns one connection only.
                if !matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
        };
        let c = &shared.counters;
        c.accepted.fetch_add(1, Ordering::Relaxed);
        reap_finished(&shared);
        if c.active.load(Ordering::Acquire) >= config.connections_max as u64 {
            c.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock(&shared.sockets).insert(id, handle);
        c.active.fetch_add(1, Ordering::AcqRel);
        let (thread_shared, exports, config) = (shared.clone(), exports.clone(), config.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection(id, stream, &thread_shared, &exports, &config));
        match spawned {
            Ok(thread) => lock(&shared.threads).push(thread),
            Err(_) => {
                // No thread for it: close it, as if refused.
                lock(&shared.sockets).remove(&id);
                c.active.fetch_sub(1, Ordering::AcqRel);
                c.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One connection's thread: handshake, then transmission.
fn connection<B: Backend>(
    id: u64,
    stream: Stream,
    shared: &Shared,
    exports: &Exports<B>,
    config: &ServerConfig,
) {
    let c = &shared.counters;
    let handshake_config = HandshakeConfig {
        shutting_down: Some(shared.stopping.clone()),
        ..config.handshake.clone()
    };
    let entered = |tls: bool, extended: bool| {
        c.tls.fetch_add(u64::from(tls), Ordering::Relaxed);
        c.extended_headers
            .fetch_add(u64::from(extended), Ordering::Relaxed);
    };
    match serve_one(stream, exports, &handshake_config, config, entered) {
        Ok(()) => {}
        Err(ConnectionError::Io(_) | ConnectionError::Handshake(_)) => {
            c.handshakes_failed.fetch_add(1, Ordering::Relaxed);
        }
        Err(ConnectionError::Serve(_)) => {
            c.connections_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    lock(&shared.sockets).remove(&id);
    c.active.fetch_sub(1, Ordering::AcqRel);
}

fn reap_finished(shared: &Shared) {
    let mut threads = lock(&shared.threads);
    let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
    *threads = running;
    drop(threads);
    for t in done {
        let _ = t.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A connection thread that panicked poisons nothing we cannot still use: the maps stay valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NbdServer {
    /// Where the server listens.
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        ServerStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Acquire),
            refused: c.refused.load(Ordering::Relaxed),
            handshakes_failed: c.handshakes_failed.load(Ordering::Relaxed),
            connections_failed: c.connections_failed.load(Ordering::Relaxed),
            tls: c.tls.load(Ordering::Relaxed),
            extended_headers: c.extended_headers.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and drains: handshakes in progress are refused (`NBD_REP_ERR_SHUTDOWN`),
    /// and each connection stops reading new requests, answers the ones in flight, and closes.
    /// Returns when every connection thread has finished.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the acceptor from accept(2) with a connection of our own. If even that fails
        // the acceptor stays parked in accept; it owns nothing that needs draining.
        if self.poke_acceptor() {
            let _ = acceptor.join();
        }
        // Reading side only: a connection's reader sees end-of-file, while replies to the
        // requests already read still go out.
        for socket in lock(&self.shared.sockets).values() {
            socket.shutdown(Shutdown::Read);
        }
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        if let (ListenAddr::Unix(path), true) = (&self.addr, self.owns_path) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn poke_acceptor(&self) -> bool {
        match &self.addr {
            ListenAddr::Unix(path) => UnixStream::connect(path).is_ok(),
            ListenAddr::Tcp(addr) => {
                let mut target = *addr;
                if target.ip().is_unspecified() {
                    let loopback = match target {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    };
                    target.set_ip(loopback);
                }
                TcpStream::connect_timeout(&target, Duration::from_secs(5)).is_ok()
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
