//! The handshake: the server greeting, client flags, option requests and option replies, and the
//! payloads of every option this crate understands.
//!
//! Both directions are here, so scripted test clients and fuzzers use the same code as the
//! server. The handshake is not the data path, so variable-length messages are built in `Vec`s.

use std::mem::size_of;

use super::consts::*;
use super::transmission::nbd_str;
use super::wire::{Reader, Writer};
use super::ProtoError;

/// Size of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Size of the client flags.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Size of an option request header.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Size of the reply to `NBD_OPT_EXPORT_NAME` without its trailing zeroes.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;

#[repr(C)]
struct RawGreeting {
    nbd_magic: [u8; 8],
    ihaveopt: [u8; 8],
    flags: [u8; 2],
}

#[repr(C)]
struct RawOptionHeader {
    magic: [u8; 8],
    option: [u8; 4],
    length: [u8; 4],
}

#[repr(C)]
struct RawOptionReplyHeader {
    magic: [u8; 8],
    option: [u8; 4],
    reply: [u8; 4],
    length: [u8; 4],
}

#[repr(C)]
struct RawExportNameReply {
    size: [u8; 8],
    flags: [u8; 2],
}

const _: () = assert!(size_of::<RawGreeting>() == GREETING_BYTES);
const _: () = assert!(size_of::<RawOptionHeader>() == OPTION_HEADER_BYTES);
const _: () = assert!(size_of::<RawOptionReplyHeader>() == OPTION_REPLY_HEADER_BYTES);
const _: () = assert!(size_of::<RawExportNameReply>() == EXPORT_NAME_REPLY_BYTES);

/// Encodes the server's opening message.
pub fn encode_greeting(flags: HandshakeFlags) -> [u8; GREETING_BYTES] {
    let raw = RawGreeting {
        nbd_magic: NBD_MAGIC.to_be_bytes(),
        ihaveopt: IHAVEOPT.to_be_bytes(),
        flags: flags.0.to_be_bytes(),
    };
    let mut out = [0u8; GREETING_BYTES];
    out[..8].copy_from_slice(&raw.nbd_magic);
    out[8..16].copy_from_slice(&raw.ihaveopt);
    out[16..].copy_from_slice(&raw.flags);
    out
}

/// Decodes the server's opening message (the client's side).
pub fn decode_greeting(buf: &[u8]) -> Result<HandshakeFlags, ProtoError> {
    let mut r = Reader::new(buf);
    let raw = RawGreeting {
        nbd_magic: r.array()?,
        ihaveopt: r.array()?,
        flags: r.array()?,
    };
    for (found, expected) in [(raw.nbd_magic, NBD_MAGIC), (raw.ihaveopt, IHAVEOPT)] {
        let found = u64::from_be_bytes(found);
        if found != expected {
            return Err(ProtoError::BadMagic { found });
        }
    }
    Ok(HandshakeFlags(u16::from_be_bytes(raw.flags)))
}

/// The header of one client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: OptionType,
    /// How many data bytes follow.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header, checking the `IHAVEOPT` magic.
    pub fn decode(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
        let mut r = Reader::new(buf);
        let raw = RawOptionHeader {
            magic: r.array()?,
            option: r.array()?,
            length: r.array()?,
        };
        let magic = u64::from_be_bytes(raw.magic);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic { found: magic });
        }
        Ok(OptionHeader {
            option: OptionType(u32::from_be_bytes(raw.option)),
            length: u32::from_be_bytes(raw.length),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let raw = RawOptionHeader {
            magic: IHAVEOPT.to_be_bytes(),
            option: self.option.0.to_be_bytes(),
            length: self.length.to_be_bytes(),
        };
        let mut out = [0u8; OPTION_HEADER_BYTES];
        out[..8].copy_from_slice(&raw.magic);
        out[8..12].copy_from_slice(&raw.option);
        out[12..].copy_from_slice(&raw.length);
        out
    }
}

/// Appends a whole option (header and data) to `out`: the client's side.
pub fn encode_option(option: OptionType, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let length = u32::try_from(data.len()).map_err(|_| ProtoError::LengthTooLarge {
        length: data.len() as u64,
    })?;
    out.extend_from_slice(&OptionHeader { option, length }.encode());
    out.extend_from_slice(data);
    Ok(())
}

