//! Fixed-newstyle negotiation, over any blocking `Read + Write`.
//!
//! [`handshake`] sends the greeting, answers options until the client enters transmission (GO or
//! EXPORT_NAME) or leaves (ABORT, disconnect), and returns what was agreed as a [`Negotiated`].
//! It is blocking on purpose: the handshake happens once per connection, on the connection's own
//! thread, before the io_uring data path starts, and blocking code is far easier to get right
//! (and to fuzz) than an async state machine.
//!
//! Everything the client sends is bounded: option data by [`HandshakeConfig::option_bytes_max`],
//! the number of options by [`HandshakeConfig::options_max`]. A malformed option gets the
//! protocol's error reply and negotiation continues, as the specification requires; only a
//! broken framing (bad magic, unknown client flags, an option too large to skip) or an
//! EXPORT_NAME that cannot be satisfied ends the connection.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::ServerConnection;

use crate::proto::{
    encode_export_name_reply, encode_greeting, encode_option_reply, nbd_str, ClientFlags,
    HandshakeFlags, InfoReply, InfoRequest, InfoType, MetaContextReply, MetaContextRequest,
    OptionHeader, OptionType, ProtoError, ReplyType, ServerReply, TransmissionFlags,
    BASE_ALLOCATION, CLIENT_FLAGS_BYTES, OPTION_HEADER_BYTES, STRING_BYTES_MAX,
};
use crate::tls::{TlsConfig, TlsMode};

/// The context id this server gives `base:allocation` in answer to `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The block size constraints of an export (see the specification's "Size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: the alignment of every offset and length. A power of two, 512 to
    /// 65536 (requests are handed to backends in 512-byte sectors).
    pub min: u32,
    /// Preferred block size: a power of two, at least `min` and 512.
    pub preferred: u32,
    /// Maximum payload of one READ or WRITE; at least `preferred`.
    pub max: u32,
}

impl BlockSizes {
    /// 512-byte sectors, 4 KiB preferred, 32 MiB payloads: what block-device clients expect.
    pub const DEFAULT: BlockSizes = BlockSizes {
        min: 512,
        preferred: 4096,
        max: 32 << 20,
    };

    /// Whether the values obey the specification's rules (and this crate's 512-byte floor).
    pub fn is_valid(&self) -> bool {
        self.min.is_power_of_two()
            && (512..=65536).contains(&self.min)
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min
            && self.max >= self.preferred
    }
}

impl Default for BlockSizes {
    fn default() -> BlockSizes {
        BlockSizes::DEFAULT
    }
}

/// What an export can do, as advertised in its transmission flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportFeatures {
    /// FLUSH is served.
    pub flush: bool,
    /// The FUA command flag is honoured.
    pub fua: bool,
    /// TRIM is served.
    pub trim: bool,
    /// WRITE_ZEROES is served.
    pub write_zeroes: bool,
    /// WRITE_ZEROES with FAST_ZERO can succeed (otherwise it fails fast with ENOTSUP).
    pub fast_zero: bool,
    /// CACHE is served.
    pub cache: bool,
    /// Flushes are visible across connections.
    pub multi_conn: bool,
    /// The medium is rotational.
    pub rotational: bool,
}

/// One export as the handshake describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name clients ask for.
    pub name: String,
    /// A human-readable description (may be empty).
    pub description: String,
    /// Size in bytes; a multiple of `block_sizes.min`.
    pub size_bytes: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// What the export can do.
    pub features: ExportFeatures,
    /// Its size constraints.
    pub block_sizes: BlockSizes,
}

impl ExportInfo {
    /// The transmission flags for this export on a connection that did (or did not) negotiate
    /// structured replies or extended headers.
    ///
    /// Write-side features are withheld from read-only exports, so a well-behaved client never
    /// tries them; SEND_DF needs structured replies, as the specification demands.
    pub fn transmission_flags(&self, structured_or_extended: bool) -> TransmissionFlags {
        let f = &self.features;
        let writable = !self.read_only;
        TransmissionFlags::HAS_FLAGS
            .set(TransmissionFlags::READ_ONLY, self.read_only)
            .set(TransmissionFlags::SEND_FLUSH, f.flush)
            .set(TransmissionFlags::SEND_FUA, f.fua && writable)
            .set(TransmissionFlags::ROTATIONAL, f.rotational)
            .set(TransmissionFlags::SEND_TRIM, f.trim && writable)
            .set(
                TransmissionFlags::SEND_WRITE_ZEROES,
                f.write_zeroes && writable,
            )
            .set(TransmissionFlags::SEND_DF, structured_or_extended)
            .set(TransmissionFlags::CAN_MULTI_CONN, f.multi_conn)
            .set(TransmissionFlags::SEND_CACHE, f.cache)
            .set(
                TransmissionFlags::SEND_FAST_ZERO,
                f.write_zeroes && writable,
            )
    }
}

