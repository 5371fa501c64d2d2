//! Errors of table building and target messages.

/// Why a table could not be parsed or built. Every variant names the row (1-based line number
/// of the table text, or row index + 1 for tables built from specs) so a user can find it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableError {
    /// A line is not `start length target [params]`.
    #[error("line {line}: {problem}")]
    Syntax {
        /// The line.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// Rows must start at 0 and follow each other without gaps or overlaps.
    #[error("line {line}: gap in table: row starts at sector {start}, expected {expected}")]
    Gap {
        /// The line.
        line: usize,
        /// Where it starts.
        start: u64,
        /// Where the previous row ended.
        expected: u64,
    },
    /// A row of length zero.
    #[error("line {line}: zero-length row")]
    ZeroLength {
        /// The line.
        line: usize,
    },
    /// The table is larger than a device may be.
    #[error("line {line}: table too large: ends beyond sector {max}")]
    TooLarge {
        /// The line.
        line: usize,
        /// The largest allowed end.
        max: u64,
    },
    /// Too many rows or too long a parameter string.
    #[error("line {line}: {problem}")]
    Limit {
        /// The line.
        line: usize,
        /// What limit.
        problem: String,
    },
    /// No target of that name exists.
    #[error("line {line}: {target}: unknown target type")]
    UnknownTarget {
        /// The line.
        line: usize,
        /// The name given.
        target: String,
    },
    /// The target refused its parameters.
    #[error("line {line}: {target}: {problem}")]
    Target {
        /// The line.
        line: usize,
        /// The target type.
        target: String,
        /// The target's own explanation, naming the bad parameter.
        problem: String,
    },
    /// An empty table where one is required.
    #[error("table is empty")]
    Empty,
}

/// Why a target message failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The target takes no messages at all (the kernel: "Target type does not support messages").
    #[error("target type does not support messages")]
    Unsupported,
    /// The message was not understood.
    #[error("{0}")]
    Invalid(String),
    /// No row covers that sector.
    #[error("no target at sector {0}")]
    NoTarget(u64),
}
