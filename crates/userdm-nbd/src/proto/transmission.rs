//! The transmission phase: request headers, simple replies, structured and extended reply chunks.
//!
//! Headers are decoded from and encoded into fixed byte arrays through private `Raw*` structs
//! whose sizes are asserted at compile time, so a layout mistake fails the build rather than a
//! client. Payloads are never copied by the codec: a chunk's data travels beside its header.

use std::mem::size_of;

use super::consts::*;
use super::wire::{Reader, Writer};
use super::ProtoError;

/// Which request and reply headers a connection uses, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStyle {
    /// 28-byte requests; simple replies, or 20-byte structured chunks when structured replies were
    /// negotiated.
    Compact,
    /// 32-byte requests and 32-byte reply chunks (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl HeaderStyle {
    /// The size of one request header in this style.
    pub const fn request_bytes(self) -> usize {
        match self {
            HeaderStyle::Compact => REQUEST_BYTES,
            HeaderStyle::Extended => EXTENDED_REQUEST_BYTES,
        }
    }

    /// The size of one reply chunk header in this style (structured or extended).
    pub const fn chunk_header_bytes(self) -> usize {
        match self {
            HeaderStyle::Compact => CHUNK_HEADER_BYTES,
            HeaderStyle::Extended => EXTENDED_REPLY_BYTES,
        }
    }
}

/// Size of a compact request header.
pub const REQUEST_BYTES: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_BYTES: usize = 32;
/// Size of a simple reply.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_BYTES: usize = 32;
/// The largest reply or request header of any style.
pub const HEADER_BYTES_MAX: usize = 32;
/// Size of an `OFFSET_HOLE` payload.
pub const OFFSET_HOLE_PAYLOAD_BYTES: usize = 12;
/// Size of the offset that starts an `OFFSET_DATA` payload.
pub const OFFSET_DATA_PREFIX_BYTES: usize = 8;

#[repr(C)]
struct RawRequest {
    magic: [u8; 4],
    flags: [u8; 2],
    kind: [u8; 2],
    cookie: [u8; 8],
    offset: [u8; 8],
    length: [u8; 4],
}

#[repr(C)]
struct RawExtendedRequest {
    magic: [u8; 4],
    flags: [u8; 2],
    kind: [u8; 2],
    cookie: [u8; 8],
    offset: [u8; 8],
    length: [u8; 8],
}

#[repr(C)]
struct RawSimpleReply {
    magic: [u8; 4],
    error: [u8; 4],
    cookie: [u8; 8],
}

#[repr(C)]
struct RawChunkHeader {
    magic: [u8; 4],
    flags: [u8; 2],
    kind: [u8; 2],
    cookie: [u8; 8],
    length: [u8; 4],
}

#[repr(C)]
struct RawExtendedReply {
    magic: [u8; 4],
    flags: [u8; 2],
    kind: [u8; 2],
    cookie: [u8; 8],
    offset: [u8; 8],
    length: [u8; 8],
}

const _: () = assert!(size_of::<RawRequest>() == REQUEST_BYTES);
const _: () = assert!(size_of::<RawExtendedRequest>() == EXTENDED_REQUEST_BYTES);
const _: () = assert!(size_of::<RawSimpleReply>() == SIMPLE_REPLY_BYTES);
const _: () = assert!(size_of::<RawChunkHeader>() == CHUNK_HEADER_BYTES);
const _: () = assert!(size_of::<RawExtendedReply>() == EXTENDED_REPLY_BYTES);
const _: () =
    assert!(HEADER_BYTES_MAX >= EXTENDED_REPLY_BYTES && HEADER_BYTES_MAX >= REQUEST_BYTES);

