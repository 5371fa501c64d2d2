//! The per-device server process: brings the device up as the CLI asked, then answers control
//! requests on its main thread until the device is removed.

use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use userdm_device::{Device, DeviceError, Geometry};
use userdm_table::{split_params, Table, TableError, Target};

use crate::export::{
    DeviceHandle, ExitSignal, Export, ExportFactory, ExportSpec, UblkSpec, UserCounter,
};
use crate::proto::{
    decode, read_value, version_of, write_line, Command, CreateConfig, DepReport, DeviceReport,
    ErrorKind, ErrorReply, GeometryReport, IoStatsReport, ReadyReport, Reply, Request, Response,
    RowReport, PROTOCOL_VERSION,
};
use crate::rundir::{DeviceDir, DeviceMeta, RunDir};
use crate::ControlError;

/// Raises table events on the server's device: handed to the code that builds the target
/// context, before the device exists, and connected to the device once it does.
#[derive(Clone, Default)]
pub struct TableEvents {
    hook: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>,
}

impl TableEvents {
    /// Raises a table event: the device's event number goes up and `wait`ers wake.
    pub fn raise(&self) {
        if let Some(hook) = self.hook.get() {
            hook();
        }
    }

    fn connect(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.hook.set(hook);
    }
}

impl std::fmt::Debug for TableEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableEvents")
    }
}

