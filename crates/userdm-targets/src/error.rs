//! `error [<dev> <offset>]`: every request fails.

use std::sync::Arc;

use userdm_io::{Errno, IoResult, OpSet};
use userdm_table::{Dep, RowSpec, TableError, TargetLimits};

use crate::args::{parse_u64, target_error};
use crate::backing::Backing;
use crate::TargetContext;

const NAME: &str = "error";

/// The error target.
#[derive(Debug)]
pub struct ErrorTarget {
    /// The device named in the params, kept for `deps` and its limits, as the kernel keeps it
    /// for zoned limits. No IO ever reaches it.
    device: Option<Arc<Backing>>,
}

impl ErrorTarget {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<ErrorTarget, TableError> {
        let args = row.args();
        // The kernel looks at the params only when there are exactly two and ignores any other
        // number, so that an error row can replace any row in place.
        let [path, start] = args.as_slice() else {
            return Ok(ErrorTarget { device: None });
        };
        if parse_u64(start).is_none() {
            return Err(target_error(
                NAME,
                format!("Invalid device sector '{start}'"),
            ));
        }
        let device = Backing::open(ctx, path)
            .map_err(|e| target_error(NAME, format!("Device lookup failed: {e}")))?;
        Ok(ErrorTarget {
            device: Some(device),
        })
    }

    pub(crate) fn ops(&self) -> OpSet {
        // Every operation, so that each reaches us and fails with EIO rather than EOPNOTSUPP
        // (the kernel fails discards too).
        OpSet::ALL
    }

    pub(crate) fn deps(&self) -> Vec<Dep> {
        self.device.iter().map(|d| d.dep()).collect()
    }

    pub(crate) fn limits(&self) -> TargetLimits {
        self.device
            .as_ref()
            .map_or_else(TargetLimits::default, |d| d.limits())
    }

    pub(crate) fn io(&self) -> IoResult {
        Err(Errno::EIO.into())
    }
}
