//! Fault behaviour: error, zero, flakey (each feature, on an injected clock), dust (messages and
//! bad blocks), striped (dead stripes), delay (holding and releasing IO), memory (allocation).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{disk, join, pattern, table, Client};
use userdm_io::{Errno, IoError, IoFlags, IoOp};
use userdm_table::MessageError;
use userdm_targets::{AnyTarget, ManualClock, TargetContext};
use userdm_uring::Reactor;

const EIO: Result<(), IoError> = Err(IoError::Failed(Errno::EIO));

fn eio<T: std::fmt::Debug>(r: Result<T, IoError>) {
    match r {
        Err(IoError::Failed(e)) if e == Errno::EIO => {}
        other => panic!("expected EIO, got {other:?}"),
    }
}

#[test]
fn error_fails_every_operation() {
    let a = disk(1 << 16, 0);
    let rt = Reactor::new(8).unwrap();
    for text in ["0 16 error".to_string(), format!("0 16 error {} 0", a.path)] {
        let t = table(&TargetContext::new(), &text);
        let c = Client { rt: &rt, table: &t };
        eio(c.read(0, 8));
        eio(c.write(0, &[7u8; 512]));
        eio(c.flush());
        for op in [IoOp::Discard, IoOp::WriteZeroes, IoOp::SecureErase] {
            assert_eq!(c.op(op, 0, 8, IoFlags::empty()), EIO, "{op}");
        }
    }
}

#[test]
fn zero_reads_zeros_and_drops_writes() {
    let t = table(&TargetContext::new(), "0 16 zero");
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    c.write(0, &[9u8; 4096]).unwrap();
    assert_eq!(c.read(0, 16).unwrap(), vec![0u8; 8192]);
    c.flush().unwrap();
    c.op(IoOp::Discard, 0, 16, IoFlags::empty()).unwrap();
    c.op(IoOp::WriteZeroes, 0, 16, IoFlags::empty()).unwrap();
    // As the kernel: read-ahead of zeros fails rather than fill the page cache.
    eio(c.read_flags(0, 8, IoFlags::RAHEAD));
}

/// A flakey row over a 64 KiB file full of 0x5A, up 1 s then down 1 s, on a manual clock.
struct FlakeyRig {
    rt: Reactor,
    clock: Arc<ManualClock>,
    table: userdm_table::Table<AnyTarget>,
    _disk: common::Disk,
}

impl FlakeyRig {
    fn new(features: &str) -> FlakeyRig {
        let d = disk(1 << 16, 0x5A);
        let clock = Arc::new(ManualClock::new());
        let ctx = TargetContext::new().with_clock(clock.clone());
        let table = table(&ctx, &format!("0 128 flakey {} 0 1 1 {features}", d.path));
        FlakeyRig {
            rt: Reactor::new(8).unwrap(),
            clock,
            table,
            _disk: d,
        }
    }

    fn client(&self) -> Client<'_> {
        Client {
            rt: &self.rt,
            table: &self.table,
        }
    }

    /// Moves into the next interval (up → down → up ...).
    fn tick(&self) {
        self.clock.advance(Duration::from_secs(1));
    }
}

#[test]
fn flakey_without_features_fails_everything_while_down() {
    let rig = FlakeyRig::new("");
    let c = rig.client();
    c.write(0, &[1u8; 512]).unwrap();
    rig.tick();
    eio(c.read(0, 1));
    eio(c.write(0, &[2u8; 512]));
    eio(c.flush());
    assert_eq!(c.op(IoOp::Discard, 0, 8, IoFlags::empty()), EIO);
    rig.tick();
    assert_eq!(
        c.read(0, 1).unwrap(),
        vec![1u8; 512],
        "up again, data intact"
    );
    // The cycle repeats from construction: 1 s up, 1 s down.
    rig.tick();
    eio(c.read(0, 1));
}