impl RawRequest {
    fn read(r: &mut Reader<'_>) -> Result<RawRequest, ProtoError> {
        Ok(RawRequest {
            magic: r.array()?,
            flags: r.array()?,
            kind: r.array()?,
            cookie: r.array()?,
            offset: r.array()?,
            length: r.array()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        for field in [
            &self.magic[..],
            &self.flags,
            &self.kind,
            &self.cookie,
            &self.offset,
            &self.length,
        ] {
            w.put(field)?;
        }
        Ok(())
    }
}

impl RawExtendedRequest {
    fn read(r: &mut Reader<'_>) -> Result<RawExtendedRequest, ProtoError> {
        Ok(RawExtendedRequest {
            magic: r.array()?,
            flags: r.array()?,
            kind: r.array()?,
            cookie: r.array()?,
            offset: r.array()?,
            length: r.array()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        for field in [
            &self.magic[..],
            &self.flags,
            &self.kind,
            &self.cookie,
            &self.offset,
            &self.length,
        ] {
            w.put(field)?;
        }
        Ok(())
    }
}

impl RawChunkHeader {
    fn read(r: &mut Reader<'_>) -> Result<RawChunkHeader, ProtoError> {
        Ok(RawChunkHeader {
            magic: r.array()?,
            flags: r.array()?,
            kind: r.array()?,
            cookie: r.array()?,
            length: r.array()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        for field in [
            &self.magic[..],
            &self.flags,
            &self.kind,
            &self.cookie,
            &self.length,
        ] {
            w.put(field)?;
        }
        Ok(())
    }
}

impl RawExtendedReply {
    fn read(r: &mut Reader<'_>) -> Result<RawExtendedReply, ProtoError> {
        Ok(RawExtendedReply {
            magic: r.array()?,
            flags: r.array()?,
            kind: r.array()?,
            cookie: r.array()?,
            offset: r.array()?,
            length: r.array()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        for field in [
            &self.magic[..],
            &self.flags,
            &self.kind,
            &self.cookie,
            &self.offset,
            &self.length,
        ] {
            w.put(field)?;
        }
        Ok(())
    }
}

/// One transmission-phase request header, in either style.
///
/// `length` is the wire length widened to 64 bits: a payload length for WRITE (and for any
/// command with `PAYLOAD_LEN` under extended headers), an effect length otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: CommandFlags,
    /// The command.
    pub command: CommandType,
    /// The client's opaque cookie, echoed in every reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Payload or effect length in bytes.
    pub length: u64,
}

impl Request {
    /// Decodes a request header. `buf` must hold at least `style.request_bytes()` bytes; any more
    /// are ignored (they are the next message).
    ///
    /// A header with the other style's magic is rejected: once the handshake fixed the style, the
    /// client must stick to it, and the specification lets the server hard-disconnect.
    pub fn decode(style: HeaderStyle, buf: &[u8]) -> Result<Request, ProtoError> {
        let mut r = Reader::new(buf);
        match style {
            HeaderStyle::Compact => {
                let raw = RawRequest::read(&mut r)?;
                let magic = u32::from_be_bytes(raw.magic);
                if magic != REQUEST_MAGIC {
                    return Err(ProtoError::BadMagic {
                        found: u64::from(magic),
                    });
                }
                Ok(Request {
                    flags: CommandFlags(u16::from_be_bytes(raw.flags)),
                    command: CommandType(u16::from_be_bytes(raw.kind)),
                    cookie: u64::from_be_bytes(raw.cookie),
                    offset: u64::from_be_bytes(raw.offset),
                    length: u64::from(u32::from_be_bytes(raw.length)),
                })
            }
            HeaderStyle::Extended => {
                let raw = RawExtendedRequest::read(&mut r)?;
                let magic = u32::from_be_bytes(raw.magic);
                if magic != EXTENDED_REQUEST_MAGIC {
                    return Err(ProtoError::BadMagic {
                        found: u64::from(magic),
                    });
                }
                Ok(Request {
                    flags: CommandFlags(u16::from_be_bytes(raw.flags)),
                    command: CommandType(u16::from_be_bytes(raw.kind)),
                    cookie: u64::from_be_bytes(raw.cookie),
                    offset: u64::from_be_bytes(raw.offset),
                    length: u64::from_be_bytes(raw.length),
                })
            }
        }
    }

    /// Encodes the header (the client's side; used by tests and fuzzers) and returns its size.
    pub fn encode(&self, style: HeaderStyle, out: &mut [u8]) -> Result<usize, ProtoError> {
        let mut w = Writer::new(out);
        match style {
            HeaderStyle::Compact => {
                let length =
                    u32::try_from(self.length).map_err(|_| ProtoError::LengthTooLarge {
                        length: self.length,
                    })?;
                RawRequest {
                    magic: REQUEST_MAGIC.to_be_bytes(),
                    flags: self.flags.0.to_be_bytes(),
                    kind: self.command.0.to_be_bytes(),
                    cookie: self.cookie.to_be_bytes(),
                    offset: self.offset.to_be_bytes(),
                    length: length.to_be_bytes(),
                }
                .write(&mut w)?;
            }
            HeaderStyle::Extended => RawExtendedRequest {
                magic: EXTENDED_REQUEST_MAGIC.to_be_bytes(),
                flags: self.flags.0.to_be_bytes(),
                kind: self.command.0.to_be_bytes(),
                cookie: self.cookie.to_be_bytes(),
                offset: self.offset.to_be_bytes(),
                length: self.length.to_be_bytes(),
            }
            .write(&mut w)?,
        }
        Ok(w.written())
    }

    /// How many payload bytes follow this header on the wire.
    ///
    /// WRITE always carries its length in payload. With extended headers, any other command
    /// carries one exactly when `PAYLOAD_LEN` is set, so the server can skip a payload it did
    /// not expect and stay in step with the client. (`PAYLOAD_LEN` on a WRITE is allowed and
    /// changes nothing: qemu >= 8.2 sends extended WRITEs without it.)
    pub fn payload_bytes(&self, style: HeaderStyle) -> u64 {
        match style {
            _ if self.command == CommandType::WRITE => self.length,
            HeaderStyle::Compact => 0,
            HeaderStyle::Extended if self.flags.contains(CommandFlags::PAYLOAD_LEN) => self.length,
            HeaderStyle::Extended => 0,
        }
    }
}

/// A simple reply header. For a successful compact READ, the data follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// Zero on success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encodes the 16-byte header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_BYTES] {
        let raw = RawSimpleReply {
            magic: SIMPLE_REPLY_MAGIC.to_be_bytes(),
            error: self.error.to_be_bytes(),
            cookie: self.cookie.to_be_bytes(),
        };
        let mut out = [0u8; SIMPLE_REPLY_BYTES];
        out[0..4].copy_from_slice(&raw.magic);
        out[4..8].copy_from_slice(&raw.error);
        out[8..16].copy_from_slice(&raw.cookie);
        out
    }
}

/// A structured (20-byte) or extended (32-byte) reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `DONE` on the last chunk of a reply.
    pub flags: ReplyFlags,
    /// What the payload holds.
    pub kind: ChunkType,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset; sent only in extended headers (zero when decoded from compact).
    pub offset: u64,
    /// Payload length in bytes.
    pub length: u64,
}

impl ChunkHeader {
    /// Encodes the header in `style` and returns its size.
    pub fn encode(&self, style: HeaderStyle, out: &mut [u8]) -> Result<usize, ProtoError> {
        let mut w = Writer::new(out);
        match style {
            HeaderStyle::Compact => {
                let length =
                    u32::try_from(self.length).map_err(|_| ProtoError::LengthTooLarge {
                        length: self.length,
                    })?;
                RawChunkHeader {
                    magic: STRUCTURED_REPLY_MAGIC.to_be_bytes(),
                    flags: self.flags.0.to_be_bytes(),
                    kind: self.kind.0.to_be_bytes(),
                    cookie: self.cookie.to_be_bytes(),
                    length: length.to_be_bytes(),
                }
                .write(&mut w)?;
            }
            HeaderStyle::Extended => RawExtendedReply {
                magic: EXTENDED_REPLY_MAGIC.to_be_bytes(),
                flags: self.flags.0.to_be_bytes(),
                kind: self.kind.0.to_be_bytes(),
                cookie: self.cookie.to_be_bytes(),
                offset: self.offset.to_be_bytes(),
                length: self.length.to_be_bytes(),
            }
            .write(&mut w)?,
        }
        Ok(w.written())
    }
}

/// Any reply header, as a client decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured or extended chunk header, with the style it was sent in.
    Chunk(HeaderStyle, ChunkHeader),
}

impl ReplyHeader {
    /// How long the header starting with `magic` is, or `None` for an unknown magic.
    pub const fn bytes_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_BYTES),
            STRUCTURED_REPLY_MAGIC => Some(CHUNK_HEADER_BYTES),
            EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_BYTES),
            _ => None,
        }
    }

    /// Decodes a reply header of any kind from the front of `buf` and returns it with its size.
    pub fn decode(buf: &[u8]) -> Result<(ReplyHeader, usize), ProtoError> {
        let mut r = Reader::new(buf);
        let magic = Reader::new(buf).u32()?;
        let header = match magic {
            SIMPLE_REPLY_MAGIC => {
                let raw = RawSimpleReply {
                    magic: r.array()?,
                    error: r.array()?,
                    cookie: r.array()?,
                };
                ReplyHeader::Simple(SimpleReply {
                    error: u32::from_be_bytes(raw.error),
                    cookie: u64::from_be_bytes(raw.cookie),
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let raw = RawChunkHeader::read(&mut r)?;
                ReplyHeader::Chunk(
                    HeaderStyle::Compact,
                    ChunkHeader {
                        flags: ReplyFlags(u16::from_be_bytes(raw.flags)),
                        kind: ChunkType(u16::from_be_bytes(raw.kind)),
                        cookie: u64::from_be_bytes(raw.cookie),
                        offset: 0,
                        length: u64::from(u32::from_be_bytes(raw.length)),
                    },
                )
            }
            EXTENDED_REPLY_MAGIC => {
                let raw = RawExtendedReply::read(&mut r)?;
                ReplyHeader::Chunk(
                    HeaderStyle::Extended,
                    ChunkHeader {
                        flags: ReplyFlags(u16::from_be_bytes(raw.flags)),
                        kind: ChunkType(u16::from_be_bytes(raw.kind)),
                        cookie: u64::from_be_bytes(raw.cookie),
                        offset: u64::from_be_bytes(raw.offset),
                        length: u64::from_be_bytes(raw.length),
                    },
                )
            }
            other => {
                return Err(ProtoError::BadMagic {
                    found: u64::from(other),
                })
            }
        };
        Ok((header, r.consumed()))
    }
}

/// The payload of an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(offset: u64, len: u32) -> [u8; OFFSET_HOLE_PAYLOAD_BYTES] {
    let mut out = [0u8; OFFSET_HOLE_PAYLOAD_BYTES];
    out[..8].copy_from_slice(&offset.to_be_bytes());
    out[8..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The size of one block status descriptor: 8 bytes (`BLOCK_STATUS`) or 16 (`BLOCK_STATUS_EXT`).
pub const fn descriptor_bytes(style: HeaderStyle) -> usize {
    match style {
        HeaderStyle::Compact => 8,
        HeaderStyle::Extended => 16,
    }
}

/// The fixed part before the descriptors: the context id (4 bytes), plus the descriptor count
/// (4 more) for `BLOCK_STATUS_EXT`.
pub const fn block_status_prefix_bytes(style: HeaderStyle) -> usize {
    match style {
        HeaderStyle::Compact => 4,
        HeaderStyle::Extended => 8,
    }
}

/// The block status chunk type of a style.
pub const fn block_status_chunk(style: HeaderStyle) -> ChunkType {
    match style {
        HeaderStyle::Compact => ChunkType::BLOCK_STATUS,
        HeaderStyle::Extended => ChunkType::BLOCK_STATUS_EXT,
    }
}

/// Writes the prefix of a block status payload for `count` descriptors.
pub fn encode_block_status_prefix(
    style: HeaderStyle,
    context_id: u32,
    count: u32,
    out: &mut [u8],
) -> Result<usize, ProtoError> {
    let mut w = Writer::new(out);
    w.u32(context_id)?;
    if style == HeaderStyle::Extended {
        w.u32(count)?;
    }
    Ok(w.written())
}

/// Writes one block status descriptor. Compact descriptors hold 32-bit lengths and flags.
pub fn encode_descriptor(
    style: HeaderStyle,
    length: u64,
    status: u64,
    out: &mut [u8],
) -> Result<usize, ProtoError> {
    let mut w = Writer::new(out);
    match style {
        HeaderStyle::Compact => {
            let length =
                u32::try_from(length).map_err(|_| ProtoError::LengthTooLarge { length })?;
            let status = u32::try_from(status).map_err(|_| ProtoError::Malformed {
                reason: "status does not fit 32 bits",
            })?;
            w.u32(length)?;
            w.u32(status)?;
        }
        HeaderStyle::Extended => {
            w.u64(length)?;
            w.u64(status)?;
        }
    }
    Ok(w.written())
}

/// The block status descriptors of a decoded chunk, still in wire form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptors<'a> {
    style: HeaderStyle,
    bytes: &'a [u8],
}

impl<'a> Descriptors<'a> {
    /// How many descriptors there are.
    pub fn len(&self) -> usize {
        self.bytes.len() / descriptor_bytes(self.style)
    }

    /// Whether there are none (never true of a valid chunk).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Iterates over `(length, status)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let style = self.style;
        self.bytes
            .chunks_exact(descriptor_bytes(style))
            .map(move |d| {
                let mut r = Reader::new(d);
                // The chunk sizes were validated in `Chunk::decode`, so these reads cannot fail;
                // falling back to zero keeps the iterator panic-free regardless.
                match style {
                    HeaderStyle::Compact => (
                        r.u32().map(u64::from).unwrap_or(0),
                        r.u32().map(u64::from).unwrap_or(0),
                    ),
                    HeaderStyle::Extended => (r.u64().unwrap_or(0), r.u64().unwrap_or(0)),
                }
            })
    }
}

