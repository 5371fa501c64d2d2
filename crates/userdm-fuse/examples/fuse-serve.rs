//! Serves a RAM disk as a FUSE file until SIGINT/SIGTERM or until the file is unmounted.
//!
//! ```text
//! fuse-serve PATH [--size 1G] [--threads 2] [--depth 16] [--page-cache]
//! ```
//!
//! Used by `bench/fuse/run.sh`; handy for trying `losetup` or fio on a userdm FUSE file.
#![allow(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use userdm_fuse::mem::MemDevice;
use userdm_fuse::{CacheMode, FuseExport, FuseOptions};

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn usage() -> ExitCode {
    eprintln!("usage: fuse-serve PATH [--size 1G] [--threads 2] [--depth 16] [--page-cache]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        return usage();
    };
    let mut size = 1u64 << 30;
    let mut options = FuseOptions::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next();
        match arg.as_str() {
            "--size" => match value().as_deref().and_then(parse_size) {
                Some(v) => size = v,
                None => return usage(),
            },
            "--threads" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => options.threads = v,
                None => return usage(),
            },
            "--depth" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => options.queue_depth = v,
                None => return usage(),
            },
            "--page-cache" => options.cache = CacheMode::PageCache,
            _ => return usage(),
        }
    }
    // Block the stop signals in every thread (workers inherit the mask) and take them here.
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise; pthread_sigmask
    // reads it and changes only this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let device = Arc::new(MemDevice::new(size));
    let handle = match FuseExport::start(device, &path, options) {
        Ok(h) => h,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg += &format!(": {s}");
                source = s.source();
            }
            eprintln!("fuse-serve: {msg}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "fuse-serve: serving {size} bytes at {}",
        handle.path().display()
    );
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: Duration::from_millis(200).as_nanos() as libc::c_long,
    };
    while handle.is_serving() {
        // SAFETY: `set` and `timeout` are initialised and live across the call; a null siginfo
        // pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            break;
        }
    }
    let stats = handle.stats();
    match handle.stop() {
        Ok(()) => {
            eprintln!("fuse-serve: stopped after {} requests", stats.requests);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fuse-serve: {e}");
            ExitCode::FAILURE
        }
    }
}
