//! `zero`: reads return zeros, writes are dropped.

use userdm_io::{Errno, IoFlags, IoHeader, IoOp, IoResult, OpSet};
use userdm_table::{RowSpec, TableError};

use crate::args::target_error;

const NAME: &str = "zero";

/// The zero target.
#[derive(Debug)]
pub struct Zero;

impl Zero {
    pub(crate) fn construct(row: &RowSpec) -> Result<Zero, TableError> {
        let args = row.args();
        if !args.is_empty() {
            return Err(target_error(
                NAME,
                format!("No arguments required, got {}", args.len()),
            ));
        }
        Ok(Zero)
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    pub(crate) fn io(&self, io: IoHeader, buf: &mut [u8]) -> IoResult {
        match io.op {
            // As the kernel: read-ahead of zeros would only fill the page cache with them.
            IoOp::Read if io.flags.contains(IoFlags::RAHEAD) => Err(Errno::EIO.into()),
            IoOp::Read => {
                buf.fill(0);
                Ok(())
            }
            IoOp::Write | IoOp::Flush | IoOp::Discard | IoOp::WriteZeroes => Ok(()),
            _ => Err(Errno::EOPNOTSUPP.into()),
        }
    }
}
