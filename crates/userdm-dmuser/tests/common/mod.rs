//! Helpers for driving a `user` table from tests: IO on its own threads, and a raw daemon that
//! speaks the wire format by hand.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userdm_dmuser::wire::{DmUserMessage, DM_USER_RESP_SUCCESS, HEADER_BYTES};
use userdm_dmuser::{UserTarget, UserTargetContext};
use userdm_io::{IoFlags, IoHeader, IoOp, IoResult};
use userdm_table::Table;
use userdm_uring::Reactor;

pub type UserTable = Arc<Table<UserTarget>>;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub table: UserTable,
}

pub fn ctx(dir: &tempfile::TempDir) -> UserTargetContext {
    UserTargetContext::new().with_dir(dir.path())
}

pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("dmu")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub fn fixture(text: &str) -> Fixture {
    let dir = tempdir();
    let table = Arc::new(Table::parse(&ctx(&dir), text).unwrap());
    Fixture { dir, table }
}

impl Fixture {
    pub fn path(&self, ctl: &str) -> PathBuf {
        self.dir.path().join(ctl)
    }

    pub fn connect(&self, ctl: &str) -> Raw {
        Raw::connect(&self.path(ctl))
    }

    pub fn status(&self, row: usize) -> String {
        self.table.status_lines()[row].clone()
    }
}

/// Runs one request on its own thread and reactor; returns the result and the buffer.
pub fn io(table: &UserTable, op: IoOp, sector: u64, len: u64, data: Option<Vec<u8>>) -> Pending {
    io_flags(table, op, IoFlags::empty(), sector, len, data)
}

pub fn io_flags(
    table: &UserTable,
    op: IoOp,
    flags: IoFlags,
    sector: u64,
    len: u64,
    data: Option<Vec<u8>>,
) -> Pending {
    let table = Arc::clone(table);
    let handle = std::thread::spawn(move || {
        let rt = Reactor::new(8).unwrap();
        let mut buf = data.unwrap_or_else(|| {
            if op == IoOp::Read {
                vec![0; len as usize]
            } else {
                Vec::new()
            }
        });
        let hdr = IoHeader {
            op,
            flags,
            sector,
            len_bytes: len,
        };
        let res = rt.block_on(table.io(&rt, hdr, &mut buf));
        (res, buf)
    });
    Pending(Some(handle))
}

pub struct Pending(Option<JoinHandle<(IoResult, Vec<u8>)>>);

impl Pending {
    pub fn is_done(&self) -> bool {
        self.0.as_ref().is_some_and(|h| h.is_finished())
    }

    /// Waits up to 10 s for the request; panics if it does not finish.
    pub fn wait(mut self) -> (IoResult, Vec<u8>) {
        let h = self.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "request did not finish within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        h.join().unwrap()
    }

    pub fn result(self) -> IoResult {
        self.wait().0
    }
}

/// Waits until `f` holds, up to 10 s.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A daemon's channel, driven by hand.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(path: &std::path::Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// Reads in pieces of `chunk` bytes (each a separate read call).
    pub fn read_chunked(&mut self, n: usize, chunk: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        let mut at = 0;
        while at < n {
            let end = (at + chunk).min(n);
            let got = self.s.read(&mut v[at..end]).unwrap();
            assert!(got > 0, "unexpected end of stream");
            at += got;
        }
        v
    }

    pub fn read_header(&mut self) -> DmUserMessage {
        let b = self.read_exact(HEADER_BYTES);
        DmUserMessage::from_bytes(&b.try_into().unwrap())
    }

    /// Reads a request and its WRITE payload.
    pub fn read_request(&mut self) -> (DmUserMessage, Vec<u8>) {
        let h = self.read_header();
        let p = self.read_exact(h.request_payload_bytes() as usize);
        (h, p)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn reply(&mut self, seq: u64, kind: u64, data: &[u8]) {
        let mut v = DmUserMessage::reply(seq, kind).to_bytes().to_vec();
        v.extend_from_slice(data);
        self.send(&v);
    }

    pub fn ok(&mut self, seq: u64) {
        self.reply(seq, DM_USER_RESP_SUCCESS, &[]);
    }

    /// Whether the other side closed the channel (read gives EOF or a reset, after any data
    /// still buffered) within 10 s.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
            }
        }
    }
}

/// A memory-backed daemon on its own thread, serving until its channel closes. Returns the
/// number of requests it served.
pub fn mem_daemon(path: PathBuf, size_bytes: usize) -> JoinHandle<usize> {
    let store = Arc::new(std::sync::Mutex::new(vec![0u8; size_bytes]));
    mem_daemon_shared(path, store)
}

pub fn mem_daemon_shared(
    path: PathBuf,
    store: Arc<std::sync::Mutex<Vec<u8>>>,
) -> JoinHandle<usize> {
    let mut raw = Raw::connect(&path);
    raw.s.set_read_timeout(None).unwrap();
    std::thread::spawn(move || {
        let mut served = 0;
        loop {
            let mut hb = [0u8; HEADER_BYTES];
            if raw.s.read_exact(&mut hb).is_err() {
                return served;
            }
            let h = DmUserMessage::from_bytes(&hb);
            let mut payload = vec![0; h.request_payload_bytes() as usize];
            if raw.s.read_exact(&mut payload).is_err() {
                return served;
            }
            let off = (h.sector * 512) as usize;
            let len = h.len as usize;
            let reply = {
                let mut st = store.lock().unwrap();
                match h.op() {
                    Some(IoOp::Read) => {
                        let mut v = DmUserMessage::reply(h.seq, 0).to_bytes().to_vec();
                        v.extend_from_slice(&st[off..off + len]);
                        v
                    }
                    Some(IoOp::Write) => {
                        st[off..off + len].copy_from_slice(&payload);
                        DmUserMessage::reply(h.seq, 0).to_bytes().to_vec()
                    }
                    Some(IoOp::WriteZeroes | IoOp::Discard) => {
                        st[off..off + len].fill(0);
                        DmUserMessage::reply(h.seq, 0).to_bytes().to_vec()
                    }
                    Some(IoOp::Flush) => DmUserMessage::reply(h.seq, 0).to_bytes().to_vec(),
                    _ => DmUserMessage::reply(h.seq, 2).to_bytes().to_vec(),
                }
            };
            if raw.s.write_all(&reply).is_err() {
                return served;
            }
            served += 1;
        }
    })
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