/// The header of one option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: OptionType,
    /// The kind of reply.
    pub reply: ReplyType,
    /// How many data bytes follow.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes a reply header, checking its magic (the client's side).
    pub fn decode(buf: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
        let mut r = Reader::new(buf);
        let raw = RawOptionReplyHeader {
            magic: r.array()?,
            option: r.array()?,
            reply: r.array()?,
            length: r.array()?,
        };
        let magic = u64::from_be_bytes(raw.magic);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        Ok(OptionReplyHeader {
            option: OptionType(u32::from_be_bytes(raw.option)),
            reply: ReplyType(u32::from_be_bytes(raw.reply)),
            length: u32::from_be_bytes(raw.length),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_BYTES] {
        let raw = RawOptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.to_be_bytes(),
            option: self.option.0.to_be_bytes(),
            reply: self.reply.0.to_be_bytes(),
            length: self.length.to_be_bytes(),
        };
        let mut out = [0u8; OPTION_REPLY_HEADER_BYTES];
        out[..8].copy_from_slice(&raw.magic);
        out[8..12].copy_from_slice(&raw.option);
        out[12..16].copy_from_slice(&raw.reply);
        out[16..].copy_from_slice(&raw.length);
        out
    }
}

/// Appends a whole option reply (header and data) to `out`.
pub fn encode_option_reply(
    option: OptionType,
    reply: ReplyType,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let length = u32::try_from(data.len()).map_err(|_| ProtoError::LengthTooLarge {
        length: data.len() as u64,
    })?;
    out.extend_from_slice(
        &OptionReplyHeader {
            option,
            reply,
            length,
        }
        .encode(),
    );
    out.extend_from_slice(data);
    Ok(())
}

