//! dm-user's wire format: `struct dm_user_message` and its constants, as the uapi header
//! `include/uapi/linux/dm-user.h` of the Android Common Kernel defines them (identical to
//! dm-user v1, December 2020), and a stream parser that accepts a message split at any byte.
//!
//! Every field is a native-endian `u64`; the header is 40 bytes and is followed by a payload:
//! the data of a WRITE request, or the data of a successful READ reply. Nothing else carries a
//! payload. See `docs/dm-user-protocol.md` for the byte-by-byte description.

use userdm_io::{Errno, IoOp};

/// Bytes of [`DmUserMessage`] on the wire.
pub const HEADER_BYTES: usize = 40;

/// `DM_USER_REQ_MAP_READ`: read `len` bytes at `sector`; the reply carries the data.
pub const DM_USER_REQ_MAP_READ: u64 = 0;
/// `DM_USER_REQ_MAP_WRITE`: write the `len` bytes that follow the header.
pub const DM_USER_REQ_MAP_WRITE: u64 = 1;
/// `DM_USER_REQ_MAP_FLUSH`: make completed writes durable.
pub const DM_USER_REQ_MAP_FLUSH: u64 = 2;
/// `DM_USER_REQ_MAP_DISCARD`: the range is no longer needed.
pub const DM_USER_REQ_MAP_DISCARD: u64 = 3;
/// `DM_USER_REQ_MAP_SECURE_ERASE`: discard, and make the old data unrecoverable.
pub const DM_USER_REQ_MAP_SECURE_ERASE: u64 = 4;
/// `DM_USER_REQ_MAP_WRITE_SAME` (never sent by userdm).
pub const DM_USER_REQ_MAP_WRITE_SAME: u64 = 5;
/// `DM_USER_REQ_MAP_WRITE_ZEROES`: make the range read as zeros.
pub const DM_USER_REQ_MAP_WRITE_ZEROES: u64 = 6;
/// `DM_USER_REQ_MAP_ZONE_OPEN` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_OPEN: u64 = 7;
/// `DM_USER_REQ_MAP_ZONE_CLOSE` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_CLOSE: u64 = 8;
/// `DM_USER_REQ_MAP_ZONE_FINISH` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_FINISH: u64 = 9;
/// `DM_USER_REQ_MAP_ZONE_APPEND` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_APPEND: u64 = 10;
/// `DM_USER_REQ_MAP_ZONE_RESET` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_RESET: u64 = 11;
/// `DM_USER_REQ_MAP_ZONE_RESET_ALL` (never sent by userdm).
pub const DM_USER_REQ_MAP_ZONE_RESET_ALL: u64 = 12;

