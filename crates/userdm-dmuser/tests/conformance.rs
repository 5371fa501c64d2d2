//! Conformance of the `user` target to dm-user's protocol, driven through a
//! `Table<UserTarget>` with hand-written daemons on real sockets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use userdm_dmuser::wire::*;
use userdm_dmuser::UserTarget;
use userdm_io::{Errno, IoError, IoFlags, IoOp};
use userdm_table::Table;

#[test]
fn endpoint_exists_from_construction_to_drop() {
    let f = fixture("0 1024 user 0 1024 ctl");
    let meta = std::fs::symlink_metadata(f.path("ctl")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(f.table.table_lines(), vec!["0 1024 user 0 1024 ctl"]);
    let path = f.path("ctl");
    let mut daemon = f.connect("ctl");
    drop(f.table);
    // Removal ends the channel: the daemon reads end-of-file (dm-user's ENOTBLK).
    assert!(daemon.closed());
    assert!(!path.exists());
}

#[test]
fn round_trip_with_device_relative_sectors() {
    let f = fixture("0 16 user 0 16 ctl\n16 16 user 0 16 ctl");
    let daemon = mem_daemon(f.path("ctl"), 32 * 512);
    let data = pattern(4096, 7);
    // Spans both rows: two requests, at device sectors 12 and 16.
    let (r, _) = io(&f.table, IoOp::Write, 12, 4096, Some(data.clone())).wait();
    r.unwrap();
    let (r, back) = io(&f.table, IoOp::Read, 12, 4096, None).wait();
    r.unwrap();
    assert_eq!(back, data);
    drop(f.table);
    assert_eq!(daemon.join().unwrap(), 4);
}

#[test]
fn request_fields_on_the_wire() {
    let f = fixture("0 100 user x y ctl2\n100 100 user x y ctl");
    let mut d = f.connect("ctl");
    let w = io_flags(
        &f.table,
        IoOp::Write,
        IoFlags::FUA | IoFlags::SYNC,
        110,
        1024,
        Some(pattern(1024, 1)),
    );
    let (h, payload) = d.read_request();
    assert_eq!(h.kind, DM_USER_REQ_MAP_WRITE);
    assert_eq!(
        h.flags,
        DM_USER_REQ_MAP_FLAG_FUA | DM_USER_REQ_MAP_FLAG_SYNC
    );
    assert_eq!(h.sector, 110, "dm-user sectors are device-relative");
    assert_eq!(h.len, 1024);
    assert_eq!(payload, pattern(1024, 1));
    d.ok(h.seq);
    w.result().unwrap();

    // A flush reaches every row; ours sees sector 0 and no length.
    let mut d2 = f.connect("ctl2");
    let fl = io(&f.table, IoOp::Flush, 0, 0, None);
    let h2 = d2.read_header();
    assert_eq!((h2.kind, h2.sector, h2.len), (DM_USER_REQ_MAP_FLUSH, 0, 0));
    d2.ok(h2.seq);
    let h = d.read_header();
    assert_eq!((h.kind, h.sector, h.len), (DM_USER_REQ_MAP_FLUSH, 0, 0));
    d.ok(h.seq);
    fl.result().unwrap();

    for (op, kind) in [
        (IoOp::Discard, DM_USER_REQ_MAP_DISCARD),
        (IoOp::WriteZeroes, DM_USER_REQ_MAP_WRITE_ZEROES),
        (IoOp::SecureErase, DM_USER_REQ_MAP_SECURE_ERASE),
    ] {
        let p = io(&f.table, op, 150, 8192, None);
        let h = d.read_header();
        assert_eq!((h.kind, h.sector, h.len), (kind, 150, 8192));
        d.reply(h.seq, DM_USER_RESP_UNSUPPORTED, &[]);
        assert_eq!(p.result(), Err(Errno::EOPNOTSUPP.into()));
    }
    let p = io(&f.table, IoOp::Read, 100, 512, None);
    let h = d.read_header();
    d.reply(h.seq, DM_USER_RESP_ERROR, &[]);
    assert_eq!(p.result(), Err(Errno::EIO.into()));
    let p = io(&f.table, IoOp::Read, 100, 512, None);
    let h = d.read_header();
    d.reply(h.seq, 77, &[]);
    assert_eq!(
        p.result(),
        Err(Errno::EIO.into()),
        "any other type is an error"
    );
}

#[test]
fn sequence_numbers_count_from_zero() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    for want in 0..3 {
        let p = io(&f.table, IoOp::Flush, 0, 0, None);
        let h = d.read_header();
        assert_eq!(h.seq, want);
        d.ok(h.seq);
        p.result().unwrap();
    }
}

