//! Every number the NBD protocol puts on the wire: magics, option and reply codes, information
//! types, command codes, error values and the flag fields.
//!
//! Codes are newtypes over the wire integer rather than enums: a peer may send a code this crate
//! does not know, and the protocol requires the server to answer it (NBD_REP_ERR_UNSUP, NBD_EINVAL)
//! rather than fail to parse, so every value must be representable. Named constants cover every
//! code of the current specification, including the experimental EXTENDED_HEADERS extension.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows [`NBD_MAGIC`] in newstyle negotiation, and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic`: follows [`NBD_MAGIC`] in the obsolete oldstyle negotiation (never sent here).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Starts every option reply of fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Starts a simple (16-byte) reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk (20-byte header).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Starts an extended reply chunk (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// The longest string the protocol allows (export names, descriptions, messages, contexts).
pub const STRING_BYTES_MAX: usize = 4096;
/// The number of zero bytes that end `NBD_OPT_EXPORT_NAME`'s reply unless NO_ZEROES was agreed.
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;

macro_rules! wire_code {
    ($(#[$doc:meta])* $name:ident($int:ty) { $($(#[$cdoc:meta])* $konst:ident = $value:expr;)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$cdoc])* pub const $konst: $name = $name($value);)*

            /// The specification's name for this code, or `None` for a code it does not define.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(v if v == $value => Some(stringify!($konst)),)*
                    _ => None,
                }
            }

            /// Whether the specification defines this code.
            pub const fn is_known(self) -> bool {
                self.name().is_some()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }
    };
}

wire_code! {
    /// An `NBD_OPT_*` option code, sent by the client during option haggling.
    OptionType(u32) {
        /// Choose an export and enter transmission, with no way to report an error.
        EXPORT_NAME = 1;
        /// End the negotiation.
        ABORT = 2;
        /// List the exports.
        LIST = 3;
        /// Withdrawn `PEEK_EXPORT` extension; answered as unsupported.
        PEEK_EXPORT = 4;
        /// Upgrade the connection to TLS.
        STARTTLS = 5;
        /// Describe one export without choosing it.
        INFO = 6;
        /// Describe one export and enter transmission.
        GO = 7;
        /// Use structured replies.
        STRUCTURED_REPLY = 8;
        /// List metadata contexts.
        LIST_META_CONTEXT = 9;
        /// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
        SET_META_CONTEXT = 10;
        /// Use 32-byte extended headers (experimental extension).
        EXTENDED_HEADERS = 11;
    }
}

wire_code! {
    /// An `NBD_REP_*` option reply type. Error types have bit 31 set.
    ReplyType(u32) {
        /// The option succeeded; ends the reply.
        ACK = 1;
        /// One export in answer to `NBD_OPT_LIST`.
        SERVER = 2;
        /// One item of export information in answer to INFO or GO.
        INFO = 3;
        /// One metadata context.
        META_CONTEXT = 4;
        /// The option is unknown to this server.
        ERR_UNSUP = 0x8000_0001;
        /// The option is forbidden by policy.
        ERR_POLICY = 0x8000_0002;
        /// The option is syntactically or semantically invalid.
        ERR_INVALID = 0x8000_0003;
        /// The option is not supported on this platform.
        ERR_PLATFORM = 0x8000_0004;
        /// TLS is required first.
        ERR_TLS_REQD = 0x8000_0005;
        /// The export does not exist.
        ERR_UNKNOWN = 0x8000_0006;
        /// The server is shutting down.
        ERR_SHUTDOWN = 0x8000_0007;
        /// The client must request `NBD_INFO_BLOCK_SIZE` first.
        ERR_BLOCK_SIZE_REQD = 0x8000_0008;
        /// The request or its reply is too large.
        ERR_TOO_BIG = 0x8000_0009;
        /// Extended headers are required (experimental extension).
        ERR_EXT_HEADER_REQD = 0x8000_000a;
    }
}

impl ReplyType {
    /// Whether this is an error reply (bit 31 set), which always ends the option's replies.
    pub const fn is_error(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }
}

wire_code! {
    /// An `NBD_INFO_*` information type, requested in and answered to INFO and GO.
    InfoType(u16) {
        /// Export size and transmission flags (mandatory on success).
        EXPORT = 0;
        /// The export's canonical name.
        NAME = 1;
        /// A human-readable description.
        DESCRIPTION = 2;
        /// Minimum, preferred and maximum block sizes.
        BLOCK_SIZE = 3;
    }
}

