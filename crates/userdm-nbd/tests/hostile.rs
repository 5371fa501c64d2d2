//! Hostile and broken clients: the server answers with the protocol's errors or a clean
//! disconnect, survives, and every other connection keeps working.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Host, Raw, Scratch};
use userdm_nbd::proto::{CommandType, OptionHeader, OptionType, ReplyType};
use userdm_nbd::ServerConfig;

/// Waits until the server has noticed every closed connection.
fn settle(host: &Host, active: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.server.as_ref().unwrap().stats().active != active {
        assert!(
            Instant::now() < deadline,
            "connections did not finish: {:?}",
            host.server.as_ref().unwrap().stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn hostile_clients_do_not_disturb_others() {
    let scratch = Scratch::new("hostile");
    let host = Host::start(&scratch);
    // A well-behaved client stays connected throughout.
    let mut good = Raw::connect(&host.socket);
    good.go("mem");
    good.write_read(0, 1);

    // Bad option magic: hard disconnect.
    let mut c = Raw::connect(&host.socket);
    c.s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert!(c.closed());

    // Unknown client flags: hard disconnect.
    let mut s = std::os::unix::net::UnixStream::connect(&host.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(Raw { s, cookie: 0 }.closed());

    // Unknown option: NBD_REP_ERR_UNSUP, and negotiation goes on.
    let mut c = Raw::connect(&host.socket);
    c.option(OptionType(0x1234), b"junk");
    assert_eq!(c.option_reply().0, ReplyType::ERR_UNSUP);
    c.option(OptionType::STARTTLS, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ERR_POLICY);
    // Oversized option (skippable): TOO_BIG, and negotiation goes on.
    c.option(OptionType::LIST, &vec![0u8; 100 << 10]);
    assert_eq!(c.option_reply().0, ReplyType::ERR_TOO_BIG);
    c.go("mem");
    c.write_read(4096, 2);
    drop(c);

    // An absurd option length: TOO_BIG, then disconnect without reading gigabytes.
    let mut c = Raw::connect(&host.socket);
    c.s.write_all(
        &OptionHeader {
            option: OptionType::GO,
            length: u32::MAX,
        }
        .encode(),
    )
    .unwrap();
    assert_eq!(c.option_reply().0, ReplyType::ERR_TOO_BIG);
    assert!(c.closed());

    // Read and write beyond the end: EINVAL / ENOSPC, and the connection stays usable.
    let mut c = Raw::connect(&host.socket);
    c.go("mem");
    c.request(CommandType::READ, 64 << 20, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, 22);
    c.request(CommandType::READ, u64::MAX - 4095, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, 22);
    c.request(CommandType::WRITE, (64 << 20) - 512, 4096, &[7; 4096]);
    assert_eq!(c.simple_reply(0).0, 28);
    c.request(CommandType(99), 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, 22);
    c.write_read(8192, 3);
    // Then a bad request magic: disconnect.
    c.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(c.closed());

    // A request after ABORT: the connection is already closed.
    let mut c = Raw::connect(&host.socket);
    c.option(OptionType::ABORT, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ACK);
    let _ = c.s.write_all(&[0u8; 28]);
    assert!(c.closed());

    // Writes to a read-only export: EPERM.
    let mut c = Raw::connect(&host.socket);
    c.go("ro");
    c.request(CommandType::WRITE, 0, 512, &[1; 512]);
    assert_eq!(c.simple_reply(0).0, 1);
    c.request(CommandType::TRIM, 0, 512, &[]);
    assert_eq!(c.simple_reply(0).0, 1);
    drop(c);

    // Disconnect mid-request: a WRITE header with half its payload, then gone.
    let mut c = Raw::connect(&host.socket);
    c.go("mem");
    c.request(CommandType::WRITE, 0, 1 << 20, &[9; 4096]);
    drop(c);
    // Disconnect mid-handshake, mid-option.
    let mut c = Raw::connect(&host.socket);
    c.s.write_all(
        &OptionHeader {
            option: OptionType::GO,
            length: 100,
        }
        .encode(),
    )
    .unwrap();
    c.s.write_all(&[0; 10]).unwrap();
    drop(c);

    settle(&host, 1);
    // The good connection never noticed, and new connections work.
    good.write_read(0, 4);
    let mut fresh = Raw::connect(&host.socket);
    fresh.go("mem");
    fresh.write_read(12288, 5);
    assert_eq!(
        host.mem.snapshot(0, 1),
        vec![4],
        "the half-sent write wrote nothing"
    );
    let stats = host.server.as_ref().unwrap().stats();
    assert!(stats.handshakes_failed >= 5, "{stats:?}");
    assert!(stats.connections_failed >= 1, "{stats:?}");
}

#[test]
fn silent_clients_time_out_and_excess_clients_are_refused() {
    let scratch = Scratch::new("limits");
    let config = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(300)),
        connections_max: 2,
        ..ServerConfig::default()
    };
    let host = Host::start_with(&scratch, config);
    // A client that never answers the greeting is dropped after the handshake timeout.
    let mut silent = Raw::connect(&host.socket);
    let started = Instant::now();
    assert!(silent.closed());
    assert!(started.elapsed() < Duration::from_secs(5));
    settle(&host, 0);
    // With two connections active, a third is closed at once.
    let mut a = Raw::connect(&host.socket);
    a.go("mem");
    let mut b = Raw::connect(&host.socket);
    b.go("mem");
    let mut s = std::os::unix::net::UnixStream::connect(&host.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    assert!(buf.is_empty(), "the refused connection got no greeting");
    assert_eq!(host.server.as_ref().unwrap().stats().refused, 1);
    a.write_read(0, 1);
    b.write_read(4096, 2);
}

#[test]
fn shutdown_drains_connections() {
    let scratch = Scratch::new("drain");
    let mut host = Host::start(&scratch);
    let mut c = Raw::connect(&host.socket);
    c.go("mem");
    // Requests in flight when the server stops are still answered.
    for i in 0..16u64 {
        c.request(CommandType::WRITE, i * 4096, 4096, &[i as u8; 4096]);
    }
    let mut mid = Raw::connect(&host.socket);
    let server = host.server.take().unwrap();
    let stopper = std::thread::spawn(move || server.shutdown());
    for _ in 0..16 {
        assert_eq!(c.simple_reply(0).0, 0);
    }
    assert!(c.closed());
    // A client still negotiating is closed: its option may still be answered (normally, or with
    // NBD_REP_ERR_SHUTDOWN, depending on when the stop lands), then the connection ends.
    let _ = mid.s.write_all(
        &OptionHeader {
            option: OptionType::LIST,
            length: 0,
        }
        .encode(),
    );
    let mut rest = Vec::new();
    assert!(
        std::io::Read::read_to_end(&mut mid.s, &mut rest).is_ok(),
        "ends with EOF, not a timeout"
    );
    stopper.join().unwrap();
    assert!(!host.socket.exists(), "socket file removed");
    for i in 0..16u64 {
        assert_eq!(host.mem.snapshot(i * 4096, 1), vec![i as u8]);
    }
}
