//! The control protocol: one JSON request line, one JSON response line, per connection.
//!
//! ```text
//! client → server   {"version":1,"command":{"op":"suspend","noflush":false,"nolockfs":false}}\n
//! server → client   {"version":1,"ok":{"kind":"done"}}\n
//!                   {"version":1,"error":{"kind":"busy","message":"device t0 is busy: ..."}}\n
//! ```
//!
//! Both sides look at `version` before anything else, with the rest of the message still
//! undecoded, so a CLI and a server of different protocol versions always get as far as a clear
//! "protocol version mismatch" error instead of a decoding failure. Fields added within one
//! version must be optional (`#[serde(default)]`) so that older peers ignore them.
//!
//! Two requests keep their connection open: [`Command::Wait`] answers when the device's event
//! number changes, and [`Command::Open`] counts the connection as an opener of the device (as an
//! export connection is counted) until the client closes it.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ControlError;

/// The protocol version this build speaks. Bump it on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request or response line accepted, in bytes. A table of the kernel's maximum
/// size (1 Mi rows) fits comfortably only in a file, not here; 64 MiB is far beyond any table a
/// person writes and still bounds what a hostile peer can make the server allocate.
pub const LINE_BYTES_MAX: u64 = 64 << 20;

/// A request: the protocol version and one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What to do.
    pub command: Command,
}

/// Every command a device's server accepts. Each maps onto one lifecycle call of
/// `userdm_device::Device` (or, for [`Command::Shutdown`], onto the server itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// The facts `dmsetup info` prints. Read-only.
    Info,
    /// Parses `table` and puts it in the inactive slot (`dmsetup load`).
    Load {
        /// Table text, one row per line.
        table: String,
        /// The client's working directory: relative paths in the table resolve against it.
        #[serde(default)]
        cwd: Option<PathBuf>,
    },
    /// Drops the inactive table (`dmsetup clear`).
    Clear,
    /// Suspends the device (`dmsetup suspend`).
    Suspend {
        /// Let targets that queue IO give it back instead of completing it.
        #[serde(default)]
        noflush: bool,
        /// Accepted for dmsetup compatibility; there is no filesystem to freeze in user space.
        #[serde(default)]
        nolockfs: bool,
    },
    /// Resumes, making an inactive table live (`dmsetup resume`).
    Resume,
    /// Renames the device. The client must hold the run directory's lock, which makes the
    /// name check and the rename one step.
    Rename {
        /// The new name.
        new_name: String,
    },
    /// Sets the uuid, once (`dmsetup rename --setuuid`).
    SetUuid {
        /// The uuid.
        uuid: String,
    },
    /// Removes the device (`dmsetup remove`): refused while it is open unless `deferred`.
    Remove {
        /// Remove at the last close instead of failing while open.
        #[serde(default)]
        deferred: bool,
        /// First replace the table with one that fails all IO (`dmsetup remove -f`).
        #[serde(default)]
        force: bool,
    },
    /// Sends a message to the target at `sector` of the live table (`dmsetup message`).
    Message {
        /// The sector that picks the row.
        sector: u64,
        /// The message words.
        argv: Vec<String>,
    },
    /// Sets the geometry (`dmsetup setgeometry`).
    SetGeometry {
        /// Cylinders.
        cylinders: u32,
        /// Heads.
        heads: u32,
        /// Sectors per track.
        sectors: u32,
        /// Start sector.
        start: u64,
    },
    /// Answers once the event number differs from `event_nr` (at once if it already does).
    /// Without `event_nr`, the current number is used, so the call waits for the next event.
    /// Read-only.
    Wait {
        /// The event number the client has seen.
        #[serde(default)]
        event_nr: Option<u32>,
        /// Give up after this long and answer with the current number.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Table lines (`dmsetup table`). Read-only.
    Table {
        /// Of the inactive table instead of the live one.
        #[serde(default)]
        inactive: bool,
    },
    /// Status lines (`dmsetup status`). Read-only.
    Status {
        /// Of the inactive table instead of the live one.
        #[serde(default)]
        inactive: bool,
    },
    /// Dependencies (`dmsetup deps`). Read-only.
    Deps {
        /// Of the inactive table instead of the live one.
        #[serde(default)]
        inactive: bool,
    },
    /// Replaces the live table with one `error` row of the same size (`dmsetup wipe_table`).
    WipeTable {
        /// Suspend without flushing.
        #[serde(default)]
        noflush: bool,
    },
    /// Counts this connection as an opener of the device until the client closes it. The server
    /// answers `Opened` at once and then holds the connection.
    Open,
    /// Starts an export on the running device (`userdm export NAME SPEC`). Root only, as
    /// `load`: an export opens, creates or mounts paths with the server's rights.
    AddExport {
        /// The export, in `--export` syntax.
        spec: String,
    },
    /// Stops an export of the running device; its clients are disconnected. A kernel block
    /// device in use is refused, as `remove` refuses it.
    RemoveExport {
        /// The export, as given or as `info` lists it.
        spec: String,
    },
    /// Stops the server at once, whatever the open count: exports stop, their clients are cut
    /// off, the run directory goes, the process exits. For administrators and tests; `remove`
    /// is the dmsetup way.
    Shutdown,
}