#[test]
fn flakey_drop_writes_acknowledges_and_forgets() {
    let rig = FlakeyRig::new("1 drop_writes");
    let c = rig.client();
    rig.tick();
    c.write(0, &[3u8; 1024]).unwrap();
    c.flush().unwrap();
    c.op(IoOp::Discard, 0, 8, IoFlags::empty()).unwrap();
    assert_eq!(
        c.read(0, 2).unwrap(),
        vec![0x5A; 1024],
        "reads work while down"
    );
    rig.tick();
    assert_eq!(
        c.read(0, 2).unwrap(),
        vec![0x5A; 1024],
        "the write never landed"
    );
}

#[test]
fn flakey_error_writes_fails_writes_only() {
    let rig = FlakeyRig::new("1 error_writes");
    let c = rig.client();
    rig.tick();
    eio(c.write(0, &[3u8; 512]));
    eio(c.flush());
    assert_eq!(c.read(0, 1).unwrap(), vec![0x5A; 512]);
}

#[test]
fn flakey_error_reads_fails_reads_only() {
    let rig = FlakeyRig::new("1 error_reads");
    let c = rig.client();
    rig.tick();
    eio(c.read(0, 1));
    c.write(0, &[4u8; 512]).unwrap();
    rig.tick();
    assert_eq!(
        c.read(0, 1).unwrap(),
        vec![4u8; 512],
        "writes went through while down"
    );
}

#[test]
fn flakey_corrupts_one_byte_of_reads() {
    let rig = FlakeyRig::new("5 corrupt_bio_byte 32 r 1 0");
    let c = rig.client();
    assert_eq!(c.read(0, 1).unwrap(), vec![0x5A; 512], "up: untouched");
    rig.tick();
    let got = c.read(0, 2).unwrap();
    let mut want = vec![0x5A; 1024];
    want[31] = 1;
    assert_eq!(got, want);
    c.write(0, &[6u8; 512]).unwrap();
    rig.tick();
    assert_eq!(
        c.read(0, 1).unwrap(),
        vec![6u8; 512],
        "writes are not corrupted"
    );
}

#[test]
fn flakey_corrupts_writes_in_a_copy() {
    let rig = FlakeyRig::new("5 corrupt_bio_byte 1 W 255 0");
    let c = rig.client();
    rig.tick();
    // `Client::write` also checks that the caller's buffer is left alone.
    c.write(4, &[7u8; 512]).unwrap();
    assert_eq!(c.read(4, 1).unwrap(), [&[255u8][..], &[7u8; 511]].concat());
}

#[test]
fn flakey_corrupts_only_requests_with_the_flags() {
    // 131072 is the kernel's REQ_FUA (bit 17).
    let rig = FlakeyRig::new("5 corrupt_bio_byte 1 w 0 131072");
    let c = rig.client();
    rig.tick();
    c.write(0, &[8u8; 512]).unwrap();
    assert_eq!(c.read(0, 1).unwrap(), vec![8u8; 512]);
    c.write_flags(0, &[9u8; 512], IoFlags::FUA).unwrap();
    assert_eq!(c.read(0, 1).unwrap(), [&[0u8][..], &[9u8; 511]].concat());
}

#[test]
fn flakey_random_corruption() {
    let rig = FlakeyRig::new("4 random_read_corrupt 1000000000 random_write_corrupt 1000000000");
    let c = rig.client();
    let data = pattern(1, 4096);
    c.write(0, &data).unwrap();
    rig.tick();
    let differing = |got: &[u8], want: &[u8]| got.iter().zip(want).filter(|(a, b)| a != b).count();
    let mut corrupted_reads = 0;
    for _ in 0..20 {
        let got = c.read(0, 8).unwrap();
        let n = differing(&got, &data);
        assert!(n <= 1, "a read differs in {n} bytes");
        corrupted_reads += n;
    }
    assert!(
        corrupted_reads > 0,
        "a 100% corruption rate never corrupted"
    );
    let mut corrupted_writes = 0;
    for i in 0..20 {
        let block = pattern(100 + i, 512);
        c.write(16, &block).unwrap(); // down: maybe corrupted on the way
        rig.tick(); // up: read back what landed
        let n = differing(&c.read(16, 1).unwrap(), &block);
        assert!(n <= 1);
        corrupted_writes += n;
        rig.tick(); // down again
    }
    assert!(corrupted_writes > 0);
}

