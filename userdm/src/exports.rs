//! The exports a device's server can start: NBD over a Unix or TCP socket, and a FUSE file.

use std::sync::Arc;

use userdm_control::{DeviceHandle, Export, ExportFactory, ExportSpec};
use userdm_device::BlockDevice;
use userdm_fuse::{FuseExport, FuseHandle, FuseOptions};
use userdm_io::{Errno, IoHeader, OpSet};
use userdm_nbd::{
    serve_tcp, serve_unix, DeviceBackend, Exports as NbdExports, ListenAddr, NbdServer,
    ServerConfig,
};
use userdm_table::{Allocation, TargetLimits};
use userdm_targets::AnyTarget;
use userdm_uring::Reactor;

/// Starts the exports named with `--export`.
pub struct Exports;

impl ExportFactory<AnyTarget> for Exports {
    fn start(
        &self,
        spec: &ExportSpec,
        handle: DeviceHandle<AnyTarget>,
    ) -> Result<Box<dyn Export>, String> {
        if let ExportSpec::Fuse(path) = spec {
            let device = Arc::new(Opener(handle));
            let fuse = FuseExport::start(device, path, FuseOptions::default())
                .map_err(|e| format!("export {spec}: {e}"))?;
            return Ok(Box::new(Fuse(Some(fuse))));
        }
        let name = handle.device().name();
        let backend = Arc::new(DeviceBackend(Arc::new(Opener(handle))));
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

/// The device as NBD sees it. Connections count as openers through the server's handle, so
/// that the last close of a device whose removal was deferred removes it.
struct Opener(DeviceHandle<AnyTarget>);

impl BlockDevice for Opener {
    fn size_bytes(&self) -> u64 {
        BlockDevice::size_bytes(&**self.0.device())
    }

    fn read_only(&self) -> bool {
        self.0.device().read_only()
    }

    fn ops(&self) -> OpSet {
        BlockDevice::ops(&**self.0.device())
    }

    fn limits(&self) -> TargetLimits {
        BlockDevice::limits(&**self.0.device())
    }

    fn io(
        &self,
        rt: &Reactor,
        io: IoHeader,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = Result<(), Errno>> {
        self.0.device().io(rt, io, buf)
    }

    fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        BlockDevice::allocation(&**self.0.device(), offset_bytes, max_len_bytes)
    }

    fn open(&self) {
        self.0.open();
    }

    fn close(&self) -> bool {
        self.0.close();
        false
    }
}
