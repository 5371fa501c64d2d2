//! Shared by the integration tests: a scratch directory, a server host, and a raw client built
//! on the crate's codec (for what real clients cannot be made to do).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use userdm_nbd::proto::{
    decode_greeting, encode_option, ClientFlags, CommandFlags, CommandType, HeaderStyle,
    InfoRequest, OptionReplyHeader, OptionType, ReplyHeader, ReplyType, Request, GREETING_BYTES,
    OPTION_REPLY_HEADER_BYTES,
};
use userdm_nbd::{serve_unix, Exports, MemBackend, NbdServer, ServerConfig};

/// A directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("userdm-nbd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server with a 64 MiB writable export "mem" and a 1 MiB read-only export "ro".
pub struct Host {
    pub server: Option<NbdServer>,
    pub socket: PathBuf,
    pub mem: Arc<MemBackend>,
}

impl Host {
    pub fn start(scratch: &Scratch) -> Host {
        Host::start_with(scratch, ServerConfig::default())
    }

    pub fn start_with(scratch: &Scratch, config: ServerConfig) -> Host {
        let mem = Arc::new(MemBackend::new(64 << 20));
        let ro = Arc::new(MemBackend::new(1 << 20).read_only());
        let exports = Exports::new()
            .with("mem", "the memory disk", mem.clone())
            .with("ro", "read-only", ro);
        let socket = scratch.path("nbd.sock");
        let server = serve_unix(&socket, exports, config).unwrap();
        Host {
            server: Some(server),
            socket,
            mem,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

/// Whether `bin` is on PATH; prints why the calling test skips when it is not.
pub fn require(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()));
    if !found {
        println!("SKIP: '{bin}' is not installed (install the Debian package that provides it)");
    }
    found
}

/// A raw NBD client over a Unix socket.
pub struct Raw {
    pub s: UnixStream,
    pub cookie: u64,
}

impl Raw {
    /// Connects and reads the greeting; sends the client flags.
    pub fn connect(socket: &Path) -> Raw {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; GREETING_BYTES];
        s.read_exact(&mut g).unwrap();
        decode_greeting(&g).unwrap();
        s.write_all(
            &(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
                .bits()
                .to_be_bytes(),
        )
        .unwrap();
        Raw { s, cookie: 0 }
    }

    pub fn option(&mut self, option: OptionType, data: &[u8]) {
        let mut out = Vec::new();
        encode_option(option, data, &mut out).unwrap();
        self.s.write_all(&out).unwrap();
    }

    /// Reads one option reply.
    pub fn option_reply(&mut self) -> (ReplyType, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_BYTES];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).unwrap();
        (h.reply, data)
    }

    /// GO to `export` with no extras; panics unless it succeeds.
    pub fn go(&mut self, export: &str) {
        let mut data = Vec::new();
        InfoRequest::encode(export, &[], &mut data).unwrap();
        self.option(OptionType::GO, &data);
        loop {
            let (kind, _) = self.option_reply();
            if kind == ReplyType::ACK {
                return;
            }
            assert_eq!(kind, ReplyType::INFO, "GO failed");
        }
    }

    pub fn request(&mut self, command: CommandType, offset: u64, length: u64, data: &[u8]) {
        self.cookie += 1;
        let r = Request {
            flags: CommandFlags::empty(),
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut h = [0u8; 28];
        r.encode(HeaderStyle::Compact, &mut h).unwrap();
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
    }

    /// Reads a simple reply; `data_len` bytes follow a successful READ.
    pub fn simple_reply(&mut self, data_len: usize) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let ReplyHeader::Simple(r) = ReplyHeader::decode(&h).unwrap().0 else {
            panic!("not simple")
        };
        let mut data = vec![0u8; if r.error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (r.error, data)
    }

    /// Whether the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// A full round trip that proves the connection (and server) still work.
    pub fn write_read(&mut self, offset: u64, fill: u8) {
        self.request(CommandType::WRITE, offset, 4096, &[fill; 4096]);
        assert_eq!(self.simple_reply(0).0, 0);
        self.request(CommandType::READ, offset, 4096, &[]);
        let (e, d) = self.simple_reply(4096);
        assert_eq!(e, 0);
        assert!(d.iter().all(|b| *b == fill));
    }
}