/// The blktests dm/002 sequence, with its golden output, then bad-block IO.
#[test]
fn dust_messages_match_the_kernel() {
    let d = disk(1 << 20, 0);
    let t = table(
        &TargetContext::new(),
        &format!("0 2048 dust {} 0 512", d.path),
    );
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    let mut out = Vec::new();
    let mut say = |m: &str| {
        if let Some(reply) = c.message(m).unwrap() {
            out.push(reply);
        }
    };
    say("addbadblock 60");
    say("addbadblock 67");
    say("addbadblock 72");
    say("countbadblocks");
    say("listbadblocks");
    say("clearbadblocks");
    say("countbadblocks");
    say("addbadblock 60");
    say("addbadblock 67");
    say("addbadblock 72");
    say("countbadblocks");
    say("enable");
    assert_eq!(
        out,
        vec![
            "countbadblocks: 3 badblock(s) found",
            "60\n67\n72\n",
            "dust_clear_badblocks: badblocks cleared",
            "countbadblocks: 0 badblock(s) found",
            "countbadblocks: 3 badblock(s) found",
        ]
    );
    // dd if=/dev/zero count=128: every write heals the bad block it lands on.
    for block in 0..128 {
        c.write(block, &[0u8; 512]).unwrap();
    }
    assert_eq!(
        c.message("countbadblocks").unwrap().as_deref(),
        Some("countbadblocks: 0 badblock(s) found")
    );
}

#[test]
fn dust_message_errors_match_the_kernel() {
    let d = disk(1 << 20, 0);
    // 1 MiB of 4096-byte blocks: blocks 0..=256 are accepted (the kernel checks `> size`).
    let t = table(
        &TargetContext::new(),
        &format!("0 2048 dust {} 0 4096", d.path),
    );
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    let invalid = |m: &str| match c.message(m) {
        Err(MessageError::Invalid(s)) => s,
        other => panic!("{m}: {other:?}"),
    };
    assert_eq!(
        c.message("listbadblocks").unwrap().unwrap(),
        "No blocks in badblocklist"
    );
    assert_eq!(
        c.message("clearbadblocks").unwrap().unwrap(),
        "dust_clear_badblocks: no badblocks found"
    );
    assert_eq!(c.message("addbadblock 256").unwrap(), None);
    assert_eq!(
        invalid("addbadblock 257"),
        "selected block value out of range"
    );
    assert_eq!(
        invalid("addbadblock 256"),
        "dust_add_block: block 256 already in badblocklist"
    );
    assert_eq!(
        c.message("queryblock 256").unwrap().unwrap(),
        "dust_query_block: block 256 found in badblocklist"
    );
    assert_eq!(
        c.message("QueryBlock 5").unwrap().unwrap(),
        "dust_query_block: block 5 not found in badblocklist"
    );
    assert_eq!(c.message("removebadblock 256").unwrap(), None);
    assert_eq!(
        invalid("removebadblock 256"),
        "dust_remove_block: block 256 not found in badblocklist"
    );
    assert_eq!(
        invalid("addbadblock"),
        "addbadblock requires an additional argument"
    );
    assert_eq!(
        invalid("queryblock"),
        "queryblock requires an additional argument"
    );
    assert_eq!(invalid("bogus"), "unrecognized message 'bogus' received");
    assert_eq!(invalid("bogus 1"), "unrecognized message 'bogus' received");
    assert_eq!(
        invalid("queryblock 1 2"),
        "unrecognized message 'queryblock' received"
    );
    assert_eq!(
        invalid("addbadblock 1 256"),
        "selected write fail count out of range"
    );
    assert_eq!(invalid("a b c d"), "invalid number of arguments '4'");
    assert_eq!(invalid("addbadblock x"), "invalid block 'x'");
    let status = |c: &Client<'_>| c.table.status_lines().remove(0);
    assert_eq!(status(&c), format!("0 2048 dust {} bypass verbose", d.path));
    c.message("quiet").unwrap();
    c.message("enable").unwrap();
    assert_eq!(
        status(&c),
        format!("0 2048 dust {} fail_read_on_bad_block quiet", d.path)
    );
    c.message("quiet").unwrap();
    c.message("disable").unwrap();
    assert_eq!(status(&c), format!("0 2048 dust {} bypass verbose", d.path));
}