wire_code! {
    /// An `NBD_CMD_*` request type of the transmission phase.
    CommandType(u16) {
        /// Read data.
        READ = 0;
        /// Write the payload.
        WRITE = 1;
        /// Disconnect after finishing in-flight requests; no reply.
        DISC = 2;
        /// Make completed writes durable.
        FLUSH = 3;
        /// Discard a range.
        TRIM = 4;
        /// Prefetch a range.
        CACHE = 5;
        /// Make a range read as zeroes.
        WRITE_ZEROES = 6;
        /// Query metadata contexts over a range.
        BLOCK_STATUS = 7;
        /// Resize the export (experimental RESIZE extension; never advertised here).
        RESIZE = 8;
    }
}

wire_code! {
    /// An `NBD_REPLY_TYPE_*` structured or extended reply chunk type. Error chunks have bit 15 set.
    ChunkType(u16) {
        /// No payload; only valid as the final chunk.
        NONE = 0;
        /// Offset followed by data.
        OFFSET_DATA = 1;
        /// A range that reads as zeroes.
        OFFSET_HOLE = 2;
        /// 32-bit extents of one metadata context.
        BLOCK_STATUS = 5;
        /// 64-bit extents of one metadata context (extended headers only).
        BLOCK_STATUS_EXT = 6;
        /// An error without an offset.
        ERROR = 0x8001;
        /// An error at an offset.
        ERROR_OFFSET = 0x8002;
    }
}

impl ChunkType {
    /// Whether this is an error chunk (bit 15 set).
    pub const fn is_error(self) -> bool {
        self.0 & 0x8000 != 0
    }
}

wire_code! {
    /// An `NBD_E*` error value of a reply. The values equal Linux errno values, but the protocol
    /// allows only these; [`crate::errno_to_nbd`] maps everything else.
    NbdError(u32) {
        /// Operation not permitted (writes to a read-only export).
        EPERM = 1;
        /// Input/output error.
        EIO = 5;
        /// Out of memory.
        ENOMEM = 12;
        /// Invalid argument.
        EINVAL = 22;
        /// No space left.
        ENOSPC = 28;
        /// Value too large.
        EOVERFLOW = 75;
        /// Operation not supported (fast zero).
        ENOTSUP = 95;
        /// The server is shutting down.
        ESHUTDOWN = 108;
    }
}

