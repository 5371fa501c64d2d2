//! Device-mapper tables: the text rows `start length target params...`, the [`Target`] trait
//! that each row's implementation provides, and [`Table`], which finds the rows a request touches
//! and splits it among them.
//!
//! Text follows dmsetup and the kernel (`../shared/reference/device-mapper.md` §2.3): one row per
//! line, blank lines and lines starting with `#` skipped, a later `#` ends the line, params split
//! on whitespace with backslash escapes; rows start at 0, are contiguous and non-empty.
//!
//! ```
//! let rows = userdm_table::parse_table_text("0 8 zero\n8 8 error\n").unwrap();
//! assert_eq!(rows[1].start, 8);
//! assert_eq!(rows[1].target_type, "error");
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
mod parse;
mod table;
mod target;

pub use error::{MessageError, TableError};
pub use parse::{parse_table_text, split_params, RowSpec};
pub use table::{Row, Table};
pub use target::{Allocation, Dep, Target, TargetLimits, TargetType};