/// `DM_USER_REQ_MAP_FLAG_FAILFAST_DEV`.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_DEV: u64 = 0x1;
/// `DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT`.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT: u64 = 0x2;
/// `DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER`.
pub const DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER: u64 = 0x4;
/// `DM_USER_REQ_MAP_FLAG_SYNC`.
pub const DM_USER_REQ_MAP_FLAG_SYNC: u64 = 0x8;
/// `DM_USER_REQ_MAP_FLAG_META`.
pub const DM_USER_REQ_MAP_FLAG_META: u64 = 0x10;
/// `DM_USER_REQ_MAP_FLAG_PRIO`.
pub const DM_USER_REQ_MAP_FLAG_PRIO: u64 = 0x20;
/// `DM_USER_REQ_MAP_FLAG_NOMERGE`.
pub const DM_USER_REQ_MAP_FLAG_NOMERGE: u64 = 0x40;
/// `DM_USER_REQ_MAP_FLAG_IDLE`.
pub const DM_USER_REQ_MAP_FLAG_IDLE: u64 = 0x80;
/// `DM_USER_REQ_MAP_FLAG_INTEGRITY`.
pub const DM_USER_REQ_MAP_FLAG_INTEGRITY: u64 = 0x100;
/// `DM_USER_REQ_MAP_FLAG_FUA`: the write must be durable before its reply.
pub const DM_USER_REQ_MAP_FLAG_FUA: u64 = 0x200;
/// `DM_USER_REQ_MAP_FLAG_PREFLUSH`.
pub const DM_USER_REQ_MAP_FLAG_PREFLUSH: u64 = 0x400;
/// `DM_USER_REQ_MAP_FLAG_RAHEAD`.
pub const DM_USER_REQ_MAP_FLAG_RAHEAD: u64 = 0x800;
/// `DM_USER_REQ_MAP_FLAG_BACKGROUND`.
pub const DM_USER_REQ_MAP_FLAG_BACKGROUND: u64 = 0x1000;
/// `DM_USER_REQ_MAP_FLAG_NOWAIT`.
pub const DM_USER_REQ_MAP_FLAG_NOWAIT: u64 = 0x2000;
/// `DM_USER_REQ_MAP_FLAG_CGROUP_PUNT`.
pub const DM_USER_REQ_MAP_FLAG_CGROUP_PUNT: u64 = 0x4000;
/// `DM_USER_REQ_MAP_FLAG_NOUNMAP`.
pub const DM_USER_REQ_MAP_FLAG_NOUNMAP: u64 = 0x8000;
/// `DM_USER_REQ_MAP_FLAG_HIPRI`.
pub const DM_USER_REQ_MAP_FLAG_HIPRI: u64 = 0x10000;
/// `DM_USER_REQ_MAP_FLAG_DRV`.
pub const DM_USER_REQ_MAP_FLAG_DRV: u64 = 0x20000;
/// `DM_USER_REQ_MAP_FLAG_SWAP`.
pub const DM_USER_REQ_MAP_FLAG_SWAP: u64 = 0x40000;

/// `DM_USER_RESP_SUCCESS`.
pub const DM_USER_RESP_SUCCESS: u64 = 0;
/// `DM_USER_RESP_ERROR`.
pub const DM_USER_RESP_ERROR: u64 = 1;
/// `DM_USER_RESP_UNSUPPORTED`.
pub const DM_USER_RESP_UNSUPPORTED: u64 = 2;

/// `struct dm_user_message` without its flexible `buf[]`: the 40-byte header of every request
/// and every reply. Native endian, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmUserMessage {
    /// Request: a per-endpoint counter. Reply: the seq of the request answered.
    pub seq: u64,
    /// The uapi's `type`: a `DM_USER_REQ_MAP_*` code in a request, a `DM_USER_RESP_*` code in a
    /// reply.
    pub kind: u64,
    /// Request: `DM_USER_REQ_MAP_FLAG_*` bits. Reply: ignored.
    pub flags: u64,
    /// Request: the first 512-byte sector, relative to the device. Reply: ignored.
    pub sector: u64,
    /// Request: the length in bytes. Reply: ignored.
    pub len: u64,
}

const _: () = assert!(std::mem::size_of::<DmUserMessage>() == HEADER_BYTES);
const _: () = assert!(std::mem::align_of::<DmUserMessage>() == 8);
const _: () = assert!(std::mem::offset_of!(DmUserMessage, seq) == 0);
const _: () = assert!(std::mem::offset_of!(DmUserMessage, kind) == 8);
const _: () = assert!(std::mem::offset_of!(DmUserMessage, flags) == 16);
const _: () = assert!(std::mem::offset_of!(DmUserMessage, sector) == 24);
const _: () = assert!(std::mem::offset_of!(DmUserMessage, len) == 32);

