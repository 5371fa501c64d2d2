//! The transmission server against a raw client built on the codec, over a socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;
use crate::backend::export_info;
use crate::handshake::{BlockSizes, MetaContexts, BASE_ALLOCATION_ID};
use crate::mem::MemBackend;
use crate::proto::{Chunk, ReplyHeader};

fn limits() -> Limits {
    Limits {
        style: HeaderStyle::Compact,
        structured: true,
        flags: TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::SEND_DF,
        size_bytes: 1 << 20,
        min_block: 512,
        max_payload: 32 << 20,
        buffer_bytes: 64 << 10,
        meta_contexts: true,
        fast_zero: false,
    }
}

fn req(command: CommandType, flags: CommandFlags, offset: u64, length: u64) -> Request {
    Request {
        flags,
        command,
        cookie: 7,
        offset,
        length,
    }
}

fn err(r: Result<(), Reject>) -> Option<NbdError> {
    r.err().map(|r| r.error)
}

#[test]
fn validation_follows_the_spec() {
    let l = limits();
    let none = CommandFlags::empty();
    use CommandType as C;
    assert_eq!(err(validate(&req(C::READ, none, 0, 4096), &l)), None);
    assert_eq!(
        err(validate(&req(C::READ, none, 1 << 20, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::READ, none, u64::MAX - 511, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::WRITE, none, 1 << 20, 512), &l)),
        Some(NbdError::ENOSPC)
    );
    assert_eq!(
        err(validate(&req(C::WRITE_ZEROES, none, 1 << 20, 512), &l)),
        Some(NbdError::ENOSPC)
    );
    assert_eq!(
        err(validate(&req(C::TRIM, none, 1 << 20, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::READ, none, 1, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::WRITE, none, 0, 100), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(CommandType(42), none, 0, 0), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::RESIZE, none, 0, 0), &l)),
        Some(NbdError::EINVAL)
    );
    // Flags: unknown, misplaced, not negotiated.
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags(0x100), 0, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags::NO_HOLE, 0, 512), &l)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags::FUA, 0, 512), &l)),
        None
    );
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags::DF, 0, 64 << 10), &l)),
        None
    );
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags::DF, 0, 128 << 10), &l)),
        Some(NbdError::EOVERFLOW)
    );
    assert_eq!(
        err(validate(
            &req(C::WRITE, CommandFlags::PAYLOAD_LEN, 0, 512),
            &l
        )),
        Some(NbdError::EINVAL),
        "PAYLOAD_LEN is for extended headers only"
    );
    assert_eq!(
        err(validate(
            &req(C::WRITE_ZEROES, CommandFlags::FAST_ZERO, 0, 512),
            &l
        )),
        Some(NbdError::ENOTSUP)
    );
    let fast = Limits {
        fast_zero: true,
        ..l
    };
    assert_eq!(
        err(validate(
            &req(C::WRITE_ZEROES, CommandFlags::FAST_ZERO, 0, 512),
            &fast
        )),
        None
    );
    // Sizes.
    let small = Limits {
        max_payload: 1 << 20,
        size_bytes: 1 << 30,
        ..l
    };
    assert_eq!(
        err(validate(&req(C::READ, none, 0, 2 << 20), &small)),
        Some(NbdError::EOVERFLOW)
    );
    let simple = Limits {
        structured: false,
        ..small
    };
    assert_eq!(
        err(validate(&req(C::READ, none, 0, 2 << 20), &simple)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::WRITE, none, 0, 2 << 20), &small)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(
        err(validate(&req(C::TRIM, none, 0, 2 << 20), &small)),
        None,
        "effect lengths may exceed"
    );
    // Read-only exports refuse every write with EPERM, before anything else about the range.
    let ro = Limits {
        flags: l.flags | TransmissionFlags::READ_ONLY,
        ..l
    };
    for c in [C::WRITE, C::TRIM, C::WRITE_ZEROES] {
        assert_eq!(
            err(validate(&req(c, none, 0, 512), &ro)),
            Some(NbdError::EPERM)
        );
    }
    assert_eq!(err(validate(&req(C::READ, none, 0, 512), &ro)), None);
    // Commands that need negotiation.
    let bare = Limits {
        flags: TransmissionFlags::HAS_FLAGS,
        meta_contexts: false,
        ..l
    };
    for c in [C::FLUSH, C::TRIM, C::WRITE_ZEROES, C::BLOCK_STATUS] {
        assert_eq!(
            err(validate(&req(c, none, 0, 512), &bare)),
            Some(NbdError::EINVAL),
            "{c:?}"
        );
    }
    assert_eq!(
        err(validate(&req(C::READ, CommandFlags::FUA, 0, 512), &bare)),
        Some(NbdError::EINVAL)
    );
    assert_eq!(err(validate(&req(C::CACHE, none, 0, 512), &bare)), None);
    assert_eq!(
        err(validate(&req(C::BLOCK_STATUS, none, 0, 0), &l)),
        Some(NbdError::EINVAL)
    );
    // Extended headers: WRITE may carry PAYLOAD_LEN or not (qemu sends none); 64-bit effect
    // lengths are fine.
    let ext = Limits {
        style: HeaderStyle::Extended,
        size_bytes: 1 << 40,
        ..l
    };
    assert_eq!(err(validate(&req(C::WRITE, none, 0, 512), &ext)), None);
    assert_eq!(
        err(validate(
            &req(C::WRITE, CommandFlags::PAYLOAD_LEN, 0, 512),
            &ext
        )),
        None
    );
    assert_eq!(err(validate(&req(C::TRIM, none, 0, 1 << 33), &ext)), None);
    assert_eq!(
        err(validate(
            &req(C::BLOCK_STATUS, CommandFlags::PAYLOAD_LEN, 0, 512),
            &ext
        )),
        Some(NbdError::EINVAL)
    );
}

