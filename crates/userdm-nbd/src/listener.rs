//! Listening sockets: accept, negotiate, and run one thread per connection.
//!
//! [`serve_unix`] and [`serve_tcp`] return an [`NbdServer`] handle at once; an acceptor thread
//! accepts connections and gives each its own thread, which runs the handshake and then the
//! transmission phase on its own io_uring ring. Connections share nothing but the backends, so
//! one connection's failure (a hostile client, a broken socket, a failed ring) never touches
//! another. [`NbdServer::shutdown`] stops accepting and drains: every connection's in-flight
//! requests finish and are answered before its socket closes.

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
use crate::handshake::{handshake, ExportCatalogue, ExportInfo, HandshakeConfig};
use crate::server::{serve_connection, ServerConfig};
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
        exports,
        config,
    )
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
        exports,
        config,
    )
}

fn start<B: Backend>(
    listener: Listener,
    addr: ListenAddr,
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
    mut stream: Stream,
    shared: &Shared,
    exports: &Exports<B>,
    config: &ServerConfig,
) {
    let c = &shared.counters;
    let handshake_config = HandshakeConfig {
        shutting_down: Some(shared.stopping.clone()),
        ..config.handshake.clone()
    };
    let negotiated = stream
        .set_timeouts(config.handshake_timeout)
        .map_err(|_| ())
        .and_then(|()| handshake(&mut stream, exports, &handshake_config).map_err(|_| ()))
        .and_then(|n| stream.set_timeouts(None).map(|()| n).map_err(|_| ()));
    match negotiated {
        Ok(negotiated) => {
            if serve_connection(stream, negotiated, config).is_err() {
                c.connections_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(()) => {
            c.handshakes_failed.fetch_add(1, Ordering::Relaxed);
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
        if let ListenAddr::Unix(path) = &self.addr {
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