/// How long a suspend waits for IO in flight before giving up (and leaving the device active).
pub const SUSPEND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the server waits for a client to send its request line (on a thread of the
/// connection's own: a silent client holds up nobody but itself).
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The kernel's default read-ahead (`VM_READAHEAD_PAGES`, 128 KiB), in sectors.
pub const READ_AHEAD_DEFAULT_SECTORS: u64 = 256;

/// Runs the server of device `id`: reads its [`CreateConfig`] from the CLI's readiness socket,
/// brings the device up, reports readiness (or the error, and returns it), then serves until
/// the device is removed or the server is shut down. Returns `Ok` when the server should exit 0.
///
/// Call it in a fresh process whose stdio the CLI already redirected, after [`detach`].
pub fn serve<T>(
    run: &RunDir,
    id: u32,
    make_ctx: &dyn Fn(&CreateConfig, TableEvents) -> T::Context,
    exports: &dyn ExportFactory<T>,
) -> Result<(), ControlError>
where
    T: Target + 'static,
{
    let dir = run.device_dir(id);
    let ready = UnixStream::connect(dir.ready_socket()).map_err(|e| {
        ControlError::Launch(format!(
            "no `userdm create` is waiting at {} ({e}); device servers are started by \
             `userdm create`, not by hand",
            dir.ready_socket().display()
        ))
    })?;
    ready
        .set_read_timeout(Some(REQUEST_READ_TIMEOUT))
        .map_err(ControlError::Io)?;
    let value = read_value(BufReader::new(&ready))?
        .ok_or_else(|| ControlError::Protocol("the CLI sent no configuration".into()))?;
    let config: CreateConfig = match version_of(&value) {
        Some(PROTOCOL_VERSION) => decode(value)?,
        other => {
            let e = ControlError::Version {
                ours: PROTOCOL_VERSION,
                theirs: other.map_or_else(|| "none".into(), |v| v.to_string()),
            };
            report_ready(&ready, Err(e.to_string()));
            return Err(e);
        }
    };
    eprintln!(
        "userdm server {}: starting device {}",
        std::process::id(),
        config.name
    );
    match Server::start(dir, config, make_ctx, exports) {
        Ok(server) => {
            report_ready(&ready, Ok(server.report()));
            drop(ready);
            eprintln!("userdm server: device {} is up", server.device.name());
            server.run();
            Ok(())
        }
        Err(message) => {
            eprintln!("userdm server: {message}");
            report_ready(&ready, Err(message.clone()));
            Err(ControlError::Launch(message))
        }
    }
}

/// Starts a new session, so that signals from the terminal the CLI ran in (hangup, ^C) do not
/// reach the server. Call first thing in the server process.
pub fn detach() {
    // Fails only when the process already leads a process group, which is as good.
    let _ = rustix::process::setsid();
}

fn report_ready(stream: &UnixStream, result: Result<DeviceReport, String>) {
    let (ready, error) = match result {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let report = ReadyReport {
        version: PROTOCOL_VERSION,
        ready,
        error,
    };
    if let Err(e) = write_line(stream, &report) {
        eprintln!("userdm server: cannot report readiness: {e}");
    }
}

/// Where the stable links to kernel block devices live: `/dev/userdm/NAME` →
/// `/dev/ublkbN`. `USERDM_DEV_DIR` moves them (tests).
pub fn dev_link_dir() -> PathBuf {
    std::env::var_os("USERDM_DEV_DIR").map_or_else(|| PathBuf::from("/dev/userdm"), PathBuf::from)
}

/// A device's server: the device, the context its tables are built with, its exports and its
/// control socket.
pub struct Server<'f, T: Target> {
    device: Arc<Device<T>>,
    ctx: T::Context,
    dir: DeviceDir,
    listener: UnixListener,
    exit: ExitSignal,
    factory: &'f dyn ExportFactory<T>,
    exports: Vec<Running>,
    /// Exports that need a table to start (a kernel device needs a size): started at the
    /// first resume that makes a table live.
    pending: Vec<ExportSpec>,
    /// What queries report of the exports; shared with the request threads.
    facts: Arc<Mutex<ExportFacts>>,
    /// `/dev/userdm/NAME`, while a kernel block device exists.
    dev_link: Option<PathBuf>,
    owner_uid: Option<u32>,
    /// How the device was created, kept for the recovery record.
    config: CreateConfig,
    /// The text (and working directory) of the inactive and the live table, for the
    /// recovery record: a new server rebuilds the device from them.
    inactive_text: Option<(String, Option<PathBuf>)>,
    live_text: Option<(String, Option<PathBuf>)>,
}

/// A running export, with the spec it was started from and where clients reach it.
struct Running {
    export: Box<dyn Export>,
    spec: ExportSpec,
    address: String,
}

impl Running {
    /// Whether `text` names this export: as given, as canonically written, or as listed.
    fn is_named(&self, text: &str, canonical: Option<&str>) -> bool {
        let given = self.spec.to_string();
        [given.as_str(), self.address.as_str()]
            .iter()
            .any(|n| *n == text || Some(*n) == canonical)
    }
}

/// The exports as queries see them. Kept apart from the exports themselves, which belong to
/// the main thread.
#[derive(Default)]
struct ExportFacts {
    device_number: Option<(u32, u32)>,
    block_device: Option<PathBuf>,
    exports: Vec<String>,
    /// Counters of the kernel block devices' users (see [`Export::kernel_users`]).
    probes: Vec<UserCounter>,
    /// Whether the server holds one open on the device for the kernel's users, while a
    /// deferred removal waits for them to go (not an opener of its own: reports leave it out).
    kernel_hold: bool,
}

enum Flow {
    Continue,
    Exit,
}

impl<'f, T: Target + 'static> Server<'f, T> {
    /// Brings the device up: creates it, loads and resumes its table, binds the control socket,
    /// records the pid and starts the exports. Errors are messages for the CLI to print.
    pub fn start(
        dir: DeviceDir,
        config: CreateConfig,
        make_ctx: &dyn Fn(&CreateConfig, TableEvents) -> T::Context,
        factory: &'f dyn ExportFactory<T>,
    ) -> Result<Server<'f, T>, String> {
        let specs = config
            .exports
            .iter()
            .map(|s| ExportSpec::parse(s).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(cwd) = &config.cwd {
            std::env::set_current_dir(cwd)
                .map_err(|e| format!("cannot enter directory {}: {e}", cwd.display()))?;
        }
        let device = Device::<T>::new(&config.name, config.uuid.as_deref(), config.read_only)
            .map_err(|e| e.to_string())?;
        let device = Arc::new(device);
        let events = TableEvents::default();
        let weak = Arc::downgrade(&device);
        events.connect(Box::new(move || {
            if let Some(d) = weak.upgrade() {
                d.table_event();
            }
        }));
        let recovery = specs
            .iter()
            .any(|s| matches!(s, ExportSpec::Ublk(u) if u.recovery || u.recover.is_some()));
        let mut config = config;
        if recovery && config.memory_dir.is_none() {
            // `memory` rows must outlive this process for a recovering server to find them.
            config.memory_dir = crate::rundir::new_memory_dir(&dir);
        }
        let ctx = make_ctx(&config, events);
        if let Some(text) = &config.table {
            let table = Table::<T>::parse(&ctx, text).map_err(|e| e.to_string())?;
            device.load(table);
        }
        device.resume().map_err(|e| e.to_string())?;
        let listener = bind_control_socket(&dir, config.uid, config.gid)?;
        dir.write_pid(std::process::id())
            .map_err(|e| e.to_string())?;
        dir.write_meta(&DeviceMeta {
            name: config.name.clone(),
            uuid: config.uuid.clone().filter(|u| !u.is_empty()),
        })
        .map_err(|e| e.to_string())?;
        let exit = ExitSignal::new(dir.socket());
        let mut server = Server {
            device,
            ctx,
            dir,
            listener,
            exit,
            factory,
            exports: Vec::new(),
            pending: Vec::new(),
            facts: Arc::default(),
            dev_link: None,
            owner_uid: config.uid,
            live_text: config.table.clone().map(|t| (t, config.cwd.clone())),
            inactive_text: None,
            config,
        };
        for spec in specs {
            if matches!(spec, ExportSpec::Ublk(_)) && server.device.size_sectors() == 0 {
                server.pending.push(spec);
                continue;
            }
            if let Err(e) = server.start_export(&spec) {
                server.stop_exports();
                return Err(e);
            }
        }
        server.write_recovery_record();
        Ok(server)
    }

    /// Records what a new server needs to take over the exports that outlive this one (a
    /// ublk device with recovery): `RUN_DIR/recovery/ID.json`, read by `userdm recover`.
    fn write_recovery_record(&self) {
        for id in self
            .exports
            .iter()
            .filter_map(|r| r.export.recoverable_id())
        {
            let (table, cwd) = self.live_text.clone().unzip();
            let record = CreateConfig {
                name: self.device.name(),
                uuid: self.device.info().uuid,
                table,
                cwd: cwd.flatten(),
                exports: self.export_specs_for_recovery(id),
                ..self.config.clone()
            };
            if let Err(e) = crate::rundir::write_recovery_record(&self.dir, id, &record) {
                eprintln!("userdm server: cannot write the recovery record of ublk {id}: {e}");
            }
        }
    }

    /// The exports as started (and those waiting for a table), with the recoverable one told
    /// to take over device `id`.
    fn export_specs_for_recovery(&self, id: u32) -> Vec<String> {
        self.exports
            .iter()
            .map(|r| &r.spec)
            .chain(&self.pending)
            .map(|spec| match spec {
                ExportSpec::Ublk(u) if u.recovery => ExportSpec::Ublk(UblkSpec {
                    recover: Some(id),
                    id: Some(id),
                    ..u.clone()
                })
                .to_string(),
                other => other.to_string(),
            })
            .collect()
    }

    fn remove_recovery_records(&self) {
        for id in self
            .exports
            .iter()
            .filter_map(|r| r.export.recoverable_id())
        {
            crate::rundir::remove_recovery_record(&self.dir, id);
        }
    }

    /// Starts one export and makes it known to queries (and `/dev/userdm/NAME`).
    fn start_export(&mut self, spec: &ExportSpec) -> Result<(), String> {
        let handle = DeviceHandle::new(self.device.clone(), self.exit.clone());
        let export = self.factory.start(spec, handle)?;
        let address = export.address().unwrap_or_else(|| spec.to_string());
        self.exports.push(Running {
            export,
            spec: spec.clone(),
            address,
        });
        self.refresh_facts();
        Ok(())
    }

    /// Starts the exports that waited for a table, once there is one. One that fails stays
    /// waiting, with those after it, for the next resume.
    fn start_pending(&mut self) -> Result<(), String> {
        if self.device.size_sectors() == 0 {
            return Ok(());
        }
        while let Some(spec) = self.pending.first().cloned() {
            self.start_export(&spec)?;
            self.pending.remove(0);
        }
        Ok(())
    }

    /// The addresses of the running exports, in the order they started.
    fn addresses(&self) -> Vec<String> {
        self.exports.iter().map(|r| r.address.clone()).collect()
    }

    /// Recomputes what queries report of the exports, and the link to the kernel device.
    fn refresh_facts(&mut self) {
        let block_device = self.exports.iter().find_map(|r| r.export.block_device());
        {
            let mut facts = self.facts.lock().unwrap_or_else(|e| e.into_inner());
            facts.device_number = self.exports.iter().find_map(|r| r.export.device_number());
            facts.block_device.clone_from(&block_device);
            facts.exports = self.addresses();
            facts.probes = self
                .exports
                .iter()
                .filter_map(|r| r.export.kernel_users())
                .collect();
        }
        match block_device {
            Some(block) if self.dev_link.is_none() => {
                self.dev_link = make_dev_link(&self.device.name(), &block);
            }
            None => self.remove_dev_link(),
            Some(_) => {}
        }
    }

    fn remove_dev_link(&mut self) {
        if let Some(link) = self.dev_link.take() {
            let _ = std::fs::remove_file(link);
        }
    }

    /// The counters of the exports' kernel block devices' users.
    fn user_counters(&self) -> Vec<UserCounter> {
        let facts = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        facts.probes.clone()
    }

    /// Serves control requests until the device is removed or the server shut down, then stops
    /// the exports and removes the run directory.
    pub fn run(mut self) {
        let (tx, rx) = mpsc::channel::<Incoming>();
        let acceptor = match self.listener.try_clone() {
            Ok(listener) => {
                let exit = self.exit.clone();
                let queries = Arc::new(self.queries());
                std::thread::spawn(move || accept_loop(&listener, &exit, &tx, &queries))
            }
            Err(e) => {
                eprintln!("userdm server: cannot start the acceptor: {e}");
                self.finish();
                return;
            }
        };
        // Requests arrive read and parsed; the main thread only executes them, one at a time,
        // so a client that connects and says nothing cannot hold the others up.
        while let Ok(incoming) = rx.recv() {
            let Incoming::Request {
                stream,
                peer_uid,
                value,
            } = incoming
            else {
                break;
            };
            if let Flow::Exit = self.handle(stream, peer_uid, value) {
                self.stop_acceptor(acceptor);
                return;
            }
        }
        eprintln!(
            "userdm server: device {} removed at its last close",
            self.device.name()
        );
        self.finish();
        self.stop_acceptor(acceptor);
    }

    /// Wakes the acceptor from `accept` (shutting a listening socket down makes `accept` fail)
    /// and joins it.
    fn stop_acceptor(&self, acceptor: JoinHandle<()>) {
        self.exit.flag.store(true, Ordering::SeqCst);
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        let _ = acceptor.join();
    }

    /// Stops the exports and removes the run directory.
    fn finish(&mut self) {
        // Exports drain their requests in flight before they stop; IO held by a suspend would
        // never drain, so let it through first.
        self.device.gate().open();
        self.remove_recovery_records();
        self.stop_exports();
        if let Some(memory_dir) = &self.config.memory_dir {
            crate::rundir::remove_memory_dir(&self.dir, memory_dir);
        }
        if let Err(e) = self.dir.remove() {
            eprintln!("userdm server: {e}");
        }
    }

    fn stop_exports(&mut self) {
        for mut r in self.exports.drain(..) {
            r.export.stop();
        }
        self.refresh_facts();
    }

    fn handle(
        &mut self,
        stream: UnixStream,
        peer_uid: Option<u32>,
        value: Result<serde_json::Value, ControlError>,
    ) -> Flow {
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                respond(
                    &stream,
                    Response::error(ErrorKind::BadRequest, e.to_string()),
                );
                return Flow::Continue;
            }
        };
        match version_of(&value) {
            Some(PROTOCOL_VERSION) => {}
            other => {
                let msg = format!(
                    "protocol version mismatch: the server of device {} speaks control protocol \
                     {PROTOCOL_VERSION}, the client {}; use the userdm binary that started the \
                     server, or remove and recreate the device",
                    self.device.name(),
                    other.map_or_else(|| "sent none".into(), |v| v.to_string())
                );
                respond(&stream, Response::error(ErrorKind::Version, msg));
                return Flow::Continue;
            }
        }
        let request: Request = match decode(value) {
            Ok(r) => r,
            Err(e) => {
                respond(
                    &stream,
                    Response::error(ErrorKind::BadRequest, e.to_string()),
                );
                return Flow::Continue;
            }
        };
        let command = request.command;
        if let Err(msg) = self.permit(&command, peer_uid) {
            respond(&stream, Response::error(ErrorKind::Permission, msg));
            return Flow::Continue;
        }
        self.dispatch(command, stream)
    }

    /// Who may send what: queries anyone who can connect; `load` only root and the server's
    /// own uid, because the server opens a table's backing files with its own privileges (an
    /// owner could otherwise export any file the server can read); everything else also the
    /// owner named at create.
    fn permit(&self, command: &Command, uid: Option<u32>) -> Result<(), String> {
        if command.is_read_only() {
            return Ok(());
        }
        let privileged = uid.is_some_and(|u| u == 0 || u == rustix::process::geteuid().as_raw());
        let owner = uid.is_some() && uid == self.owner_uid;
        match command {
            _ if privileged => Ok(()),
            Command::Load { .. } => Err(format!(
                "permission denied: only root may load a table into device {}, since its \
                 server opens the table's files with root's rights",
                self.device.name()
            )),
            Command::AddExport { .. } => Err(format!(
                "permission denied: only root may add an export to device {}, since its \
                 server opens and mounts paths with root's rights",
                self.device.name()
            )),
            _ if owner => Ok(()),
            _ => Err(format!(
                "permission denied: only root and the device's owner may send {} to device {}",
                command.name(),
                self.device.name()
            )),
        }
    }

    fn dispatch(&mut self, command: Command, stream: UnixStream) -> Flow {
        let name = self.device.name();
        let device = &self.device;
        let result: Result<Reply, ErrorReply> = match command {
            Command::Info => Ok(Reply::Info(self.report())),
            Command::Load { table, cwd } => self.load(&table, cwd.as_deref()),
            Command::Clear => {
                device.clear();
                self.inactive_text = None;
                Ok(Reply::Done)
            }
            Command::Suspend { noflush, .. } => device
                .suspend(noflush, Some(SUSPEND_TIMEOUT))
                .map(|()| Reply::Done)
                .map_err(device_error),
            Command::Resume => self.resume(),
            Command::Rename { new_name } => self.rename(&new_name),
            Command::SetUuid { uuid } => self.set_uuid(&uuid),
            Command::Remove { deferred, force } => {
                if force && device.live_table().is_some() {
                    if let Err(e) = self.wipe_table(true) {
                        respond(&stream, Response::failed(e));
                        return Flow::Continue;
                    }
                }
                match self.remove(deferred) {
                    Ok(true) => {
                        eprintln!("userdm server: device {name} removed");
                        self.finish();
                        respond(&stream, Response::ok(Reply::Removed { now: true }));
                        return Flow::Exit;
                    }
                    Ok(false) => Ok(Reply::Removed { now: false }),
                    Err(e) => Err(e),
                }
            }
            Command::Message { sector, argv } => self.message(sector, &argv),
            Command::SetGeometry {
                cylinders,
                heads,
                sectors,
                start,
            } => device
                .set_geometry(Geometry {
                    cylinders,
                    heads,
                    sectors,
                    start,
                })
                .map(|()| Reply::Done)
                .map_err(device_error),
            Command::Wait {
                event_nr,
                timeout_ms,
            } => {
                let device = device.clone();
                let seen = event_nr.unwrap_or_else(|| device.event_nr());
                let timeout = timeout_ms.map(Duration::from_millis);
                std::thread::spawn(move || {
                    if let Some(nr) = wait_for_client(&device, seen, timeout, &stream) {
                        respond(&stream, Response::ok(Reply::Event { event_nr: nr }));
                    }
                });
                return Flow::Continue;
            }
            Command::Table { inactive } => Ok(Reply::Rows {
                rows: self.rows(inactive, false),
            }),
            Command::Status { inactive } => Ok(Reply::Rows {
                rows: self.rows(inactive, true),
            }),
            Command::Deps { inactive } => Ok(Reply::Deps {
                deps: self.deps(inactive),
            }),
            Command::WipeTable { noflush } => self.wipe_table(noflush).map(|()| Reply::Done),
            Command::Open => {
                self.hold_open(stream);
                return Flow::Continue;
            }
            Command::AddExport { spec } => self.add_export(&spec),
            Command::RemoveExport { spec } => self.remove_export(&spec),
            Command::Shutdown => {
                eprintln!("userdm server: device {name} shut down");
                self.finish();
                respond(&stream, Response::ok(Reply::Done));
                return Flow::Exit;
            }
            // `Command` is non_exhaustive for other crates only; this arm is unreachable here
            // but keeps a new variant from compiling into a silent no-op elsewhere.
            #[allow(unreachable_patterns)]
            other => Err(err(
                ErrorKind::BadRequest,
                format!("{} is not supported by this server", other.name()),
            )),
        };
        respond(
            &stream,
            match result {
                Ok(reply) => Response::ok(reply),
                Err(e) => Response::failed(e),
            },
        );
        Flow::Continue
    }

    /// Resumes the device; a new size goes to the kernel devices, and exports that waited for
    /// a table start.
    fn resume(&mut self) -> Result<Reply, ErrorReply> {
        let before = self.device.size_sectors();
        self.device.resume().map_err(device_error)?;
        if let Some(text) = self.inactive_text.take() {
            self.live_text = Some(text);
        }
        let mut warnings = Vec::new();
        if self.device.size_sectors() != before {
            for r in &mut self.exports {
                if let Err(w) = r.export.resized() {
                    warnings.push(w);
                }
            }
        }
        self.start_pending().map_err(|e| {
            err(
                ErrorKind::Device,
                format!("the table is live, but an export failed to start: {e}"),
            )
        })?;
        self.write_recovery_record();
        if warnings.is_empty() {
            Ok(Reply::Done)
        } else {
            for w in &warnings {
                eprintln!("userdm server: {w}");
            }
            Ok(Reply::Warnings { warnings })
        }
    }

    /// `userdm export NAME SPEC`: starts one more export.
    fn add_export(&mut self, text: &str) -> Result<Reply, ErrorReply> {
        let spec =
            ExportSpec::parse(text).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        let wanted = spec.to_string();
        if self.exports.iter().any(|r| r.spec == spec) || self.pending.contains(&spec) {
            return Err(err(
                ErrorKind::Device,
                format!("device {} already has export {wanted}", self.device.name()),
            ));
        }
        if matches!(spec, ExportSpec::Ublk(_)) && self.device.size_sectors() == 0 {
            return Err(err(
                ErrorKind::Device,
                format!(
                    "device {} has no live table: a kernel block device needs a size",
                    self.device.name()
                ),
            ));
        }
        if matches!(spec, ExportSpec::Ublk(_))
            && self
                .exports
                .iter()
                .any(|r| r.export.block_device().is_some())
        {
            return Err(err(
                ErrorKind::Device,
                format!(
                    "device {} already has a kernel block device",
                    self.device.name()
                ),
            ));
        }
        self.start_export(&spec)
            .map_err(|e| err(ErrorKind::Device, e))?;
        self.write_recovery_record();
        let address = self
            .exports
            .last()
            .map(|r| r.address.clone())
            .unwrap_or_default();
        Ok(Reply::Exported { address })
    }

    /// `userdm export NAME --remove SPEC`: stops one export, named as given or as listed.
    fn remove_export(&mut self, text: &str) -> Result<Reply, ErrorReply> {
        let canonical = ExportSpec::parse(text).map(|s| s.to_string()).ok();
        let found = self
            .exports
            .iter()
            .position(|r| r.is_named(text, canonical.as_deref()));
        let Some(i) = found else {
            let has = self.addresses();
            return Err(err(
                ErrorKind::Device,
                format!(
                    "device {} has no export {text}; it has: {}",
                    self.device.name(),
                    if has.is_empty() {
                        "none".to_string()
                    } else {
                        has.join(", ")
                    }
                ),
            ));
        };
        if let Err(who) = self.exports[i].export.release() {
            return Err(err(
                ErrorKind::Busy,
                format!(
                    "export {text} of device {} is busy: {who}",
                    self.device.name()
                ),
            ));
        }
        let mut removed = self.exports.remove(i);
        if let Some(id) = removed.export.recoverable_id() {
            crate::rundir::remove_recovery_record(&self.dir, id);
        }
        removed.export.stop();
        self.write_recovery_record();
        self.refresh_facts();
        Ok(Reply::Done)
    }

    /// Removes the device now (`Ok(true)`), or at the last close with `deferred` (`Ok(false)`),
    /// or refuses because it is open. Users of a kernel block device count as openers, as they
    /// do in the kernel's device-mapper; a deferred removal holds one open for them until a
    /// watcher sees the last one go.
    fn remove(&mut self, deferred: bool) -> Result<bool, ErrorReply> {
        let name = self.device.name();
        let busy = |who: String| {
            err(
                ErrorKind::Busy,
                format!("device {name} is busy: {who}; use --deferred to remove it on last close"),
            )
        };
        let kernel: u32 = self.user_counters().iter().map(|count| count()).sum();
        if self.device.open_count() > 0 || kernel > 0 {
            if !deferred {
                if kernel == 0 {
                    return self.device.remove(false).map_err(device_error);
                }
                return Err(busy(format!("its block device has {kernel} users")));
            }
            // The last close may then be an NBD client's or the kernel users': either way the
            // kernel device stays until both are gone.
            if kernel > 0 {
                self.hold_for_kernel();
            }
            return self.device.remove(true).map_err(device_error);
        }
        // Nobody seen: end the kernel devices, atomically where the kernel can check.
        for r in &mut self.exports {
            if let Err(who) = r.export.release() {
                if !deferred {
                    return Err(busy(who));
                }
                self.hold_for_kernel();
                return self.device.remove(true).map_err(device_error);
            }
        }
        self.device.remove(deferred).map_err(device_error)
    }

    /// Holds one open on the device until the kernel block devices have no users left, then
    /// closes it (the last close of a deferred removal ends the server).
    fn hold_for_kernel(&mut self) {
        {
            let mut facts = self.facts.lock().unwrap_or_else(|e| e.into_inner());
            if facts.kernel_hold {
                return;
            }
            facts.kernel_hold = true;
        }
        let probes = self.user_counters();
        let handle = DeviceHandle::new(self.device.clone(), self.exit.clone());
        handle.open();
        let facts = self.facts.clone();
        std::thread::spawn(move || {
            while probes.iter().map(|p| p()).sum::<u32>() > 0 && !handle.exiting() {
                std::thread::sleep(KERNEL_USERS_POLL);
            }
            facts.lock().unwrap_or_else(|e| e.into_inner()).kernel_hold = false;
            handle.close();
        });
    }

    fn load(&mut self, text: &str, cwd: Option<&Path>) -> Result<Reply, ErrorReply> {
        if let Some(cwd) = cwd {
            std::env::set_current_dir(cwd).map_err(|e| {
                err(
                    ErrorKind::Internal,
                    format!("cannot enter directory {}: {e}", cwd.display()),
                )
            })?;
        }
        let table = Table::<T>::parse(&self.ctx, text).map_err(table_error)?;
        self.device.load(table);
        self.inactive_text = Some((text.to_string(), cwd.map(Path::to_path_buf)));
        Ok(Reply::Done)
    }

    fn rename(&mut self, new_name: &str) -> Result<Reply, ErrorReply> {
        let old = DeviceMeta {
            name: self.device.name(),
            uuid: self.device.info().uuid,
        };
        let new = DeviceMeta {
            name: new_name.to_string(),
            uuid: old.uuid.clone(),
        };
        // The name in meta.json is what lookups go by: it changes first, and back on failure.
        self.dir.write_meta(&new).map_err(internal)?;
        if let Err(e) = self.device.rename(new_name) {
            let _ = self.dir.write_meta(&old);
            return Err(device_error(e));
        }
        if let Some(link) = self.dev_link.take() {
            let new_link = link.with_file_name(new_name);
            match std::fs::rename(&link, &new_link) {
                Ok(()) => self.dev_link = Some(new_link),
                Err(e) => eprintln!(
                    "userdm server: cannot move {} to {}: {e}",
                    link.display(),
                    new_link.display()
                ),
            }
        }
        Ok(Reply::Done)
    }

    fn set_uuid(&self, uuid: &str) -> Result<Reply, ErrorReply> {
        self.device.set_uuid(uuid).map_err(device_error)?;
        self.dir
            .write_meta(&DeviceMeta {
                name: self.device.name(),
                uuid: Some(uuid.to_string()),
            })
            .map_err(internal)?;
        Ok(Reply::Done)
    }

    fn message(&self, sector: u64, argv: &[String]) -> Result<Reply, ErrorReply> {
        // Messages starting with '@' go to the device-mapper core, as in the kernel.
        if argv.first().map(String::as_str) == Some("@cancel_deferred_remove") {
            if argv.len() != 1 {
                return Err(err(
                    ErrorKind::Message,
                    "@cancel_deferred_remove takes no arguments",
                ));
            }
            if !self.device.cancel_deferred_remove() {
                return Err(err(
                    ErrorKind::Message,
                    format!(
                        "device {} is not marked for deferred removal",
                        self.device.name()
                    ),
                ));
            }
            return Ok(Reply::Message { reply: None });
        }
        self.device
            .message(sector, argv)
            .map(|reply| Reply::Message { reply })
            .map_err(|e| match e {
                DeviceError::Message(m) => err(ErrorKind::Message, m.to_string()),
                other => device_error(other),
            })
    }

    /// Replaces the live table with one `error` row of the same size and makes it live.
    fn wipe_table(&mut self, noflush: bool) -> Result<(), ErrorReply> {
        let size = self.device.size_sectors();
        let text = if size == 0 {
            String::new()
        } else {
            format!("0 {size} error")
        };
        let table = Table::<T>::parse(&self.ctx, &text).map_err(table_error)?;
        self.device
            .suspend(noflush, Some(SUSPEND_TIMEOUT))
            .map_err(device_error)?;
        self.device.load(table);
        self.device.resume().map_err(device_error)?;
        self.live_text = Some((text, None));
        self.write_recovery_record();
        Ok(())
    }

    /// Counts the connection as an opener until the client closes it.
    fn hold_open(&self, stream: UnixStream) {
        let handle = DeviceHandle::new(self.device.clone(), self.exit.clone());
        handle.open();
        respond(&stream, Response::ok(Reply::Opened));
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(None);
            let mut sink = [0u8; 64];
            let mut s = &stream;
            // Anything the client sends is ignored; end of stream or an error is the close.
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            handle.close();
        });
    }

    /// The device's facts, as `info` reports them.
    pub fn report(&self) -> DeviceReport {
        self.queries().report()
    }

    /// What request threads need to answer queries without the main thread.
    fn queries(&self) -> Queries<T> {
        Queries {
            device: self.device.clone(),
            id: self.dir.id(),
            facts: self.facts.clone(),
            owner_uid: self.owner_uid,
        }
    }

    fn rows(&self, inactive: bool, status: bool) -> Vec<RowReport> {
        rows(&self.device, inactive, status)
    }

    fn deps(&self, inactive: bool) -> Vec<DepReport> {
        deps(&self.device, inactive)
    }
}