#[test]
fn tag_buffers_are_aligned_with_header_room() {
    let mut b = TagBuf::new(64 << 10);
    assert_eq!(b.data(512).as_ptr().align_offset(BUFFER_ALIGN), 0);
    assert!(b.data_start >= PREFIX_BYTES);
    assert_eq!(b.data(1 << 30).len(), 64 << 10);
    b.data(3).copy_from_slice(b"abc");
    let r = b.frame(&[b"hd", b"r"], 3);
    assert_eq!(&b.storage[r], b"hdrabc");
}

/// A client speaking the negotiated style.
struct Client {
    s: UnixStream,
    style: HeaderStyle,
    cookie: u64,
}

#[derive(Debug)]
enum Reply {
    Simple(u32, u64, Vec<u8>),
    Chunk(ChunkHeader, Vec<u8>),
}

impl Client {
    fn send(
        &mut self,
        command: CommandType,
        flags: CommandFlags,
        offset: u64,
        length: u64,
        data: &[u8],
    ) -> u64 {
        self.cookie += 1;
        let r = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut h = [0u8; 32];
        let n = r.encode(self.style, &mut h).unwrap();
        self.s.write_all(&h[..n]).unwrap();
        self.s.write_all(data).unwrap();
        self.cookie
    }

    /// Reads one reply; `read_len` is how much data a successful simple reply carries.
    fn reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        let n = ReplyHeader::bytes_for_magic(u32::from_be_bytes(magic)).expect("reply magic");
        let mut h = vec![0u8; n];
        h[..4].copy_from_slice(&magic);
        self.s.read_exact(&mut h[4..]).unwrap();
        match ReplyHeader::decode(&h).unwrap().0 {
            ReplyHeader::Simple(s) => {
                let mut data = vec![0u8; if s.error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).unwrap();
                Reply::Simple(s.error, s.cookie, data)
            }
            ReplyHeader::Chunk(_, c) => {
                let mut payload = vec![0u8; c.length as usize];
                self.s.read_exact(&mut payload).unwrap();
                Reply::Chunk(c, payload)
            }
        }
    }

    /// Reads chunks until DONE; returns them.
    fn chunks(&mut self) -> Vec<(ChunkHeader, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let Reply::Chunk(h, p) = self.reply(0) else {
                panic!("simple reply in a structured read")
            };
            let done = h.flags.contains(ReplyFlags::DONE);
            v.push((h, p));
            if done {
                return v;
            }
        }
    }

    /// Reassembles a structured READ; `Err` with the first error chunk's value.
    fn structured_read(
        &mut self,
        offset: u64,
        len: usize,
        flags: CommandFlags,
    ) -> Result<Vec<u8>, u32> {
        self.send(CommandType::READ, flags, offset, len as u64, &[]);
        let mut out = vec![0xeeu8; len];
        let mut covered = 0;
        for (h, p) in self.chunks() {
            match Chunk::decode(h.kind, &p).unwrap() {
                Chunk::OffsetData { offset: o, data } => {
                    let at = (o - offset) as usize;
                    out[at..at + data.len()].copy_from_slice(data);
                    covered += data.len();
                }
                Chunk::OffsetHole { offset: o, len } => {
                    let at = (o - offset) as usize;
                    out[at..at + len as usize].fill(0);
                    covered += len as usize;
                }
                Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => return Err(error),
                Chunk::None => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(covered, len);
        Ok(out)
    }

    fn status(&mut self) -> u32 {
        match self.reply(0) {
            Reply::Simple(e, _, _) => e,
            Reply::Chunk(h, p) => match Chunk::decode(h.kind, &p).unwrap() {
                Chunk::None => 0,
                Chunk::Error { error, .. } => error,
                other => panic!("unexpected {other:?}"),
            },
        }
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

struct Setup {
    structured: bool,
    extended: bool,
    meta: bool,
    config: ServerConfig,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            structured: false,
            extended: false,
            meta: false,
            config: ServerConfig {
                queue_depth: 8,
                buffer_bytes: 64 << 10,
                ..ServerConfig::default()
            },
        }
    }
}

fn start(backend: Arc<MemBackend>, setup: Setup) -> (Client, JoinHandle<Result<(), ServeError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let info = export_info("mem", "", &*backend);
    let structured = setup.structured || setup.extended;
    let negotiated = Negotiated {
        flags: info.transmission_flags(structured),
        export: backend,
        info,
        structured,
        extended: setup.extended,
        meta_contexts: MetaContexts {
            base_allocation: setup.meta.then_some(BASE_ALLOCATION_ID),
        },
        no_zeroes: true,
        block_sizes_agreed: true,
    };
    let config = setup.config;
    let server = std::thread::spawn(move || serve_connection(Stream::Unix(b), negotiated, &config));
    let style = if setup.extended {
        HeaderStyle::Extended
    } else {
        HeaderStyle::Compact
    };
    (
        Client {
            s: a,
            style,
            cookie: 0,
        },
        server,
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn simple_replies_write_read_flush_trim() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let (mut c, server) = start(mem.clone(), Setup::default());
    let data = pattern(8192, 1);
    c.send(CommandType::WRITE, CommandFlags::FUA, 4096, 8192, &data);
    assert!(matches!(c.reply(0), Reply::Simple(0, 1, _)));
    let cookie = c.send(CommandType::READ, CommandFlags::empty(), 4096, 8192, &[]);
    let Reply::Simple(0, got, back) = c.reply(8192) else {
        panic!()
    };
    assert_eq!((got, back), (cookie, data.clone()));
    c.send(CommandType::FLUSH, CommandFlags::empty(), 0, 0, &[]);
    assert_eq!(c.status(), 0);
    c.send(CommandType::TRIM, CommandFlags::empty(), 4096, 4096, &[]);
    assert_eq!(c.status(), 0);
    assert_eq!(mem.snapshot(4096, 4096), vec![0; 4096]);
    c.send(
        CommandType::WRITE_ZEROES,
        CommandFlags::NO_HOLE,
        8192,
        4096,
        &[],
    );
    assert_eq!(c.status(), 0);
    assert_eq!(mem.snapshot(8192, 4096), vec![0; 4096]);
    // Errors: beyond the end, unaligned, unknown command, a write with its payload drained.
    c.send(CommandType::READ, CommandFlags::empty(), 1 << 20, 512, &[]);
    assert_eq!(c.status(), 22);
    c.send(CommandType::READ, CommandFlags::empty(), 100, 512, &[]);
    assert_eq!(c.status(), 22);
    c.send(CommandType(77), CommandFlags::empty(), 0, 0, &[]);
    assert_eq!(c.status(), 22);
    c.send(
        CommandType::WRITE,
        CommandFlags::empty(),
        (1 << 20) - 512,
        1024,
        &[9; 1024],
    );
    assert_eq!(c.status(), 28, "ENOSPC, and the payload was skipped");
    assert_eq!(
        mem.snapshot((1 << 20) - 512, 512),
        vec![0; 512],
        "nothing written"
    );
    c.send(CommandType::READ, CommandFlags::empty(), 0, 0, &[]);
    assert!(matches!(c.reply(0), Reply::Simple(0, _, _)));
    c.send(CommandType::DISC, CommandFlags::empty(), 0, 0, &[]);
    assert!(c.closed());
    server.join().unwrap().unwrap();
}

#[test]
fn requests_larger_than_the_buffer_are_served_in_pieces() {
    let mem = Arc::new(MemBackend::new(4 << 20));
    let (mut c, server) = start(mem.clone(), Setup::default());
    let data = pattern(1 << 20, 3);
    // 1 MiB through 64 KiB buffers: streamed in both directions.
    c.send(
        CommandType::WRITE,
        CommandFlags::empty(),
        512,
        1 << 20,
        &data,
    );
    assert_eq!(c.status(), 0);
    assert_eq!(mem.snapshot(512, 1 << 20), data);
    c.send(CommandType::READ, CommandFlags::empty(), 512, 1 << 20, &[]);
    let Reply::Simple(0, _, back) = c.reply(1 << 20) else {
        panic!()
    };
    assert!(back == data);
    c.send(
        CommandType::WRITE_ZEROES,
        CommandFlags::empty(),
        0,
        3 << 20,
        &[],
    );
    assert_eq!(c.status(), 0);
    assert_eq!(mem.allocated_pages(), 0);
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn pipelined_requests_complete() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let (mut c, server) = start(mem.clone(), Setup::default());
    // More requests in flight than tags: the reader waits for free tags.
    let n = 64;
    for i in 0..n {
        c.send(
            CommandType::WRITE,
            CommandFlags::empty(),
            i * 4096,
            4096,
            &pattern(4096, i as u8),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let Reply::Simple(0, cookie, _) = c.reply(0) else {
            panic!()
        };
        assert!(seen.insert(cookie));
    }
    for i in 0..n {
        assert_eq!(mem.snapshot(i * 4096, 4096), pattern(4096, i as u8));
    }
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn structured_reads_report_holes_and_split() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let (mut c, server) = start(
        mem.clone(),
        Setup {
            structured: true,
            meta: true,
            ..Setup::default()
        },
    );
    let data = pattern(4096, 5);
    c.send(CommandType::WRITE, CommandFlags::empty(), 8192, 4096, &data);
    assert_eq!(c.status(), 0);
    // 0..8K hole, 8K..12K data, 12K..200K hole: one hole chunk, one data chunk, one hole chunk.
    c.send(CommandType::READ, CommandFlags::empty(), 0, 200 << 10, &[]);
    let chunks = c.chunks();
    let kinds: Vec<_> = chunks.iter().map(|(h, _)| h.kind).collect();
    assert_eq!(
        kinds,
        [
            ChunkType::OFFSET_HOLE,
            ChunkType::OFFSET_DATA,
            ChunkType::OFFSET_HOLE
        ]
    );
    assert!(chunks[2].0.flags.contains(ReplyFlags::DONE));
    let mut expect = vec![0u8; 200 << 10];
    expect[8192..12288].copy_from_slice(&data);
    assert_eq!(
        c.structured_read(0, 200 << 10, CommandFlags::empty())
            .unwrap(),
        expect
    );
    // DF: one data chunk with the zeroes present.
    c.send(CommandType::READ, CommandFlags::DF, 0, 64 << 10, &[]);
    let chunks = c.chunks();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].0.kind, ChunkType::OFFSET_DATA);
    // A large all-data read: one chunk per buffer.
    let big = pattern(256 << 10, 9);
    c.send(
        CommandType::WRITE,
        CommandFlags::empty(),
        0,
        256 << 10,
        &big,
    );
    assert_eq!(c.status(), 0);
    c.send(CommandType::READ, CommandFlags::empty(), 0, 256 << 10, &[]);
    assert_eq!(c.chunks().len(), 4);
    assert_eq!(
        c.structured_read(0, 256 << 10, CommandFlags::empty())
            .unwrap(),
        big
    );
    // Errors on READ are structured too.
    assert_eq!(
        c.structured_read(1 << 20, 512, CommandFlags::empty()),
        Err(22)
    );
    // Block status: data then hole, merged, with REQ_ONE limiting to one extent.
    c.send(
        CommandType::BLOCK_STATUS,
        CommandFlags::empty(),
        0,
        1 << 20,
        &[],
    );
    let chunks = c.chunks();
    assert_eq!(chunks.len(), 1);
    let Chunk::BlockStatus {
        context_id,
        descriptors,
    } = Chunk::decode(chunks[0].0.kind, &chunks[0].1).unwrap()
    else {
        panic!()
    };
    assert_eq!(context_id, BASE_ALLOCATION_ID);
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        vec![(256 << 10, 0), (768 << 10, 3)]
    );
    c.send(
        CommandType::BLOCK_STATUS,
        CommandFlags::REQ_ONE,
        4096,
        1 << 19,
        &[],
    );
    let chunks = c.chunks();
    let Chunk::BlockStatus { descriptors, .. } =
        Chunk::decode(chunks[0].0.kind, &chunks[0].1).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        vec![((256 << 10) - 4096, 0)]
    );
    c.send(CommandType::DISC, CommandFlags::empty(), 0, 0, &[]);
    server.join().unwrap().unwrap();
}