/// A decoded reply chunk payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// Data at an offset.
    OffsetData {
        /// Export offset of the first byte.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// A range reading as zeroes.
    OffsetHole {
        /// Export offset.
        offset: u64,
        /// Length, nonzero.
        len: u32,
    },
    /// Block status of one context (`BLOCK_STATUS` or `BLOCK_STATUS_EXT`, by the descriptors'
    /// style).
    BlockStatus {
        /// The metadata context.
        context_id: u32,
        /// The extents.
        descriptors: Descriptors<'a>,
    },
    /// An error.
    Error {
        /// Nonzero error value.
        error: u32,
        /// Human-readable message (may be empty).
        message: &'a str,
    },
    /// An error at an offset.
    ErrorOffset {
        /// Nonzero error value.
        error: u32,
        /// Human-readable message (may be empty).
        message: &'a str,
        /// Where the error happened.
        offset: u64,
    },
    /// A chunk type this crate does not know.
    Unknown {
        /// Its type.
        kind: ChunkType,
        /// Its payload.
        payload: &'a [u8],
    },
}

impl<'a> Chunk<'a> {
    /// Decodes a chunk payload of type `kind`, checking every length rule of the specification.
    pub fn decode(kind: ChunkType, payload: &'a [u8]) -> Result<Chunk<'a>, ProtoError> {
        let mut r = Reader::new(payload);
        let chunk = match kind {
            ChunkType::NONE => Chunk::None,
            ChunkType::OFFSET_DATA => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(ProtoError::Malformed {
                        reason: "OFFSET_DATA without data",
                    });
                }
                Chunk::OffsetData { offset, data }
            }
            ChunkType::OFFSET_HOLE => {
                let offset = r.u64()?;
                let len = r.u32()?;
                if len == 0 {
                    return Err(ProtoError::Malformed {
                        reason: "OFFSET_HOLE of length zero",
                    });
                }
                Chunk::OffsetHole { offset, len }
            }
            ChunkType::BLOCK_STATUS | ChunkType::BLOCK_STATUS_EXT => {
                return Chunk::decode_block_status(kind, payload);
            }
            ChunkType::ERROR | ChunkType::ERROR_OFFSET => {
                let error = r.u32()?;
                if error == 0 {
                    return Err(ProtoError::Malformed {
                        reason: "error chunk with error zero",
                    });
                }
                let message_len = r.u16()?;
                let message = nbd_str(r.bytes(usize::from(message_len))?)?;
                if kind == ChunkType::ERROR {
                    Chunk::Error { error, message }
                } else {
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            kind => return Ok(Chunk::Unknown { kind, payload }),
        };
        r.finish()?;
        Ok(chunk)
    }

    fn decode_block_status(kind: ChunkType, payload: &'a [u8]) -> Result<Chunk<'a>, ProtoError> {
        let style = if kind == ChunkType::BLOCK_STATUS {
            HeaderStyle::Compact
        } else {
            HeaderStyle::Extended
        };
        let mut r = Reader::new(payload);
        let context_id = r.u32()?;
        let count = if style == HeaderStyle::Extended {
            Some(r.u32()?)
        } else {
            None
        };
        let bytes = r.rest();
        let width = descriptor_bytes(style);
        if bytes.is_empty() || bytes.len() % width != 0 {
            return Err(ProtoError::Malformed {
                reason: "block status length",
            });
        }
        if let Some(count) = count {
            if usize::try_from(count).ok() != Some(bytes.len() / width) {
                return Err(ProtoError::Malformed {
                    reason: "block status descriptor count",
                });
            }
        }
        Ok(Chunk::BlockStatus {
            context_id,
            descriptors: Descriptors { style, bytes },
        })
    }

    /// The chunk type this payload is sent as.
    pub fn kind(&self) -> ChunkType {
        match self {
            Chunk::None => ChunkType::NONE,
            Chunk::OffsetData { .. } => ChunkType::OFFSET_DATA,
            Chunk::OffsetHole { .. } => ChunkType::OFFSET_HOLE,
            Chunk::BlockStatus { descriptors, .. } => block_status_chunk(descriptors.style),
            Chunk::Error { .. } => ChunkType::ERROR,
            Chunk::ErrorOffset { .. } => ChunkType::ERROR_OFFSET,
            Chunk::Unknown { kind, .. } => *kind,
        }
    }

    /// The encoded payload size.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Chunk::None => 0,
            Chunk::OffsetData { data, .. } => OFFSET_DATA_PREFIX_BYTES + data.len(),
            Chunk::OffsetHole { .. } => OFFSET_HOLE_PAYLOAD_BYTES,
            Chunk::BlockStatus { descriptors, .. } => {
                block_status_prefix_bytes(descriptors.style) + descriptors.bytes.len()
            }
            Chunk::Error { message, .. } => 6 + message.len(),
            Chunk::ErrorOffset { message, .. } => 14 + message.len(),
            Chunk::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Encodes the payload into `out` and returns its size. The server's data path sends
    /// `OFFSET_DATA` data from its own buffer instead; this is for everything else and for tests.
    pub fn encode_payload(&self, out: &mut [u8]) -> Result<usize, ProtoError> {
        let mut w = Writer::new(out);
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                w.u64(*offset)?;
                w.put(data)?;
            }
            Chunk::OffsetHole { offset, len } => w.put(&encode_offset_hole(*offset, *len))?,
            Chunk::BlockStatus {
                context_id,
                descriptors,
            } => {
                let count =
                    u32::try_from(descriptors.len()).map_err(|_| ProtoError::Malformed {
                        reason: "too many descriptors",
                    })?;
                w.u32(*context_id)?;
                if descriptors.style == HeaderStyle::Extended {
                    w.u32(count)?;
                }
                w.put(descriptors.bytes)?;
            }
            Chunk::Error { error, message } => encode_error_fields(&mut w, *error, message)?,
            Chunk::ErrorOffset {
                error,
                message,
                offset,
            } => {
                encode_error_fields(&mut w, *error, message)?;
                w.u64(*offset)?;
            }
            Chunk::Unknown { payload, .. } => w.put(payload)?,
        }
        Ok(w.written())
    }
}

