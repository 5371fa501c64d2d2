//! TLS for NBD: `NBD_OPT_STARTTLS` with rustls, and the record pump of the transmission phase.
//!
//! The policy follows nbdkit's `--tls`: [`TlsMode::Off`] refuses STARTTLS (`NBD_REP_ERR_POLICY`),
//! [`TlsMode::On`] offers it and lets clients choose, [`TlsMode::Require`] answers every option
//! but STARTTLS and ABORT with `NBD_REP_ERR_TLS_REQD` until the session is encrypted (the
//! specification's NOTLS, SELECTIVETLS and FORCEDTLS).
//!
//! Credentials are X.509: a certificate chain and its private key in PEM files, and optionally a
//! CA whose certificates clients must present (mutual TLS). TLS pre-shared keys (gnutls's PSK
//! files, which nbdkit and qemu accept) are **not** available: rustls implements no external
//! PSK key exchange in TLS 1.2 or 1.3 (only resumption PSKs that it derives itself). Mutual TLS
//! with a private CA is the nearest equivalent: only holders of a key the operator issued may
//! connect.
//!
//! The transmission phase runs on io_uring against a plain socket, so a TLS connection is served
//! through a socketpair: `spawn_pump` starts two threads that move records between the client's
//! socket and one end of the pair (decrypting one way, encrypting the other), and the server
//! serves the other end exactly as it serves a plain connection. The kernel's TLS offload (kTLS)
//! would remove the copies, but it is not built into every kernel (this project's development
//! kernel lacks `CONFIG_TLS`), and exports that leave the machine are network-bound anyway.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig as RustlsConfig, ServerConnection};

use crate::stream::Stream;

/// Whether and how the server offers TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS is offered; clients may also negotiate in the clear.
    On,
    /// Every client must upgrade with STARTTLS before anything else.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = TlsError;

    /// `off`, `on` or `require`, as nbdkit's `--tls`.
    fn from_str(s: &str) -> Result<TlsMode, TlsError> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(TlsError::Mode(other.to_string())),
        }
    }
}

/// The TLS policy and credentials of a server.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Off, on or required.
    pub mode: TlsMode,
    /// The rustls server configuration (certificates, verifier, protocol versions).
    pub server: Arc<RustlsConfig>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A `--tls` value other than off, on or require.
    #[error("invalid TLS mode '{0}': expected off, on or require")]
    Mode(String),
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        /// Certificate, key or CA.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the credentials (a key that does not match the certificate, ...).
    #[error("invalid TLS credentials: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("invalid client CA: {0}")]
    Verifier(String),
}

