//! Scripted clients against the handshake, with byte-level checks from the specification.

use std::io::{Cursor, Read, Write};

use super::*;
use crate::proto::{encode_option, OptionReplyHeader, OPTION_REPLY_HEADER_BYTES};

/// An in-memory connection: the client's whole script is queued up front (the server reads one
/// option at a time, so this is what a client waiting for each reply would send).
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Catalogue(Vec<ExportInfo>);

impl ExportCatalogue for Catalogue {
    type Export = String;
    fn exports(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
    fn open(&self, name: &str) -> Option<(ExportInfo, String)> {
        self.info(name).map(|i| (i, name.to_owned()))
    }
}

fn export(name: &str, read_only: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: format!("the {name} disk"),
        size_bytes: 1 << 20,
        read_only,
        features: ExportFeatures {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
        },
        block_sizes: BlockSizes::DEFAULT,
    }
}

fn one() -> Catalogue {
    Catalogue(vec![export("disk", false)])
}

fn two() -> Catalogue {
    Catalogue(vec![export("a", false), export("b", true)])
}

const FIXED: u32 = 1;
const FIXED_NO_ZEROES: u32 = 3;

fn opt(option: OptionType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_option(option, data, &mut out).unwrap();
    out
}

fn go(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let mut data = Vec::new();
    InfoRequest::encode(name, infos, &mut data).unwrap();
    opt(OptionType::GO, &data)
}

fn meta(option: OptionType, name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    MetaContextRequest::encode(name, queries, &mut data).unwrap();
    opt(option, &data)
}

