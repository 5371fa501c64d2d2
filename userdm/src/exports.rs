//! The exports a device's server can start: NBD over a Unix or TCP socket, and a FUSE file.

use std::path::PathBuf;
use std::sync::Arc;

use userdm_control::{DeviceHandle, Export, ExportFactory, ExportSpec, UblkSpec, UserCounter};
use userdm_device::BlockDevice;
use userdm_fuse::{FuseExport, FuseHandle, FuseOptions};
use userdm_io::{Errno, IoHeader, OpSet};
use userdm_nbd::{
    serve_tcp, serve_unix, DeviceBackend, Exports as NbdExports, ListenAddr, NbdServer,
    ServerConfig,
};
use userdm_table::{Allocation, TargetLimits};
use userdm_targets::AnyTarget;
use userdm_ublk::{BlockUsers, UblkBackend, UblkHandle, UblkOptions, UblkServer};
use userdm_uring::Reactor;

/// The ublk control device; `USERDM_UBLK_CONTROL` points elsewhere (tests simulate a kernel
/// without ublk with a path that does not exist).
pub fn ublk_control_path() -> PathBuf {
    std::env::var_os("USERDM_UBLK_CONTROL")
        .map_or_else(|| PathBuf::from(userdm_ublk::CONTROL_PATH), PathBuf::from)
}

/// Starts the exports named with `--export`.
pub struct Exports;

impl ExportFactory<AnyTarget> for Exports {
    fn start(
        &self,
        spec: &ExportSpec,
        handle: DeviceHandle<AnyTarget>,
    ) -> Result<Box<dyn Export>, String> {
        if let ExportSpec::Ublk(ublk) = spec {
            return start_ublk(ublk, handle).map(|u| Box::new(u) as _);
        }
        if let ExportSpec::Fuse(path) = spec {
            let device = Arc::new(Opener::counted(handle));
            let fuse = FuseExport::start(device, path, FuseOptions::default())
                .map_err(|e| format!("export {spec}: {e}"))?;
            return Ok(Box::new(Fuse(Some(fuse))));
        }
        let name = handle.device().name();
        let backend = Arc::new(DeviceBackend(Arc::new(Opener::counted(handle))));
        let exports = NbdExports::new().with(&name, "userdm device", backend);
        let server = match spec {
            ExportSpec::NbdUnix(path) => {
                // serve_unix replaces a stale socket file; a live one belongs to someone else.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(format!(
                        "export {spec}: {} is in use by another server",
                        path.display()
                    ));
                }
                serve_unix(path, exports, ServerConfig::default())
            }
            ExportSpec::NbdTcp { host, port } => {
                serve_tcp((host.as_str(), *port), exports, ServerConfig::default())
            }
            other => return Err(format!("export {other}: not supported by this build")),
        }
        .map_err(|e| format!("export {spec}: cannot listen: {e}"))?;
        let address = match server.local_addr() {
            ListenAddr::Tcp(addr) => Some(
                ExportSpec::NbdTcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                }
                .to_string(),
            ),
            _ => None,
        };
        Ok(Box::new(Nbd(Some(server), address)))
    }
}

/// A running NBD server, and its real address if it differs from the spec.
struct Nbd(Option<NbdServer>, Option<String>);

impl Export for Nbd {
    fn address(&self) -> Option<String> {
        self.1.clone()
    }

    fn stop(&mut self) {
        if let Some(server) = self.0.take() {
            server.shutdown();
        }
    }
}

/// A running FUSE export.
struct Fuse(Option<FuseHandle>);

impl Export for Fuse {
    fn stop(&mut self) {
        if let Some(fuse) = self.0.take() {
            if let Err(e) = fuse.stop() {
                eprintln!("userdm: stopping FUSE export: {e}");
            }
        }
    }
}

