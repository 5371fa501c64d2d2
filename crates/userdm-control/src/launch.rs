//! Starting a device's server from the CLI and waiting until it is up.

use std::fs::OpenOptions;
use std::io::BufReader;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use crate::proto::{
    decode, read_value, version_of, write_line, CreateConfig, DeviceReport, ReadyReport,
    PROTOCOL_VERSION,
};
use crate::rundir::{DeviceDir, DeviceMeta, RunDir, RunLock};
use crate::ControlError;

/// The hidden subcommand that makes the binary a server.
pub const SERVE_SUBCOMMAND: &str = "__serve";

/// How long a new server may take to connect back to the CLI.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new server may take to bring its device up (open backing files, bind exports).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the server of a new device and waits until it reports the device up.
///
/// The caller holds the run directory's lock (so the name it checked stays free). This claims
/// the lowest free id, records the name, starts `exe __serve --run-dir ROOT --id ID` in the
/// background with its stdio on `server.log`, hands it `config` over the readiness socket and
/// waits for its answer. On failure the id's directory is removed and the server's own message
/// returned.
pub fn launch(
    run: &RunDir,
    lock: &RunLock,
    exe: &Path,
    config: &CreateConfig,
) -> Result<(DeviceDir, DeviceReport), ControlError> {
    let dir = run.claim(lock)?;
    let result = launch_in(run, &dir, exe, config);
    let _ = std::fs::remove_file(dir.ready_socket());
    if result.is_err() {
        let _ = dir.remove();
    }
    result.map(|r| (dir, r))
}

fn launch_in(
    run: &RunDir,
    dir: &DeviceDir,
    exe: &Path,
    config: &CreateConfig,
) -> Result<DeviceReport, ControlError> {
    dir.write_meta(&DeviceMeta {
        name: config.name.clone(),
        uuid: config.uuid.clone(),
    })?;
    let ready_path = dir.ready_socket();
    let listener = UnixListener::bind(&ready_path).map_err(|source| ControlError::RunDir {
        what: "cannot bind",
        path: ready_path.clone(),
        source,
    })?;
    listener.set_nonblocking(true).map_err(ControlError::Io)?;
    let log_path = dir.log_file();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| ControlError::RunDir {
            what: "cannot open",
            path: log_path.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(ControlError::Io)?;
    let mut child = Process::new(exe)
        .arg(SERVE_SUBCOMMAND)
        .arg("--run-dir")
        .arg(run.root())
        .arg("--id")
        .arg(dir.id().to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| {
            ControlError::Launch(format!(
                "cannot start the device server {}: {e}",
                exe.display()
            ))
        })?;
    match talk(&listener, &mut child, config, &log_path) {
        Ok(report) => Ok(report),
        Err(e) => {
            // A server that reported an error exits by itself; one that hangs must not linger.
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
            }
            let _ = child.wait();
            Err(e)
        }
    }
}

fn talk(
    listener: &UnixListener,
    child: &mut Child,
    config: &CreateConfig,
    log_path: &Path,
) -> Result<DeviceReport, ControlError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ControlError::Io(e)),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ControlError::Launch(format!(
                "the device server exited ({status}) before starting{}",
                log_tail(log_path)
            )));
        }
        if Instant::now() > deadline {
            return Err(ControlError::Launch(format!(
                "the device server did not start within {CONNECT_TIMEOUT:?}{}",
                log_tail(log_path)
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    stream.set_nonblocking(false).map_err(ControlError::Io)?;
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .map_err(ControlError::Io)?;
    write_line(&stream, config)?;
    let value = read_value(BufReader::new(&stream))?.ok_or_else(|| {
        ControlError::Launch(format!(
            "the device server exited without reporting{}",
            log_tail(log_path)
        ))
    })?;
    if version_of(&value) != Some(PROTOCOL_VERSION) {
        return Err(ControlError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version_of(&value).map_or_else(|| "none".into(), |v| v.to_string()),
        });
    }
    let report: ReadyReport = decode(value)?;
    match (report.ready, report.error) {
        (_, Some(e)) => Err(ControlError::Launch(e)),
        (Some(info), None) => Ok(info),
        (None, None) => Err(ControlError::Protocol(
            "readiness report has neither a device nor an error".into(),
        )),
    }
}

/// The last lines of the server's log, for an error message.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("; its log said:\n{}", tail.join("\n"))
}