impl Command {
    /// Whether the command leaves the device as it is. Read-only commands are served to any
    /// peer that can connect; the others only to root and the device's owner.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Info
                | Command::Wait { .. }
                | Command::Table { .. }
                | Command::Status { .. }
                | Command::Deps { .. }
        )
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Info => "info",
            Command::Load { .. } => "load",
            Command::Clear => "clear",
            Command::Suspend { .. } => "suspend",
            Command::Resume => "resume",
            Command::Rename { .. } => "rename",
            Command::SetUuid { .. } => "setuuid",
            Command::Remove { .. } => "remove",
            Command::Message { .. } => "message",
            Command::SetGeometry { .. } => "setgeometry",
            Command::Wait { .. } => "wait",
            Command::Table { .. } => "table",
            Command::Status { .. } => "status",
            Command::Deps { .. } => "deps",
            Command::WipeTable { .. } => "wipe_table",
            Command::Open => "open",
            Command::AddExport { .. } => "export",
            Command::RemoveExport { .. } => "export --remove",
            Command::Shutdown => "shutdown",
        }
    }
}

/// A response: the server's protocol version and either a reply or an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The server's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The reply, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Reply>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
}

impl Response {
    /// A successful response.
    pub fn ok(reply: Reply) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: Some(reply),
            error: None,
        }
    }

    /// A failed response carrying `error`.
    pub fn failed(error: ErrorReply) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: None,
            error: Some(error),
        }
    }

    /// A failed response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: None,
            error: Some(ErrorReply {
                kind,
                message: message.into(),
            }),
        }
    }
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
// One reply per control request, off the data path: boxing the report would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// Nothing to report.
    Done,
    /// The device's facts.
    Info(DeviceReport),
    /// Table or status rows.
    Rows {
        /// The rows, in table order.
        rows: Vec<RowReport>,
    },
    /// Dependencies.
    Deps {
        /// In the kernel's order: the most recently added device first.
        deps: Vec<DepReport>,
    },
    /// The target's answer to a message, if it gave one.
    Message {
        /// The answer.
        reply: Option<String>,
    },
    /// The event number after a wait.
    Event {
        /// The number.
        event_nr: u32,
    },
    /// The result of a removal.
    Removed {
        /// True: the device is gone. False: it is open and will go at the last close.
        now: bool,
    },
    /// The connection now counts as an opener.
    Opened,
    /// An export started: where clients reach it.
    Exported {
        /// In `--export` syntax (a TCP port 0 resolved, a ublk device named).
        address: String,
    },
    /// Done, with things the user should know (a kernel device that could not be resized).
    Warnings {
        /// One sentence each.
        warnings: Vec<String>,
    },
}

