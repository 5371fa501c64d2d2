//! The transmission phase under arbitrary client bytes.
//!
//! First the request decoder alone, in both header styles; then the whole server (io_uring data
//! path, memory backend) on a socket pair, in the reply mode the first byte picks. Neither may
//! panic, and the server must end (the client's bytes end with a half-close).
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use userdm_nbd::backend::export_info;
use userdm_nbd::handshake::{MetaContexts, Negotiated, BASE_ALLOCATION_ID};
use userdm_nbd::mem::MemBackend;
use userdm_nbd::proto::{HeaderStyle, Request};
use userdm_nbd::server::{serve_connection, ServerConfig};
use userdm_nbd::stream::Stream;

fn decode_all(style: HeaderStyle, mut bytes: &[u8]) {
    while let Ok(req) = Request::decode(style, bytes) {
        let skip = (style.request_bytes() as u64).saturating_add(req.payload_bytes(style));
        let skip = usize::try_from(skip).unwrap_or(usize::MAX).min(bytes.len());
        bytes = &bytes[skip..];
    }
}

fuzz_target!(|data: &[u8]| {
    decode_all(HeaderStyle::Compact, data);
    decode_all(HeaderStyle::Extended, data);

    let (&mode, script) = data.split_first().unwrap_or((&0, &[]));
    let (structured, extended, meta) = (mode & 1 != 0, mode & 2 != 0, mode & 4 != 0);
    let mem = Arc::new(if mode & 8 != 0 { MemBackend::new(1 << 20).read_only() } else { MemBackend::new(1 << 20) });
    let info = export_info("fuzz", "", &*mem);
    let negotiated = Negotiated {
        flags: info.transmission_flags(structured || extended),
        export: mem,
        info,
        structured: structured || extended,
        extended,
        meta_contexts: MetaContexts { base_allocation: meta.then_some(BASE_ALLOCATION_ID) },
        no_zeroes: true,
        block_sizes_agreed: true,
    };
    let config = ServerConfig { queue_depth: 4, buffer_bytes: 64 << 10, ring_entries: 32, ..ServerConfig::default() };
    let (client, server) = UnixStream::pair().expect("socketpair");
    let served = std::thread::spawn(move || serve_connection(Stream::Unix(server), negotiated, &config));
    let mut writer = client.try_clone().expect("dup");
    let script = script.to_vec();
    let sender = std::thread::spawn(move || {
        // The server may close first (bad magic); a failed write is expected then.
        let _ = writer.write_all(&script);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut sink = Vec::new();
    let mut reader = client;
    let _ = reader.read_to_end(&mut sink);
    sender.join().expect("sender");
    // Errors are the server's answer to bad input; only a panic would fail here.
    let _ = served.join().expect("server thread panicked");
});
