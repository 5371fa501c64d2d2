//! The exports the server can start.

use userdm_control::{DeviceHandle, Export, ExportFactory, ExportSpec};
use userdm_targets::AnyTarget;

/// Starts the exports named with `--export`.
pub struct Exports;

impl ExportFactory<AnyTarget> for Exports {
    fn start(
        &self,
        spec: &ExportSpec,
        _handle: DeviceHandle<AnyTarget>,
    ) -> Result<Box<dyn Export>, String> {
        Err(format!(
            "export {spec}: the NBD export is not available yet"
        ))
    }
}
