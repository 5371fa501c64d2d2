//! Operations and sets of operations.

use std::fmt;

/// Every block operation that ublk or dm-user can carry.
///
/// The discriminants are userdm's own; each export converts from its wire codes with the
/// `from_*` functions so that a code it does not know becomes an explicit error, never a guess.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoOp {
    /// Read data into the request's buffer.
    Read = 0,
    /// Write the request's buffer.
    Write = 1,
    /// Make all completed writes durable.
    Flush = 2,
    /// The range's contents are no longer needed; later reads may return anything.
    Discard = 3,
    /// Like discard, but the old contents must become unrecoverable.
    SecureErase = 4,
    /// Write one logical block repeatedly over the range (removed from Linux 5.18).
    WriteSame = 5,
    /// Make the range read as zeros.
    WriteZeroes = 6,
    /// Explicitly open a zone.
    ZoneOpen = 7,
    /// Close a zone.
    ZoneClose = 8,
    /// Move a zone to full.
    ZoneFinish = 9,
    /// Append to a zone; the device chooses the sector.
    ZoneAppend = 10,
    /// Reset one zone's write pointer.
    ZoneReset = 11,
    /// Reset every zone.
    ZoneResetAll = 12,
    /// Report zone descriptors (ublk only).
    ReportZones = 13,
}

impl IoOp {
    /// Every operation, in discriminant order.
    pub const ALL: [IoOp; 14] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Discard,
        IoOp::SecureErase,
        IoOp::WriteSame,
        IoOp::WriteZeroes,
        IoOp::ZoneOpen,
        IoOp::ZoneClose,
        IoOp::ZoneFinish,
        IoOp::ZoneAppend,
        IoOp::ZoneReset,
        IoOp::ZoneResetAll,
        IoOp::ReportZones,
    ];

    /// The lower-case name used in messages and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::SecureErase => "secure-erase",
            IoOp::WriteSame => "write-same",
            IoOp::WriteZeroes => "write-zeroes",
            IoOp::ZoneOpen => "zone-open",
            IoOp::ZoneClose => "zone-close",
            IoOp::ZoneFinish => "zone-finish",
            IoOp::ZoneAppend => "zone-append",
            IoOp::ZoneReset => "zone-reset",
            IoOp::ZoneResetAll => "zone-reset-all",
            IoOp::ReportZones => "report-zones",
        }
    }

    /// Converts a ublk `UBLK_IO_OP_*` code.
    pub const fn from_ublk(code: u8) -> Option<IoOp> {
        Some(match code {
            0 => IoOp::Read,
            1 => IoOp::Write,
            2 => IoOp::Flush,
            3 => IoOp::Discard,
            4 => IoOp::WriteSame,
            5 => IoOp::WriteZeroes,
            10 => IoOp::ZoneOpen,
            11 => IoOp::ZoneClose,
            12 => IoOp::ZoneFinish,
            13 => IoOp::ZoneAppend,
            14 => IoOp::ZoneResetAll,
            15 => IoOp::ZoneReset,
            18 => IoOp::ReportZones,
            _ => return None,
        })
    }

    /// Converts to dm-user's `DM_USER_REQ_MAP_*` type code, if dm-user has one.
    pub const fn to_dm_user(self) -> Option<u64> {
        Some(match self {
            IoOp::Read => 0,
            IoOp::Write => 1,
            IoOp::Flush => 2,
            IoOp::Discard => 3,
            IoOp::SecureErase => 4,
            IoOp::WriteSame => 5,
            IoOp::WriteZeroes => 6,
            IoOp::ZoneOpen => 7,
            IoOp::ZoneClose => 8,
            IoOp::ZoneFinish => 9,
            IoOp::ZoneAppend => 10,
            IoOp::ZoneReset => 11,
            IoOp::ZoneResetAll => 12,
            IoOp::ReportZones => return None,
        })
    }

    /// Converts a dm-user `DM_USER_REQ_MAP_*` type code.
    pub const fn from_dm_user(code: u64) -> Option<IoOp> {
        Some(match code {
            0 => IoOp::Read,
            1 => IoOp::Write,
            2 => IoOp::Flush,
            3 => IoOp::Discard,
            4 => IoOp::SecureErase,
            5 => IoOp::WriteSame,
            6 => IoOp::WriteZeroes,
            7 => IoOp::ZoneOpen,
            8 => IoOp::ZoneClose,
            9 => IoOp::ZoneFinish,
            10 => IoOp::ZoneAppend,
            11 => IoOp::ZoneReset,
            12 => IoOp::ZoneResetAll,
            _ => return None,
        })
    }

    /// Whether the request carries data from the client to the device.
    pub const fn carries_write_data(self) -> bool {
        matches!(self, IoOp::Write | IoOp::WriteSame | IoOp::ZoneAppend)
    }

    /// Whether the request returns data from the device to the client.
    pub const fn returns_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::ReportZones)
    }

    /// Whether the request names a sector range (FLUSH and ZONE_RESET_ALL do not).
    pub const fn has_range(self) -> bool {
        !matches!(self, IoOp::Flush | IoOp::ZoneResetAll)
    }

    /// Whether the operation changes data, and so is refused on a read-only device.
    pub const fn modifies(self) -> bool {
        !matches!(self, IoOp::Read | IoOp::Flush | IoOp::ReportZones)
    }

    const fn bit(self) -> u16 {
        1 << (self as u8)
    }
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of operations, used by targets to say what they serve.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct OpSet(u16);