fn pem_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = File::open(path).map_err(|e| pem_error(what, path, e))?;
    let certs = CertificateDer::pem_reader_iter(BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

impl TlsConfig {
    /// X.509 credentials from PEM files: the server's certificate chain and private key (PKCS#8,
    /// PKCS#1 or SEC1), and, with `client_ca`, the CA whose certificates every client must
    /// present. TLS 1.2 and 1.3, with the ring provider's safe defaults.
    pub fn from_pem_files(
        mode: TlsMode,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsConfig, TlsError> {
        let chain = load_certs("certificate", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("key", key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = RustlsConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs("client CA", ca)? {
                    roots
                        .add(c)
                        .map_err(|e| pem_error("client CA", ca, e.to_string()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_single_cert(chain, key)?;
        // Session tickets would be sent after the handshake, in the middle of option replies;
        // NBD clients reconnect rarely, so resumption buys nothing.
        server.send_tls13_tickets = 0;
        Ok(TlsConfig {
            mode,
            server: Arc::new(server),
        })
    }

    /// Whether STARTTLS is accepted.
    pub fn offered(&self) -> bool {
        self.mode != TlsMode::Off
    }
}

/// Completes a server-side TLS handshake on `stream` (right after the STARTTLS ACK).
pub(crate) fn accept<S: Read + Write>(
    config: &TlsConfig,
    stream: &mut S,
) -> io::Result<ServerConnection> {
    let mut conn = ServerConnection::new(config.server.clone()).map_err(io::Error::other)?;
    // Bounded by the socket's handshake timeouts and by the client's bytes: each turn moves the
    // handshake forward or fails.
    while conn.is_handshaking() {
        let (read, written) = conn.complete_io(stream)?;
        if read == 0 && written == 0 && conn.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(conn)
}

/// The threads moving one TLS connection's records; joined when the connection ends.
pub(crate) struct Pump {
    threads: Vec<JoinHandle<()>>,
}

impl Pump {
    /// Waits for both directions to finish.
    pub(crate) fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Size of one plaintext read: a TLS record holds at most 16 KiB.
const PUMP_BYTES: usize = 64 << 10;

/// Starts moving records between `socket` (TLS, negotiated as `conn`) and a new socketpair, and
/// returns the pair's other end, to be served in the clear.
///
/// Client → server: read the socket, decrypt, write the plaintext to the pair. Server → client:
/// read the pair, encrypt, write the socket. End of file either way is passed on: the client
/// closing shuts the pair's writing side (the server sees end of file and answers what is in
/// flight); the server closing sends `close_notify` and shuts the socket.
pub(crate) fn spawn_pump(conn: ServerConnection, socket: Stream) -> io::Result<(Stream, Pump)> {
    let (ours, theirs) = UnixStream::pair()?;
    let conn = Arc::new(Mutex::new(conn));
    // Hand-over-hand: TLS bytes are produced under `conn` and written under `writer`, which is
    // taken before `conn` is released, so records reach the socket in sequence-number order.
    let writer = Arc::new(Mutex::new(socket.try_clone()?));
    let up = {
        let (conn, writer, mut socket, mut pair) = (
            conn.clone(),
            writer.clone(),
            socket.try_clone()?,
            ours.try_clone()?,
        );
        std::thread::Builder::new()
            .name("nbd-tls-up".into())
            .spawn(move || {
                let _ = upstream(&conn, &writer, &mut socket, &mut pair);
                // Stop the server's reader; its replies still flow down.
                let _ = pair.shutdown(Shutdown::Write);
            })?
    };
    let down = {
        let mut pair = ours;
        std::thread::Builder::new()
            .name("nbd-tls-down".into())
            .spawn(move || {
                let _ = downstream(&conn, &writer, &mut pair);
                let mut c = lock(&conn);
                c.send_close_notify();
                let w = lock(&writer);
                let mut out = Vec::new();
                let _ = drain_tls(&mut c, &mut out);
                drop(c);
                let mut w = w;
                let _ = w.write_all(&out);
                w.shutdown(Shutdown::Both);
                let _ = pair.shutdown(Shutdown::Both);
            })?
    };
    Ok((
        Stream::Unix(theirs),
        Pump {
            threads: vec![up, down],
        },
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Moves every pending TLS record of `conn` into `out`.
fn drain_tls(conn: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

fn upstream(
    conn: &Mutex<ServerConnection>,
    writer: &Mutex<Stream>,
    socket: &mut Stream,
    pair: &mut UnixStream,
) -> io::Result<()> {
    let mut cipher = vec![0u8; PUMP_BYTES];
    let mut plain = vec![0u8; PUMP_BYTES];
    let mut out = Vec::new();
    // Plaintext the handshake already decrypted (a client that pipelined its first requests)
    // goes first; then each turn takes one read from the socket, fed to rustls a record buffer
    // at a time, the plaintext of each moved on before the next (rustls bounds its buffers).
    let mut got = 0;
    let mut fed = 0;
    loop {
        let mut c = lock(conn);
        if fed < got {
            let mut rd = &cipher[fed..got];
            let n = c.read_tls(&mut rd)?;
            if n == 0 {
                // rustls took nothing although bytes remain: never spin on it.
                return Err(io::ErrorKind::InvalidData.into());
            }
            fed += n;
            let state = c.process_new_packets();
            out.clear();
            drain_tls(&mut c, &mut out)?;
            if !out.is_empty() {
                let mut w = lock(writer);
                drop(c);
                w.write_all(&out)?;
                c = lock(conn);
            }
            let state = state.map_err(io::Error::other)?;
            if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
                return Ok(());
            }
        }
        // Take out the plaintext, then write it without holding the session.
        loop {
            let n = match c.reader().read(&mut plain) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            drop(c);
            pair.write_all(&plain[..n])?;
            c = lock(conn);
        }
        drop(c);
        if fed < got {
            continue;
        }
        let n = socket.read(&mut cipher)?;
        if n == 0 {
            return Ok(());
        }
        (got, fed) = (n, 0);
    }
}

fn downstream(
    conn: &Mutex<ServerConnection>,
    writer: &Mutex<Stream>,
    pair: &mut UnixStream,
) -> io::Result<()> {
    let mut plain = vec![0u8; PUMP_BYTES];
    let mut out = Vec::with_capacity(PUMP_BYTES + 1024);
    loop {
        let n = pair.read(&mut plain)?;
        if n == 0 {
            return Ok(());
        }
        // rustls takes plaintext up to its buffer limit; encrypt and send what it took, then
        // the rest.
        let mut at = 0;
        while at < n {
            let mut c = lock(conn);
            let took = c.writer().write(&plain[at..n])?;
            out.clear();
            drain_tls(&mut c, &mut out)?;
            if took == 0 && out.is_empty() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut w = lock(writer);
            drop(c);
            w.write_all(&out)?;
            at += took;
        }
    }
}