macro_rules! wire_flags {
    ($(#[$doc:meta])* $name:ident($int:ty) { $($(#[$cdoc:meta])* $konst:ident = $bit:expr;)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$cdoc])* pub const $konst: $name = $name(1 << $bit);)*
            /// Every flag the specification defines.
            pub const KNOWN: $name = $name(0 $(| (1 << $bit))*);
            const NAMES: &'static [($name, &'static str)] = &[$(($name::$konst, stringify!($konst))),*];

            /// No flags.
            pub const fn empty() -> $name {
                $name(0)
            }

            /// The wire value.
            pub const fn bits(self) -> $int {
                self.0
            }

            /// Whether every flag of `other` is set.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether any flag of `other` is set.
            pub const fn intersects(self, other: $name) -> bool {
                self.0 & other.0 != 0
            }

            /// These flags plus `other`.
            pub const fn with(self, other: $name) -> $name {
                $name(self.0 | other.0)
            }

            /// These flags without `other`.
            pub const fn without(self, other: $name) -> $name {
                $name(self.0 & !other.0)
            }

            /// These flags with `other` set or cleared.
            pub const fn set(self, other: $name, on: bool) -> $name {
                if on { self.with(other) } else { self.without(other) }
            }

            /// The flags this crate does not know.
            pub const fn unknown(self) -> $name {
                $name(self.0 & !$name::KNOWN.0)
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl BitAnd for $name {
            type Output = $name;
            fn bitand(self, rhs: $name) -> $name {
                $name(self.0 & rhs.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                let mut sep = "";
                for (flag, name) in $name::NAMES {
                    if self.contains(*flag) {
                        write!(f, "{sep}{name}")?;
                        sep = "|";
                    }
                }
                if self.unknown().0 != 0 {
                    write!(f, "{sep}{:#x}", self.unknown().0)?;
                }
                f.write_str(")")
            }
        }
    };
}

wire_flags! {
    /// Handshake flags: 16 bits sent by the server after `IHAVEOPT`.
    HandshakeFlags(u16) {
        /// The server speaks fixed newstyle.
        FIXED_NEWSTYLE = 0;
        /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
        NO_ZEROES = 1;
    }
}

wire_flags! {
    /// Client flags: 32 bits sent by the client in answer to the handshake flags.
    ClientFlags(u32) {
        /// The client speaks fixed newstyle.
        FIXED_NEWSTYLE = 0;
        /// The client wants no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
        NO_ZEROES = 1;
    }
}

wire_flags! {
    /// Transmission flags: 16 bits describing an export.
    TransmissionFlags(u16) {
        /// Always set.
        HAS_FLAGS = 0;
        /// Writes are refused.
        READ_ONLY = 1;
        /// `NBD_CMD_FLUSH` is supported.
        SEND_FLUSH = 2;
        /// `NBD_CMD_FLAG_FUA` is supported.
        SEND_FUA = 3;
        /// The export behaves like a rotational medium.
        ROTATIONAL = 4;
        /// `NBD_CMD_TRIM` is supported.
        SEND_TRIM = 5;
        /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
        SEND_WRITE_ZEROES = 6;
        /// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
        SEND_DF = 7;
        /// Flush and FUA effects are visible across connections.
        CAN_MULTI_CONN = 8;
        /// `NBD_CMD_RESIZE` is supported (experimental RESIZE extension).
        SEND_RESIZE = 9;
        /// `NBD_CMD_CACHE` is supported.
        SEND_CACHE = 10;
        /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
        SEND_FAST_ZERO = 11;
        /// `NBD_CMD_BLOCK_STATUS` accepts a payload (extended headers only).
        BLOCK_STATUS_PAYLOAD = 12;
    }
}

wire_flags! {
    /// Command flags: 16 bits of every request.
    CommandFlags(u16) {
        /// Forced unit access.
        FUA = 0;
        /// WRITE_ZEROES must not punch a hole.
        NO_HOLE = 1;
        /// READ must be answered with at most one content chunk.
        DF = 2;
        /// BLOCK_STATUS must return one extent per context.
        REQ_ONE = 3;
        /// WRITE_ZEROES must fail fast with ENOTSUP unless it is fast.
        FAST_ZERO = 4;
        /// The length field is a payload length (extended headers only).
        PAYLOAD_LEN = 5;
    }
}

wire_flags! {
    /// Reply flags of structured and extended reply chunks.
    ReplyFlags(u16) {
        /// This is the last chunk of the reply.
        DONE = 0;
    }
}

wire_flags! {
    /// The `base:allocation` metadata context's status flags.
    AllocationFlags(u32) {
        /// The extent is not allocated.
        HOLE = 0;
        /// The extent reads as zeroes.
        ZERO = 1;
    }
}

/// The only metadata context the specification defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }

    #[test]
    fn codes_have_names() {
        assert_eq!(OptionType(7).name(), Some("GO"));
        assert_eq!(OptionType(99).name(), None);
        assert_eq!(format!("{:?}", OptionType(99)), "OptionType(0x63)");
        assert!(ReplyType::ERR_TOO_BIG.is_error());
        assert!(!ReplyType::ACK.is_error());
        assert!(ChunkType::ERROR_OFFSET.is_error());
        assert!(!ChunkType::BLOCK_STATUS_EXT.is_error());
        for e in [1, 5, 12, 22, 28, 75, 95, 108] {
            assert!(NbdError(e).is_known());
        }
    }

    #[test]
    fn flag_bits_match_the_spec() {
        assert_eq!(TransmissionFlags::SEND_FAST_ZERO.bits(), 1 << 11);
        assert_eq!(TransmissionFlags::BLOCK_STATUS_PAYLOAD.bits(), 1 << 12);
        assert_eq!(CommandFlags::PAYLOAD_LEN.bits(), 1 << 5);
        assert_eq!(CommandFlags::KNOWN.bits(), 0x3f);
        assert_eq!(CommandFlags(0x41).unknown(), CommandFlags(0x40));
        assert_eq!(
            format!("{:?}", CommandFlags::FUA | CommandFlags(0x100)),
            "CommandFlags(FUA|0x100)"
        );
    }
}