/// Answers the read-only queries (`info`, `table`, `status`, `deps`, `wait`) on the request's
/// own thread: they only read the device, so they never wait behind a suspend that is draining
/// IO on the main thread (`ls` stays quick while a device suspends).
struct Queries<T> {
    device: Arc<Device<T>>,
    /// The run directory's id: the minor number while no kernel device exists.
    id: u32,
    facts: Arc<Mutex<ExportFacts>>,
    owner_uid: Option<u32>,
}

impl<T: Target + 'static> Queries<T> {
    /// Answers `value` if it is a well-formed query; `false` leaves it to the main thread.
    fn answer(&self, stream: &UnixStream, value: &serde_json::Value) -> bool {
        if version_of(value) != Some(PROTOCOL_VERSION) {
            return false;
        }
        let Ok(request) = decode::<Request>(value.clone()) else {
            return false;
        };
        let reply = match request.command {
            Command::Info => Reply::Info(self.report()),
            Command::Table { inactive } => Reply::Rows {
                rows: rows(&self.device, inactive, false),
            },
            Command::Status { inactive } => Reply::Rows {
                rows: rows(&self.device, inactive, true),
            },
            Command::Deps { inactive } => Reply::Deps {
                deps: deps(&self.device, inactive),
            },
            Command::Wait {
                event_nr,
                timeout_ms,
            } => {
                let seen = event_nr.unwrap_or_else(|| self.device.event_nr());
                let timeout = timeout_ms.map(Duration::from_millis);
                let _ = stream.set_write_timeout(Some(REQUEST_READ_TIMEOUT));
                match wait_for_client(&self.device, seen, timeout, stream) {
                    Some(event_nr) => Reply::Event { event_nr },
                    None => return true,
                }
            }
            _ => return false,
        };
        respond(stream, Response::ok(reply));
        true
    }

    fn report(&self) -> DeviceReport {
        let info = self.device.info();
        let facts = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        let (major, minor) = facts.device_number.unwrap_or((0, self.id));
        let kernel: u32 = facts.probes.iter().map(|p| p()).sum();
        let open_count = info.open_count - i32::from(facts.kernel_hold)
            + i32::try_from(kernel).unwrap_or(i32::MAX);
        DeviceReport {
            name: info.name,
            uuid: info.uuid,
            suspended: info.suspended,
            read_only: info.read_only,
            live_table: info.live_table,
            inactive_table: info.inactive_table,
            open_count,
            event_nr: info.event_nr,
            target_count: info.target_count,
            deferred_remove: info.deferred_remove,
            size_sectors: info.size_sectors,
            major,
            minor,
            read_ahead: read_ahead_sectors(&rows(&self.device, false, false)),
            pid: std::process::id(),
            owner_uid: self.owner_uid,
            exports: facts.exports.clone(),
            block_device: facts.block_device.clone(),
            io: {
                let io = self.device.io_stats();
                IoStatsReport {
                    reads: io.reads,
                    writes: io.writes,
                    read_bytes: io.read_bytes,
                    write_bytes: io.write_bytes,
                    others: io.others,
                    errors: io.errors,
                    requeues: io.requeues,
                }
            },
            geometry: self.device.geometry().map(|g| GeometryReport {
                cylinders: g.cylinders,
                heads: g.heads,
                sectors: g.sectors,
                start: g.start,
            }),
        }
    }
}

