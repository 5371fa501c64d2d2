//! userdm's control plane: one server process per device, a run directory to find them, and a
//! small JSON protocol to talk to them.
//!
//! # Decisions
//!
//! - **One server process per device.** `userdm create NAME ...` checks its arguments, then
//!   starts a detached server for the device (the same binary re-executed with the hidden
//!   subcommand [`launch::SERVE_SUBCOMMAND`]: a new session, stdin on `/dev/null`, stdout and
//!   stderr on the device's `server.log`). The CLI hands the server its [`proto::CreateConfig`]
//!   over a readiness socket and waits until the server reports the device up (table loaded and
//!   resumed, control socket bound, exports listening) or reports its error, then exits 0 or
//!   prints that error and exits 1. A crash of one device's server cannot take other devices
//!   down, and servers outlive the CLI, so state survives CLI restarts.
//! - **The run directory** is `$USERDM_RUN_DIR`, default `/run/userdm` ([`rundir`] draws it).
//!   Each device has `devices/<id>/` with `control.sock` (mode 0600, owned by root or by the
//!   owner given with `--uid/--gid` at create), `pid`, `meta.json` and `server.log`. `<id>` is
//!   the lowest free integer, claimed atomically with `mkdir`, and is the device's minor
//!   number. A global `flock` on `lock` serialises create, rename and the removal of stale
//!   directories, so two CLIs cannot create the same name. Listing iterates the directories
//!   and asks each server; a directory whose server is dead (connection refused or socket
//!   missing, and its pid not running) is removed and reported as a warning, never a panic.
//! - **The control protocol** ([`proto`]) is newline-delimited JSON, one request and one
//!   response per connection, versioned by a `version` field that both sides check before
//!   decoding anything else, so a newer CLI talking to an older server gets a clear
//!   "protocol version mismatch" error. Requests cover every lifecycle command of
//!   `userdm_device::Device` plus `Open` (the connection counts as an opener while it lasts)
//!   and `Shutdown`.
//! - **Who may send what.** The socket is mode 0600, so only root and the socket's owner can
//!   connect at all. Behind that, the server checks the peer with `SO_PEERCRED`: read-only
//!   queries (`info`, `table`, `status`, `deps`, `wait`) are answered for any peer; `load`
//!   only for uid 0 and the server's own uid (the server opens a table's files with its own
//!   rights, so an owner could otherwise export any file root can read); every other command
//!   also for the owner uid given at create.
//! - **The server process** owns an `Arc<Device<T>>` and executes commands that change the
//!   device on its main thread, one at a time, as the kernel serialises ioctls on a device. An
//!   acceptor thread reads each connection's request line on a short-lived thread of its own
//!   (so a client that connects and says nothing holds up nobody); that thread answers the
//!   read-only queries itself (so `ls` stays quick while a suspend drains IO) and hands every
//!   other command to the main thread. A `wait` blocks on its own thread, an `open` holds one
//!   for as long as its connection lasts. Exports run on their own
//!   threads (an NBD connection is one thread with its own `Reactor`, calling
//!   `Device::io`). `remove` with the device closed stops the exports, deletes the run
//!   directory, answers, and exits 0; a deferred removal completes at the last close, which an
//!   export reports through [`DeviceHandle::close`]. A table's relative paths resolve against
//!   the client's working directory, which `create` and `load` send along.
//! - **Device numbers.** A device with no kernel block device reports major 0 and minor = its
//!   id: no kernel device exists, and 0 is the major Linux reserves for "unnamed" devices, so no
//!   real block device can be mistaken for it. An export that creates a kernel device (ublk)
//!   reports its real `ublkb` major:minor through [`Export::device_number`].
//!
//! # Example
//!
//! ```no_run
//! use userdm_control::{client, proto::{Command, Reply}, rundir::RunDir};
//! let run = RunDir::from_env();
//! let mut warnings = Vec::new();
//! if let Some(found) = run.find("t0", None, &mut warnings)? {
//!     client::call(&found.dir.socket(), "t0", Command::Suspend { noflush: false, nolockfs: false })?;
//! }
//! # Ok::<(), userdm_control::ControlError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
mod error;
pub mod export;
pub mod launch;
pub mod proto;
pub mod rundir;
pub mod server;

pub use error::ControlError;
pub use export::{
    DeviceHandle, Export, ExportFactory, ExportSpec, NoExports, UblkSpec, UserCounter,
};