fn run_with(
    catalogue: &Catalogue,
    config: &HandshakeConfig,
    flags: u32,
    options: &[Vec<u8>],
) -> (Result<Negotiated<String>, HandshakeError>, Vec<u8>) {
    let mut input = flags.to_be_bytes().to_vec();
    for o in options {
        input.extend_from_slice(o);
    }
    let mut d = Duplex {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    let res = handshake(&mut d, catalogue, config);
    (res, d.output)
}

fn run(
    catalogue: &Catalogue,
    flags: u32,
    options: &[Vec<u8>],
) -> (Result<Negotiated<String>, HandshakeError>, Vec<u8>) {
    run_with(catalogue, &HandshakeConfig::default(), flags, options)
}

/// Splits the server's bytes after the greeting into option replies.
fn replies(out: &[u8]) -> Vec<(OptionType, ReplyType, Vec<u8>)> {
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(out[16..18], [0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
    let mut rest = &out[18..];
    let mut v = Vec::new();
    while !rest.is_empty() {
        let h = OptionReplyHeader::decode(rest).unwrap();
        let end = OPTION_REPLY_HEADER_BYTES + h.length as usize;
        v.push((
            h.option,
            h.reply,
            rest[OPTION_REPLY_HEADER_BYTES..end].to_vec(),
        ));
        rest = &rest[end..];
    }
    v
}

fn kinds(r: &[(OptionType, ReplyType, Vec<u8>)]) -> Vec<ReplyType> {
    r.iter().map(|(_, k, _)| *k).collect()
}

#[test]
fn go_default_export_with_block_size() {
    let (res, out) = run(&one(), FIXED_NO_ZEROES, &[go("", &[InfoType::BLOCK_SIZE])]);
    let n = res.unwrap();
    assert_eq!(n.export, "disk");
    assert!(n.no_zeroes && n.block_sizes_agreed && !n.structured && !n.extended);
    let r = replies(&out);
    assert_eq!(
        kinds(&r),
        [
            ReplyType::INFO,
            ReplyType::INFO,
            ReplyType::INFO,
            ReplyType::ACK
        ]
    );
    assert!(r.iter().all(|(o, _, _)| *o == OptionType::GO));
    let flags = n.flags;
    assert_eq!(
        InfoReply::decode(&r[0].2).unwrap(),
        InfoReply::Export {
            size_bytes: 1 << 20,
            flags
        }
    );
    // The client used the default name, so the server names the export it chose.
    assert_eq!(InfoReply::decode(&r[1].2).unwrap(), InfoReply::Name("disk"));
    assert_eq!(
        InfoReply::decode(&r[2].2).unwrap(),
        InfoReply::BlockSize {
            min: 512,
            preferred: 4096,
            max: 32 << 20
        }
    );
    assert!(flags.contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH));
    assert!(flags.contains(TransmissionFlags::SEND_FAST_ZERO | TransmissionFlags::SEND_CACHE));
    // Without structured replies, DF must stay clear.
    assert!(!flags.contains(TransmissionFlags::SEND_DF));
}

#[test]
fn info_then_go_with_description() {
    let mut info = Vec::new();
    InfoRequest::encode("b", &[InfoType::DESCRIPTION, InfoType::NAME], &mut info).unwrap();
    let (res, out) = run(&two(), FIXED, &[opt(OptionType::INFO, &info), go("b", &[])]);
    let n = res.unwrap();
    assert_eq!(n.export, "b");
    assert!(!n.block_sizes_agreed);
    assert!(n.flags.contains(TransmissionFlags::READ_ONLY));
    assert!(!n.flags.intersects(
        TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_FAST_ZERO
    ));
    let r = replies(&out);
    let info_replies: Vec<_> = r
        .iter()
        .filter(|(o, k, _)| *o == OptionType::INFO && *k == ReplyType::INFO)
        .map(|(_, _, d)| InfoReply::decode(d).unwrap())
        .collect();
    assert!(info_replies.contains(&InfoReply::Description("the b disk")));
    assert!(info_replies.contains(&InfoReply::Name("b")));
    assert_eq!(r.iter().filter(|(_, k, _)| *k == ReplyType::ACK).count(), 2);
}

#[test]
fn list_exports() {
    let (res, out) = run(
        &two(),
        FIXED,
        &[opt(OptionType::LIST, &[]), opt(OptionType::LIST, b"x")],
    );
    assert!(
        matches!(res, Err(HandshakeError::Io(_))),
        "script ends without GO"
    );
    let r = replies(&out);
    assert_eq!(
        kinds(&r),
        [
            ReplyType::SERVER,
            ReplyType::SERVER,
            ReplyType::ACK,
            ReplyType::ERR_INVALID
        ]
    );
    assert_eq!(
        ServerReply::decode(&r[1].2).unwrap(),
        ServerReply {
            name: "b",
            description: "the b disk"
        }
    );
}

#[test]
fn unknown_options_are_unsupported_and_negotiation_goes_on() {
    let (res, out) = run(
        &one(),
        FIXED,
        &[
            opt(OptionType(99), b"whatever"),
            opt(OptionType::PEEK_EXPORT, &[]),
            go("disk", &[]),
        ],
    );
    assert_eq!(res.unwrap().export, "disk");
    let r = replies(&out);
    assert_eq!((r[0].0, r[0].1), (OptionType(99), ReplyType::ERR_UNSUP));
    assert_eq!(r[1].1, ReplyType::ERR_UNSUP);
    assert_eq!(r.last().unwrap().1, ReplyType::ACK);
}

#[test]
fn starttls_is_refused_by_policy() {
    let (res, out) = run(
        &one(),
        FIXED,
        &[
            opt(OptionType::STARTTLS, &[]),
            opt(OptionType::STARTTLS, b"x"),
            go("disk", &[]),
        ],
    );
    res.unwrap();
    let r = replies(&out);
    assert_eq!(r[0].1, ReplyType::ERR_POLICY);
    assert_eq!(r[1].1, ReplyType::ERR_INVALID);
}

#[test]
fn abort_is_acknowledged() {
    let (res, out) = run(&one(), FIXED, &[opt(OptionType::ABORT, b"ignored data")]);
    assert!(matches!(res, Err(HandshakeError::Aborted)));
    assert_eq!(kinds(&replies(&out)), [ReplyType::ACK]);
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (flags, tail) in [(FIXED, 134), (FIXED_NO_ZEROES, 10)] {
        let (res, out) = run(&one(), flags, &[opt(OptionType::EXPORT_NAME, b"")]);
        let n = res.unwrap();
        assert_eq!(n.export, "disk");
        assert_eq!(out.len(), 18 + tail);
        assert_eq!(out[18..26], (1u64 << 20).to_be_bytes());
        assert_eq!(out[26..28], n.flags.bits().to_be_bytes());
        assert!(out[28..].iter().all(|b| *b == 0));
    }
}

#[test]
fn export_name_unknown_disconnects() {
    let (res, out) = run(&two(), FIXED, &[opt(OptionType::EXPORT_NAME, b"nope")]);
    assert!(matches!(res, Err(HandshakeError::UnknownExport(n)) if n == "nope"));
    assert_eq!(out.len(), 18, "nothing but the greeting");
    // With two exports there is no default either.
    let (res, _) = run(&two(), FIXED, &[opt(OptionType::EXPORT_NAME, b"")]);
    assert!(matches!(res, Err(HandshakeError::UnknownExport(_))));
}

#[test]
fn go_unknown_or_malformed_is_an_error_reply() {
    let (res, out) = run(
        &two(),
        FIXED,
        &[
            go("nope", &[]),
            go("", &[]),
            opt(OptionType::GO, &[0, 0, 0, 9]),
            go("a", &[]),
        ],
    );
    assert_eq!(res.unwrap().export, "a");
    let r = replies(&out);
    assert_eq!(r[0].1, ReplyType::ERR_UNKNOWN);
    assert_eq!(r[1].1, ReplyType::ERR_UNKNOWN);
    assert_eq!(r[2].1, ReplyType::ERR_INVALID);
    assert_eq!(r.last().unwrap().1, ReplyType::ACK);
}

#[test]
fn oversized_options() {
    // 70 KiB: skipped, TOO_BIG, and negotiation goes on.
    let (res, out) = run(
        &one(),
        FIXED,
        &[opt(OptionType::GO, &vec![0; 70 << 10]), go("", &[])],
    );
    res.unwrap();
    let r = replies(&out);
    assert_eq!(r[0].1, ReplyType::ERR_TOO_BIG);
    assert_eq!(r.last().unwrap().1, ReplyType::ACK);
    // 4 GiB claimed: TOO_BIG, then the connection ends without reading the data.
    let mut huge = OptionHeader {
        option: OptionType::LIST,
        length: u32::MAX,
    }
    .encode()
    .to_vec();
    huge.extend_from_slice(&[0; 100]);
    let (res, out) = run(&one(), FIXED, &[huge]);
    assert!(matches!(
        res,
        Err(HandshakeError::OptionTooLarge {
            length: u32::MAX,
            ..
        })
    ));
    assert_eq!(kinds(&replies(&out)), [ReplyType::ERR_TOO_BIG]);
    // A truncated option is a disconnect, not a hang or a panic.
    let mut short = OptionHeader {
        option: OptionType::LIST,
        length: 100,
    }
    .encode()
    .to_vec();
    short.extend_from_slice(&[0; 10]);
    assert!(matches!(
        run(&one(), FIXED, &[short]).0,
        Err(HandshakeError::Io(_))
    ));
}

#[test]
fn bad_client_flags_and_magic_disconnect() {
    assert!(matches!(
        run(&one(), 4, &[go("", &[])]).0,
        Err(HandshakeError::BadClientFlags(4))
    ));
    let mut bad = go("", &[]);
    bad[0] = b'X';
    assert!(matches!(
        run(&one(), FIXED, &[bad]).0,
        Err(HandshakeError::Protocol(_))
    ));
}

#[test]
fn structured_replies_and_meta_contexts() {
    let (res, out) = run(
        &two(),
        FIXED,
        &[
            // Before structured replies, SET is refused.
            meta(OptionType::SET_META_CONTEXT, "a", &[BASE_ALLOCATION]),
            opt(OptionType::STRUCTURED_REPLY, b"x"),
            opt(OptionType::STRUCTURED_REPLY, &[]),
            meta(OptionType::LIST_META_CONTEXT, "a", &[]),
            meta(
                OptionType::LIST_META_CONTEXT,
                "a",
                &["base:", "qemu:dirty-bitmap:x"],
            ),
            meta(OptionType::LIST_META_CONTEXT, "a", &["x-other:"]),
            meta(OptionType::SET_META_CONTEXT, "nope", &[BASE_ALLOCATION]),
            meta(
                OptionType::SET_META_CONTEXT,
                "a",
                &["base:", BASE_ALLOCATION, "qemu:x"],
            ),
            go("a", &[]),
        ],
    );
    let n = res.unwrap();
    assert!(n.structured && !n.extended);
    assert_eq!(n.meta_contexts.base_allocation, Some(BASE_ALLOCATION_ID));
    assert!(n.flags.contains(TransmissionFlags::SEND_DF));
    let r = replies(&out);
    use ReplyType as R;
    assert_eq!(
        kinds(&r[..11]),
        [
            R::ERR_INVALID,
            R::ERR_INVALID,
            R::ACK,
            R::META_CONTEXT,
            R::ACK,
            R::META_CONTEXT,
            R::ACK,
            R::ACK,
            R::ERR_UNKNOWN,
            R::META_CONTEXT,
            R::ACK,
        ]
    );
    assert_eq!(
        MetaContextReply::decode(&r[3].2).unwrap(),
        MetaContextReply {
            id: 0,
            name: BASE_ALLOCATION
        }
    );
    assert_eq!(
        MetaContextReply::decode(&r[9].2).unwrap(),
        MetaContextReply {
            id: BASE_ALLOCATION_ID,
            name: BASE_ALLOCATION
        }
    );
}

#[test]
fn meta_contexts_follow_the_export_name() {
    let (res, _) = run(
        &two(),
        FIXED,
        &[
            opt(OptionType::STRUCTURED_REPLY, &[]),
            meta(OptionType::SET_META_CONTEXT, "b", &[BASE_ALLOCATION]),
            go("a", &[]),
        ],
    );
    assert!(!res.unwrap().meta_contexts.any(), "selected for b, not a");
    // A failing SET clears an earlier selection.
    let (res, _) = run(
        &one(),
        FIXED,
        &[
            opt(OptionType::STRUCTURED_REPLY, &[]),
            meta(OptionType::SET_META_CONTEXT, "disk", &[BASE_ALLOCATION]),
            opt(OptionType::SET_META_CONTEXT, &[1]),
            go("disk", &[]),
        ],
    );
    assert!(!res.unwrap().meta_contexts.any());
}

#[test]
fn extended_headers() {
    let (res, out) = run(
        &one(),
        FIXED,
        &[
            opt(OptionType::EXTENDED_HEADERS, b"x"),
            opt(OptionType::EXTENDED_HEADERS, &[]),
            opt(OptionType::STRUCTURED_REPLY, &[]),
            meta(OptionType::SET_META_CONTEXT, "", &[BASE_ALLOCATION]),
            go("", &[]),
        ],
    );
    let n = res.unwrap();
    assert!(n.extended && n.structured && n.meta_contexts.any());
    let r = replies(&out);
    assert_eq!(
        kinds(&r[..3]),
        [
            ReplyType::ERR_INVALID,
            ReplyType::ACK,
            ReplyType::ERR_EXT_HEADER_REQD
        ]
    );
    // EXPORT_NAME is forbidden after extended headers: the only answer is a disconnect.
    let (res, _) = run(
        &one(),
        FIXED,
        &[
            opt(OptionType::EXTENDED_HEADERS, &[]),
            opt(OptionType::EXPORT_NAME, b""),
        ],
    );
    assert!(matches!(res, Err(HandshakeError::Protocol(_))));
}

#[test]
fn shutting_down_refuses_options() {
    let config = HandshakeConfig {
        shutting_down: Some(Arc::new(AtomicBool::new(true))),
        ..HandshakeConfig::default()
    };
    let (res, out) = run_with(
        &one(),
        &config,
        FIXED,
        &[go("", &[]), opt(OptionType::ABORT, &[])],
    );
    assert!(matches!(res, Err(HandshakeError::Aborted)));
    assert_eq!(
        kinds(&replies(&out)),
        [ReplyType::ERR_SHUTDOWN, ReplyType::ACK]
    );
}

#[test]
fn option_count_is_bounded() {
    let config = HandshakeConfig {
        options_max: 3,
        ..HandshakeConfig::default()
    };
    let list = opt(OptionType::LIST, &[]);
    let (res, _) = run_with(
        &one(),
        &config,
        FIXED,
        &[list.clone(), list.clone(), list.clone(), list],
    );
    assert!(matches!(res, Err(HandshakeError::TooManyOptions)));
}

#[test]
fn block_sizes_validity() {
    assert!(BlockSizes::DEFAULT.is_valid());
    assert!(!BlockSizes {
        min: 1,
        preferred: 4096,
        max: 1 << 20
    }
    .is_valid());
    assert!(!BlockSizes {
        min: 4096,
        preferred: 512,
        max: 1 << 20
    }
    .is_valid());
    assert!(!BlockSizes {
        min: 512,
        preferred: 4096,
        max: 1024
    }
    .is_valid());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_client_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut d = Duplex { input: Cursor::new(bytes), output: Vec::new() };
            let _ = handshake(&mut d, &two(), &HandshakeConfig::default());
        }

        #[test]
        fn arbitrary_options_never_panic(
            options in proptest::collection::vec((0u32..14, proptest::collection::vec(any::<u8>(), 0..40)), 0..8)
        ) {
            let mut script: Vec<Vec<u8>> = vec![opt(OptionType::STRUCTURED_REPLY, &[])];
            script.extend(options.iter().map(|(o, d)| opt(OptionType(*o), d)));
            let _ = run(&two(), FIXED, &script);
        }
    }
}
