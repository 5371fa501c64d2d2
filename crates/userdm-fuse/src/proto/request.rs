//! Parsing what `/dev/fuse` hands us into a [`Request`].
//!
//! The kernel is trusted to follow the protocol, but a parser that panics on a surprise would
//! take every mounted client down with it, so [`parse_request`] checks every length and returns
//! a [`ParseError`] for anything it cannot read. It borrows the write payload from the input and
//! allocates nothing.

use super::abi::{self, opcode, Wire};

/// One request from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The header: opcode, `unique` (the id the reply must carry), node and caller.
    pub header: abi::InHeader,
    /// The operation and its arguments.
    pub op: Operation<'a>,
}

/// The operations this export understands; everything else is [`Operation::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation<'a> {
    /// Protocol negotiation, the first request of every connection. Kernels before 7.36 send
    /// only the first 16 bytes; the rest then reads as zero.
    Init(abi::InitIn),
    /// A name lookup: never valid, the root is a regular file.
    Lookup,
    /// File attributes.
    Getattr(abi::GetattrIn),
    /// Changes to attributes (size, mode, owner, times).
    Setattr(abi::SetattrIn),
    /// An `open(2)`.
    Open(abi::OpenIn),
    /// The last close of an open file.
    Release(abi::ReleaseIn),
    /// A read.
    Read(abi::ReadIn),
    /// A write and its payload (exactly `size` bytes).
    Write(abi::WriteIn, &'a [u8]),
    /// Filesystem statistics.
    Statfs,
    /// `fsync(2)` / `fdatasync(2)`.
    Fsync(abi::FsyncIn),
    /// A `close(2)` of one descriptor.
    Flush(abi::FlushIn),
    /// `access(2)`.
    Access(abi::AccessIn),
    /// The kernel gave up waiting for request `unique`; no reply.
    Interrupt(abi::InterruptIn),
    /// The connection is being torn down.
    Destroy,
    /// Lookup counts dropped; no reply.
    Forget(abi::ForgetIn),
    /// Several forgets at once; no reply.
    BatchForget(abi::BatchForgetIn),
    /// `fallocate(2)`.
    Fallocate(abi::FallocateIn),
    /// `lseek(2)` with `SEEK_DATA` / `SEEK_HOLE`.
    Lseek(abi::LseekIn),
    /// A reply to a notification we never send; no reply.
    NotifyReply,
    /// An opcode we do not implement (answered ENOSYS, unless it expects no reply).
    Unknown(u32),
}

impl Operation<'_> {
    /// The operation without a WRITE's payload (which becomes empty), detached from the
    /// request bytes so that the buffer they sit in can be reused for the reply.
    pub fn detach(&self) -> Operation<'static> {
        match *self {
            Operation::Init(x) => Operation::Init(x),
            Operation::Lookup => Operation::Lookup,
            Operation::Getattr(x) => Operation::Getattr(x),
            Operation::Setattr(x) => Operation::Setattr(x),
            Operation::Open(x) => Operation::Open(x),
            Operation::Release(x) => Operation::Release(x),
            Operation::Read(x) => Operation::Read(x),
            Operation::Write(x, _) => Operation::Write(x, &[]),
            Operation::Statfs => Operation::Statfs,
            Operation::Fsync(x) => Operation::Fsync(x),
            Operation::Flush(x) => Operation::Flush(x),
            Operation::Access(x) => Operation::Access(x),
            Operation::Interrupt(x) => Operation::Interrupt(x),
            Operation::Destroy => Operation::Destroy,
            Operation::Forget(x) => Operation::Forget(x),
            Operation::BatchForget(x) => Operation::BatchForget(x),
            Operation::Fallocate(x) => Operation::Fallocate(x),
            Operation::Lseek(x) => Operation::Lseek(x),
            Operation::NotifyReply => Operation::NotifyReply,
            Operation::Unknown(x) => Operation::Unknown(x),
        }
    }

    /// Whether the kernel waits for a reply to this operation.
    pub fn expects_reply(&self) -> bool {
        !matches!(
            self,
            Operation::Forget(_)
                | Operation::BatchForget(_)
                | Operation::Interrupt(_)
                | Operation::NotifyReply
        )
    }
}

