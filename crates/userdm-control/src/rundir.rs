//! The run directory: where servers listen and how clients find them.
//!
//! ```text
//! $USERDM_RUN_DIR (default /run/userdm)
//! ├── lock                 flock(2)ed by create, rename and removal of stale entries
//! ├── recovery/
//! │   └── <ublk id>.json   how to rebuild a device whose ublk export outlives its server
//! │                        (a CreateConfig; written by the server, read by `userdm recover`)
//! └── devices/
//!     └── <id>/            id = the lowest free integer, claimed with mkdir(2); the minor number
//!         ├── control.sock the server's control socket, mode 0600 (owner: root or --uid/--gid)
//!         ├── pid          the server's process id
//!         ├── meta.json    {"name":..,"uuid":..}, kept current by the server (for lookups)
//!         ├── server.log   the server's stderr
//!         └── ready.sock   only while the server starts: the CLI's readiness socket
//! ```
//!
//! Lookups by name read `meta.json` and then ask the server itself, so a stale `meta.json`
//! cannot make a client act on the wrong device. A directory whose server is gone (its socket
//! refuses connections or is missing, and its pid is not running) is removed, under the lock
//! and after a second look, and reported to the caller as a warning.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client;
use crate::proto::{Command, CreateConfig, DeviceReport, Reply};
use crate::ControlError;

/// The environment variable naming the run directory.
pub const RUN_DIR_ENV: &str = "USERDM_RUN_DIR";
/// The run directory when the environment does not name one.
pub const RUN_DIR_DEFAULT: &str = "/run/userdm";

/// The run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

/// The global lock, held while it lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// One device's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDir {
    id: u32,
    path: PathBuf,
}

/// What `meta.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMeta {
    /// The device's name.
    pub name: String,
    /// Its uuid, if set.
    #[serde(default)]
    pub uuid: Option<String>,
}

/// A device whose server answered.
#[derive(Clone, Debug)]
pub struct Found {
    /// Its directory.
    pub dir: DeviceDir,
    /// What its server said.
    pub info: DeviceReport,
}

/// The result of looking at every device.
#[derive(Debug, Default)]
pub struct Scan {
    /// Devices whose servers answered, by id.
    pub devices: Vec<Found>,
    /// Stale directories that were removed, described for a warning.
    pub warnings: Vec<String>,
}

/// What probing a directory found.
#[derive(Debug)]
pub enum Probe {
    /// The server answered.
    Alive(DeviceReport),
    /// The server is gone; the reason, for a warning.
    Dead(String),
    /// The server exists but did not answer properly.
    Failed(ControlError),
}

impl RunDir {
    /// The run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    /// The run directory named by `$USERDM_RUN_DIR`, or `/run/userdm`.
    pub fn from_env() -> RunDir {
        match std::env::var_os(RUN_DIR_ENV) {
            Some(p) if !p.is_empty() => RunDir::new(p),
            _ => RunDir::new(RUN_DIR_DEFAULT),
        }
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn devices_path(&self) -> PathBuf {
        self.root.join("devices")
    }

    /// Where the recovery record of ublk device `ublk_id` lives.
    pub fn recovery_record(&self, ublk_id: u32) -> PathBuf {
        self.root.join("recovery").join(format!("{ublk_id}.json"))
    }

    /// Where devices that outlive their servers keep `memory` rows' bytes.
    pub fn memory_root(&self) -> PathBuf {
        self.root.join("memory")
    }

    /// Removes a device's memory directory (from its recovery record), and only if it lies in
    /// this run directory: a record is a file, and a corrupt one must not delete elsewhere.
    pub fn remove_memory_dir(&self, dir: &Path) {
        remove_memory_dir_under(&self.memory_root(), dir);
    }

    /// Reads the recovery record of ublk device `ublk_id`.
    pub fn read_recovery_record(&self, ublk_id: u32) -> Result<CreateConfig, ControlError> {
        let path = self.recovery_record(ublk_id);
        let bytes = fs::read(&path).map_err(|source| ControlError::RunDir {
            what: "cannot read the recovery record",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ControlError::Protocol(format!(
                "recovery record {} is corrupt: {e}",
                path.display()
            ))
        })
    }

    /// Creates the run directory and `devices/` if they are missing (mode 0755: owners named
    /// with `--uid` must reach their sockets).
    pub fn ensure(&self) -> Result<(), ControlError> {
        let devices = self.devices_path();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&devices)
            .map_err(|source| ControlError::RunDir {
                what: "cannot create run directory",
                path: devices,
                source,
            })
    }