#[test]
fn daemon_reads_requests_in_pieces_of_any_size() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let data = pattern(3000 & !511, 3);
    for chunk in [1, 2, 3, 5, 7, 13, 39, 40, 41, 100, 511, 4096] {
        let p = io(
            &f.table,
            IoOp::Write,
            8,
            data.len() as u64,
            Some(data.clone()),
        );
        let bytes = d.read_chunked(HEADER_BYTES + data.len(), chunk);
        let h = DmUserMessage::from_bytes(&bytes[..HEADER_BYTES].try_into().unwrap());
        assert_eq!(&bytes[HEADER_BYTES..], &data[..], "chunk {chunk}");
        // Reply split in two at a point that depends on the chunk size.
        let reply = DmUserMessage::reply(h.seq, 0).to_bytes();
        let cut = chunk % HEADER_BYTES;
        d.send(&reply[..cut]);
        std::thread::sleep(Duration::from_micros(300));
        d.send(&reply[cut..]);
        p.result().unwrap();
    }
}

#[test]
fn replies_split_at_every_byte() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let data = pattern(512, 9);
    for cut in 0..=HEADER_BYTES + data.len() {
        let p = io(&f.table, IoOp::Read, 1, 512, None);
        let h = d.read_header();
        let mut reply = DmUserMessage::reply(h.seq, 0).to_bytes().to_vec();
        reply.extend_from_slice(&data);
        d.send(&reply[..cut]);
        std::thread::sleep(Duration::from_micros(200));
        d.send(&reply[cut..]);
        let (r, back) = p.wait();
        r.unwrap();
        assert_eq!(back, data, "cut at {cut}");
    }
    // And one byte per write.
    let p = io(&f.table, IoOp::Read, 1, 512, None);
    let h = d.read_header();
    let mut reply = DmUserMessage::reply(h.seq, 0).to_bytes().to_vec();
    reply.extend_from_slice(&data);
    for b in &reply {
        d.send(std::slice::from_ref(b));
    }
    assert_eq!(p.wait().1, data);
}

#[test]
fn large_requests_stream_through() {
    let f = fixture("0 8192 user 0 8192 ctl");
    let daemon = mem_daemon(f.path("ctl"), 8192 * 512);
    let data = pattern(1 << 20, 5);
    io(&f.table, IoOp::Write, 100, 1 << 20, Some(data.clone()))
        .result()
        .unwrap();
    let (r, back) = io(&f.table, IoOp::Read, 100, 1 << 20, None).wait();
    r.unwrap();
    assert!(back == data);
    drop(f.table);
    daemon.join().unwrap();
}

