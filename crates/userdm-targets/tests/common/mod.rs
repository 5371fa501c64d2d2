//! Helpers shared by the integration tests: backing files, tables and requests.
#![allow(dead_code)]

use std::future::{poll_fn, Future};
use std::io::Write;
use std::pin::pin;
use std::task::Poll;

use tempfile::NamedTempFile;
use userdm_io::{IoError, IoFlags, IoHeader, IoOp, IoResult};
use userdm_table::Table;
use userdm_targets::{AnyTarget, TargetContext};
use userdm_uring::Reactor;

/// A temporary backing file.
pub struct Disk {
    pub file: NamedTempFile,
    pub path: String,
}

/// A backing file of `bytes` bytes, filled with `fill`.
pub fn disk(bytes: u64, fill: u8) -> Disk {
    let mut file = NamedTempFile::new().expect("temp file");
    if fill == 0 {
        file.as_file().set_len(bytes).expect("set_len");
    } else {
        file.write_all(&vec![fill; bytes as usize]).expect("fill");
    }
    let path = file.path().to_str().expect("utf-8 path").to_string();
    Disk { file, path }
}

/// Builds a table, panicking with the error.
pub fn table(ctx: &TargetContext, text: &str) -> Table<AnyTarget> {
    match Table::parse(ctx, text) {
        Ok(t) => t,
        Err(e) => panic!("table {text:?}: {e}"),
    }
}

/// The error of building a table that must fail.
pub fn table_error(ctx: &TargetContext, text: &str) -> String {
    match Table::<AnyTarget>::parse(ctx, text) {
        Ok(_) => panic!("table {text:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

pub fn header(op: IoOp, sector: u64, sectors: u64) -> IoHeader {
    IoHeader {
        op,
        flags: IoFlags::empty(),
        sector,
        len_bytes: sectors * 512,
    }
}

/// Requests against a table, run to completion on one reactor.
pub struct Client<'a> {
    pub rt: &'a Reactor,
    pub table: &'a Table<AnyTarget>,
}

impl Client<'_> {
    pub fn read(&self, sector: u64, sectors: u64) -> Result<Vec<u8>, IoError> {
        self.read_flags(sector, sectors, IoFlags::empty())
    }

    pub fn read_flags(
        &self,
        sector: u64,
        sectors: u64,
        flags: IoFlags,
    ) -> Result<Vec<u8>, IoError> {
        let mut buf = vec![0u8; (sectors * 512) as usize];
        let io = IoHeader {
            flags,
            ..header(IoOp::Read, sector, sectors)
        };
        self.rt.block_on(self.table.io(self.rt, io, &mut buf))?;
        Ok(buf)
    }

    pub fn write(&self, sector: u64, data: &[u8]) -> IoResult {
        self.write_flags(sector, data, IoFlags::empty())
    }

    pub fn write_flags(&self, sector: u64, data: &[u8], flags: IoFlags) -> IoResult {
        let mut buf = data.to_vec();
        let io = IoHeader {
            flags,
            ..header(IoOp::Write, sector, data.len() as u64 / 512)
        };
        let result = self.rt.block_on(self.table.io(self.rt, io, &mut buf));
        assert_eq!(buf, data, "a target changed the caller's write buffer");
        result
    }

    pub fn op(&self, op: IoOp, sector: u64, sectors: u64, flags: IoFlags) -> IoResult {
        let io = IoHeader {
            flags,
            ..header(op, sector, sectors)
        };
        self.rt.block_on(self.table.io(self.rt, io, &mut []))
    }

    pub fn flush(&self) -> IoResult {
        self.op(IoOp::Flush, 0, 0, IoFlags::empty())
    }

    pub fn message(&self, argv: &str) -> Result<Option<String>, userdm_table::MessageError> {
        let argv: Vec<String> = argv.split_whitespace().map(str::to_string).collect();
        self.table.message(0, &argv)
    }
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs two futures to completion together, returning both outputs.
pub async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    let mut out_a = None;
    let mut out_b = None;
    poll_fn(|cx| {
        if out_a.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                out_a = Some(v);
            }
        }
        if out_b.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                out_b = Some(v);
            }
        }
        if out_a.is_some() && out_b.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (out_a.expect("a finished"), out_b.expect("b finished"))
}