fn rows<T: Target>(device: &Device<T>, inactive: bool, status: bool) -> Vec<RowReport> {
    let table = if inactive {
        device.inactive_table()
    } else {
        device.live_table()
    };
    let Some(table) = table else {
        return Vec::new();
    };
    table
        .rows()
        .iter()
        .map(|r| RowReport {
            start: r.start,
            length: r.len,
            target_type: r.target.type_name().to_string(),
            params: if status {
                r.target.status()
            } else {
                r.target.table_params()
            },
        })
        .collect()
}

/// Dependencies in the kernel's order: `dm_get_device` adds each new device at the head
/// of the table's list, so the device named last comes first.
fn deps<T: Target>(device: &Device<T>, inactive: bool) -> Vec<DepReport> {
    let table = if inactive {
        device.inactive_table()
    } else {
        device.live_table()
    };
    let Some(table) = table else {
        return Vec::new();
    };
    let mut deps: Vec<DepReport> = Vec::new();
    for row in table.rows() {
        for d in row.target.deps() {
            if !deps
                .iter()
                .any(|e| (e.major, e.minor, &e.path) == (d.major, d.minor, &d.path))
            {
                deps.push(DepReport {
                    major: d.major,
                    minor: d.minor,
                    path: d.path,
                });
            }
        }
    }
    deps.reverse();
    deps
}

