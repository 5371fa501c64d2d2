//! A userdm mapped device (`Device<AnyTarget>`) through `DeviceBackend`: allocation reaches
//! BLOCK_STATUS and structured reads, and real clients copy sparsely.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;

use common::{require, Scratch};
use userdm_device::Device;
use userdm_nbd::{serve_unix, DeviceBackend, Exports, ServerConfig};
use userdm_table::Table;
use userdm_targets::{AnyTarget, TargetContext};

fn device(table: &str) -> Arc<Device<AnyTarget>> {
    let d = Device::new("nbd-test", None, false).unwrap();
    d.load(Table::parse(&TargetContext::new(), table).unwrap());
    d.resume().unwrap();
    Arc::new(d)
}

fn run(program: &str, args: &[&str]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let out = Command::new("timeout")
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `nbdinfo --map` lines as (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn block_status_and_sparse_copy_through_the_engine() {
    if !require("nbdinfo") || !require("nbdcopy") {
        return;
    }
    let scratch = Scratch::new("device");
    let backing = scratch.path("backing.img");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[0x5a; 1 << 20], 1 << 20).unwrap();
    drop(f);
    // 4 MiB linear on the sparse file, 1 MiB zero, 3 MiB memory.
    let d = device(&format!(
        "0 8192 linear {} 0\n8192 2048 zero\n10240 6144 memory\n",
        backing.display()
    ));
    let socket = scratch.path("dev.sock");
    let server = serve_unix(
        &socket,
        Exports::new().with("dev", "", Arc::new(DeviceBackend(d.clone()))),
        ServerConfig::default(),
    )
    .unwrap();
    let uri = format!("nbd+unix:///dev?socket={}", socket.display());
    let m = map(&uri);
    // ext4 and tmpfs track holes; a filesystem that does not shows the file as data.
    let want_file = if m[0].2 == 3 {
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 1 << 20, 0),
            (2 << 20, 6 << 20, 3),
        ]
    } else {
        vec![(0, 4 << 20, 0), (4 << 20, 4 << 20, 3)]
    };
    assert_eq!(
        m, want_file,
        "empty memory and zero rows and the file's holes"
    );
    // Write into the memory row through NBD: that chunk becomes data.
    run(
        "nbdsh",
        &["-u", &uri, "-c", "h.pwrite(b'\\x01' * 65536, 6 << 20)"],
    );
    let m = map(&uri);
    assert!(m.contains(&(6 << 20, 65536, 0)), "{m:?}");
    // A sparse copy out and back in: nbdcopy skips the holes and the bytes match.
    let out = scratch.path("out.img");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert!(got[..1 << 20].iter().all(|&b| b == 0));
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    assert!(got[6 << 20..(6 << 20) + 65536].iter().all(|&b| b == 1));
    assert!(got[(6 << 20) + 65536..].iter().all(|&b| b == 0));
    // Copied back into the memory row of a fresh device, only the data is allocated.
    let d2 = device("0 16384 memory\n");
    let socket2 = scratch.path("dev2.sock");
    let server2 = serve_unix(
        &socket2,
        Exports::new().with("", "", Arc::new(DeviceBackend(d2.clone()))),
        ServerConfig::default(),
    )
    .unwrap();
    let uri2 = format!("nbd+unix:///?socket={}", socket2.display());
    run("nbdcopy", &[&uri, &uri2]);
    let table = d2.live_table().unwrap();
    let AnyTarget::Memory(mem) = &table.rows()[0].target else {
        panic!("not memory")
    };
    assert_eq!(
        mem.allocated_bytes(),
        (1 << 20) + 65536,
        "only the data runs were written"
    );
    run(
        "nbdcopy",
        &[&uri2, scratch.path("back.img").to_str().unwrap()],
    );
    assert_eq!(std::fs::read(scratch.path("back.img")).unwrap(), got);
    server.shutdown();
    server2.shutdown();
}

#[test]
fn multi_conn_flush_reaches_the_device_and_several_exports() {
    use common::Raw;
    use userdm_nbd::proto::CommandType;
    let scratch = Scratch::new("multi-conn");
    let backing = scratch.path("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let d = device(&format!("0 2048 linear {} 0\n", backing.display()));
    let m = device("0 2048 memory\n");
    let socket = scratch.path("mc.sock");
    let server = serve_unix(
        &socket,
        Exports::new()
            .with("file", "the file", Arc::new(DeviceBackend(d.clone())))
            .with("mem", "the memory", Arc::new(DeviceBackend(m.clone()))),
        ServerConfig::default(),
    )
    .unwrap();
    // Connection A writes; its reply means the write is complete.
    let mut a = Raw::connect(&socket);
    a.go("file");
    a.request(CommandType::WRITE, 8192, 4096, &[0xab; 4096]);
    assert_eq!(a.simple_reply(0).0, 0);
    // Connection B flushes: the flush reaches the device (every row of its table, here an
    // fdatasync of the file) and covers A's write, which B also reads back.
    let mut b = Raw::connect(&socket);
    b.go("file");
    let others = d.io_stats().others;
    b.request(CommandType::FLUSH, 0, 0, &[]);
    assert_eq!(b.simple_reply(0).0, 0);
    assert_eq!(
        d.io_stats().others,
        others + 1,
        "the flush reached the device"
    );
    b.request(CommandType::READ, 8192, 4096, &[]);
    assert_eq!(b.simple_reply(4096).1, vec![0xab; 4096]);
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(&on_disk[8192..12288], &[0xab; 4096][..]);
    // The other export of the same server is another device.
    let mut c = Raw::connect(&socket);
    c.go("mem");
    c.request(CommandType::READ, 8192, 4096, &[]);
    assert_eq!(c.simple_reply(4096).1, vec![0; 4096]);
    if require("nbdinfo") {
        let uri = format!("nbd+unix:///file?socket={}", socket.display());
        let info = run("nbdinfo", &[&uri]);
        assert!(info.contains("can_multi_conn: true"), "{info}");
        let list = run(
            "nbdinfo",
            &[
                "--list",
                &format!("nbd+unix://?socket={}", socket.display()),
            ],
        );
        assert!(
            list.contains("export=\"file\"") && list.contains("export=\"mem\""),
            "{list}"
        );
    }
    drop((a, b, c));
    server.shutdown();
}