/// The facts behind `dmsetup info`, plus userdm's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Uuid, if set.
    pub uuid: Option<String>,
    /// Whether IO is held.
    pub suspended: bool,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether a live table is present.
    pub live_table: bool,
    /// Whether an inactive table is present.
    pub inactive_table: bool,
    /// Openers: export connections, `Open` connections, and the kernel block device's users
    /// (descriptors, mounts, stacked devices).
    pub open_count: i32,
    /// The event counter.
    pub event_nr: u32,
    /// Rows in the live table.
    pub target_count: u32,
    /// Whether removal waits for the last close.
    pub deferred_remove: bool,
    /// Size of the live table in sectors.
    pub size_sectors: u64,
    /// Major number: 0 while no kernel block device exists (see the crate docs).
    pub major: u32,
    /// Minor number: the device's id in the run directory.
    pub minor: u32,
    /// Read-ahead in sectors, as the kernel would set it for this table.
    pub read_ahead: u32,
    /// The server's process id.
    pub pid: u32,
    /// Owner uid allowed to send commands besides root.
    #[serde(default)]
    pub owner_uid: Option<u32>,
    /// The exports, as given to `--export` (with the address a TCP port 0 or a ublk device
    /// was given).
    #[serde(default)]
    pub exports: Vec<String>,
    /// The kernel block device an export made (`/dev/ublkbN`).
    #[serde(default)]
    pub block_device: Option<PathBuf>,
    /// Geometry set with `setgeometry`.
    #[serde(default)]
    pub geometry: Option<GeometryReport>,
    /// Counters of the IO the device has served.
    #[serde(default)]
    pub io: IoStatsReport,
}

/// Counters of the IO a device has served (`Device::io_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStatsReport {
    /// Reads completed successfully.
    pub reads: u64,
    /// Writes completed successfully.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Other requests (flush, discard, ...) completed successfully.
    pub others: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests given back during a noflush suspend and resubmitted after resume.
    pub requeues: u64,
}

/// Disk geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeometryReport {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Start sector.
    pub start: u64,
}

/// One table or status row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowReport {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type.
    pub target_type: String,
    /// Table params or status text.
    pub params: String,
}

impl RowReport {
    /// The row as dmsetup prints it: `start length type params` (a trailing space when params
    /// are empty, as dmsetup's `"%llu %llu %s "` then `"%s"`).
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.start, self.length, self.target_type, self.params
        )
    }
}

/// One dependency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepReport {
    /// Major number (0 for a regular file).
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// What the table named.
    pub path: String,
}

/// A failure, with a kind a program can match and a message a person can read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, broadly.
    pub kind: ErrorKind,
    /// The message, naming the device and the problem.
    pub message: String,
}

/// Broad classes of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request could not be decoded.
    BadRequest,
    /// Client and server speak different protocol versions.
    Version,
    /// The peer may not send this command.
    Permission,
    /// The table text was refused.
    Table,
    /// The device is open.
    Busy,
    /// Any other refusal by the device.
    Device,
    /// The message was refused.
    Message,
    /// The server failed.
    Internal,
    /// A kind this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

/// The first message on the readiness socket, from the CLI to a starting server: what device
/// to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateConfig {
    /// The CLI's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Device name.
    pub name: String,
    /// Uuid, if any.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Table text; `None` creates the device without a table (`--notable`). Either way the
    /// server resumes the new device, so it reads ACTIVE as a `dmsetup create` leaves it.
    #[serde(default)]
    pub table: Option<String>,
    /// The CLI's working directory, for relative paths in the table.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Export specs, as given to `--export`.
    #[serde(default)]
    pub exports: Vec<String>,
    /// Owner uid (besides root) allowed to send commands; the socket is chowned to it.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group of the socket.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Where `memory` rows keep their bytes so that they outlive the server; set by the server
    /// of a device served over ublk with recovery, and carried to the server that recovers it
    /// by the recovery record. `None`: in the server's own memory.
    #[serde(default)]
    pub memory_dir: Option<PathBuf>,
}