/// What the acceptor hands the main thread.
enum Incoming {
    /// A request line, read (or failed to read) from `stream`.
    Request {
        stream: UnixStream,
        peer_uid: Option<u32>,
        value: Result<serde_json::Value, ControlError>,
    },
    /// The server was asked to finish (the last close of a deferred removal).
    Exit,
}

/// Accepts connections, reads each one's request on a thread of its own and passes it on.
fn accept_loop<T: Target + 'static>(
    listener: &UnixListener,
    exit: &ExitSignal,
    tx: &mpsc::Sender<Incoming>,
    queries: &Arc<Queries<T>>,
) {
    let mut failures = 0u32;
    loop {
        let accepted = listener.accept();
        if exit.requested() {
            let _ = tx.send(Incoming::Exit);
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => {
                failures = 0;
                s
            }
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                failures = failures.saturating_add(1);
                eprintln!("userdm server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10 * u64::from(failures.min(100))));
                continue;
            }
        };
        let tx = tx.clone();
        let queries = queries.clone();
        let spawned = std::thread::Builder::new()
            .name("userdm-request".into())
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(REQUEST_READ_TIMEOUT));
                let _ = stream.set_write_timeout(Some(REQUEST_READ_TIMEOUT));
                let peer_uid = rustix::net::sockopt::socket_peercred(&stream)
                    .ok()
                    .map(|c| c.uid.as_raw());
                let value = match read_value(BufReader::new(&stream)) {
                    Ok(Some(v)) => {
                        if queries.answer(&stream, &v) {
                            return;
                        }
                        Ok(v)
                    }
                    // A probe or a wake-up connection.
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let _ = tx.send(Incoming::Request {
                    stream,
                    peer_uid,
                    value,
                });
            });
        if let Err(e) = spawned {
            eprintln!("userdm server: cannot start a request thread: {e}");
        }
    }
}