#[test]
fn extended_headers() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let (mut c, server) = start(
        mem.clone(),
        Setup {
            extended: true,
            meta: true,
            ..Setup::default()
        },
    );
    let data = pattern(4096, 2);
    c.send(
        CommandType::WRITE,
        CommandFlags::PAYLOAD_LEN,
        4096,
        4096,
        &data,
    );
    let Reply::Chunk(h, _) = c.reply(0) else {
        panic!("extended replies only")
    };
    assert_eq!((h.kind, h.offset), (ChunkType::NONE, 4096));
    assert_eq!(
        c.structured_read(4096, 4096, CommandFlags::empty())
            .unwrap(),
        data
    );
    // A WRITE without PAYLOAD_LEN (as qemu sends them) has its payload all the same.
    let other = pattern(4096, 3);
    c.send(
        CommandType::WRITE,
        CommandFlags::empty(),
        8192,
        4096,
        &other,
    );
    assert_eq!(c.status(), 0);
    assert_eq!(mem.snapshot(8192, 4096), other);
    // A payload on a command that takes none is consumed, then refused.
    c.send(
        CommandType::TRIM,
        CommandFlags::PAYLOAD_LEN,
        0,
        16,
        &[0; 16],
    );
    assert_eq!(c.status(), 22);
    c.send(
        CommandType::BLOCK_STATUS,
        CommandFlags::empty(),
        0,
        1 << 20,
        &[],
    );
    let chunks = c.chunks();
    assert_eq!(chunks[0].0.kind, ChunkType::BLOCK_STATUS_EXT);
    assert_eq!(chunks[0].0.offset, 0);
    let Chunk::BlockStatus { descriptors, .. } =
        Chunk::decode(chunks[0].0.kind, &chunks[0].1).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        vec![(4096, 3), (8192, 0), ((1 << 20) - 12288, 3)]
    );
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn read_only_and_bad_magic() {
    let mem = Arc::new(MemBackend::new(1 << 20).read_only());
    let (mut c, server) = start(mem, Setup::default());
    c.send(CommandType::WRITE, CommandFlags::empty(), 0, 512, &[1; 512]);
    assert_eq!(c.status(), 1, "EPERM");
    c.send(CommandType::READ, CommandFlags::empty(), 0, 512, &[]);
    assert!(matches!(c.reply(512), Reply::Simple(0, _, _)));
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
    assert!(matches!(
        server.join().unwrap(),
        Err(ServeError::Protocol(_))
    ));
}

