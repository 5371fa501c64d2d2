//! The control endpoint: a Unix stream socket at `$USERDM_DMUSER_DIR/<ctl>`, shared by every
//! `user` row that names it, alive from the first such row's construction to the last one's
//! destruction.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use crate::cuse::{self, CuseDevice, Owner};
use crate::shared::Shared;
use crate::sys::{self, EventFd};
use crate::worker::{Access, Worker};

/// The directory of control endpoints when neither the context nor `USERDM_DMUSER_DIR` names
/// one: where dm-user's misc devices appear.
pub const DEFAULT_DIR: &str = "/dev/dm-user";
/// The environment variable that moves the endpoint directory.
pub const DIR_ENV: &str = "USERDM_DMUSER_DIR";
/// The longest socket path Linux accepts (`sun_path` less its NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Live endpoints by path, so that rows naming the same `ctl` (in one table, or in the old and
/// the new table of a reload) share one socket and its daemons.
static REGISTRY: Mutex<Vec<(PathBuf, Weak<Endpoint>)>> = Mutex::new(Vec::new());

/// What an endpoint is made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointConfig {
    pub(crate) path: PathBuf,
    pub(crate) ctl: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
    pub(crate) depth: usize,
    pub(crate) device: Option<String>,
}

pub(crate) struct Endpoint {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: EndpointConfig,
    thread: Option<JoinHandle<()>>,
    /// `/dev/dm-user/<ctl>` as a character device, where CUSE is on.
    cuse: Option<CuseDevice>,
}

fn registry() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Weak<Endpoint>)>> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Returns the live endpoint at `config.path` if it is compatible, or makes one.
pub(crate) fn open(config: EndpointConfig) -> Result<Arc<Endpoint>, String> {
    let mut reg = registry();
    reg.retain(|(_, w)| w.strong_count() > 0);
    if let Some(ep) = reg
        .iter()
        .find(|(p, _)| *p == config.path)
        .and_then(|(_, w)| w.upgrade())
    {
        let compatible = check_compatible(&ep.config, &config);
        // Our `ep` may be the last reference by now; its drop takes the registry lock.
        drop(reg);
        return compatible.map(|()| ep);
    }
    let listener = bind(&config).map_err(|e| format!("{}: {e}", config.path.display()))?;
    let wake = EventFd::new().map_err(|e| format!("cannot make an eventfd: {e}"))?;
    let shared = Arc::new(Shared::new(config.ctl.clone(), config.depth, wake));
    let access = Access {
        uid: config.uid,
        gid: config.gid,
        mode: config.mode,
    };
    let worker = Worker::new(Arc::clone(&shared), listener, access, config.depth)
        .map_err(|e| format!("cannot watch {}: {e}", config.path.display()))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&config.path);
        })?;
    let thread = std::thread::Builder::new()
        .name(format!("dmuser-{}", config.ctl))
        .spawn(move || worker.run())
        .map_err(|e| {
            let _ = std::fs::remove_file(&config.path);
            format!("cannot start the endpoint thread: {e}")
        })?;
    let cuse = if cuse::enabled() {
        let owner = Owner {
            uid: config.uid,
            gid: config.gid,
            mode: config.mode,
        };
        match CuseDevice::start(&config.ctl, config.path.clone(), Arc::clone(&shared), owner) {
            Ok(c) => Some(c),
            Err(e) => {
                // The socket serves without it; say why the device is missing.
                eprintln!("userdm: user {}: no character device: {e}", config.ctl);
                None
            }
        }
    } else {
        None
    };
    let ep = Arc::new(Endpoint {
        shared,
        config: config.clone(),
        thread: Some(thread),
        cuse,
    });
    reg.push((config.path, Arc::downgrade(&ep)));
    Ok(ep)
}

fn check_compatible(have: &EndpointConfig, want: &EndpointConfig) -> Result<(), String> {
    if let (Some(a), Some(b)) = (&have.device, &want.device) {
        if a != b {
            return Err(format!(
                "control endpoint {} is already used by device {a}",
                have.path.display()
            ));
        }
    }
    if (have.uid, have.gid, have.mode, have.depth) != (want.uid, want.gid, want.mode, want.depth) {
        return Err(format!(
            "control endpoint {} already exists with owner={}:{} mode={:04o} queue_depth={}; rows \
             sharing it must agree",
            have.path.display(),
            have.uid,
            have.gid,
            have.mode,
            have.depth
        ));
    }
    Ok(())
}

/// The socket's path: `<dir>/<ctl>`, or `<dir>/<ctl>.sock` where the character device takes
/// `/dev/dm-user/<ctl>`.
pub(crate) fn socket_path(dir: &Path, ctl: &str) -> PathBuf {
    if cuse::enabled() && dir == Path::new(DEFAULT_DIR) {
        dir.join(format!("{ctl}.sock"))
    } else {
        dir.join(ctl)
    }
}

/// The endpoint directory: the context's, else `$USERDM_DMUSER_DIR`, else `/dev/dm-user`.
pub(crate) fn endpoint_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(d) = configured {
        return d.to_path_buf();
    }
    match std::env::var_os(DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_DIR),
    }
}

fn bind(config: &EndpointConfig) -> io::Result<UnixListener> {
    let path = &config.path;
    let dir = path.parent().unwrap_or(Path::new("/"));
    if path.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("socket path longer than {SOCKET_PATH_BYTES_MAX} bytes; use a shorter ctl name or {DIR_ENV}"),
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    remove_stale(path)?;
    // Bind under a temporary name, set owner and mode, then rename into place: the endpoint
    // never exists under its real name with the wrong owner.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".udm{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let finish = || -> io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(config.mode))?;
        if (config.uid, config.gid) != sys::effective_ids() {
            sys::chown(&tmp, config.uid, config.gid).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give the endpoint to {}:{}: {e} (needs root or CAP_CHOWN)",
                        config.uid, config.gid
                    ),
                )
            })?;
        }
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Removes a socket left by a userdm that died; refuses to touch anything else.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            ErrorKind::AlreadyExists,
            "exists and is not a socket; remove it or choose another ctl name",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            ErrorKind::AddrInUse,
            "another process serves this endpoint (a second userdm?)",
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Under the registry lock until the thread is gone, so that a new endpoint for the same
        // path waits for this one to let go of it (the thread never takes this lock).
        let mut reg = registry();
        reg.retain(|(_, w)| w.strong_count() > 0);
        let _ = std::fs::remove_file(&self.config.path);
        self.shared.shut_down();
        self.shared.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // After the worker: its connections are closed, so every open file fails ENOTBLK.
        drop(self.cuse.take());
        drop(reg);
    }
}