fn bind_control_socket(
    dir: &DeviceDir,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<UnixListener, String> {
    let path = dir.socket();
    let tmp = path.with_extension("sock.tmp");
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).map_err(|e| format!("cannot bind {}: {e}", tmp.display()))?;
    // Mode and owner are set before the socket appears under its real name, so nobody can
    // connect through a window of wider permissions.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set the mode of {}: {e}", tmp.display()))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(&tmp, uid, gid)
            .map_err(|e| format!("cannot give {} to the owner: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))?;
    Ok(listener)
}

/// How often a deferred removal looks whether the kernel block device's users have gone.
const KERNEL_USERS_POLL: Duration = Duration::from_millis(100);

/// Points `/dev/userdm/NAME` at `block`, replacing a stale link. `None` (and a note in the
/// log) when that cannot be done: the device works without it.
fn make_dev_link(name: &str, block: &Path) -> Option<PathBuf> {
    let dir = dev_link_dir();
    let link = dir.join(name);
    let made = std::fs::create_dir_all(&dir).and_then(|()| {
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&link)?;
        }
        std::os::unix::fs::symlink(block, &link)
    });
    match made {
        Ok(()) => Some(link),
        Err(e) => {
            eprintln!("userdm server: cannot link {}: {e}", link.display());
            None
        }
    }
}

