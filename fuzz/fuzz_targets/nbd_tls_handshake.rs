//! The handshake with TLS offered or required, under arbitrary client bytes: the policy
//! (options refused before STARTTLS, EXPORT_NAME refused, STARTTLS twice) and, once STARTTLS is
//! acknowledged, rustls parsing whatever follows as a ClientHello. It must never panic, and
//! every option reply written in the clear must frame correctly.
//!
//! The certificate and key in `testdata/` are a throwaway self-signed pair made for this target.
#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use userdm_nbd::handshake::{
    handshake_tls, BlockSizes, ExportCatalogue, ExportFeatures, ExportInfo, HandshakeConfig,
};
use userdm_nbd::proto::{OptionReplyHeader, GREETING_BYTES, OPTION_REPLY_HEADER_BYTES};
use userdm_nbd::tls::{TlsConfig, TlsMode};

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

fn tls(mode: TlsMode) -> TlsConfig {
    static BASE: OnceLock<TlsConfig> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        TlsConfig::from_pem_files(
            TlsMode::On,
            &dir.join("nbd-tls-cert.pem"),
            &dir.join("nbd-tls-key.pem"),
            None,
        )
        .expect("test credentials")
    });
    TlsConfig { mode, server: Arc::clone(&base.server) }
}

fuzz_target!(|data: &[u8]| {
    let (&pick, script) = data.split_first().unwrap_or((&0, &[]));
    let mode = if pick & 1 == 0 { TlsMode::Require } else { TlsMode::On };
    let catalogue = Catalogue(vec![ExportInfo {
        name: "disk".into(),
        description: "fuzz".into(),
        size_bytes: 1 << 20,
        read_only: pick & 2 != 0,
        features: ExportFeatures { flush: true, trim: true, ..Default::default() },
        block_sizes: BlockSizes::DEFAULT,
    }]);
    let config = HandshakeConfig {
        option_bytes_max: 4096,
        option_skip_bytes_max: 8192,
        tls: Some(tls(mode)),
        ..Default::default()
    };
    let mut stream = Duplex { input: Cursor::new(script.to_vec()), output: Vec::new() };
    let _ = handshake_tls(&mut stream, &catalogue, &config);
    // Option replies in the clear frame correctly, up to the STARTTLS ACK (TLS records follow).
    let out = &stream.output;
    assert!(out.len() >= GREETING_BYTES);
    let mut rest = &out[GREETING_BYTES..];
    while rest.len() >= OPTION_REPLY_HEADER_BYTES {
        let Ok(h) = OptionReplyHeader::decode(rest) else {
            break;
        };
        let end = OPTION_REPLY_HEADER_BYTES + h.length as usize;
        assert!(end <= rest.len(), "reply overruns the output");
        rest = &rest[end..];
    }
});