    /// Takes the global lock, waiting for it.
    ///
    /// The lock file is mode 0644 and locked through a read-only descriptor, so that device
    /// owners named with `--uid` can take it too (to rename their devices).
    pub fn lock(&self) -> Result<RunLock, ControlError> {
        self.ensure()?;
        let path = self.root.join("lock");
        let open = || File::open(&path);
        let file = match open() {
            Err(e) if e.kind() == IoKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .open(&path)
                .and_then(|_| open()),
            other => other,
        }
        .map_err(|source| ControlError::RunDir {
            what: "cannot open lock file",
            path: path.clone(),
            source,
        })?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            ControlError::RunDir {
                what: "cannot lock",
                path,
                source: e.into(),
            }
        })?;
        Ok(RunLock { _file: file })
    }

    /// The directory of device `id` (whether or not it exists).
    pub fn device_dir(&self, id: u32) -> DeviceDir {
        DeviceDir {
            id,
            path: self.devices_path().join(id.to_string()),
        }
    }

    /// Every device directory, by id. Entries that are not decimal ids are ignored.
    pub fn device_dirs(&self) -> Result<Vec<DeviceDir>, ControlError> {
        let devices = self.devices_path();
        let entries = match fs::read_dir(&devices) {
            Ok(e) => e,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ControlError::RunDir {
                    what: "cannot read",
                    path: devices,
                    source,
                })
            }
        };
        let mut dirs: Vec<DeviceDir> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let id: u32 = name.parse().ok()?;
                (id.to_string() == name).then(|| self.device_dir(id))
            })
            .collect();
        dirs.sort_by_key(|d| d.id);
        Ok(dirs)
    }

    /// Claims the lowest free id by creating its directory.
    pub fn claim(&self, _lock: &RunLock) -> Result<DeviceDir, ControlError> {
        self.ensure()?;
        // Ids are minors; 2^20 is the kernel's MINORMASK + 1, far beyond any real use.
        for id in 0..(1u32 << 20) {
            let dir = self.device_dir(id);
            match fs::DirBuilder::new().mode(0o755).create(&dir.path) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == IoKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(ControlError::RunDir {
                        what: "cannot create device directory",
                        path: dir.path,
                        source,
                    })
                }
            }
        }
        Err(ControlError::Launch("no free device id".into()))
    }

    /// Probes every device directory, removing those whose servers are gone. A server that
    /// exists but does not answer is skipped with a warning.
    ///
    /// `lock`: the global lock if the caller holds it (removing a stale directory needs it;
    /// taking it a second time from the same process would deadlock).
    pub fn scan(&self, lock: Option<&RunLock>) -> Result<Scan, ControlError> {
        let mut scan = Scan::default();
        for dir in self.device_dirs()? {
            match self.probe_or_reap(&dir, lock, &mut scan.warnings) {
                Ok(Some(info)) => scan.devices.push(Found { dir, info }),
                Ok(None) => {}
                // One server that misbehaves must not hide the others.
                Err(e) => {
                    scan.warnings
                        .push(format!("skipped device id {}: {}", dir.id, error_chain(&e)))
                }
            }
        }
        Ok(scan)
    }

    /// Finds the device called `name`, removing stale directories met on the way. `lock` as
    /// for [`RunDir::scan`].
    pub fn find(
        &self,
        name: &str,
        lock: Option<&RunLock>,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Found>, ControlError> {
        for dir in self.device_dirs()? {
            match dir.read_meta() {
                Some(meta) if meta.name == name => {}
                _ => continue,
            }
            if let Some(info) = self.probe_or_reap(&dir, lock, warnings)? {
                if info.name == name {
                    return Ok(Some(Found { dir, info }));
                }
            }
        }
        Ok(None)
    }

    /// Probes one directory; a dead one is removed (under the lock, after a second look) and
    /// `None` returned. A server that exists but fails to answer is an error.
    fn probe_or_reap(
        &self,
        dir: &DeviceDir,
        lock: Option<&RunLock>,
        warnings: &mut Vec<String>,
    ) -> Result<Option<DeviceReport>, ControlError> {
        match dir.probe() {
            Probe::Alive(info) => return Ok(Some(info)),
            Probe::Failed(e) => return Err(e),
            Probe::Dead(_) => {}
        }
        // A directory looks dead while its creator is still starting the server; creation
        // holds the lock, so look again while holding it.
        let taken;
        let _lock = match lock {
            Some(l) => l,
            None => {
                taken = self.lock()?;
                &taken
            }
        };
        match dir.probe() {
            Probe::Alive(info) => Ok(Some(info)),
            Probe::Failed(e) => Err(e),
            Probe::Dead(reason) => {
                let name = dir.read_meta().map_or_else(|| "?".to_string(), |m| m.name);
                dir.remove()?;
                warnings.push(format!(
                    "removed stale device {name} (id {}): {reason}",
                    dir.id
                ));
                Ok(None)
            }
        }
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

impl DeviceDir {
    /// The id, which is also the device's minor number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    /// The readiness socket, present only while a server starts.
    pub fn ready_socket(&self) -> PathBuf {
        self.path.join("ready.sock")
    }

    /// The server's log.
    pub fn log_file(&self) -> PathBuf {
        self.path.join("server.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.path.join("pid")
    }

    fn meta_file(&self) -> PathBuf {
        self.path.join("meta.json")
    }

    /// The recorded name and uuid, if readable.
    pub fn read_meta(&self) -> Option<DeviceMeta> {
        let bytes = fs::read(self.meta_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records the name and uuid (atomically: written aside, then renamed into place).
    pub fn write_meta(&self, meta: &DeviceMeta) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec(meta).map_err(|e| ControlError::Encode(e.to_string()))?;
        self.write_atomic(&self.meta_file(), &bytes)
    }

    /// The recorded server pid.
    pub fn read_pid(&self) -> Option<u32> {
        fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Records the server pid.
    pub fn write_pid(&self, pid: u32) -> Result<(), ControlError> {
        self.write_atomic(&self.pid_file(), format!("{pid}\n").as_bytes())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
        let tmp = path.with_extension("tmp");
        let err = |what, source| ControlError::RunDir {
            what,
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::create(&tmp).map_err(|e| err("cannot write", e))?;
        f.write_all(bytes).map_err(|e| err("cannot write", e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| err("cannot write", e))
    }

    /// Whether the recorded server process exists: it runs (a zombie, which a container's
    /// init may never reap, does not count) and is a userdm server (its pid was not reused).
    pub fn server_running(&self) -> bool {
        let Some(pid) = self.read_pid() else {
            return false;
        };
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name, which is in parentheses and may hold any
            // byte, so look after the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if matches!(state, Some("Z" | "X" | "x")) {
                return false;
            }
            if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) {
                let serve = crate::launch::SERVE_SUBCOMMAND.as_bytes();
                if !cmdline.split(|b| *b == 0).any(|arg| arg == serve) {
                    return false;
                }
            }
            return true;
        }
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        match rustix::process::test_kill_process(pid) {
            Ok(()) => true,
            // It exists but belongs to someone else.
            Err(e) => e == rustix::io::Errno::PERM,
        }
    }

    /// Asks the server for its info, telling a dead server from one that misbehaves.
    pub fn probe(&self) -> Probe {
        let label = self
            .read_meta()
            .map_or_else(|| format!("#{}", self.id), |m| m.name);
        match client::call(&self.socket(), &label, Command::Info) {
            Ok(Reply::Info(info)) => Probe::Alive(info),
            Ok(other) => Probe::Failed(ControlError::Protocol(format!(
                "unexpected reply to info: {other:?}"
            ))),
            Err(ControlError::Connect { source, .. })
                if matches!(source.kind(), IoKind::NotFound | IoKind::ConnectionRefused)
                    && !self.server_running() =>
            {
                Probe::Dead(format!("its server is gone ({source})"))
            }
            Err(e) => Probe::Failed(e),
        }
    }

    /// Removes the directory and everything in it. A directory already gone is not an error.
    pub fn remove(&self) -> Result<(), ControlError> {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == IoKind::NotFound => Ok(()),
            Err(source) => Err(ControlError::RunDir {
                what: "cannot remove",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// The run directory `dir` belongs to.
fn root_of(dir: &DeviceDir) -> Option<&Path> {
    dir.path.parent()?.parent()
}

/// Writes the recovery record of ublk device `ublk_id` (atomically) next to `dir`'s run
/// directory.
pub(crate) fn write_recovery_record(
    dir: &DeviceDir,
    ublk_id: u32,
    record: &CreateConfig,
) -> Result<(), ControlError> {
    let Some(root) = root_of(dir) else {
        return Ok(());
    };
    let path = RunDir::new(root).recovery_record(ublk_id);
    let parent = path.parent().unwrap_or(root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|source| ControlError::RunDir {
            what: "cannot create",
            path: parent.to_path_buf(),
            source,
        })?;
    let bytes = serde_json::to_vec(record).map_err(|e| ControlError::Encode(e.to_string()))?;
    dir.write_atomic(&path, &bytes)
}

/// A fresh directory name for the `memory` rows of the device in `dir`, unique across servers
/// (the device id is reused after removal, so the creation time is part of it).
pub(crate) fn new_memory_dir(dir: &DeviceDir) -> Option<PathBuf> {
    let root = root_of(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Some(
        RunDir::new(root)
            .memory_root()
            .join(format!("{}-{nanos}", dir.id())),
    )
}

/// Removes `dir` and what is in it, if `dir` is a direct child of `memory_root`.
pub(crate) fn remove_memory_dir_under(memory_root: &Path, dir: &Path) {
    if dir.parent() == Some(memory_root) && dir.file_name().is_some_and(|n| n != ".." && n != ".") {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Removes the memory directory of the device in `dir`, if it has one.
pub(crate) fn remove_memory_dir(dir: &DeviceDir, memory_dir: &Path) {
    if let Some(root) = root_of(dir) {
        RunDir::new(root).remove_memory_dir(memory_dir);
    }
}

/// Removes the recovery record of ublk device `ublk_id`, if any.
pub(crate) fn remove_recovery_record(dir: &DeviceDir, ublk_id: u32) {
    if let Some(root) = root_of(dir) {
        let _ = fs::remove_file(RunDir::new(root).recovery_record(ublk_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_dirs_are_removed_only_inside_the_run_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path().join("run"));
        let inside = run.memory_root().join("3-17");
        let outside = tmp.path().join("elsewhere");
        for d in [&inside, &outside] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("0-8.mem"), b"x").unwrap();
        }
        run.remove_memory_dir(&outside);
        run.remove_memory_dir(&run.memory_root().join(".."));
        run.remove_memory_dir(&run.memory_root().join("3-17/.."));
        assert!(outside.join("0-8.mem").exists());
        assert!(run.memory_root().exists());
        run.remove_memory_dir(&inside);
        assert!(!inside.exists());
    }

    #[test]
    fn claims_lowest_free_id_and_lists_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let lock = run.lock().unwrap();
        let a = run.claim(&lock).unwrap();
        let b = run.claim(&lock).unwrap();
        let c = run.claim(&lock).unwrap();
        assert_eq!((a.id(), b.id(), c.id()), (0, 1, 2));
        b.remove().unwrap();
        assert_eq!(run.claim(&lock).unwrap().id(), 1);
        fs::create_dir(run.devices_path().join("junk")).unwrap();
        fs::create_dir(run.devices_path().join("007")).unwrap();
        let ids: Vec<u32> = run.device_dirs().unwrap().iter().map(|d| d.id()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
    }

    #[test]
    fn meta_and_pid_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let lock = run.lock().unwrap();
        let d = run.claim(&lock).unwrap();
        assert_eq!(d.read_meta(), None);
        let meta = DeviceMeta {
            name: "t0".into(),
            uuid: Some("u".into()),
        };
        d.write_meta(&meta).unwrap();
        assert_eq!(d.read_meta(), Some(meta));
        assert!(!d.server_running());
        // A live process that is not a server (a reused pid) does not count.
        d.write_pid(std::process::id()).unwrap();
        assert!(!d.server_running());
        fs::write(d.pid_file(), "garbage").unwrap();
        assert!(!d.server_running());
    }

    #[test]
    fn dead_directories_are_reaped_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let lock = run.lock().unwrap();
        let d = run.claim(&lock).unwrap();
        d.write_meta(&DeviceMeta {
            name: "gone".into(),
            uuid: None,
        })
        .unwrap();
        let mut warnings = Vec::new();
        assert!(run
            .find("gone", Some(&lock), &mut warnings)
            .unwrap()
            .is_none());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("stale device gone"), "{warnings:?}");
        assert!(!d.path().exists());
        drop(lock);
        let scan = run.scan(None).unwrap();
        assert!(scan.devices.is_empty() && scan.warnings.is_empty());
    }
}