/// Why a request could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer bytes than a header.
    #[error("request of {0} bytes is shorter than a header")]
    ShortHeader(usize),
    /// The header's length disagrees with the bytes read.
    #[error("request {unique}: header says {header_len} bytes, read {read_len}")]
    LengthMismatch {
        /// The request's id.
        unique: u64,
        /// `len` from the header.
        header_len: u32,
        /// Bytes actually read.
        read_len: usize,
    },
    /// The arguments are shorter than the opcode needs.
    #[error("request {unique}: opcode {opcode} arguments are truncated")]
    Truncated {
        /// The request's id.
        unique: u64,
        /// The opcode.
        opcode: u32,
    },
}

impl ParseError {
    /// The id of the request, when the header was readable, so that it can still be answered.
    pub fn unique(&self) -> Option<u64> {
        match *self {
            ParseError::ShortHeader(_) => None,
            ParseError::LengthMismatch { unique, .. } | ParseError::Truncated { unique, .. } => {
                Some(unique)
            }
        }
    }
}

/// Parses one request exactly as read from `/dev/fuse`.
pub fn parse_request(bytes: &[u8]) -> Result<Request<'_>, ParseError> {
    let header = abi::InHeader::decode(bytes).ok_or(ParseError::ShortHeader(bytes.len()))?;
    if header.len as usize != bytes.len() {
        return Err(ParseError::LengthMismatch {
            unique: header.unique,
            header_len: header.len,
            read_len: bytes.len(),
        });
    }
    let args = &bytes[abi::InHeader::SIZE..];
    let truncated = ParseError::Truncated {
        unique: header.unique,
        opcode: header.opcode,
    };
    let op = parse_operation(header.opcode, args).ok_or(truncated)?;
    Ok(Request { header, op })
}

fn parse_operation(code: u32, args: &[u8]) -> Option<Operation<'_>> {
    Some(match code {
        opcode::INIT => Operation::Init(parse_init(args)?),
        opcode::LOOKUP => Operation::Lookup,
        opcode::GETATTR => Operation::Getattr(abi::GetattrIn::decode(args)?),
        opcode::SETATTR => Operation::Setattr(abi::SetattrIn::decode(args)?),
        opcode::OPEN => Operation::Open(abi::OpenIn::decode(args)?),
        opcode::RELEASE => Operation::Release(abi::ReleaseIn::decode(args)?),
        opcode::READ => Operation::Read(abi::ReadIn::decode(args)?),
        opcode::WRITE => {
            let write = abi::WriteIn::decode(args)?;
            let payload = args.get(abi::WriteIn::SIZE..)?;
            // The payload must be exactly `size` bytes: more would be a framing error, less a
            // truncated request. Either way, refusing is safer than guessing.
            if payload.len() != write.size as usize {
                return None;
            }
            Operation::Write(write, payload)
        }
        opcode::STATFS => Operation::Statfs,
        opcode::FSYNC => Operation::Fsync(abi::FsyncIn::decode(args)?),
        opcode::FLUSH => Operation::Flush(abi::FlushIn::decode(args)?),
        opcode::ACCESS => Operation::Access(abi::AccessIn::decode(args)?),
        opcode::INTERRUPT => Operation::Interrupt(abi::InterruptIn::decode(args)?),
        opcode::DESTROY => Operation::Destroy,
        opcode::FORGET => Operation::Forget(abi::ForgetIn::decode(args)?),
        opcode::BATCH_FORGET => {
            let batch = abi::BatchForgetIn::decode(args)?;
            let entries = (batch.count as usize).checked_mul(abi::ForgetOne::SIZE)?;
            // We keep no lookup counts, so the entries are only length-checked.
            args.get(abi::BatchForgetIn::SIZE..)?.get(..entries)?;
            Operation::BatchForget(batch)
        }
        opcode::FALLOCATE => Operation::Fallocate(abi::FallocateIn::decode(args)?),
        opcode::LSEEK => Operation::Lseek(abi::LseekIn::decode(args)?),
        opcode::NOTIFY_REPLY => Operation::NotifyReply,
        other => Operation::Unknown(other),
    })
}