#[test]
fn huge_payload_disconnects() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let (mut c, server) = start(
        mem,
        Setup {
            extended: true,
            ..Setup::default()
        },
    );
    c.send(
        CommandType::WRITE,
        CommandFlags::PAYLOAD_LEN,
        0,
        1 << 40,
        &[],
    );
    assert!(c.closed());
    assert!(matches!(
        server.join().unwrap(),
        Err(ServeError::PayloadTooLarge(_))
    ));
}

#[test]
fn config_is_checked() {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let mut setup = Setup::default();
    setup.config.buffer_bytes = 4096;
    let (_c, server) = start(mem, setup);
    assert!(matches!(server.join().unwrap(), Err(ServeError::Config(_))));
    assert!(BlockSizes::DEFAULT.is_valid());
}

#[test]
fn unix_connections_get_a_send_buffer_that_holds_a_batch_of_large_replies() {
    let (a, _b) = UnixStream::pair().unwrap();
    let before = rustix::net::sockopt::socket_send_buffer_size(&a).unwrap();
    grow_send_buffer(&a, UNIX_SEND_BUFFER_BYTES);
    let after = rustix::net::sockopt::socket_send_buffer_size(&a).unwrap();
    // Root may force any size; others get at most net.core.wmem_max, and never less than before.
    assert!(after >= before, "{before} -> {after}");
    if rustix::process::geteuid().is_root() {
        assert!(after >= UNIX_SEND_BUFFER_BYTES, "{after}");
    }
}