/// The device as an export serves it. NBD connections and FUSE opens count as openers through
/// the server's handle (`counts_opens`), so that the last close of a device whose removal was
/// deferred removes it. A ublk device's users are not seen that way (its export would count
/// as one opener for as long as it runs): the server asks the export for them instead
/// ([`Export::kernel_users`]).
struct Opener {
    handle: DeviceHandle<AnyTarget>,
    counts_opens: bool,
}

impl Opener {
    fn counted(handle: DeviceHandle<AnyTarget>) -> Opener {
        Opener {
            handle,
            counts_opens: true,
        }
    }
}

impl BlockDevice for Opener {
    fn size_bytes(&self) -> u64 {
        BlockDevice::size_bytes(&**self.handle.device())
    }

    fn read_only(&self) -> bool {
        self.handle.device().read_only()
    }

    fn ops(&self) -> OpSet {
        BlockDevice::ops(&**self.handle.device())
    }

    fn limits(&self) -> TargetLimits {
        BlockDevice::limits(&**self.handle.device())
    }

    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = Result<(), Errno>> {
        self.handle.device().io(rt, io, buf)
    }

    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        BlockDevice::allocation(&**self.handle.device(), offset_bytes, max_len_bytes)
    }

    fn open(&self) {
        if self.counts_opens {
            self.handle.open();
        }
    }

    fn close(&self) -> bool {
        if self.counts_opens {
            self.handle.close();
        }
        false
    }
}

/// A table can be reloaded under a live device, so every request goes through the engine.
impl UblkBackend for Opener {}

/// Starts (or, after a crash, takes over) the ublk device of `device`.
fn start_ublk(spec: &UblkSpec, handle: DeviceHandle<AnyTarget>) -> Result<Ublk, String> {
    let defaults = UblkOptions::default();
    let opts = UblkOptions {
        id: spec.id,
        queues: spec.queues.unwrap_or(defaults.queues),
        depth: spec.depth.unwrap_or(defaults.depth),
        recovery: spec.recovery,
        user_copy: spec.user_copy,
        zero_copy: spec.zero_copy,
        control_path: ublk_control_path(),
        ..defaults
    };
    let backend = Arc::new(Opener {
        handle,
        counts_opens: false,
    });
    let handle = match spec.recover {
        Some(id) => UblkServer::recover(id, backend, opts),
        None => UblkServer::start(backend, opts),
    }
    .map_err(|e| format!("export {spec}: {e}"))?;
    let info = handle.info();
    let recoverable = info.recoverable().then_some(info.id);
    Ok(Ublk(Some(handle), recoverable))
}

/// A running ublk device, and its id if it was made to outlive this server (kept past the
/// handle: the recovery record goes only after the device).
struct Ublk(Option<UblkHandle>, Option<u32>);

impl Export for Ublk {
    fn device_number(&self) -> Option<(u32, u32)> {
        self.0.as_ref().map(UblkHandle::devt)
    }

    fn block_device(&self) -> Option<PathBuf> {
        self.0.as_ref().map(UblkHandle::block_path)
    }

    fn address(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|h| format!("ublk:{}", h.block_path().display()))
    }

    fn kernel_users(&self) -> Option<UserCounter> {
        let (major, minor) = self.device_number()?;
        Some(Arc::new(move || BlockUsers::scan(major, minor).total()))
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(handle) = self.0.take() else {
            return Ok(());
        };
        match handle.try_stop() {
            Ok(_) => Ok(()),
            Err((e, handle)) => {
                self.0 = Some(handle);
                Err(e.to_string())
            }
        }
    }

    fn recoverable_id(&self) -> Option<u32> {
        self.1
    }

    fn resized(&mut self) -> Result<(), String> {
        match &mut self.0 {
            Some(handle) => handle
                .update_size()
                .map_err(|e| format!("{} keeps its old size: {e}", handle.block_path().display())),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        if let Some(handle) = self.0.take() {
            let path = handle.block_path();
            if let Err(e) = handle.stop() {
                eprintln!("userdm: stopping {}: {e}", path.display());
            }
        }
    }
}