/// The exports a server offers. Called from connection threads during their handshakes.
pub trait ExportCatalogue {
    /// What a connection gets when it enters transmission (typically a backend handle).
    type Export;

    /// Every export, in the order `NBD_OPT_LIST` shows them.
    fn exports(&self) -> Vec<ExportInfo>;

    /// Opens `name` for transmission. `None` if it does not exist (any more).
    fn open(&self, name: &str) -> Option<(ExportInfo, Self::Export)>;

    /// Describes `name` without opening it.
    fn info(&self, name: &str) -> Option<ExportInfo> {
        self.exports().into_iter().find(|e| e.name == name)
    }
}

/// Limits and policy of one handshake.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// The most option data accepted (the specification caps strings at 4 KiB; INFO, GO and meta
    /// context options are a few strings).
    pub option_bytes_max: u32,
    /// Larger options than `option_bytes_max` but no larger than this are read and thrown away
    /// so negotiation can go on after `NBD_REP_ERR_TOO_BIG`; anything larger ends the
    /// connection, because skipping it would let a client make the server read gigabytes.
    pub option_skip_bytes_max: u32,
    /// The most options one connection may send before it is deemed a denial of service.
    pub options_max: u32,
    /// When set, every option but ABORT is answered with `NBD_REP_ERR_SHUTDOWN`.
    pub shutting_down: Option<Arc<AtomicBool>>,
    /// TLS policy and credentials; `None` is [`TlsMode::Off`]. Only [`handshake_tls`] can
    /// upgrade a connection; [`handshake`] refuses STARTTLS whatever this says.
    pub tls: Option<TlsConfig>,
}

impl Default for HandshakeConfig {
    fn default() -> HandshakeConfig {
        HandshakeConfig {
            option_bytes_max: 64 << 10,
            option_skip_bytes_max: 1 << 20,
            options_max: 1024,
            shutting_down: None,
            tls: None,
        }
    }
}

/// The metadata contexts selected for transmission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaContexts {
    /// The id of `base:allocation`, if selected.
    pub base_allocation: Option<u32>,
}

impl MetaContexts {
    /// Whether any context is selected (BLOCK_STATUS is allowed).
    pub fn any(&self) -> bool {
        self.base_allocation.is_some()
    }
}

/// What the handshake agreed on.
#[derive(Debug)]
pub struct Negotiated<E> {
    /// The opened export.
    pub export: E,
    /// Its description, as sent.
    pub info: ExportInfo,
    /// The transmission flags sent to the client.
    pub flags: TransmissionFlags,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated (all replies use 32-byte headers).
    pub extended: bool,
    /// The metadata contexts selected for this export.
    pub meta_contexts: MetaContexts,
    /// The client asked for no 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
    /// The client entered with GO and asked for `NBD_INFO_BLOCK_SIZE`, so it promised to obey
    /// the size constraints.
    pub block_sizes_agreed: bool,
}

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The client sent `NBD_OPT_ABORT`.
    #[error("client aborted the negotiation")]
    Aborted,
    /// The client set client flags this server does not know.
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the protocol has no way to say
    /// so but to disconnect.
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The client broke the protocol in a way negotiation cannot recover from.
    #[error("protocol violation")]
    Protocol(#[source] ProtoError),
    /// The client sent an option too large to skip.
    #[error("option {option:?} of {length} bytes is too large")]
    OptionTooLarge {
        /// The option.
        option: OptionType,
        /// Its length.
        length: u32,
    },
    /// The client sent more options than `options_max`.
    #[error("too many options")]
    TooManyOptions,
    /// Reading or writing the connection failed (including the client disconnecting).
    #[error("connection failed")]
    Io(#[source] io::Error),
    /// TLS is required and the client tried to enter transmission without it (EXPORT_NAME,
    /// which has no error reply).
    #[error("client entered transmission without the TLS this server requires")]
    TlsRequired,
    /// The TLS handshake after STARTTLS failed.
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> HandshakeError {
        HandshakeError::Io(e)
    }
}

/// Where the connection stands with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsState {
    /// In the clear; STARTTLS refused (ERR_POLICY).
    Refused,
    /// In the clear; STARTTLS accepted; with `required`, nothing else is.
    Offered { required: bool },
    /// Encrypted.
    Secure,
}