fn parse_init(args: &[u8]) -> Option<abi::InitIn> {
    if let Some(full) = abi::InitIn::decode(args) {
        return Some(full);
    }
    let compat = abi::InitInCompat::decode(args)?;
    Some(abi::InitIn {
        major: compat.major,
        minor: compat.minor,
        max_readahead: compat.max_readahead,
        flags: compat.flags,
        ..abi::InitIn::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(opcode: u32, args: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; abi::InHeader::SIZE];
        let header = abi::InHeader {
            len: (abi::InHeader::SIZE + args.len()) as u32,
            opcode,
            unique: 42,
            nodeid: abi::ROOT_ID,
            ..abi::InHeader::default()
        };
        header.encode(&mut out).unwrap();
        out.extend_from_slice(args);
        out
    }

    fn encoded<W: Wire>(w: &W) -> Vec<u8> {
        let mut out = vec![0u8; W::SIZE];
        w.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn write_payload_is_borrowed_exactly() {
        let write = abi::WriteIn {
            offset: 513,
            size: 3,
            ..abi::WriteIn::default()
        };
        let mut args = encoded(&write);
        args.extend_from_slice(b"abc");
        let bytes = request(opcode::WRITE, &args);
        let req = parse_request(&bytes).unwrap();
        assert_eq!(req.header.unique, 42);
        assert_eq!(req.op, Operation::Write(write, b"abc"));
        // A payload one byte short or long is refused, with the id kept for the reply.
        let mut long = args.clone();
        long.push(0);
        let err = parse_request(&request(opcode::WRITE, &long)).unwrap_err();
        assert_eq!(err.unique(), Some(42));
        let short = &args[..args.len() - 1];
        assert!(parse_request(&request(opcode::WRITE, short)).is_err());
    }

    #[test]
    fn old_kernels_send_a_short_init() {
        let compat = abi::InitInCompat {
            major: 7,
            minor: 31,
            max_readahead: 65536,
            flags: 1,
        };
        let bytes = request(opcode::INIT, &encoded(&compat));
        let req = parse_request(&bytes).unwrap();
        let Operation::Init(init) = req.op else {
            panic!("not init: {req:?}")
        };
        assert_eq!(
            (init.major, init.minor, init.flags, init.flags2),
            (7, 31, 1, 0)
        );
    }

    #[test]
    fn framing_errors() {
        assert_eq!(parse_request(&[0u8; 10]), Err(ParseError::ShortHeader(10)));
        let mut bytes = request(opcode::GETATTR, &[0u8; 16]);
        bytes.push(0);
        assert!(matches!(
            parse_request(&bytes),
            Err(ParseError::LengthMismatch { read_len: 57, .. })
        ));
        assert!(matches!(
            parse_request(&request(opcode::READ, &[0u8; 39])),
            Err(ParseError::Truncated { opcode: 15, .. })
        ));
        let batch = abi::BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        };
        assert!(parse_request(&request(opcode::BATCH_FORGET, &encoded(&batch))).is_err());
        assert_eq!(
            parse_request(&request(9999, &[])).unwrap().op,
            Operation::Unknown(9999)
        );
        assert!(!Operation::Forget(abi::ForgetIn::default()).expects_reply());
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn never_panics_on_framed_garbage(
            code in 0u32..60,
            args in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = parse_request(&request(code, &args));
        }
    }
}