#[test]
fn dust_bad_blocks_fail_reads_and_heal_on_write() {
    // Blocks of 8 sectors of the backing file; the row starts one block into it, so row sector
    // 0 is in backing block 1.
    let d = disk(1 << 20, 0);
    let t = table(
        &TargetContext::new(),
        &format!("0 1024 dust {} 8 4096", d.path),
    );
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    c.message("addbadblock 1").unwrap();
    c.message("addbadblock 3 2").unwrap();
    assert!(c.read(0, 8).is_ok(), "disabled: bad blocks read fine");
    c.message("enable").unwrap();
    eio(c.read(0, 1));
    eio(c.read(7, 1));
    eio(c.read(4, 16)); // spans blocks 1 and 2
    assert!(c.read(8, 8).is_ok(), "block 2 is good");
    // A write to block 1 succeeds and removes it.
    c.write(0, &[1u8; 512]).unwrap();
    assert_eq!(c.read(0, 1).unwrap(), vec![1u8; 512]);
    assert_eq!(c.message("listbadblocks").unwrap().unwrap(), "3\n");
    // Block 3 (row sectors 16..24) fails two writes, then heals.
    eio(c.write(16, &[2u8; 512]));
    eio(c.write(16, &[2u8; 512]));
    c.write(16, &[2u8; 512]).unwrap();
    assert_eq!(c.read(16, 1).unwrap(), vec![2u8; 512]);
    assert_eq!(
        c.message("countbadblocks").unwrap().unwrap(),
        "countbadblocks: 0 badblock(s) found"
    );
    // A multi-block write over a failing block: the other blocks are still written.
    c.message("addbadblock 5 1").unwrap();
    let data = pattern(5, 24 * 512);
    eio(c.write(24, &data)); // row blocks 3, 4, 5: backing blocks 4, 5, 6
    eio(c.read(32, 1)); // block 5 is still bad, with no write failures left
    c.message("disable").unwrap();
    let got = c.read(24, 24).unwrap();
    assert_eq!(got[..4096], data[..4096]);
    assert_eq!(got[8192..], data[8192..]);
    assert_eq!(
        got[4096..8192],
        [0u8; 4096],
        "the failed block was not written"
    );
    // Discards count as writes, as in the kernel.
    c.message("enable").unwrap();
    c.op(IoOp::Discard, 32, 8, IoFlags::empty()).unwrap();
    assert_eq!(
        c.message("countbadblocks").unwrap().unwrap(),
        "countbadblocks: 0 badblock(s) found"
    );
}

#[test]
fn striped_marks_a_failed_stripe_dead() {
    let a = disk(1 << 16, 0);
    let b = disk(1 << 16, 0);
    let events = Arc::new(AtomicUsize::new(0));
    let seen = events.clone();
    let ctx = TargetContext::new().with_event_hook(Arc::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    }));
    // Three stripes, the first and third on the same file, as the kernel allows.
    let t = table(
        &ctx,
        &format!(
            "0 96 striped 3 8 {a} 0 {b} 0 {a} 32",
            a = a.path,
            b = b.path
        ),
    );
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    // A second table over the same files, for read-ahead below.
    let t2 = table(
        &TargetContext::new(),
        &format!("0 16 striped 2 8 {a} 0 {b} 0", a = a.path, b = b.path),
    );
    let status = || t.status_lines().remove(0);
    let names = format!("{} {} {}", a.path, b.path, a.path);
    assert_eq!(status(), format!("0 96 striped 3 {names} 1 AAA"));
    c.write(0, &pattern(1, 96 * 512)).unwrap();
    // Take stripe 1's file away: reads from it hit end of file.
    b.file.as_file().set_len(0).unwrap();
    assert!(c.read(0, 8).is_ok(), "chunk 0 is on stripe 0");
    eio(c.read(8, 8));
    assert_eq!(status(), format!("0 96 striped 3 {names} 1 ADA"));
    assert_eq!(events.load(Ordering::SeqCst), 1);
    // Read-ahead failures do not count.
    let c2 = Client {
        rt: &rt,
        table: &t2,
    };
    eio(c2.read_flags(8, 8, IoFlags::RAHEAD));
    assert!(t2.status_lines()[0].ends_with(" 1 AA"));
    // A device shared by two stripes dies for both.
    a.file.as_file().set_len(0).unwrap();
    eio(c.read(0, 8));
    assert_eq!(status(), format!("0 96 striped 3 {names} 1 DDD"));
}

