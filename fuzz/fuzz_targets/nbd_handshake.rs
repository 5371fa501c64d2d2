//! Drives the NBD handshake with arbitrary client bytes over an in-memory stream.
//!
//! The handshake must never panic, never read past what it was given, and never answer with a
//! malformed option reply, whatever the client sends.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use userdm_nbd::handshake::{
    handshake, BlockSizes, ExportCatalogue, ExportFeatures, ExportInfo, HandshakeConfig,
};
use userdm_nbd::proto::{OptionReplyHeader, GREETING_BYTES, OPTION_REPLY_HEADER_BYTES};

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
    type Export = ();
    fn exports(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
    fn open(&self, name: &str) -> Option<(ExportInfo, ())> {
        self.info(name).map(|i| (i, ()))
    }
}

fn export(name: &str, read_only: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: "fuzz".into(),
        size_bytes: 1 << 20,
        read_only,
        features: ExportFeatures { flush: true, trim: true, write_zeroes: true, ..Default::default() },
        block_sizes: BlockSizes::DEFAULT,
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks one export (a default exists) or two (no default).
    let (&pick, script) = data.split_first().unwrap_or((&0, &[]));
    let catalogue = if pick & 1 == 0 {
        Catalogue(vec![export("disk", false)])
    } else {
        Catalogue(vec![export("a", false), export("", true)])
    };
    let config = HandshakeConfig { option_bytes_max: 4096, option_skip_bytes_max: 8192, ..Default::default() };
    let mut stream = Duplex { input: Cursor::new(script.to_vec()), output: Vec::new() };
    let _ = handshake(&mut stream, &catalogue, &config);
    // Every option reply the server wrote must frame correctly.
    let out = &stream.output;
    assert!(out.len() >= GREETING_BYTES);
    let mut rest = &out[GREETING_BYTES..];
    while rest.len() >= OPTION_REPLY_HEADER_BYTES {
        let Ok(h) = OptionReplyHeader::decode(rest) else {
            // The bytes after EXPORT_NAME are size, flags and zeroes, not an option reply.
            break;
        };
        let end = OPTION_REPLY_HEADER_BYTES + h.length as usize;
        assert!(end <= rest.len(), "reply overruns the output");
        rest = &rest[end..];
    }
});