#[test]
fn replies_out_of_order() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let reads: Vec<_> = (0..3)
        .map(|i| io(&f.table, IoOp::Read, i * 8, 512, None))
        .collect();
    let mut hs: Vec<_> = (0..3).map(|_| d.read_header()).collect();
    hs.sort_by_key(|h| h.sector);
    for (i, h) in hs.iter().enumerate().rev() {
        d.reply(h.seq, 0, &[i as u8 + 1; 512]);
    }
    for (i, p) in reads.into_iter().enumerate() {
        let (r, back) = p.wait();
        r.unwrap();
        assert!(back.iter().all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn requests_spread_over_channels() {
    let f = fixture("0 4096 user 0 4096 ctl");
    let store = Arc::new(std::sync::Mutex::new(vec![0u8; 4096 * 512]));
    let daemons: Vec<_> = (0..3)
        .map(|_| mem_daemon_shared(f.path("ctl"), Arc::clone(&store)))
        .collect();
    eventually("three channels", || {
        f.table.rows()[0].target.channels() == 3
    });
    let writes: Vec<_> = (0..60)
        .map(|i| {
            io(
                &f.table,
                IoOp::Write,
                i * 16,
                8192,
                Some(pattern(8192, i as u8)),
            )
        })
        .collect();
    for w in writes {
        w.result().unwrap();
    }
    for i in 0..60 {
        let (r, back) = io(&f.table, IoOp::Read, i * 16, 8192, None).wait();
        r.unwrap();
        assert!(back == pattern(8192, i as u8));
    }
    drop(f.table);
    let served: Vec<usize> = daemons.into_iter().map(|d| d.join().unwrap()).collect();
    assert_eq!(served.iter().sum::<usize>(), 120);
}

#[test]
fn a_reply_with_an_unknown_seq_fails_the_channel() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut bad = f.connect("ctl");
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let h = bad.read_header();
    bad.reply(h.seq + 1000, 0, &[]);
    assert!(bad.closed(), "the channel is closed after a protocol error");
    // The request it held goes to the next daemon, unchanged.
    let mut good = f.connect("ctl");
    let h2 = good.read_header();
    assert_eq!((h2.seq, h2.sector, h2.len), (h.seq, h.sector, h.len));
    good.reply(h2.seq, 0, &[4; 512]);
    assert_eq!(p.wait().1, vec![4; 512]);
    assert!(f.status(0).contains("protocol_errors=1"), "{}", f.status(0));
    assert!(f.status(0).contains("requeued=1"), "{}", f.status(0));
}

#[test]
fn replies_only_on_the_channel_that_read_the_request() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut a = f.connect("ctl");
    eventually("channel a", || f.table.rows()[0].target.channels() == 1);
    let mut b = f.connect("ctl");
    eventually("channel b", || f.table.rows()[0].target.channels() == 2);
    let p = io(&f.table, IoOp::Flush, 0, 0, None);
    // Channel a has been idle longest, so it gets the request.
    let h = a.read_header();
    b.ok(h.seq);
    assert!(
        b.closed(),
        "a reply on another channel is an unknown seq there"
    );
    assert!(!p.is_done());
    a.ok(h.seq);
    p.result().unwrap();
}

#[test]
fn a_reply_to_a_request_never_read_fails_the_channel() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    // A WRITE whose header the daemon reads, but not its data: replying is a seq error in
    // dm-user (the message is not on the channel's reply list until it has been read in full).
    let p = io(&f.table, IoOp::Write, 0, 8192, Some(pattern(8192, 2)));
    let h = d.read_header();
    d.ok(h.seq);
    // (A daemon that reads the rest at once races with userdm's check: the check can only see
    // what the daemon has not read yet.)
    eventually("protocol error", || {
        f.status(0).contains("protocol_errors=1")
    });
    assert!(d.closed());
    let mut d2 = f.connect("ctl");
    let (h2, data) = d2.read_request();
    assert_eq!(h2.seq, h.seq);
    assert_eq!(data, pattern(8192, 2));
    d2.ok(h2.seq);
    p.result().unwrap();
}

#[test]
fn garbage_fails_the_channel_and_others_carry_on() {
    let f = fixture("0 64 user 0 64 ctl\n64 64 user 0 64 other");
    let good_other = mem_daemon(f.path("other"), 128 * 512);
    let mut bad = f.connect("ctl");
    eventually("bad channel", || f.table.rows()[0].target.channels() == 1);
    let good = mem_daemon(f.path("ctl"), 128 * 512);
    eventually("good channel", || f.table.rows()[0].target.channels() == 2);
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let _ = bad.read_header();
    bad.send(&[0xa5; 100]);
    assert!(bad.closed());
    p.result().unwrap();
    // The good daemon on the same endpoint, and the other endpoint, keep serving.
    for i in 0..20 {
        io(&f.table, IoOp::Write, i * 6, 512, Some(pattern(512, 1)))
            .result()
            .unwrap();
    }
    drop(f.table);
    assert_eq!(good.join().unwrap(), 12);
    assert_eq!(good_other.join().unwrap(), 9);
}

