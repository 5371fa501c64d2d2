//! Turning what a [`BlockDevice`](userdm_device::BlockDevice) says about itself into
//! `ublk_params`.

use userdm_io::limits::IO_BYTES_MAX;
use userdm_io::{IoOp, OpSet, SECTOR_SHIFT};
use userdm_table::TargetLimits;
use userdm_ublk_sys as sys;

use crate::UblkError;

/// The facts about a device that its ublk parameters are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// Size in bytes (rounded down to whole sectors).
    pub size_bytes: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Operations served; DISCARD and WRITE_ZEROES limits are advertised only when present.
    pub ops: OpSet,
    /// Block sizes and cache properties.
    pub limits: TargetLimits,
    /// Largest request the server takes, in bytes.
    pub max_io_bytes: u32,
}

/// The largest DISCARD or WRITE_ZEROES request advertised. They carry no data, but a target may
/// still touch the whole range at once (a file target writes zeros), so they stay within the
/// engine's request limit.
pub const DISCARD_BYTES_MAX: u64 = IO_BYTES_MAX;

/// Builds the parameter blocks for SET_PARAMS. Fails on block sizes ublk cannot express
/// (logical must be a power of two from 512 to the page size, physical at least logical).
pub fn build_params(shape: &DeviceShape, page_size: usize) -> Result<sys::ublk_params, UblkError> {
    let logical = shape.limits.logical_block_bytes;
    let physical = shape.limits.physical_block_bytes.max(logical);
    let page = u32::try_from(page_size).unwrap_or(4096);
    if !logical.is_power_of_two() || !(512..=page).contains(&logical) {
        return Err(UblkError::InvalidOption(format!(
            "logical block size {logical} is not supported by ublk: it must be a power of two \
             from 512 to {page}"
        )));
    }
    if !physical.is_power_of_two() {
        return Err(UblkError::InvalidOption(format!(
            "physical block size {physical} is not a power of two"
        )));
    }
    if shape.max_io_bytes < logical || shape.max_io_bytes % 512 != 0 {
        return Err(UblkError::InvalidOption(format!(
            "largest request {} bytes is smaller than a block or not sector aligned",
            shape.max_io_bytes
        )));
    }
    let logical_shift = logical.trailing_zeros() as u8;
    let physical_shift = physical.trailing_zeros() as u8;
    let mut attrs = 0;
    if shape.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if shape.limits.rotational {
        attrs |= sys::UBLK_ATTR_ROTATIONAL;
    }
    if shape.limits.volatile_cache {
        // The engine hands FUA through to targets, so FUA is honoured whenever there is a
        // cache for it to bypass; the kernel ignores FUA without a volatile cache.
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    }
    let mut params = sys::ublk_params {
        len: sys::UBLK_PARAMS_LEN_6_12 as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: logical_shift,
            physical_bs_shift: physical_shift,
            io_opt_shift: physical_shift,
            io_min_shift: logical_shift,
            max_sectors: shape.max_io_bytes >> SECTOR_SHIFT,
            chunk_sectors: 0,
            dev_sectors: shape.size_bytes >> SECTOR_SHIFT,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };
    let discard = shape.ops.contains(IoOp::Discard) && !shape.read_only;
    let zeroes = shape.ops.contains(IoOp::WriteZeroes) && !shape.read_only;
    if discard || zeroes {
        let sectors = (DISCARD_BYTES_MAX >> SECTOR_SHIFT) as u32;
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: physical,
            max_discard_sectors: if discard { sectors } else { 0 },
            max_write_zeroes_sectors: if zeroes { sectors } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> DeviceShape {
        DeviceShape {
            size_bytes: 64 << 20,
            read_only: false,
            ops: OpSet::STORAGE,
            limits: TargetLimits::default(),
            max_io_bytes: 512 << 10,
        }
    }

    #[test]
    fn storage_device_gets_discard_and_write_zeroes() {
        let p = build_params(&shape(), 4096).unwrap();
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(p.len as usize, sys::UBLK_PARAMS_LEN_6_12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_sectors, 2048);
        assert_eq!(p.discard.max_write_zeroes_sectors, 2048);
    }

    #[test]
    fn read_write_only_device_has_no_discard_block() {
        let s = DeviceShape {
            ops: OpSet::RW_FLUSH,
            ..shape()
        };
        let p = build_params(&s, 4096).unwrap();
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn write_zeroes_without_discard() {
        let s = DeviceShape {
            ops: OpSet::RW_FLUSH.with(IoOp::WriteZeroes),
            ..shape()
        };
        let p = build_params(&s, 4096).unwrap();
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert_eq!(p.discard.max_write_zeroes_sectors, 2048);
        assert_ne!(p.discard.discard_granularity, 0);
    }

    #[test]
    fn read_only_rotational_without_cache() {
        let s = DeviceShape {
            read_only: true,
            limits: TargetLimits {
                logical_block_bytes: 4096,
                physical_block_bytes: 4096,
                volatile_cache: false,
                rotational: true,
            },
            ..shape()
        };
        let p = build_params(&s, 4096).unwrap();
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_READ_ONLY | sys::UBLK_ATTR_ROTATIONAL
        );
        assert_eq!(p.basic.logical_bs_shift, 12);
        // A read-only device advertises no discard.
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        for logical in [256, 1000, 8192] {
            let s = DeviceShape {
                limits: TargetLimits {
                    logical_block_bytes: logical,
                    ..TargetLimits::default()
                },
                ..shape()
            };
            assert!(build_params(&s, 4096).is_err(), "{logical}");
        }
    }

    #[test]
    fn physical_smaller_than_logical_is_raised() {
        let s = DeviceShape {
            limits: TargetLimits {
                logical_block_bytes: 4096,
                physical_block_bytes: 512,
                ..TargetLimits::default()
            },
            ..shape()
        };
        let p = build_params(&s, 4096).unwrap();
        assert!(p.basic.physical_bs_shift >= p.basic.logical_bs_shift);
    }

    #[test]
    fn unaligned_size_rounds_down() {
        let s = DeviceShape {
            size_bytes: 4096 + 100,
            ..shape()
        };
        assert_eq!(build_params(&s, 4096).unwrap().basic.dev_sectors, 8);
    }
}