/// How often a `wait` looks whether its client is still there.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// Waits for the event number to differ from `seen` (or `timeout`), giving up when the client
/// hangs up, so that abandoned waits (`timeout 3 userdm wait t0`) do not pile up threads.
/// `None` when the client is gone.
fn wait_for_client<T: Target>(
    device: &Device<T>,
    seen: u32,
    timeout: Option<Duration>,
    stream: &UnixStream,
) -> Option<u32> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let slice = match deadline {
            Some(d) => d
                .saturating_duration_since(std::time::Instant::now())
                .min(WAIT_POLL),
            None => WAIT_POLL,
        };
        let nr = device.wait_event(seen, Some(slice));
        if nr != seen
            || device.is_removed()
            || deadline.is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Some(nr);
        }
        if client_gone(stream) {
            return None;
        }
    }
}

/// Whether the peer closed its end (a client sends nothing after its request line).
fn client_gone(stream: &UnixStream) -> bool {
    use rustix::net::RecvFlags;
    let mut byte = [0u8; 1];
    match rustix::net::recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, 0)) => true,
        Ok(_) => false,
        Err(e) => e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR,
    }
}

fn respond(stream: &UnixStream, response: Response) {
    if let Err(e) = write_line(stream, &response) {
        eprintln!("userdm server: cannot answer a client: {e}");
    }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        kind,
        message: message.into(),
    }
}