impl<'a> Descriptors<'a> {
    /// Wraps descriptors already encoded with [`encode_descriptor`] in `style`.
    pub fn from_wire(style: HeaderStyle, bytes: &'a [u8]) -> Result<Descriptors<'a>, ProtoError> {
        if bytes.is_empty() || bytes.len() % descriptor_bytes(style) != 0 {
            return Err(ProtoError::Malformed {
                reason: "block status length",
            });
        }
        Ok(Descriptors { style, bytes })
    }
}

fn encode_error_fields(w: &mut Writer<'_>, error: u32, message: &str) -> Result<(), ProtoError> {
    let len = u16::try_from(message.len())
        .ok()
        .filter(|l| usize::from(*l) <= STRING_BYTES_MAX)
        .ok_or(ProtoError::BadString {
            reason: "longer than 4096 bytes",
        })?;
    w.u32(error)?;
    w.u16(len)?;
    w.put(message.as_bytes())
}

/// Encodes an `ERROR` chunk payload (error, message length, message) and returns its size.
pub fn encode_error_payload(
    error: u32,
    message: &str,
    out: &mut [u8],
) -> Result<usize, ProtoError> {
    let mut w = Writer::new(out);
    encode_error_fields(&mut w, error, message)?;
    Ok(w.written())
}

/// Validates a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn nbd_str(bytes: &[u8]) -> Result<&str, ProtoError> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(ProtoError::BadString {
            reason: "longer than 4096 bytes",
        });
    }
    if bytes.contains(&0) {
        return Err(ProtoError::BadString {
            reason: "contains NUL",
        });
    }
    std::str::from_utf8(bytes).map_err(|_| ProtoError::BadString {
        reason: "not UTF-8",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// NBD_CMD_WRITE, FUA, cookie 0x0102030405060708, offset 4096, length 512, built byte by byte
    /// from the "Request message" section of the specification.
    const WRITE_FUA: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, // NBD_REQUEST_MAGIC
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 0, 0, 0, 0x10, 0, // offset
        0, 0, 0x02, 0, // length
    ];

    #[test]
    fn decodes_compact_request_from_spec_bytes() {
        let req = Request::decode(HeaderStyle::Compact, &WRITE_FUA).unwrap();
        assert_eq!(
            req,
            Request {
                flags: CommandFlags::FUA,
                command: CommandType::WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(req.payload_bytes(HeaderStyle::Compact), 512);
        let mut out = [0u8; 28];
        assert_eq!(req.encode(HeaderStyle::Compact, &mut out).unwrap(), 28);
        assert_eq!(out, WRITE_FUA);
    }

    #[test]
    fn decodes_extended_request_from_spec_bytes() {
        let bytes: [u8; 32] = [
            0x21, 0xe4, 0x1c, 0x71, // NBD_EXTENDED_REQUEST_MAGIC
            0x00, 0x08, // flags: REQ_ONE
            0x00, 0x07, // type: BLOCK_STATUS
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 0, 1, 0, 0, 0, 0, // offset 4 GiB
            0, 0, 0, 2, 0, 0, 0, 0, // length 8 GiB: only extended headers can say this
        ];
        let req = Request::decode(HeaderStyle::Extended, &bytes).unwrap();
        assert_eq!(req.command, CommandType::BLOCK_STATUS);
        assert_eq!(req.flags, CommandFlags::REQ_ONE);
        assert_eq!(req.offset, 1 << 32);
        assert_eq!(req.length, 2 << 32);
        assert_eq!(req.payload_bytes(HeaderStyle::Extended), 0);
    }

    #[test]
    fn rejects_wrong_magic_and_short_input() {
        let mut bad = WRITE_FUA;
        bad[0] = 0x12;
        assert!(matches!(
            Request::decode(HeaderStyle::Compact, &bad),
            Err(ProtoError::BadMagic { found: 0x1260_9513 })
        ));
        // A compact header is not accepted once extended headers were negotiated.
        let mut ext = [0u8; 32];
        ext[..28].copy_from_slice(&WRITE_FUA);
        assert!(Request::decode(HeaderStyle::Extended, &ext).is_err());
        assert!(matches!(
            Request::decode(HeaderStyle::Compact, &WRITE_FUA[..27]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn extended_payload_follows_the_flag() {
        let req = Request {
            flags: CommandFlags::PAYLOAD_LEN,
            command: CommandType::BLOCK_STATUS,
            cookie: 1,
            offset: 0,
            length: 12,
        };
        assert_eq!(req.payload_bytes(HeaderStyle::Extended), 12);
        assert_eq!(req.payload_bytes(HeaderStyle::Compact), 0);
        let write = Request {
            flags: CommandFlags::empty(),
            command: CommandType::WRITE,
            ..req
        };
        assert_eq!(write.payload_bytes(HeaderStyle::Extended), 12);
        assert_eq!(write.payload_bytes(HeaderStyle::Compact), 12);
        let flagged = Request {
            flags: CommandFlags::PAYLOAD_LEN,
            ..write
        };
        assert_eq!(flagged.payload_bytes(HeaderStyle::Extended), 12);
    }

    #[test]
    fn simple_reply_bytes() {
        let bytes = SimpleReply {
            error: 22,
            cookie: 0xabcd,
        }
        .encode();
        assert_eq!(
            bytes,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xab, 0xcd]
        );
        let (h, n) = ReplyHeader::decode(&bytes).unwrap();
        assert_eq!(n, 16);
        assert_eq!(
            h,
            ReplyHeader::Simple(SimpleReply {
                error: 22,
                cookie: 0xabcd
            })
        );
    }

    #[test]
    fn structured_chunk_bytes() {
        let h = ChunkHeader {
            flags: ReplyFlags::DONE,
            kind: ChunkType::OFFSET_HOLE,
            cookie: 5,
            offset: 0,
            length: 12,
        };
        let mut out = [0u8; 32];
        assert_eq!(h.encode(HeaderStyle::Compact, &mut out).unwrap(), 20);
        assert_eq!(
            out[..20],
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 12]
        );
        let ext = ChunkHeader {
            offset: 0x1000,
            ..h
        };
        assert_eq!(ext.encode(HeaderStyle::Extended, &mut out).unwrap(), 32);
        assert_eq!(
            out,
            [
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 0, 0, 0, 0, 0, 12
            ]
        );
        assert!(ChunkHeader {
            length: 1 << 32,
            ..h
        }
        .encode(HeaderStyle::Compact, &mut out)
        .is_err());
    }

    #[test]
    fn chunk_payloads_from_spec_bytes() {
        let hole = [0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x10, 0];
        assert_eq!(
            Chunk::decode(ChunkType::OFFSET_HOLE, &hole).unwrap(),
            Chunk::OffsetHole {
                offset: 512,
                len: 4096
            }
        );
        assert_eq!(encode_offset_hole(512, 4096), hole);
        assert!(Chunk::decode(ChunkType::OFFSET_HOLE, &[0; 12]).is_err());

        // BLOCK_STATUS: context 1, one extent of 64 KiB that is a hole reading as zeroes.
        let bs = [0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 3];
        let Chunk::BlockStatus {
            context_id,
            descriptors,
        } = Chunk::decode(ChunkType::BLOCK_STATUS, &bs).unwrap()
        else {
            panic!("not block status");
        };
        assert_eq!(context_id, 1);
        assert_eq!(descriptors.iter().collect::<Vec<_>>(), vec![(65536, 3)]);
        assert!(Chunk::decode(ChunkType::BLOCK_STATUS, &bs[..8]).is_err());

        let mut ext = vec![0, 0, 0, 1, 0, 0, 0, 1];
        ext.extend_from_slice(&(5u64 << 32).to_be_bytes());
        ext.extend_from_slice(&1u64.to_be_bytes());
        let Chunk::BlockStatus { descriptors, .. } =
            Chunk::decode(ChunkType::BLOCK_STATUS_EXT, &ext).unwrap()
        else {
            panic!("not block status");
        };
        assert_eq!(descriptors.iter().collect::<Vec<_>>(), vec![(5 << 32, 1)]);
        ext[7] = 2; // wrong descriptor count
        assert!(Chunk::decode(ChunkType::BLOCK_STATUS_EXT, &ext).is_err());

        // ERROR: EIO with the message "bad".
        let err = [0, 0, 0, 5, 0, 3, b'b', b'a', b'd'];
        assert_eq!(
            Chunk::decode(ChunkType::ERROR, &err).unwrap(),
            Chunk::Error {
                error: 5,
                message: "bad"
            }
        );
        assert!(Chunk::decode(ChunkType::ERROR, &err[..8]).is_err());
        assert!(Chunk::decode(ChunkType::ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
        let mut eo = err.to_vec();
        eo.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            Chunk::decode(ChunkType::ERROR_OFFSET, &eo).unwrap(),
            Chunk::ErrorOffset {
                error: 5,
                message: "bad",
                offset: 7
            }
        );
        assert!(Chunk::decode(ChunkType::NONE, &[1]).is_err());
    }

    #[test]
    fn strings() {
        assert!(nbd_str(b"ok").is_ok());
        assert!(nbd_str(b"a\0b").is_err());
        assert!(nbd_str(&[0xff]).is_err());
        assert!(nbd_str(&[b'a'; 4097]).is_err());
    }

    fn style() -> impl Strategy<Value = HeaderStyle> {
        prop_oneof![Just(HeaderStyle::Compact), Just(HeaderStyle::Extended)]
    }

    proptest! {
        #[test]
        fn request_round_trip(style in style(), flags: u16, command: u16, cookie: u64,
                              offset: u64, length: u64) {
            let length = if style == HeaderStyle::Compact { length & 0xffff_ffff } else { length };
            let req = Request { flags: CommandFlags(flags), command: CommandType(command), cookie,
                                offset, length };
            let mut buf = [0u8; 32];
            let n = req.encode(style, &mut buf).unwrap();
            prop_assert_eq!(n, style.request_bytes());
            prop_assert_eq!(Request::decode(style, &buf[..n]).unwrap(), req);
        }

        #[test]
        fn request_decode_never_panics(style in style(), bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Request::decode(style, &bytes);
        }

        #[test]
        fn reply_header_round_trip(style in style(), flags: u16, kind: u16, cookie: u64,
                                   offset: u64, length: u64) {
            let (offset, length) = match style {
                HeaderStyle::Compact => (0, length & 0xffff_ffff),
                HeaderStyle::Extended => (offset, length),
            };
            let h = ChunkHeader { flags: ReplyFlags(flags), kind: ChunkType(kind), cookie, offset, length };
            let mut buf = [0u8; 32];
            let n = h.encode(style, &mut buf).unwrap();
            prop_assert_eq!(ReplyHeader::decode(&buf[..n]).unwrap(), (ReplyHeader::Chunk(style, h), n));
        }

        #[test]
        fn simple_reply_round_trip(error: u32, cookie: u64) {
            let r = SimpleReply { error, cookie };
            prop_assert_eq!(ReplyHeader::decode(&r.encode()).unwrap(), (ReplyHeader::Simple(r), 16));
        }

        #[test]
        fn chunk_round_trip(style in style(), offset: u64, hole in 1u32.., error in 1u32..,
                            data in proptest::collection::vec(any::<u8>(), 1..64),
                            message in "[a-z ]{0,40}",
                            extents in proptest::collection::vec((1u32.., any::<u32>()), 1..16)) {
            let mut desc = vec![0u8; extents.len() * descriptor_bytes(style)];
            let mut at = 0;
            for (len, status) in &extents {
                at += encode_descriptor(style, u64::from(*len), u64::from(*status), &mut desc[at..]).unwrap();
            }
            let chunks = [
                Chunk::None,
                Chunk::OffsetData { offset, data: &data },
                Chunk::OffsetHole { offset, len: hole },
                Chunk::BlockStatus { context_id: hole, descriptors: Descriptors::from_wire(style, &desc).unwrap() },
                Chunk::Error { error, message: &message },
                Chunk::ErrorOffset { error, message: &message, offset },
            ];
            for chunk in chunks {
                let mut buf = vec![0u8; chunk.payload_bytes()];
                let n = chunk.encode_payload(&mut buf).unwrap();
                prop_assert_eq!(n, buf.len());
                let back = Chunk::decode(chunk.kind(), &buf).unwrap();
                prop_assert_eq!(back, chunk);
                if let Chunk::BlockStatus { descriptors, .. } = back {
                    let got: Vec<_> = descriptors.iter().collect();
                    let want: Vec<_> = extents.iter().map(|(l, s)| (u64::from(*l), u64::from(*s))).collect();
                    prop_assert_eq!(got, want);
                }
            }
        }

        #[test]
        fn chunk_decode_never_panics(kind: u16, bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Chunk::decode(ChunkType(kind), &bytes);
            let _ = ReplyHeader::decode(&bytes);
        }
    }
}
