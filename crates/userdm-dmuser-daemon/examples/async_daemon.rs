//! A RAM-disk daemon written with the std-only async API: `async_daemon <endpoint> <size-bytes>
//! [workers]`. One channel; its requests are handed to a pool of worker threads, which reply
//! out of order through a `Responder`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use userdm_dmuser_daemon::{
    block_on, endpoint_path, handle, AsyncChannel, MemoryDisk, Request, Status,
};
use userdm_io::IoOp;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: async_daemon <endpoint> <size-bytes> [workers]");
        return ExitCode::from(2);
    }
    let path = if args[1].contains('/') {
        PathBuf::from(&args[1])
    } else {
        endpoint_path(&args[1])
    };
    let Ok(size) = args[2].parse::<usize>() else {
        eprintln!("async_daemon: invalid size '{}'", args[2]);
        return ExitCode::from(2);
    };
    let workers = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(4usize);
    let channel = match AsyncChannel::connect(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("async_daemon: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let disk = Arc::new(MemoryDisk::new(size));
    let (tx, rx) = mpsc::channel::<Request>();
    let rx = Arc::new(Mutex::new(rx));
    let pool: Vec<_> = (0..workers)
        .map(|_| {
            let (rx, disk, responder) = (Arc::clone(&rx), Arc::clone(&disk), channel.responder());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                loop {
                    let Ok(req) = rx.lock().map_err(drop).and_then(|r| r.recv().map_err(drop))
                    else {
                        return;
                    };
                    let status = handle(&*disk, &req, &mut buf);
                    let data: &[u8] = if status == Status::Success && req.op() == Some(IoOp::Read) {
                        &buf
                    } else {
                        &[]
                    };
                    if responder.reply(req.header.seq, status, data).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    let served = block_on(async {
        let mut n = 0u64;
        while let Ok(Some(req)) = channel.next_request().await {
            if tx.send(req).is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    drop(tx);
    for w in pool {
        let _ = w.join();
    }
    eprintln!("async_daemon: target removed after {served} requests");
    ExitCode::SUCCESS
}
