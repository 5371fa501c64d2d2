//! Steady-state IO through the export allocates nothing: a counting global allocator sees no
//! allocation while reads, writes (aligned and read-modify-write), fsyncs and fallocates are
//! served. Its own test binary, so no other test allocates meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{fuse_available, TempDir};
use userdm_fuse::mem::MemDevice;
use userdm_fuse::{FuseExport, FuseOptions};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the counter has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as `dealloc`, and the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn round(file: &std::fs::File, buf: &mut [u8], i: u64) {
    let offset = (i * 7919 * 512) % (8 << 20);
    file.write_at(&buf[..4096], offset).unwrap();
    file.write_at(&buf[..1000], offset + 3).unwrap(); // read-modify-write
    file.read_at(&mut buf[..5000], offset + 1).unwrap();
    file.read_at(&mut buf[..65536], offset).unwrap();
    if i % 16 == 0 {
        file.sync_data().unwrap();
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let res = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64 + 100,
                9000,
            )
        };
        assert_eq!(res, 0);
    }
}

#[test]
fn serving_requests_allocates_nothing() {
    if !fuse_available("serving_requests_allocates_nothing") {
        return;
    }
    let dir = TempDir::new("noalloc");
    let dev = Arc::new(MemDevice::new(16 << 20));
    let h = FuseExport::start(dev, dir.join("disk.img"), FuseOptions::default()).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(h.path())
        .unwrap();
    let mut buf = vec![0x5au8; 65536];
    // Warm up: lazily made thread-locals and the like are allowed once.
    for i in 0..200 {
        round(&file, &mut buf, i);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let requests_before = h.stats().requests;
    for i in 0..2000 {
        round(&file, &mut buf, i);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let requests = h.stats().requests - requests_before;
    assert!(requests >= 8000, "{requests} requests");
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in {requests} requests"
    );
}
