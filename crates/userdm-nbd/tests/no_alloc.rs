//! Serving requests allocates nothing: a counting allocator watches the connection's thread
//! while a client writes and reads, with simple and with structured replies.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use userdm_nbd::handshake::{MetaContexts, Negotiated};
use userdm_nbd::proto::{CommandFlags, CommandType, HeaderStyle, ReplyHeader, Request};
use userdm_nbd::{export_info, serve_connection, MemBackend, ServerConfig, Stream};

thread_local! {
    /// Set on the server's thread only.
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}
static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: defers to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: thread-locals may be gone during thread teardown.
        if ARMED.load(Ordering::Relaxed) && SERVER_THREAD.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn round_trips(s: &mut UnixStream, count: u64) {
    let data = vec![0x5au8; 65536];
    for i in 0..count {
        let offset = (i % 16) * 65536;
        for (command, len) in [
            (CommandType::WRITE, 65536),
            (CommandType::READ, 65536),
            (CommandType::FLUSH, 0),
        ] {
            let req = Request {
                flags: CommandFlags::empty(),
                command,
                cookie: i,
                offset,
                length: len,
            };
            let req = if command == CommandType::FLUSH {
                Request { offset: 0, ..req }
            } else {
                req
            };
            let mut h = [0u8; 28];
            req.encode(HeaderStyle::Compact, &mut h).unwrap();
            s.write_all(&h).unwrap();
            if command == CommandType::WRITE {
                s.write_all(&data).unwrap();
            }
            let mut magic = [0u8; 4];
            s.read_exact(&mut magic).unwrap();
            let n = ReplyHeader::bytes_for_magic(u32::from_be_bytes(magic)).unwrap();
            let mut rest = vec![0u8; n];
            rest[..4].copy_from_slice(&magic);
            s.read_exact(&mut rest[4..]).unwrap();
            let payload = match ReplyHeader::decode(&rest).unwrap().0 {
                ReplyHeader::Simple(r) => {
                    assert_eq!(r.error, 0);
                    if command == CommandType::READ {
                        65536
                    } else {
                        0
                    }
                }
                ReplyHeader::Chunk(_, c) => c.length as usize,
            };
            let mut body = vec![0u8; payload];
            s.read_exact(&mut body).unwrap();
        }
    }
}

fn check(structured: bool) {
    let mem = Arc::new(MemBackend::new(1 << 20));
    let info = export_info("mem", "", &*mem);
    let negotiated = Negotiated {
        flags: info.transmission_flags(structured),
        export: mem,
        info,
        structured,
        extended: false,
        meta_contexts: MetaContexts::default(),
        no_zeroes: true,
        block_sizes_agreed: true,
    };
    let (mut client, server) = UnixStream::pair().unwrap();
    let config = ServerConfig {
        queue_depth: 4,
        buffer_bytes: 128 << 10,
        ..ServerConfig::default()
    };
    let thread = std::thread::spawn(move || {
        SERVER_THREAD.with(|t| t.set(true));
        serve_connection(Stream::Unix(server), negotiated, &config)
    });
    // Warm up: the backend allocates its pages, every tag serves at least once. Counting here
    // proves the counter sees the server's thread (the backend's first writes allocate pages).
    ALLOCATIONS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    round_trips(&mut client, 32);
    ARMED.store(false, Ordering::SeqCst);
    if !structured {
        assert!(
            ALLOCATIONS.load(Ordering::SeqCst) > 0,
            "the counter saw nothing"
        );
    }
    ALLOCATIONS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    round_trips(&mut client, 200);
    ARMED.store(false, Ordering::SeqCst);
    let counted = ALLOCATIONS.load(Ordering::SeqCst);
    drop(client);
    thread.join().unwrap().unwrap();
    assert_eq!(
        counted, 0,
        "allocations while serving (structured: {structured})"
    );
}

#[test]
fn serving_requests_allocates_nothing() {
    // One test function: the counter is global, so the two runs must not overlap.
    check(false);
    check(true);
}
