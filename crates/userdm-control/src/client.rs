//! The client side of the control protocol.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::{
    decode, read_value, version_of, write_line, Command, Reply, Request, Response, PROTOCOL_VERSION,
};
use crate::ControlError;

/// How long a command may take before the client gives up, except `wait` (which takes what the
/// caller gives it) and `open` (which holds its connection). Suspend waits for IO in flight and
/// the server gives that up to [`crate::server::SUSPEND_TIMEOUT`], so this is longer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one command to the server listening at `socket` and returns its reply. `device` names
/// the device in errors.
pub fn call(socket: &Path, device: &str, command: Command) -> Result<Reply, ControlError> {
    let timeout = match &command {
        Command::Wait { .. } | Command::Open => None,
        _ => Some(COMMAND_TIMEOUT),
    };
    let (reply, _stream) = call_keep(socket, device, command, timeout)?;
    Ok(reply)
}

/// Like [`call`], but returns the connection too, for `Open`, whose opener lasts as long as the
/// connection does.
pub fn call_keep(
    socket: &Path,
    device: &str,
    command: Command,
    timeout: Option<Duration>,
) -> Result<(Reply, UnixStream), ControlError> {
    let stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        device: device.to_string(),
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(timeout).map_err(ControlError::Io)?;
    stream
        .set_write_timeout(Some(COMMAND_TIMEOUT))
        .map_err(ControlError::Io)?;
    let request = Request {
        version: PROTOCOL_VERSION,
        command,
    };
    write_line(&stream, &request)?;
    let mut reader = BufReader::new(&stream);
    let value = read_value(&mut reader)?.ok_or_else(|| {
        ControlError::Protocol(format!(
            "the server of device {device} closed the connection without answering"
        ))
    })?;
    match version_of(&value) {
        Some(PROTOCOL_VERSION) => {}
        other => {
            return Err(ControlError::Version {
                ours: PROTOCOL_VERSION,
                theirs: other.map_or_else(|| "none".to_string(), |v| v.to_string()),
            })
        }
    }
    let response: Response = decode(value)?;
    drop(reader);
    match (response.ok, response.error) {
        (_, Some(e)) => Err(ControlError::Server(e)),
        (Some(reply), None) => Ok((reply, stream)),
        (None, None) => Err(ControlError::Protocol(
            "response has neither a reply nor an error".into(),
        )),
    }
}
