//! A RAM-disk dm-user daemon: `mem_daemon <endpoint> <size-bytes> [threads]`.
//!
//! `<endpoint>` is a path (`/dev/dm-user/ctl`, a socket made by userdm, or a dm-user kernel's
//! device) or a bare ctl name, looked up in `$USERDM_DMUSER_DIR` (default `/dev/dm-user`). One
//! channel per thread; serves until the target is removed.

use std::path::PathBuf;
use std::process::ExitCode;

use userdm_dmuser_daemon::{endpoint_path, serve_threads, MemoryDisk};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: mem_daemon <endpoint> <size-bytes> [threads]");
        return ExitCode::from(2);
    }
    let path = if args[1].contains('/') {
        PathBuf::from(&args[1])
    } else {
        endpoint_path(&args[1])
    };
    let Ok(size) = args[2].parse::<usize>() else {
        eprintln!("mem_daemon: invalid size '{}'", args[2]);
        return ExitCode::from(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let disk = MemoryDisk::new(size);
    match serve_threads(&path, threads, &disk) {
        Ok(n) => {
            eprintln!("mem_daemon: target removed after {n} requests");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mem_daemon: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
