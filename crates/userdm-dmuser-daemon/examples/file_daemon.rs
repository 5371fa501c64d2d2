//! A file-backed dm-user daemon: `file_daemon <endpoint> <file> [threads]`.
//!
//! Serves the file's current length; FLUSH and FUA writes call `fdatasync`. `<endpoint>` as in
//! `mem_daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use userdm_dmuser_daemon::{endpoint_path, serve_threads, FileDisk};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: file_daemon <endpoint> <file> [threads]");
        return ExitCode::from(2);
    }
    let path = if args[1].contains('/') {
        PathBuf::from(&args[1])
    } else {
        endpoint_path(&args[1])
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args[2])
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("file_daemon: {}: {e}", args[2]);
            return ExitCode::FAILURE;
        }
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let disk = match FileDisk::new(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("file_daemon: {}: {e}", args[2]);
            return ExitCode::FAILURE;
        }
    };
    match serve_threads(&path, threads, &disk) {
        Ok(n) => {
            eprintln!("file_daemon: target removed after {n} requests");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("file_daemon: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