impl DmUserMessage {
    /// The header as it travels: five native-endian `u64`s.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        let fields = [self.seq, self.kind, self.flags, self.sector, self.len];
        for (chunk, field) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&field.to_ne_bytes());
        }
        out
    }

    /// Reads a header from its wire bytes.
    pub fn from_bytes(bytes: &[u8; HEADER_BYTES]) -> DmUserMessage {
        let mut fields = [0u64; 5];
        for (field, chunk) in fields.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *field = u64::from_ne_bytes(word);
        }
        DmUserMessage {
            seq: fields[0],
            kind: fields[1],
            flags: fields[2],
            sector: fields[3],
            len: fields[4],
        }
    }

    /// A reply header answering `seq`.
    pub fn reply(seq: u64, response: u64) -> DmUserMessage {
        DmUserMessage {
            seq,
            kind: response,
            ..DmUserMessage::default()
        }
    }

    /// The request's operation, if its type is one dm-user defines.
    pub fn op(&self) -> Option<IoOp> {
        IoOp::from_dm_user(self.kind)
    }

    /// Bytes that follow this header when it is a request: `len` for WRITE, none otherwise
    /// (dm-user sends no payload for any other type, WRITE_SAME included).
    pub fn request_payload_bytes(&self) -> u64 {
        if self.kind == DM_USER_REQ_MAP_WRITE {
            self.len
        } else {
            0
        }
    }

    /// Bytes that follow a reply with type `response` to this request: `len` for a successful
    /// READ, none otherwise (a daemon must never send data after an error header).
    pub fn reply_payload_bytes(&self, response: u64) -> u64 {
        if self.kind == DM_USER_REQ_MAP_READ && response == DM_USER_RESP_SUCCESS {
            self.len
        } else {
            0
        }
    }
}

/// How a reply's type ends the request. dm-user ends every non-SUCCESS reply with EIO; userdm
/// reports UNSUPPORTED as EOPNOTSUPP (an extension: the kernel above can tell "not supported"
/// from "failed", which matters for DISCARD and WRITE_ZEROES).
pub fn response_result(response: u64) -> Result<(), Errno> {
    match response {
        DM_USER_RESP_SUCCESS => Ok(()),
        DM_USER_RESP_UNSUPPORTED => Err(Errno::EOPNOTSUPP),
        _ => Err(Errno::EIO),
    }
}

/// The side of a [`MessageReader`] that knows the requests: told of each complete header, it
/// says how many payload bytes follow; then it receives the payload and the end of the message.
pub trait MessageHandler {
    /// A complete header. Returns how many payload bytes follow it, or an error that fails the
    /// stream from then on (an unknown seq gives EINVAL, as in dm-user).
    fn header(&mut self, msg: &DmUserMessage) -> Result<u64, Errno>;
    /// Payload bytes of the message `msg`, starting `offset` bytes into its payload.
    fn payload(&mut self, msg: &DmUserMessage, offset: u64, data: &[u8]);
    /// The message, header and payload, is complete.
    fn complete(&mut self, msg: &DmUserMessage);
}

/// Parses a stream of dm-user messages (requests on the daemon's side, replies on userdm's)
/// that may arrive split at any byte: a header accumulates until its 40 bytes are in, then its
/// payload is handed on as it comes. Never panics, whatever the bytes; after an error it stays
/// failed and consumes nothing more (dm-user's sticky channel error).
#[derive(Clone, Debug)]
pub struct MessageReader {
    header: [u8; HEADER_BYTES],
    header_have: usize,
    /// The message whose payload is arriving: (header, bytes received, bytes expected).
    current: Option<(DmUserMessage, u64, u64)>,
    failed: Option<Errno>,
}

impl Default for MessageReader {
    fn default() -> MessageReader {
        MessageReader::new()
    }
}

impl MessageReader {
    /// A reader at the start of a stream.
    pub const fn new() -> MessageReader {
        MessageReader {
            header: [0; HEADER_BYTES],
            header_have: 0,
            current: None,
            failed: None,
        }
    }

    /// The sticky error, once the stream has failed.
    pub fn error(&self) -> Option<Errno> {
        self.failed
    }

    /// Whether the reader sits between messages (no header bytes or payload pending), as at the
    /// start of the stream.
    pub fn is_idle(&self) -> bool {
        self.header_have == 0 && self.current.is_none()
    }

    /// Bytes of a header received so far (0 between messages and during a payload).
    pub fn header_bytes_pending(&self) -> usize {
        self.header_have
    }