fn device_error(e: DeviceError) -> ErrorReply {
    let kind = match e {
        DeviceError::Busy { .. } => ErrorKind::Busy,
        DeviceError::Message(_) => ErrorKind::Message,
        _ => ErrorKind::Device,
    };
    err(kind, e.to_string())
}

fn table_error(e: TableError) -> ErrorReply {
    err(ErrorKind::Table, e.to_string())
}

fn internal(e: ControlError) -> ErrorReply {
    err(ErrorKind::Internal, e.to_string())
}

/// The read-ahead the kernel would give a device with this table, in sectors:
/// `max(VM_READAHEAD, 2 × optimal IO size)` (`disk_update_readahead`).
///
/// The optimal IO size is stacked over rows as the least common multiple of the rows' sizes.
/// The only target here that sets one is `striped` (`chunk × stripes`); rows over files and
/// the other targets set none. `TargetLimits` has no optimal IO size yet, so it is read from
/// the striped rows' parameters.
pub fn read_ahead_sectors(rows: &[RowReport]) -> u32 {
    let mut io_opt: u64 = 0;
    for row in rows.iter().filter(|r| r.target_type == "striped") {
        let words = split_params(&row.params);
        let (Some(stripes), Some(chunk)) = (
            words.first().and_then(|w| w.parse::<u64>().ok()),
            words.get(1).and_then(|w| w.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let Some(opt) = stripes.checked_mul(chunk).filter(|o| *o > 0) else {
            continue;
        };
        io_opt = if io_opt == 0 { opt } else { lcm(io_opt, opt) };
    }
    let ra = READ_AHEAD_DEFAULT_SECTORS.max(io_opt.saturating_mul(2));
    u32::try_from(ra).unwrap_or(u32::MAX)
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    (a / x).saturating_mul(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: &str, p: &str) -> RowReport {
        RowReport {
            start: 0,
            length: 8,
            target_type: t.into(),
            params: p.into(),
        }
    }

    #[test]
    fn read_ahead_follows_the_kernel() {
        assert_eq!(read_ahead_sectors(&[]), 256);
        assert_eq!(read_ahead_sectors(&[row("linear", "7:0 0")]), 256);
        // t0 of dmsetup-output-6.12.md: striped 2 × 128 → io_opt 128 KiB → 512 sectors.
        let t0 = [
            row("zero", ""),
            row("error", ""),
            row("linear", "7:0 0"),
            row("striped", "2 128 7:0 16384 7:1 0"),
        ];
        assert_eq!(read_ahead_sectors(&t0), 512);
        assert_eq!(read_ahead_sectors(&[row("striped", "1 8 a 0")]), 256);
        assert_eq!(
            read_ahead_sectors(&[
                row("striped", "2 128 a 0 b 0"),
                row("striped", "3 128 a 0 b 0 c 0")
            ]),
            2 * 768
        );
        assert_eq!(read_ahead_sectors(&[row("striped", "x y")]), 256);
        assert_eq!(
            read_ahead_sectors(&[row("striped", &format!("{} {}", u64::MAX, u64::MAX))]),
            256
        );
    }
}