/// Encodes the reply that ends `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero
/// bytes unless both sides agreed on NO_ZEROES. Returns the buffer and how much of it to send.
pub fn encode_export_name_reply(
    size_bytes: u64,
    flags: TransmissionFlags,
    no_zeroes: bool,
) -> (
    [u8; EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES],
    usize,
) {
    let raw = RawExportNameReply {
        size: size_bytes.to_be_bytes(),
        flags: flags.0.to_be_bytes(),
    };
    let mut out = [0u8; EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES];
    out[..8].copy_from_slice(&raw.size);
    out[8..10].copy_from_slice(&raw.flags);
    let len = if no_zeroes {
        EXPORT_NAME_REPLY_BYTES
    } else {
        out.len()
    };
    (out, len)
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name; empty means the default export.
    pub name: &'a str,
    /// The requested information types, in wire form (2 bytes each).
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// Decodes the option data. Any inconsistency between the lengths is an error, which the
    /// server answers with `NBD_REP_ERR_INVALID`.
    pub fn decode(data: &'a [u8]) -> Result<InfoRequest<'a>, ProtoError> {
        let mut r = Reader::new(data);
        let name_len = r.u32()?;
        let name_len = usize::try_from(name_len).map_err(|_| ProtoError::Malformed {
            reason: "export name length",
        })?;
        let name = nbd_str(r.bytes(name_len)?)?;
        let count = r.u16()?;
        let requests = r.bytes(usize::from(count) * 2)?;
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }

    /// Iterates over the requested information types.
    pub fn requests(&self) -> impl Iterator<Item = InfoType> + 'a {
        self.requests
            .chunks_exact(2)
            .map(|c| InfoType(u16::from_be_bytes([c[0], c[1]])))
    }

    /// Whether the client asked for `kind`.
    pub fn wants(&self, kind: InfoType) -> bool {
        self.requests().any(|k| k == kind)
    }

    /// Encodes the option data (the client's side).
    pub fn encode(name: &str, requests: &[InfoType], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let name_len = u32::try_from(name.len()).map_err(|_| ProtoError::LengthTooLarge {
            length: name.len() as u64,
        })?;
        let count = u16::try_from(requests.len()).map_err(|_| ProtoError::LengthTooLarge {
            length: requests.len() as u64,
        })?;
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for kind in requests {
            out.extend_from_slice(&kind.0.to_be_bytes());
        }
        Ok(())
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export name.
    pub name: &'a str,
    count: u32,
    /// The queries, still in wire form but already validated by `decode`.
    queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    /// Decodes the option data, validating every query string up front so iteration cannot fail.
    pub fn decode(data: &'a [u8]) -> Result<MetaContextRequest<'a>, ProtoError> {
        let mut r = Reader::new(data);
        let name_len = usize::try_from(r.u32()?).map_err(|_| ProtoError::Malformed {
            reason: "export name length",
        })?;
        let name = nbd_str(r.bytes(name_len)?)?;
        let count = r.u32()?;
        let queries = r.rest();
        let mut q = Reader::new(queries);
        for _ in 0..count {
            let len = usize::try_from(q.u32()?).map_err(|_| ProtoError::Malformed {
                reason: "query length",
            })?;
            nbd_str(q.bytes(len)?)?;
        }
        q.finish()?;
        Ok(MetaContextRequest {
            name,
            count,
            queries,
        })
    }

    /// How many queries there are.
    pub fn query_count(&self) -> u32 {
        self.count
    }

    /// Iterates over the queries.
    pub fn queries(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.queries);
        std::iter::from_fn(move || {
            let len = usize::try_from(r.u32().ok()?).ok()?;
            nbd_str(r.bytes(len).ok()?).ok()
        })
    }

    /// Encodes the option data (the client's side).
    pub fn encode(name: &str, queries: &[&str], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let len32 = |s: &str| {
            u32::try_from(s.len()).map_err(|_| ProtoError::LengthTooLarge {
                length: s.len() as u64,
            })
        };
        out.extend_from_slice(&len32(name)?.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        let count = u32::try_from(queries.len()).map_err(|_| ProtoError::LengthTooLarge {
            length: queries.len() as u64,
        })?;
        out.extend_from_slice(&count.to_be_bytes());
        for q in queries {
            out.extend_from_slice(&len32(q)?.to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        Ok(())
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoReply<'a> {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size_bytes: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`.
    Name(&'a str),
    /// `NBD_INFO_DESCRIPTION`.
    Description(&'a str),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An information type this crate does not know.
    Unknown {
        /// Its type.
        kind: InfoType,
        /// Its payload after the type.
        data: &'a [u8],
    },
}

impl<'a> InfoReply<'a> {
    /// Appends the payload (information type first) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        match self {
            InfoReply::Export { size_bytes, flags } => {
                let mut raw = [0u8; 12];
                let mut w = Writer::new(&mut raw);
                w.u16(InfoType::EXPORT.0)?;
                w.u64(*size_bytes)?;
                w.u16(flags.0)?;
                out.extend_from_slice(&raw);
            }
            InfoReply::Name(s) | InfoReply::Description(s) => {
                let kind = if matches!(self, InfoReply::Name(_)) {
                    InfoType::NAME
                } else {
                    InfoType::DESCRIPTION
                };
                nbd_str(s.as_bytes())?;
                out.extend_from_slice(&kind.0.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            InfoReply::BlockSize {
                min,
                preferred,
                max,
            } => {
                let mut raw = [0u8; 14];
                let mut w = Writer::new(&mut raw);
                w.u16(InfoType::BLOCK_SIZE.0)?;
                w.u32(*min)?;
                w.u32(*preferred)?;
                w.u32(*max)?;
                out.extend_from_slice(&raw);
            }
            InfoReply::Unknown { kind, data } => {
                out.extend_from_slice(&kind.0.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
        Ok(())
    }

    /// Decodes a payload, checking the exact lengths the specification gives.
    pub fn decode(data: &'a [u8]) -> Result<InfoReply<'a>, ProtoError> {
        let mut r = Reader::new(data);
        let kind = InfoType(r.u16()?);
        let reply = match kind {
            InfoType::EXPORT => InfoReply::Export {
                size_bytes: r.u64()?,
                flags: TransmissionFlags(r.u16()?),
            },
            InfoType::NAME => InfoReply::Name(nbd_str(r.rest())?),
            InfoType::DESCRIPTION => InfoReply::Description(nbd_str(r.rest())?),
            InfoType::BLOCK_SIZE => InfoReply::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            kind => InfoReply::Unknown {
                kind,
                data: r.rest(),
            },
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The payload of `NBD_REP_SERVER`: an export name, then optional human-readable details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerReply<'a> {
    /// The export name.
    pub name: &'a str,
    /// The description (may be empty).
    pub description: &'a str,
}

impl<'a> ServerReply<'a> {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        nbd_str(self.name.as_bytes())?;
        nbd_str(self.description.as_bytes())?;
        let len = u32::try_from(self.name.len()).map_err(|_| ProtoError::LengthTooLarge {
            length: self.name.len() as u64,
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.description.as_bytes());
        Ok(())
    }

    /// Decodes a payload.
    pub fn decode(data: &'a [u8]) -> Result<ServerReply<'a>, ProtoError> {
        let mut r = Reader::new(data);
        let len = usize::try_from(r.u32()?).map_err(|_| ProtoError::Malformed {
            reason: "name length",
        })?;
        let name = nbd_str(r.bytes(len)?)?;
        let description = nbd_str(r.rest())?;
        Ok(ServerReply { name, description })
    }
}

/// The payload of `NBD_REP_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextReply<'a> {
    /// The context id (zero in answer to LIST).
    pub id: u32,
    /// The context name.
    pub name: &'a str,
}

impl<'a> MetaContextReply<'a> {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        nbd_str(self.name.as_bytes())?;
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }

    /// Decodes a payload.
    pub fn decode(data: &'a [u8]) -> Result<MetaContextReply<'a>, ProtoError> {
        let mut r = Reader::new(data);
        let id = r.u32()?;
        let name = nbd_str(r.rest())?;
        Ok(MetaContextReply { id, name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(g[16..], [0, 3]);
        assert_eq!(decode_greeting(&g).unwrap().bits(), 3);
        assert!(decode_greeting(b"NBDMAGIC\0\x42\x02\x81\x86\x12\x53\0\0\0").is_err());
    }

    #[test]
    fn option_header_from_spec_bytes() {
        // IHAVEOPT, NBD_OPT_GO (7), 10 bytes of data.
        let bytes = *b"IHAVEOPT\0\0\0\x07\0\0\0\x0a";
        let h = OptionHeader::decode(&bytes).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: OptionType::GO,
                length: 10
            }
        );
        assert_eq!(h.encode(), bytes);
        assert!(OptionHeader::decode(b"IHAVEOPX\0\0\0\x07\0\0\0\x0a").is_err());
    }

    #[test]
    fn option_reply_from_spec_bytes() {
        let h = OptionReplyHeader {
            option: OptionType::LIST,
            reply: ReplyType::ERR_UNSUP,
            length: 0,
        };
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0x80, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(OptionReplyHeader::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn export_name_reply() {
        let (buf, n) = encode_export_name_reply(1 << 20, TransmissionFlags::HAS_FLAGS, false);
        assert_eq!(n, 134);
        assert_eq!(buf[..10], [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
        assert!(buf[10..].iter().all(|b| *b == 0));
        assert_eq!(
            encode_export_name_reply(0, TransmissionFlags::empty(), true).1,
            10
        );
    }

    #[test]
    fn info_request_from_spec_bytes() {
        // name "ab", two requests: NAME and BLOCK_SIZE.
        let data = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3];
        let req = InfoRequest::decode(&data).unwrap();
        assert_eq!(req.name, "ab");
        assert_eq!(
            req.requests().collect::<Vec<_>>(),
            vec![InfoType::NAME, InfoType::BLOCK_SIZE]
        );
        assert!(req.wants(InfoType::BLOCK_SIZE));
        assert!(!req.wants(InfoType::DESCRIPTION));
        let mut out = Vec::new();
        InfoRequest::encode("ab", &[InfoType::NAME, InfoType::BLOCK_SIZE], &mut out).unwrap();
        assert_eq!(out, data);
        // Name length past the end, count past the end, trailing bytes.
        assert!(InfoRequest::decode(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0, 0, 0, 2, 0, 1]).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0, 0, 0, 0, 9]).is_err());
    }

    #[test]
    fn meta_context_request_from_spec_bytes() {
        let mut data = vec![0, 0, 0, 0, 0, 0, 0, 2];
        for q in ["base:allocation", "qemu:"] {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        let req = MetaContextRequest::decode(&data).unwrap();
        assert_eq!(req.name, "");
        assert_eq!(req.query_count(), 2);
        assert_eq!(
            req.queries().collect::<Vec<_>>(),
            vec!["base:allocation", "qemu:"]
        );
        // A query longer than the data is INVALID, as the specification requires.
        let mut short = data.clone();
        short.pop();
        assert!(MetaContextRequest::decode(&short).is_err());
        let mut long = data;
        long.push(0);
        assert!(MetaContextRequest::decode(&long).is_err());
    }

    #[test]
    fn info_replies_from_spec_bytes() {
        let export = [0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x0d];
        assert_eq!(
            InfoReply::decode(&export).unwrap(),
            InfoReply::Export {
                size_bytes: 4096,
                flags: TransmissionFlags(0x0d)
            }
        );
        assert!(InfoReply::decode(&export[..11]).is_err());
        let bs = [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x10, 0, 0];
        assert_eq!(
            InfoReply::decode(&bs).unwrap(),
            InfoReply::BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 20
            }
        );
    }

    proptest! {
        #[test]
        fn info_round_trip(name in "[a-z0-9/]{0,20}", kinds in proptest::collection::vec(any::<u16>(), 0..8)) {
            let kinds: Vec<InfoType> = kinds.into_iter().map(InfoType).collect();
            let mut data = Vec::new();
            InfoRequest::encode(&name, &kinds, &mut data).unwrap();
            let req = InfoRequest::decode(&data).unwrap();
            prop_assert_eq!(req.name, name.as_str());
            prop_assert_eq!(req.requests().collect::<Vec<_>>(), kinds);
        }

        #[test]
        fn meta_round_trip(name in "[a-z]{0,10}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..6)) {
            let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
            let mut data = Vec::new();
            MetaContextRequest::encode(&name, &refs, &mut data).unwrap();
            let req = MetaContextRequest::decode(&data).unwrap();
            prop_assert_eq!(req.name, name.as_str());
            prop_assert_eq!(req.queries().collect::<Vec<_>>(), refs);
        }

        #[test]
        fn reply_payload_round_trip(size: u64, flags: u16, min: u32, preferred: u32, max: u32,
                                    text in "[ -~]{0,30}", id: u32) {
            for reply in [
                InfoReply::Export { size_bytes: size, flags: TransmissionFlags(flags) },
                InfoReply::Name(&text),
                InfoReply::Description(&text),
                InfoReply::BlockSize { min, preferred, max },
            ] {
                let mut out = Vec::new();
                reply.encode(&mut out).unwrap();
                prop_assert_eq!(InfoReply::decode(&out).unwrap(), reply);
            }
            let mut out = Vec::new();
            ServerReply { name: &text, description: "d" }.encode(&mut out).unwrap();
            prop_assert_eq!(ServerReply::decode(&out).unwrap(), ServerReply { name: &text, description: "d" });
            out.clear();
            MetaContextReply { id, name: &text }.encode(&mut out).unwrap();
            prop_assert_eq!(MetaContextReply::decode(&out).unwrap(), MetaContextReply { id, name: &text });
        }

        #[test]
        fn option_headers_round_trip(option: u32, reply: u32, length: u32) {
            let h = OptionHeader { option: OptionType(option), length };
            prop_assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
            let r = OptionReplyHeader { option: OptionType(option), reply: ReplyType(reply), length };
            prop_assert_eq!(OptionReplyHeader::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_payload_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::decode(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let _ = InfoReply::decode(&bytes);
            let _ = ServerReply::decode(&bytes);
            let _ = MetaContextReply::decode(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = decode_greeting(&bytes);
        }
    }
}