#[test]
fn a_short_header_then_close_requeues() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let p = io(&f.table, IoOp::Read, 3, 1024, None);
    let h = d.read_header();
    d.send(&DmUserMessage::reply(h.seq, 0).to_bytes()[..20]);
    drop(d);
    let mut d2 = f.connect("ctl");
    let h2 = d2.read_header();
    assert_eq!(h2.seq, h.seq);
    d2.reply(h2.seq, 0, &[9; 1024]);
    assert_eq!(p.wait().1, vec![9; 1024]);
}

#[test]
fn data_after_an_error_reply_is_a_protocol_error() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let h = d.read_header();
    let mut bytes = DmUserMessage::reply(h.seq, DM_USER_RESP_ERROR)
        .to_bytes()
        .to_vec();
    bytes.extend_from_slice(&[0x5a; 512]);
    d.send(&bytes);
    // The error ends the request; the data that follows reads as a header with an unknown seq.
    assert_eq!(p.result(), Err(Errno::EIO.into()));
    assert!(d.closed());
}

#[test]
fn disconnect_mid_request_and_mid_reply_requeues() {
    let f = fixture("0 64 user 0 64 ctl");
    let data = pattern(4096, 8);
    // Mid-request: the daemon read part of a WRITE and died.
    let mut d = f.connect("ctl");
    let w = io(&f.table, IoOp::Write, 16, 4096, Some(data.clone()));
    let _ = d.read_exact(HEADER_BYTES + 100);
    drop(d);
    let mut d = f.connect("ctl");
    let (h, payload) = d.read_request();
    assert_eq!(payload, data);
    d.ok(h.seq);
    w.result().unwrap();
    // Mid-reply: the daemon sent a READ's header and half its data, then died.
    let r = io(&f.table, IoOp::Read, 16, 4096, None);
    let h = d.read_header();
    d.reply(h.seq, 0, &[1; 2048]);
    drop(d);
    let mut d = f.connect("ctl");
    let h2 = d.read_header();
    assert_eq!(h2.seq, h.seq);
    d.reply(h2.seq, 0, &data);
    assert_eq!(r.wait().1, data);
    assert!(f.status(0).contains("requeued=2"), "{}", f.status(0));
}

#[test]
fn on_close_fail_fails_requests_in_flight() {
    let f = fixture("0 64 user 0 64 ctl on_close=fail");
    let mut d = f.connect("ctl");
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let _ = d.read_header();
    drop(d);
    assert_eq!(p.result(), Err(Errno::EIO.into()));
}

#[test]
fn without_a_daemon_io_waits() {
    let f = fixture("0 64 user 0 64 ctl");
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!p.is_done());
    assert!(f.status(0).contains("queued=1"), "{}", f.status(0));
    let _d = mem_daemon(f.path("ctl"), 64 * 512);
    p.result().unwrap();
}

#[test]
fn without_a_daemon_io_times_out() {
    let f = fixture("0 64 user 0 64 ctl timeout_ms=200");
    let start = Instant::now();
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    assert_eq!(p.result(), Err(Errno::EIO.into()));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(f.status(0).contains("timed_out=1"));
    // A daemon that connects in time serves the request; after it dies, requests it held wait
    // for the timeout again before failing.
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let mut d = f.connect("ctl");
    let h = d.read_header();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!p.is_done(), "a connected daemon is never timed out");
    drop(d);
    let _ = h;
    assert_eq!(p.result(), Err(Errno::EIO.into()));
}