/// The server's answer on the readiness socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyReport {
    /// The server's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The device, when it is up.
    #[serde(default)]
    pub ready: Option<DeviceReport>,
    /// Why it could not come up.
    #[serde(default)]
    pub error: Option<String>,
}

/// Writes one value as a JSON line.
pub fn write_line<W: Write, V: Serialize>(mut w: W, value: &V) -> Result<(), ControlError> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| ControlError::Encode(e.to_string()))?;
    bytes.push(b'\n');
    w.write_all(&bytes).map_err(ControlError::Io)?;
    w.flush().map_err(ControlError::Io)
}

/// Reads one JSON line of at most [`LINE_BYTES_MAX`] bytes, returning the raw value so the
/// caller can check `version` before decoding further. `Ok(None)` at a clean end of stream.
pub fn read_value<R: BufRead>(r: R) -> Result<Option<serde_json::Value>, ControlError> {
    let mut line = Vec::new();
    let n = r
        .take(LINE_BYTES_MAX + 1)
        .read_until(b'\n', &mut line)
        .map_err(ControlError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n as u64 > LINE_BYTES_MAX {
            return Err(ControlError::Protocol(format!(
                "message longer than {LINE_BYTES_MAX} bytes"
            )));
        }
        return Err(ControlError::Protocol(
            "message ends without a newline".into(),
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| ControlError::Protocol(format!("invalid JSON: {e}")))
}

/// The `version` field of a raw message, if it has one.
pub fn version_of(value: &serde_json::Value) -> Option<u32> {
    value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

/// Decodes a raw value into `V`.
pub fn decode<V: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<V, ControlError> {
    serde_json::from_value(value).map_err(|e| ControlError::Protocol(format!("bad message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form_is_stable() {
        let r = Request {
            version: 1,
            command: Command::Suspend {
                noflush: true,
                nolockfs: false,
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"command":{"op":"suspend","noflush":true,"nolockfs":false}}"#
        );
        let back: Request =
            serde_json::from_str(r#"{"version":1,"command":{"op":"suspend"}}"#).unwrap();
        assert_eq!(
            back.command,
            Command::Suspend {
                noflush: false,
                nolockfs: false
            }
        );
    }

    #[test]
    fn response_wire_form_is_stable() {
        let text = serde_json::to_string(&Response::ok(Reply::Done)).unwrap();
        assert_eq!(text, r#"{"version":1,"ok":{"kind":"done"}}"#);
        let text = serde_json::to_string(&Response::error(ErrorKind::Busy, "x")).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"error":{"kind":"busy","message":"x"}}"#
        );
        let unknown: ErrorReply =
            serde_json::from_str(r#"{"kind":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(unknown.kind, ErrorKind::Unknown);
    }

    #[test]
    fn read_value_bounds_and_framing() {
        let mut input: &[u8] = b"{\"version\":7}\n";
        let v = read_value(&mut input).unwrap().unwrap();
        assert_eq!(version_of(&v), Some(7));
        let mut empty: &[u8] = b"";
        assert!(read_value(&mut empty).unwrap().is_none());
        let mut torn: &[u8] = b"{\"version\":";
        assert!(read_value(&mut torn).is_err());
        let mut junk: &[u8] = b"\xff\xfe\n";
        assert!(read_value(&mut junk).is_err());
        assert_eq!(version_of(&serde_json::json!({"version": -1})), None);
        assert_eq!(version_of(&serde_json::json!([])), None);
    }

    #[test]
    fn read_only_commands() {
        assert!(Command::Info.is_read_only());
        assert!(Command::Table { inactive: true }.is_read_only());
        assert!(!Command::Resume.is_read_only());
        assert!(!Command::Open.is_read_only());
        assert!(!Command::Shutdown.is_read_only());
    }
}
