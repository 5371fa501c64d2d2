//! Serves a sparse in-memory disk over NBD until standard input closes (or a line is read).
//!
//! ```text
//! nbd-memory unix PATH [SIZE_BYTES [NAME]]
//! nbd-memory tcp ADDR:PORT [SIZE_BYTES [NAME]]
//! ```
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::Arc;

use userdm_nbd::{serve_tcp, serve_unix, Exports, ListenAddr, MemBackend, ServerConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("usage: nbd-memory unix PATH|tcp ADDR:PORT [SIZE_BYTES [NAME]]");
        return ExitCode::from(2);
    };
    let size = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64u64 << 20);
    let name = args.get(3).map_or("mem", String::as_str);
    let exports = Exports::new().with(
        name,
        "userdm in-memory disk",
        Arc::new(MemBackend::new(size)),
    );
    let server = match kind.as_str() {
        "unix" => serve_unix(addr, exports, ServerConfig::default()),
        "tcp" => serve_tcp(addr.as_str(), exports, ServerConfig::default()),
        _ => {
            eprintln!("nbd-memory: unknown listener kind '{kind}'");
            return ExitCode::from(2);
        }
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-memory: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    match server.local_addr() {
        ListenAddr::Unix(p) => println!("listening on {}", p.display()),
        ListenAddr::Tcp(a) => println!("listening on {a}"),
    }
    let _ = std::io::stdin().lock().lines().next();
    server.shutdown();
    ExitCode::SUCCESS
}