#[test]
fn timeout_zero_fails_at_once_without_a_daemon() {
    let f = fixture("0 64 user 0 64 ctl timeout_ms=0");
    let start = Instant::now();
    assert_eq!(
        io(&f.table, IoOp::Flush, 0, 0, None).result(),
        Err(Errno::EIO.into())
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn noflush_presuspend_gives_queued_requests_back() {
    let f = fixture("0 64 user 0 64 ctl");
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    eventually("queued", || f.status(0).contains("queued=1"));
    f.table.presuspend(true);
    assert_eq!(p.result(), Err(IoError::Requeue));
    assert_eq!(
        io(&f.table, IoOp::Flush, 0, 0, None).result(),
        Err(IoError::Requeue)
    );
    // A flush suspend takes nothing back.
    f.table.resume();
    f.table.presuspend(false);
    let p = io(&f.table, IoOp::Flush, 0, 0, None);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!p.is_done());
    let _d = mem_daemon(f.path("ctl"), 64 * 512);
    p.result().unwrap();
}

#[test]
fn requests_a_daemon_holds_stay_through_noflush_suspend() {
    let f = fixture("0 64 user 0 64 ctl");
    let mut d = f.connect("ctl");
    let p = io(&f.table, IoOp::Flush, 0, 0, None);
    let h = d.read_header();
    f.table.presuspend(true);
    d.ok(h.seq);
    p.result().unwrap();
    // ...unless the daemon dies: then they are given back rather than re-queued.
    f.table.resume();
    let p = io(&f.table, IoOp::Flush, 0, 0, None);
    let _ = d.read_header();
    f.table.presuspend(true);
    drop(d);
    assert_eq!(p.result(), Err(IoError::Requeue));
}

#[test]
fn a_small_queue_depth_makes_io_wait_for_slots() {
    let f = fixture("0 1024 user 0 1024 ctl queue_depth=2");
    let daemon = mem_daemon(f.path("ctl"), 1024 * 512);
    let ps: Vec<_> = (0..16)
        .map(|i| {
            io(
                &f.table,
                IoOp::Write,
                i * 8,
                4096,
                Some(pattern(4096, i as u8)),
            )
        })
        .collect();
    for p in ps {
        p.result().unwrap();
    }
    drop(f.table);
    assert_eq!(daemon.join().unwrap(), 16);
}

#[test]
fn dropping_a_request_cancels_it_safely() {
    let f = fixture("0 64 user 0 64 ctl");
    let table = Arc::clone(&f.table);
    let rt = userdm_uring::Reactor::new(8).unwrap();
    // Queued (no daemon yet): dropped before any daemon sees it.
    rt.block_on(async {
        let mut buf = vec![0u8; 512];
        let hdr = userdm_io::IoHeader {
            op: IoOp::Read,
            flags: IoFlags::empty(),
            sector: 0,
            len_bytes: 512,
        };
        let io = table.io(&rt, hdr, &mut buf);
        let sleep = rt.sleep(Duration::from_millis(50));
        race(io, sleep).await;
    });
    assert!(f.status(0).contains("queued=0"), "{}", f.status(0));
    // Held by a daemon: dropped while the daemon works; its late reply goes nowhere and the
    // channel carries on.
    let mut d = f.connect("ctl");
    rt.block_on(async {
        let mut buf = vec![0u8; 4096];
        let hdr = userdm_io::IoHeader {
            op: IoOp::Read,
            flags: IoFlags::empty(),
            sector: 0,
            len_bytes: 4096,
        };
        let io = table.io(&rt, hdr, &mut buf);
        let sleep = rt.sleep(Duration::from_millis(50));
        race(io, sleep).await;
    });
    let h = d.read_header();
    assert_eq!(h.seq, 1);
    d.reply(h.seq, 0, &[3; 4096]);
    // Same for a WRITE the daemon has not read yet: it still gets the data the request had.
    rt.block_on(async {
        let mut buf = pattern(8192, 4);
        let hdr = userdm_io::IoHeader {
            op: IoOp::Write,
            flags: IoFlags::empty(),
            sector: 0,
            len_bytes: 8192,
        };
        let io = table.io(&rt, hdr, &mut buf);
        let sleep = rt.sleep(Duration::from_millis(50));
        race(io, sleep).await;
        buf.fill(0xee);
    });
    let (h, data) = d.read_request();
    assert_eq!(data, pattern(8192, 4));
    d.ok(h.seq);
    let p = io(&f.table, IoOp::Read, 0, 512, None);
    let h = d.read_header();
    d.reply(h.seq, 0, &[6; 512]);
    assert_eq!(p.wait().1, vec![6; 512]);
    eventually("slots freed", || f.status(0).contains("in_flight=0"));
}

/// Polls both futures until either finishes; drops the other.
async fn race<A: std::future::Future, B: std::future::Future>(a: A, b: B) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    })
    .await;
}

