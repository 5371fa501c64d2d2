//! Allocation through the table: each target's answer, device-relative and cut at row ends.

mod common;

use std::os::unix::fs::FileExt;

use common::{table, Client};
use userdm_table::Allocation;
use userdm_targets::TargetContext;
use userdm_uring::Reactor;

/// Walks the whole device and returns the runs (merging equal neighbours), as `nbdinfo --map`.
fn map(t: &userdm_table::Table<userdm_targets::AnyTarget>) -> Vec<(u64, bool, bool)> {
    let size = t.size_sectors() * 512;
    let mut runs: Vec<(u64, bool, bool)> = Vec::new();
    let mut at = 0;
    while at < size {
        let a = t.allocation(at, size - at).unwrap();
        assert!(a.len_bytes > 0 && a.len_bytes <= size - at);
        match runs.last_mut() {
            Some((len, hole, zero)) if (*hole, *zero) == (a.hole, a.zero) => *len += a.len_bytes,
            _ => runs.push((a.len_bytes, a.hole, a.zero)),
        }
        at += a.len_bytes;
    }
    runs
}

#[test]
fn every_target_reports_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[9u8; 65536], 256 << 10).unwrap();
    let file_has_holes = {
        // Only filesystems that track holes can show them (tmpfs, ext4, xfs, btrfs do).
        let ctx = TargetContext::new();
        let probe = table(&ctx, &format!("0 2048 linear {} 0", path.display()));
        probe.allocation(0, 4096).unwrap().hole
    };
    let ctx = TargetContext::new();
    // 1 MiB linear onto the file, 64 KiB zero, 256 KiB memory, 4 KiB error.
    let t = table(
        &ctx,
        &format!(
            "0 2048 linear {p} 0\n2048 128 zero\n2176 512 memory 2 chunk_bytes 4096\n2688 8 error\n",
            p = path.display()
        ),
    );
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    c.write(2176 + 16, &[1u8; 4096]).unwrap(); // memory chunk 2
    let runs = map(&t);
    let mut want = Vec::new();
    if file_has_holes {
        want.extend([(256 << 10, true, true), (64 << 10, false, false)]);
        // Then the file's tail hole, the zero row and the memory's first two chunks: one run.
        want.push(((1 << 20) - (320 << 10) + (64 << 10) + 8192, true, true));
    } else {
        want.push((1 << 20, false, false));
        want.push(((64 << 10) + 8192, true, true));
    }
    want.push((4096, false, false)); // the written memory chunk
    want.push(((256 << 10) - 12288, true, true));
    want.push((4096, false, false)); // error rows are data
    assert_eq!(runs, want);
    // Answers stop at row ends, so callers ask again for the next row.
    assert_eq!(
        t.allocation(1024 * 512, 1 << 30).unwrap().len_bytes,
        1024 * 512
    );
    assert_eq!(
        t.allocation(2048 * 512, 1 << 30),
        Some(Allocation::hole(65536))
    );
}

#[test]
fn striped_asks_each_chunks_stripe() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    // Data on stripe b only: chunk 1 of the row (chunks are 64 KiB).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .write_all_at(&[5u8; 65536], 0)
        .unwrap();
    let ctx = TargetContext::new();
    let t = table(
        &ctx,
        &format!("0 1024 striped 2 128 {} 0 {} 0", a.display(), b.display()),
    );
    let first = t.allocation(0, 1 << 20).unwrap();
    if !first.hole {
        eprintln!("skipped: the temporary directory's filesystem reports no holes");
        return;
    }
    assert_eq!(first, Allocation::hole(65536), "cut at the chunk's end");
    assert_eq!(t.allocation(65536, 1 << 20), Some(Allocation::data(65536)));
    assert_eq!(t.allocation(131072, 4096), Some(Allocation::hole(4096)));
}