#[test]
fn delay_holds_io_for_its_class() {
    let a = disk(1 << 16, 0);
    let t = table(
        &TargetContext::new(),
        &format!("0 64 delay {p} 0 0 {p} 0 150 {p} 0 0", p = a.path),
    );
    let rt = Reactor::new(8).unwrap();
    let status = || t.status_lines().remove(0);
    let started = Instant::now();
    let mut buf = vec![5u8; 512];
    let write = common::header(IoOp::Write, 0, 1);
    let (result, seen) = rt.block_on(join(t.io(&rt, write, &mut buf), async {
        rt.sleep(Duration::from_millis(40)).await;
        status()
    }));
    result.unwrap();
    let took = started.elapsed();
    assert_eq!(seen, "0 64 delay 0 1 0", "one write held");
    assert!(took >= Duration::from_millis(140), "took {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(status(), "0 64 delay 0 0 0");
    // Reads have no delay here.
    let c = Client { rt: &rt, table: &t };
    let started = Instant::now();
    assert_eq!(c.read(0, 1).unwrap(), vec![5u8; 512]);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn delay_presuspend_releases_held_io() {
    let a = disk(1 << 16, 0);
    let t = table(
        &TargetContext::new(),
        &format!("0 64 delay {} 0 10000", a.path),
    );
    let rt = Reactor::new(8).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let read = common::header(IoOp::Read, 0, 8);
    let (result, seen) = rt.block_on(join(t.io(&rt, read, &mut buf), async {
        rt.sleep(Duration::from_millis(30)).await;
        let seen = t.status_lines().remove(0);
        t.presuspend(false);
        seen
    }));
    result.unwrap();
    assert_eq!(seen, "0 64 delay 1 0 0");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held IO was not released"
    );
    // Until resume, nothing is held.
    let c = Client { rt: &rt, table: &t };
    let started = Instant::now();
    c.flush().unwrap();
    c.read(0, 1).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(t.status_lines(), vec!["0 64 delay 0 0 0"]);
}

#[test]
fn delay_presuspend_from_another_thread_wakes_the_reactor() {
    let a = disk(1 << 16, 0);
    let t = Arc::new(table(
        &TargetContext::new(),
        &format!("0 64 delay {} 0 10000", a.path),
    ));
    let rt = Reactor::new(8).unwrap();
    let control = {
        let t = t.clone();
        std::thread::spawn(move || {
            // Wait until the request is held, then suspend from this (control) thread.
            let deadline = Instant::now() + Duration::from_secs(5);
            while t.status_lines()[0] != "0 64 delay 0 1 0" && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            t.presuspend(true);
        })
    };
    let started = Instant::now();
    let mut buf = vec![1u8; 512];
    rt.block_on(t.io(&rt, common::header(IoOp::Write, 0, 1), &mut buf))
        .unwrap();
    control.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    // After resume, IO is delayed again.
    t.resume();
    let started = Instant::now();
    let (result, seen) = rt.block_on(join(
        t.io(&rt, common::header(IoOp::Flush, 0, 0), &mut []),
        async {
            rt.sleep(Duration::from_millis(30)).await;
            let seen = t.status_lines().remove(0);
            t.presuspend(false);
            seen
        },
    ));
    result.unwrap();
    assert_eq!(
        seen, "0 64 delay 0 0 1",
        "flushes are held in their own class"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn memory_allocates_lazily_and_frees_on_discard() {
    let t = table(
        &TargetContext::new(),
        "0 1024 memory 4 chunk_bytes 4096 max_allocated_bytes 16384",
    );
    let AnyTarget::Memory(m) = &t.rows()[0].target else {
        panic!("not memory");
    };
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    let status = || t.status_lines().remove(0);
    assert_eq!(status(), "0 1024 memory 0 524288");
    c.write(0, &[0u8; 4096]).unwrap();
    assert_eq!(m.allocated_bytes(), 0, "zeros into nothing stay nothing");
    c.write(9, &[1u8; 512]).unwrap(); // chunk 1
    assert_eq!(status(), "0 1024 memory 4096 524288");
    assert!(!m.is_allocated(0, 4096));
    assert!(m.is_allocated(0, 8192));
    let ext = m.allocation_extent(0, 1 << 20);
    assert_eq!((ext.allocated, ext.len_bytes), (false, 4096));
    let ext = m.allocation_extent(4096, 1 << 20);
    assert_eq!((ext.allocated, ext.len_bytes), (true, 4096));
    let ext = m.allocation_extent(8192, 1 << 20);
    assert_eq!((ext.allocated, ext.len_bytes), (false, 524288 - 8192));
    assert_eq!(
        t.rows()[0]
            .target
            .allocation_extent(4096, 100)
            .map(|e| e.len_bytes),
        Some(100)
    );
    // The limit: 4 chunks in all.
    for chunk in 2..5u64 {
        c.write(chunk * 8, &[2u8; 512]).unwrap();
    }
    assert_eq!(
        c.write(5 * 8, &[3u8; 512]),
        Err(IoError::Failed(Errno::ENOSPC))
    );
    // Zeroing without unmap keeps the chunk; discard frees it.
    c.op(IoOp::WriteZeroes, 8, 8, IoFlags::NOUNMAP).unwrap();
    assert_eq!(m.allocated_bytes(), 16384);
    assert_eq!(c.read(8, 8).unwrap(), vec![0u8; 4096]);
    c.op(IoOp::Discard, 8, 8, IoFlags::empty()).unwrap();
    assert_eq!(m.allocated_bytes(), 12288);
    // A partial discard zeroes in place.
    c.op(IoOp::Discard, 16, 1, IoFlags::empty()).unwrap();
    assert_eq!(m.allocated_bytes(), 12288);
    assert_eq!(c.read(16, 1).unwrap(), vec![0u8; 512]);
    c.write(5 * 8, &[3u8; 512]).unwrap();
}

#[test]
fn memory_serves_several_threads_at_once() {
    let t = Arc::new(table(
        &TargetContext::new(),
        "0 8192 memory 2 chunk_bytes 4096",
    ));
    let threads: Vec<_> = (0..4u64)
        .map(|id| {
            let t = t.clone();
            std::thread::spawn(move || {
                let rt = Reactor::new(8).unwrap();
                let c = Client { rt: &rt, table: &t };
                // Racing writes to shared sectors in the upper half (any winner is fine) ...
                for round in 0..200u64 {
                    let sector = 4096 + (round * 7 + id) % 4000;
                    c.write(sector, &pattern(id * 1000 + round, 512)).unwrap();
                }
                // ... and interleaved 3-sector writes in the lower half: neighbours share
                // chunks, never sectors.
                for i in 0..256u64 {
                    let sector = (i * 12 + id * 3) % 8190;
                    c.write(sector, &pattern(id << 32 | i, 1536)).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // The lower half holds each thread's last writes: check them.
    let rt = Reactor::new(8).unwrap();
    let c = Client { rt: &rt, table: &t };
    for id in 0..4u64 {
        for i in 0..256u64 {
            let sector = (i * 12 + id * 3) % 8190;
            assert_eq!(c.read(sector, 3).unwrap(), pattern(id << 32 | i, 1536));
        }
    }
}
