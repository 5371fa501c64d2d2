//! userdm's NBD export: a sans-IO protocol codec, the fixed-newstyle handshake, and a
//! transmission server with one io_uring-driven thread per connection.
//!
//! - [`proto`]: every message of the protocol (including the experimental extended headers),
//!   encoded and decoded without IO;
//! - [`handshake`]: option negotiation over any blocking `Read + Write`, against an
//!   [`ExportCatalogue`];
//! - [`server`]: the transmission phase of one connection, against a [`Backend`];
//! - [`listener`]: [`serve_unix`] / [`serve_tcp`] / [`serve_listen_fds`] (systemd socket
//!   activation), which accept, negotiate and serve, and stop cleanly with
//!   [`NbdServer::shutdown`]; and [`serve_stream`], one client on an already-connected socket
//!   (inetd style, e.g. standard input);
//! - [`tls`]: STARTTLS with rustls (X.509; `off`/`on`/`require` as nbdkit's `--tls`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use userdm_nbd::{serve_unix, Exports, MemBackend, ServerConfig};
//!
//! let disk = Arc::new(MemBackend::new(64 << 20));
//! let server = serve_unix("/tmp/disk.sock", Exports::new().with("disk", "", disk),
//!                         ServerConfig::default()).unwrap();
//! // nbdinfo 'nbd+unix:///disk?socket=/tmp/disk.sock'
//! server.shutdown();
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod handshake;
pub mod listener;
pub mod mem;
pub mod proto;
pub mod server;
pub mod stream;
#[allow(unsafe_code)]
mod sys;
pub mod tls;

pub use backend::{errno_to_nbd, export_info, Backend, BackendProperties, DeviceBackend, Extent};
pub use handshake::{
    handshake, handshake_tls, BlockSizes, ExportCatalogue, ExportFeatures, ExportInfo,
    HandshakeConfig, HandshakeError, MetaContexts, Negotiated,
};
pub use listener::{
    serve_listen_fds, serve_stream, serve_tcp, serve_unix, ConnectionError, Export, Exports,
    ListenAddr, NbdServer, ServerStats,
};
pub use mem::MemBackend;
pub use server::{serve_connection, ServeError, ServerConfig};
pub use stream::Stream;
pub use tls::{TlsConfig, TlsError, TlsMode};