/// Mutable state of one negotiation.
struct State {
    tls: TlsState,
    /// Options handled so far, against `options_max`, across a STARTTLS.
    options: u32,
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// The selected contexts and the export name they were selected for.
    meta: Option<(String, MetaContexts)>,
    out: Vec<u8>,
}

/// What handling one option decided.
enum Step<E> {
    Continue,
    Done(Box<Negotiated<E>>),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Runs the server side of a fixed-newstyle handshake on `stream`, without TLS: STARTTLS is
/// refused whatever `config.tls` says (use [`handshake_tls`] to offer it).
///
/// On success the stream is positioned at the first transmission request.
pub fn handshake<S, C>(
    stream: &mut S,
    catalogue: &C,
    config: &HandshakeConfig,
) -> Result<Negotiated<C::Export>, HandshakeError>
where
    S: Read + Write,
    C: ExportCatalogue,
{
    negotiate(stream, catalogue, config, None).map(|(n, _)| n)
}

/// Runs the handshake with the TLS policy of `config.tls`. When the client upgraded with
/// STARTTLS, the TLS session comes back with the result: every later byte of the connection
/// must go through it (see `serve_stream`, which does that).
pub fn handshake_tls<S, C>(
    stream: &mut S,
    catalogue: &C,
    config: &HandshakeConfig,
) -> Result<(Negotiated<C::Export>, Option<ServerConnection>), HandshakeError>
where
    S: Read + Write,
    C: ExportCatalogue,
{
    negotiate(stream, catalogue, config, config.tls.as_ref())
}

fn negotiate<S, C>(
    stream: &mut S,
    catalogue: &C,
    config: &HandshakeConfig,
    tls: Option<&TlsConfig>,
) -> Result<(Negotiated<C::Export>, Option<ServerConnection>), HandshakeError>
where
    S: Read + Write,
    C: ExportCatalogue,
{
    let offered = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
    stream.write_all(&encode_greeting(offered))?;
    stream.flush()?;
    let mut raw = [0u8; CLIENT_FLAGS_BYTES];
    stream.read_exact(&mut raw)?;
    let client = ClientFlags(u32::from_be_bytes(raw));
    // The specification: the server MUST drop the connection on unknown client flags.
    if client.unknown().bits() != 0 {
        return Err(HandshakeError::BadClientFlags(client.bits()));
    }
    let tls_state = match tls.map(|t| t.mode) {
        None | Some(TlsMode::Off) => TlsState::Refused,
        Some(TlsMode::On) => TlsState::Offered { required: false },
        Some(TlsMode::Require) => TlsState::Offered { required: true },
    };
    let mut st = State::new(tls_state, client.contains(ClientFlags::NO_ZEROES));
    if let Some(negotiated) = options(stream, catalogue, config, &mut st)? {
        return Ok((negotiated, None));
    }
    // STARTTLS: everything negotiated in the clear is forgotten, as the specification requires.
    let tls = tls.ok_or(HandshakeError::TlsRequired)?;
    let mut conn = crate::tls::accept(tls, stream).map_err(HandshakeError::Tls)?;
    let used = st.options;
    st = State::new(TlsState::Secure, st.no_zeroes);
    st.options = used;
    let mut secure = rustls::Stream::new(&mut conn, stream);
    match options(&mut secure, catalogue, config, &mut st)? {
        Some(negotiated) => Ok((negotiated, Some(conn))),
        // `handle_option` never starts TLS twice.
        None => Err(HandshakeError::TlsRequired),
    }
}

impl State {
    fn new(tls: TlsState, no_zeroes: bool) -> State {
        State {
            tls,
            options: 0,
            structured: false,
            extended: false,
            no_zeroes,
            meta: None,
            out: Vec::with_capacity(512),
        }
    }
}

/// Answers options until the client enters transmission (`Some`) or STARTTLS is acknowledged
/// (`None`).
fn options<S, C>(
    stream: &mut S,
    catalogue: &C,
    config: &HandshakeConfig,
    st: &mut State,
) -> Result<Option<Negotiated<C::Export>>, HandshakeError>
where
    S: Read + Write,
    C: ExportCatalogue,
{
    while st.options < config.options_max {
        st.options += 1;
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        stream.read_exact(&mut raw)?;
        let header = OptionHeader::decode(&raw).map_err(HandshakeError::Protocol)?;
        let step = handle_option(stream, catalogue, config, st, header)?;
        stream.write_all(&st.out)?;
        stream.flush()?;
        st.out.clear();
        match step {
            Step::Continue => {}
            Step::Done(negotiated) => return Ok(Some(*negotiated)),
            Step::StartTls => return Ok(None),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

fn handle_option<S, C>(
    stream: &mut S,
    catalogue: &C,
    config: &HandshakeConfig,
    st: &mut State,
    header: OptionHeader,
) -> Result<Step<C::Export>, HandshakeError>
where
    S: Read + Write,
    C: ExportCatalogue,
{
    let option = header.option;
    if header.length > config.option_bytes_max {
        return skip_oversized(stream, config, st, header);
    }
    let mut data = vec![0u8; usize::try_from(header.length).unwrap_or(usize::MAX)];
    stream.read_exact(&mut data)?;
    let shutting_down = config
        .shutting_down
        .as_ref()
        .is_some_and(|s| s.load(Ordering::Acquire));
    if shutting_down && option != OptionType::ABORT {
        reply(
            st,
            option,
            ReplyType::ERR_SHUTDOWN,
            b"server is shutting down",
        );
        return Ok(Step::Continue);
    }
    if st.tls == (TlsState::Offered { required: true })
        && !matches!(option, OptionType::STARTTLS | OptionType::ABORT)
    {
        // FORCEDTLS: EXPORT_NAME has no error reply, so it ends the connection.
        if option == OptionType::EXPORT_NAME {
            return Err(HandshakeError::TlsRequired);
        }
        reply(
            st,
            option,
            ReplyType::ERR_TLS_REQD,
            b"this server requires TLS",
        );
        return Ok(Step::Continue);
    }
    match option {
        OptionType::EXPORT_NAME => export_name(catalogue, st, &data).map(Step::Done),
        OptionType::ABORT => {
            // The client may already have closed; a failed ACK changes nothing.
            reply(st, option, ReplyType::ACK, &[]);
            let _ = stream.write_all(&st.out);
            let _ = stream.flush();
            Err(HandshakeError::Aborted)
        }
        OptionType::LIST => {
            list(catalogue, st, &data);
            Ok(Step::Continue)
        }
        OptionType::STARTTLS => {
            if !data.is_empty() {
                reply(
                    st,
                    option,
                    ReplyType::ERR_INVALID,
                    b"STARTTLS takes no data",
                );
                return Ok(Step::Continue);
            }
            match st.tls {
                // POLICY tells the client this server will not encrypt, so a client that
                // requires TLS gives up rather than retrying.
                TlsState::Refused => reply(
                    st,
                    option,
                    ReplyType::ERR_POLICY,
                    b"TLS is not enabled on this server",
                ),
                TlsState::Secure => reply(
                    st,
                    option,
                    ReplyType::ERR_INVALID,
                    b"TLS is already negotiated",
                ),
                TlsState::Offered { .. } => {
                    reply(st, option, ReplyType::ACK, &[]);
                    return Ok(Step::StartTls);
                }
            }
            Ok(Step::Continue)
        }
        OptionType::INFO | OptionType::GO => info_or_go(catalogue, st, option, &data),
        OptionType::STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply(
                    st,
                    option,
                    ReplyType::ERR_INVALID,
                    b"STRUCTURED_REPLY takes no data",
                );
            } else if st.extended {
                reply(
                    st,
                    option,
                    ReplyType::ERR_EXT_HEADER_REQD,
                    b"extended headers in use",
                );
            } else {
                st.structured = true;
                reply(st, option, ReplyType::ACK, &[]);
            }
            Ok(Step::Continue)
        }
        OptionType::EXTENDED_HEADERS => {
            if data.is_empty() {
                st.extended = true;
                reply(st, option, ReplyType::ACK, &[]);
            } else {
                reply(
                    st,
                    option,
                    ReplyType::ERR_INVALID,
                    b"EXTENDED_HEADERS takes no data",
                );
            }
            Ok(Step::Continue)
        }
        OptionType::LIST_META_CONTEXT | OptionType::SET_META_CONTEXT => {
            meta_context(catalogue, st, option, &data);
            Ok(Step::Continue)
        }
        _ => {
            reply(st, option, ReplyType::ERR_UNSUP, b"option not supported");
            Ok(Step::Continue)
        }
    }
}

/// Answers an option whose data exceeds `option_bytes_max`.
#[cold]
fn skip_oversized<S: Read + Write, E>(
    stream: &mut S,
    config: &HandshakeConfig,
    st: &mut State,
    header: OptionHeader,
) -> Result<Step<E>, HandshakeError> {
    let too_large = HandshakeError::OptionTooLarge {
        option: header.option,
        length: header.length,
    };
    // EXPORT_NAME cannot be answered with an error, and a name this long is invalid anyway.
    if header.option == OptionType::EXPORT_NAME || header.length > config.option_skip_bytes_max {
        reply(
            st,
            header.option,
            ReplyType::ERR_TOO_BIG,
            b"option data too large",
        );
        let _ = stream.write_all(&st.out);
        let _ = stream.flush();
        return Err(too_large);
    }
    let skipped = io::copy(
        &mut (&mut *stream).take(u64::from(header.length)),
        &mut io::sink(),
    )?;
    if skipped != u64::from(header.length) {
        return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    reply(
        st,
        header.option,
        ReplyType::ERR_TOO_BIG,
        b"option data too large",
    );
    Ok(Step::Continue)
}

fn reply(st: &mut State, option: OptionType, kind: ReplyType, data: &[u8]) {
    // Replies are built from strings and payloads this module bounds to a few KiB, so the only
    // encode error (a length over 4 GiB) cannot happen.
    let _ = encode_option_reply(option, kind, data, &mut st.out);
}

/// Resolves a client's export name: the empty name means the only export, if there is one.
fn resolve<C: ExportCatalogue>(catalogue: &C, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        let mut all = catalogue.exports();
        return if all.len() == 1 {
            all.pop()
        } else {
            catalogue.info("")
        };
    }
    catalogue.info(name)
}

fn export_name<C: ExportCatalogue>(
    catalogue: &C,
    st: &mut State,
    data: &[u8],
) -> Result<Box<Negotiated<C::Export>>, HandshakeError> {
    // The client must not use EXPORT_NAME after negotiating extended headers; and an export this
    // option cannot open has no error reply, so both end the connection.
    if st.extended {
        return Err(HandshakeError::Protocol(ProtoError::Malformed {
            reason: "EXPORT_NAME after EXTENDED_HEADERS",
        }));
    }
    let name = nbd_str(data).map_err(HandshakeError::Protocol)?;
    let info =
        resolve(catalogue, name).ok_or_else(|| HandshakeError::UnknownExport(name.to_owned()))?;
    let (info, export) = catalogue
        .open(&info.name)
        .ok_or_else(|| HandshakeError::UnknownExport(name.to_owned()))?;
    let flags = info.transmission_flags(st.structured);
    let (bytes, len) = encode_export_name_reply(info.size_bytes, flags, st.no_zeroes);
    st.out.extend_from_slice(&bytes[..len]);
    let meta_contexts = selected_contexts(st, &info.name);
    Ok(Box::new(Negotiated {
        export,
        info,
        flags,
        structured: st.structured,
        extended: false,
        meta_contexts,
        no_zeroes: st.no_zeroes,
        block_sizes_agreed: false,
    }))
}

/// The contexts in force for `export`: those of the last SET_META_CONTEXT, if it named the same
/// export (the specification ties the selection to the name used to enter transmission).
fn selected_contexts(st: &State, export: &str) -> MetaContexts {
    match &st.meta {
        Some((name, contexts)) if name == export => *contexts,
        _ => MetaContexts::default(),
    }
}

fn list<C: ExportCatalogue>(catalogue: &C, st: &mut State, data: &[u8]) {
    if !data.is_empty() {
        reply(
            st,
            OptionType::LIST,
            ReplyType::ERR_INVALID,
            b"LIST takes no data",
        );
        return;
    }
    let mut payload = Vec::new();
    for export in catalogue.exports() {
        payload.clear();
        let server = ServerReply {
            name: &export.name,
            description: &export.description,
        };
        // An export whose name or description is not a valid protocol string cannot be listed.
        if server.encode(&mut payload).is_ok() {
            reply(st, OptionType::LIST, ReplyType::SERVER, &payload);
        }
    }
    reply(st, OptionType::LIST, ReplyType::ACK, &[]);
}

fn info_or_go<C: ExportCatalogue>(
    catalogue: &C,
    st: &mut State,
    option: OptionType,
    data: &[u8],
) -> Result<Step<C::Export>, HandshakeError> {
    let Ok(request) = InfoRequest::decode(data) else {
        reply(
            st,
            option,
            ReplyType::ERR_INVALID,
            b"malformed INFO/GO request",
        );
        return Ok(Step::Continue);
    };
    let Some(info) = resolve(catalogue, request.name) else {
        reply(st, option, ReplyType::ERR_UNKNOWN, b"no such export");
        return Ok(Step::Continue);
    };
    let opened = if option == OptionType::GO {
        match catalogue.open(&info.name) {
            Some(opened) => Some(opened),
            None => {
                reply(st, option, ReplyType::ERR_UNKNOWN, b"export went away");
                return Ok(Step::Continue);
            }
        }
    } else {
        None
    };
    let info = opened.as_ref().map_or(info, |(i, _)| i.clone());
    let flags = info.transmission_flags(st.structured || st.extended);
    send_info(st, option, &request, &info, flags);
    reply(st, option, ReplyType::ACK, &[]);
    let Some((_, export)) = opened else {
        return Ok(Step::Continue);
    };
    let meta_contexts = selected_contexts(st, &info.name);
    Ok(Step::Done(Box::new(Negotiated {
        export,
        info,
        flags,
        structured: st.structured || st.extended,
        extended: st.extended,
        meta_contexts,
        no_zeroes: st.no_zeroes,
        block_sizes_agreed: request.wants(InfoType::BLOCK_SIZE),
    })))
}

/// Sends the `NBD_REP_INFO` replies: EXPORT always; NAME when asked or when the client used the
/// default name; DESCRIPTION when asked and not empty; BLOCK_SIZE always, because this server
/// enforces a 512-byte minimum that is not the protocol's default of 1.
fn send_info(
    st: &mut State,
    option: OptionType,
    request: &InfoRequest<'_>,
    info: &ExportInfo,
    flags: TransmissionFlags,
) {
    let mut items = vec![InfoReply::Export {
        size_bytes: info.size_bytes,
        flags,
    }];
    if request.wants(InfoType::NAME) || request.name != info.name {
        items.push(InfoReply::Name(&info.name));
    }
    if request.wants(InfoType::DESCRIPTION) && !info.description.is_empty() {
        items.push(InfoReply::Description(&info.description));
    }
    let bs = info.block_sizes;
    items.push(InfoReply::BlockSize {
        min: bs.min,
        preferred: bs.preferred,
        max: bs.max,
    });
    let mut payload = Vec::new();
    for item in items {
        payload.clear();
        if item.encode(&mut payload).is_ok() {
            reply(st, option, ReplyType::INFO, &payload);
        }
    }
}

fn meta_context<C: ExportCatalogue>(
    catalogue: &C,
    st: &mut State,
    option: OptionType,
    data: &[u8],
) {
    let set = option == OptionType::SET_META_CONTEXT;
    if set {
        // SET replaces the previous selection even when it fails.
        st.meta = None;
        if !st.structured && !st.extended {
            reply(
                st,
                option,
                ReplyType::ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
    }
    let Ok(request) = MetaContextRequest::decode(data) else {
        reply(
            st,
            option,
            ReplyType::ERR_INVALID,
            b"malformed meta context request",
        );
        return;
    };
    let Some(info) = resolve(catalogue, request.name) else {
        reply(st, option, ReplyType::ERR_UNKNOWN, b"no such export");
        return;
    };
    let allocation = if set {
        request.queries().any(|q| q == BASE_ALLOCATION)
    } else {
        // LIST: no queries means everything; `base:` is the namespace wildcard.
        request.query_count() == 0
            || request
                .queries()
                .any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    let mut contexts = MetaContexts::default();
    if allocation {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut payload = Vec::new();
        if (MetaContextReply {
            id,
            name: BASE_ALLOCATION,
        })
        .encode(&mut payload)
        .is_ok()
        {
            reply(st, option, ReplyType::META_CONTEXT, &payload);
        }
        contexts.base_allocation = Some(BASE_ALLOCATION_ID);
    }
    if set {
        st.meta = Some((info.name.clone(), contexts));
    }
    reply(st, option, ReplyType::ACK, &[]);
}

const _: () = assert!(STRING_BYTES_MAX < 64 << 10);

#[cfg(test)]
mod tests;