impl OpSet {
    /// No operations.
    pub const EMPTY: OpSet = OpSet(0);
    /// READ, WRITE and FLUSH: what every data-carrying target must serve.
    pub const RW_FLUSH: OpSet = OpSet::EMPTY
        .with(IoOp::Read)
        .with(IoOp::Write)
        .with(IoOp::Flush);
    /// The usual set of a target that stores data: RW_FLUSH plus DISCARD and WRITE_ZEROES.
    pub const STORAGE: OpSet = OpSet::RW_FLUSH.with(IoOp::Discard).with(IoOp::WriteZeroes);
    /// Every operation.
    pub const ALL: OpSet = OpSet((1 << IoOp::ALL.len()) - 1);

    /// This set with `op` added.
    pub const fn with(self, op: IoOp) -> OpSet {
        OpSet(self.0 | op.bit())
    }

    /// This set without `op`.
    pub const fn without(self, op: IoOp) -> OpSet {
        OpSet(self.0 & !op.bit())
    }

    /// Whether `op` is in the set.
    pub const fn contains(self, op: IoOp) -> bool {
        self.0 & op.bit() != 0
    }

    /// Operations in both sets; a table serves an operation only if every row does.
    pub const fn intersect(self, other: OpSet) -> OpSet {
        OpSet(self.0 & other.0)
    }

    /// Iterates over the operations in the set.
    pub fn iter(self) -> impl Iterator<Item = IoOp> {
        IoOp::ALL.into_iter().filter(move |op| self.contains(*op))
    }
}

impl fmt::Debug for OpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_codes_round_trip_names() {
        for code in 0..=255u8 {
            if let Some(op) = IoOp::from_ublk(code) {
                assert!(!op.name().is_empty());
            }
        }
        assert_eq!(IoOp::from_ublk(6), None);
        assert_eq!(IoOp::from_ublk(15), Some(IoOp::ZoneReset));
    }

    #[test]
    fn dm_user_codes_round_trip() {
        for op in IoOp::ALL {
            if let Some(code) = op.to_dm_user() {
                assert_eq!(IoOp::from_dm_user(code), Some(op));
            }
        }
        assert_eq!(IoOp::from_dm_user(13), None);
    }

    #[test]
    fn op_sets() {
        let s = OpSet::STORAGE;
        assert!(s.contains(IoOp::Discard));
        assert!(!s.contains(IoOp::SecureErase));
        assert_eq!(s.intersect(OpSet::RW_FLUSH), OpSet::RW_FLUSH);
        assert_eq!(OpSet::ALL.iter().count(), IoOp::ALL.len());
        assert!(!s.without(IoOp::Read).contains(IoOp::Read));
    }
}