#[test]
fn many_requests_on_one_reactor() {
    let f = fixture("0 65536 user 0 65536 ctl");
    let daemon = mem_daemon(f.path("ctl"), 65536 * 512);
    let rt = std::rc::Rc::new(userdm_uring::Reactor::new(64).unwrap());
    let done = std::rc::Rc::new(std::cell::Cell::new(0));
    for task in 0..32u64 {
        let (rt2, table, done) = (rt.clone(), Arc::clone(&f.table), done.clone());
        rt.spawn(async move {
            for i in 0..16u64 {
                let sector = (task * 16 + i) * 8;
                let mut data = pattern(4096, (task + i) as u8);
                let w = userdm_io::IoHeader {
                    op: IoOp::Write,
                    flags: IoFlags::empty(),
                    sector,
                    len_bytes: 4096,
                };
                table.io(&rt2, w, &mut data).await.unwrap();
                let mut back = vec![0; 4096];
                let r = userdm_io::IoHeader {
                    op: IoOp::Read,
                    ..w
                };
                table.io(&rt2, r, &mut back).await.unwrap();
                assert!(back == data);
            }
            done.set(done.get() + 1);
        });
    }
    let (rt2, d2) = (rt.clone(), done.clone());
    rt.block_on(async move {
        while d2.get() < 32 {
            rt2.sleep(Duration::from_millis(1)).await;
        }
    });
    drop(f.table);
    assert_eq!(daemon.join().unwrap(), 32 * 16 * 2);
}

#[test]
fn rows_sharing_an_endpoint_must_agree() {
    let dir = tempdir();
    let e = Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 c\n8 8 user 0 8 c mode=0660")
        .unwrap_err();
    assert!(e.to_string().contains("rows sharing it must agree"), "{e}");
    // Options that are per row may differ.
    Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 c timeout_ms=5\n8 8 user 0 8 c").unwrap();
}

#[test]
fn a_reload_keeps_the_endpoint_and_its_daemons() {
    let dir = tempdir();
    let c = ctx(&dir).with_device("dev0");
    let old = Arc::new(Table::<UserTarget>::parse(&c, "0 64 user 0 64 ctl").unwrap());
    let daemon = mem_daemon(dir.path().join("ctl"), 128 * 512);
    let new = Arc::new(Table::<UserTarget>::parse(&c, "0 128 user 0 128 ctl").unwrap());
    drop(old);
    io(&new, IoOp::Write, 100, 512, Some(vec![1; 512]))
        .result()
        .unwrap();
    // Another device may not use it.
    let other = ctx(&dir).with_device("dev1");
    let e = Table::<UserTarget>::parse(&other, "0 8 user 0 8 ctl").unwrap_err();
    assert!(e.to_string().contains("already used by device dev0"), "{e}");
    drop(new);
    assert_eq!(daemon.join().unwrap(), 1);
}

#[test]
fn stale_sockets_are_replaced_and_other_files_refused() {
    let dir = tempdir();
    let path = dir.path().join("ctl");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let t = Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 ctl").unwrap();
    drop(t);
    std::fs::write(&path, b"not a socket").unwrap();
    let e = Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 ctl").unwrap_err();
    assert!(e.to_string().contains("is not a socket"), "{e}");
    // A live socket of another process is refused too.
    std::fs::remove_file(&path).unwrap();
    let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 ctl").unwrap_err();
    assert!(e.to_string().contains("another process"), "{e}");
}

#[test]
fn the_directory_is_created() {
    let dir = tempdir();
    let sub = dir.path().join("a/b");
    let c = userdm_dmuser::UserTargetContext::new().with_dir(&sub);
    let _t = Table::<UserTarget>::parse(&c, "0 8 user 0 8 ctl").unwrap();
    assert!(sub.join("ctl").exists());
}