    /// The message whose payload is arriving, the offset reached and the bytes still expected.
    pub fn payload_pending(&self) -> Option<(DmUserMessage, u64, u64)> {
        self.current
            .map(|(msg, have, total)| (msg, have, total - have))
    }

    /// Consumes `input`, calling `handler` for each header, payload piece and completion.
    /// Returns the bytes consumed: all of `input`, or fewer if the stream failed part way, in
    /// which case the error is returned from then on.
    pub fn feed<H: MessageHandler>(
        &mut self,
        input: &[u8],
        handler: &mut H,
    ) -> Result<usize, Errno> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            if let Some((msg, have, total)) = self.current {
                let take = usize::try_from(total - have)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                handler.payload(&msg, have, &rest[..take]);
                used += take;
                self.finish_payload(take as u64, handler);
                continue;
            }
            let take = (HEADER_BYTES - self.header_have).min(rest.len());
            self.header[self.header_have..self.header_have + take].copy_from_slice(&rest[..take]);
            self.header_have += take;
            used += take;
            if self.header_have == HEADER_BYTES {
                self.header_have = 0;
                let msg = DmUserMessage::from_bytes(&self.header);
                self.start_message(msg, handler)?;
            }
        }
        Ok(used)
    }

    /// Records `n` payload bytes that the caller moved itself (for example with a `recv`
    /// straight into the destination buffer, after [`MessageReader::payload_pending`]); `n`
    /// beyond what is pending is ignored.
    pub fn payload_received<H: MessageHandler>(&mut self, n: u64, handler: &mut H) {
        if let Some((_, have, total)) = self.current {
            self.finish_payload(n.min(total - have), handler);
        }
    }

    fn start_message<H: MessageHandler>(
        &mut self,
        msg: DmUserMessage,
        handler: &mut H,
    ) -> Result<(), Errno> {
        match handler.header(&msg) {
            Ok(0) => {
                handler.complete(&msg);
                Ok(())
            }
            Ok(total) => {
                self.current = Some((msg, 0, total));
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e);
                Err(e)
            }
        }
    }

    fn finish_payload<H: MessageHandler>(&mut self, n: u64, handler: &mut H) {
        let Some((msg, have, total)) = self.current.as_mut() else {
            return;
        };
        *have += n;
        if *have >= *total {
            let msg = *msg;
            self.current = None;
            handler.complete(&msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_native_endian_u64s() {
        let m = DmUserMessage {
            seq: 1,
            kind: 2,
            flags: 3,
            sector: 4,
            len: 0x0102_0304_0506_0708,
        };
        let b = m.to_bytes();
        assert_eq!(&b[0..8], &1u64.to_ne_bytes());
        assert_eq!(&b[8..16], &2u64.to_ne_bytes());
        assert_eq!(&b[32..40], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(DmUserMessage::from_bytes(&b), m);
    }

    #[test]
    fn payload_rules() {
        let read = DmUserMessage {
            kind: DM_USER_REQ_MAP_READ,
            len: 4096,
            ..Default::default()
        };
        let write = DmUserMessage {
            kind: DM_USER_REQ_MAP_WRITE,
            ..read
        };
        assert_eq!(read.request_payload_bytes(), 0);
        assert_eq!(write.request_payload_bytes(), 4096);
        assert_eq!(read.reply_payload_bytes(DM_USER_RESP_SUCCESS), 4096);
        assert_eq!(read.reply_payload_bytes(DM_USER_RESP_ERROR), 0);
        assert_eq!(write.reply_payload_bytes(DM_USER_RESP_SUCCESS), 0);
        assert_eq!(response_result(7), Err(Errno::EIO));
        assert_eq!(response_result(2), Err(Errno::EOPNOTSUPP));
    }

    #[test]
    fn uapi_values() {
        assert_eq!(DM_USER_REQ_MAP_FLAG_SWAP, userdm_io::IoFlags::SWAP.bits());
        assert_eq!(DM_USER_REQ_MAP_FLAG_FUA, userdm_io::IoFlags::FUA.bits());
        assert_eq!(
            IoOp::from_dm_user(DM_USER_REQ_MAP_WRITE_ZEROES),
            Some(IoOp::WriteZeroes)
        );
        assert_eq!(
            IoOp::from_dm_user(DM_USER_REQ_MAP_ZONE_RESET_ALL),
            Some(IoOp::ZoneResetAll)
        );
    }

    /// Replies to READ requests carry `len` bytes when successful.
    #[derive(Default)]
    struct Model {
        events: Vec<String>,
    }

    impl MessageHandler for Model {
        fn header(&mut self, msg: &DmUserMessage) -> Result<u64, Errno> {
            self.events.push(format!("h{}", msg.seq));
            match msg.seq {
                0..=9 => Ok(0),
                10..=19 if msg.kind == DM_USER_RESP_SUCCESS => Ok(5),
                10..=19 => Ok(0),
                _ => Err(Errno::EINVAL),
            }
        }
        fn payload(&mut self, msg: &DmUserMessage, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                self.events
                    .push(format!("p{}@{}={}", msg.seq, offset + i as u64, b));
            }
        }
        fn complete(&mut self, msg: &DmUserMessage) {
            self.events.push(format!("c{}", msg.seq));
        }
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(DmUserMessage::reply(3, DM_USER_RESP_SUCCESS).to_bytes());
        s.extend(DmUserMessage::reply(12, DM_USER_RESP_SUCCESS).to_bytes());
        s.extend([1, 2, 3, 4, 5]);
        s.extend(DmUserMessage::reply(13, DM_USER_RESP_ERROR).to_bytes());
        s.extend(DmUserMessage::reply(4, DM_USER_RESP_SUCCESS).to_bytes());
        s
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let s = stream();
        let mut whole = Model::default();
        assert_eq!(MessageReader::new().feed(&s, &mut whole), Ok(s.len()));
        for a in 0..=s.len() {
            for b in a..=s.len() {
                let mut m = Model::default();
                let mut r = MessageReader::new();
                for part in [&s[..a], &s[a..b], &s[b..]] {
                    assert_eq!(r.feed(part, &mut m), Ok(part.len()));
                }
                assert_eq!(m.events, whole.events, "split at {a},{b}");
                assert!(r.is_idle());
            }
        }
        let mut m = Model::default();
        let mut r = MessageReader::new();
        for byte in &s {
            r.feed(std::slice::from_ref(byte), &mut m).unwrap();
        }
        assert_eq!(m.events, whole.events);
    }

    #[test]
    fn unknown_seq_is_sticky() {
        let mut s = DmUserMessage::reply(99, DM_USER_RESP_SUCCESS)
            .to_bytes()
            .to_vec();
        s.extend(DmUserMessage::reply(1, DM_USER_RESP_SUCCESS).to_bytes());
        let mut m = Model::default();
        let mut r = MessageReader::new();
        assert_eq!(r.feed(&s, &mut m), Err(Errno::EINVAL));
        assert_eq!(r.feed(&s, &mut m), Err(Errno::EINVAL));
        assert_eq!(r.error(), Some(Errno::EINVAL));
        assert_eq!(m.events, vec!["h99"]);
    }

    #[test]
    fn direct_payload() {
        let mut m = Model::default();
        let mut r = MessageReader::new();
        r.feed(&DmUserMessage::reply(11, 0).to_bytes(), &mut m)
            .unwrap();
        let (msg, offset, left) = r.payload_pending().unwrap();
        assert_eq!((msg.seq, offset, left), (11, 0, 5));
        r.payload_received(3, &mut m);
        assert_eq!(r.payload_pending().unwrap().2, 2);
        r.payload_received(100, &mut m);
        assert!(r.is_idle());
        assert_eq!(m.events.last().unwrap(), "c11");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), cut in 0usize..400) {
            let mut m = Model::default();
            let mut r = MessageReader::new();
            let cut = cut.min(data.len());
            let _ = r.feed(&data[..cut], &mut m);
            let _ = r.feed(&data[cut..], &mut m);
        }
    }
}
