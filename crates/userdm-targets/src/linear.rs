//! `linear <dev> <offset>`: maps the row onto a range of another device or file.

use userdm_io::{IoHeader, IoResult, OpSet};
use userdm_table::{Allocation, Dep, RowSpec, TableError, TargetLimits};
use userdm_uring::Reactor;

use crate::args::{parse_u64, target_error};
use crate::backing::{Backing, Mapping};
use crate::TargetContext;

const NAME: &str = "linear";

/// A linear mapping.
#[derive(Debug)]
pub struct Linear {
    map: Mapping,
}

impl Linear {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<Linear, TableError> {
        let args = row.args();
        let [path, start] = args.as_slice() else {
            return Err(target_error(
                NAME,
                format!(
                    "Invalid argument count: expected 2 (<dev_path> <offset>), got {}",
                    args.len()
                ),
            ));
        };
        let map = open_mapping(NAME, ctx, path, start, row.len)?;
        Ok(Linear { map })
    }

    pub(crate) fn table_params(&self) -> String {
        self.map.table_params()
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    pub(crate) fn deps(&self) -> Vec<Dep> {
        vec![self.map.backing.dep()]
    }

    pub(crate) fn limits(&self) -> TargetLimits {
        self.map.backing.limits()
    }

    pub(crate) fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        self.map.allocation(offset_bytes, max_len_bytes)
    }

    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        self.map.io(rt, io, buf).await
    }
}

/// Parses `<dev> <offset>`, opens the device and checks that `len` sectors fit, with the kernel's
/// messages ("Invalid device sector", "Device lookup failed"). Shared by every target that maps
/// onto one device.
pub(crate) fn open_mapping(
    target: &str,
    ctx: &TargetContext,
    path: &str,
    start: &str,
    len: u64,
) -> Result<Mapping, TableError> {
    let start = parse_u64(start)
        .ok_or_else(|| target_error(target, format!("Invalid device sector '{start}'")))?;
    let backing = Backing::open(ctx, path)
        .map_err(|e| target_error(target, format!("Device lookup failed: {e}")))?;
    backing
        .check_area(start, len)
        .map_err(|e| target_error(target, e))?;
    Ok(Mapping { backing, start })
}
