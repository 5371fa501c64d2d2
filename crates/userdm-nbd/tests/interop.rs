//! End to end against real clients: libnbd's tools (nbdinfo, nbdcopy, nbdsh), fio's nbd engine
//! and qemu's tools, each against a server hosted by this test process.
//!
//! Each test skips, with a printed reason, only when its client binary is not installed
//! (`scripts/install-deps` installs them all: libnbd-bin, python3-libnbd, fio, qemu-utils).

mod common;

use std::process::{Command, Output};

use common::{require, Host, Scratch};
use userdm_nbd::{serve_tcp, Exports, ListenAddr, MemBackend, ServerConfig};

/// Runs a client with a time limit, failing the test with its output unless it succeeds.
///
/// The system's directories come first in PATH: nbdsh runs `python3 -m nbd`, and the libnbd
/// Python module is installed for the system's Python, not for one a developer put first.
fn run(program: &str, args: &[&str]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let out: Output = Command::new("timeout")
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn random_file(path: &std::path::Path, len: usize, seed: u64) -> Vec<u8> {
    // xorshift: reproducible data without a dependency.
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn nbdinfo_describes_and_lists_exports() {
    if !require("nbdinfo") {
        return;
    }
    let scratch = Scratch::new("nbdinfo");
    let host = Host::start(&scratch);
    let info = run("nbdinfo", &[&host.uri("mem")]);
    for expect in [
        "export-size: 67108864",
        "using structured packets",
        "base:allocation",
        "can_trim: true",
        "can_fua: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "block_size_minimum: 512",
        "description: the memory disk",
    ] {
        assert!(info.contains(expect), "missing {expect:?} in:\n{info}");
    }
    let ro = run("nbdinfo", &[&host.uri("ro")]);
    assert!(
        ro.contains("is_read_only: true") && ro.contains("can_trim: false"),
        "{ro}"
    );
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", host.socket.display()),
        ],
    );
    assert!(
        list.contains("export=\"mem\"") && list.contains("export=\"ro\""),
        "{list}"
    );
    // The map of an empty disk is one hole; after a write, data then hole.
    let map = run("nbdinfo", &["--map", &host.uri("mem")]);
    assert!(map.contains("67108864    3  hole,zero"), "{map}");
    run(
        "nbdsh",
        &["-u", &host.uri("mem"), "-c", "h.pwrite(b'x' * 65536, 0)"],
    );
    let map = run("nbdinfo", &["--map", &host.uri("mem")]);
    assert!(map.contains("65536    0  data"), "{map}");
}

#[test]
fn nbdcopy_round_trip_is_byte_exact() {
    if !require("nbdcopy") {
        return;
    }
    let scratch = Scratch::new("nbdcopy");
    let host = Host::start(&scratch);
    let src = scratch.path("src.img");
    let back = scratch.path("back.img");
    // 24 MiB of data then 40 MiB of zeroes: nbdcopy writes the data and zeroes the rest.
    let mut data = random_file(&src, 24 << 20, 42);
    data.resize(64 << 20, 0);
    std::fs::write(&src, &data).unwrap();
    run(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &host.uri("mem")],
    );
    run("nbdcopy", &[&host.uri("mem"), back.to_str().unwrap()]);
    let status = Command::new("cmp").arg(&src).arg(&back).status().unwrap();
    assert!(status.success(), "cmp found a difference");
    assert!(host.mem.snapshot(0, 24 << 20) == data[..24 << 20]);
    // Several connections at once (nbdcopy uses multi-conn when advertised).
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &host.uri("mem"),
            back.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&back).unwrap() == data);
}

#[test]
fn fio_randwrite_verifies() {
    if !require("fio") {
        return;
    }
    let scratch = Scratch::new("fio");
    let host = Host::start(&scratch);
    let uri = host.uri("mem");
    let out = run(
        "fio",
        &[
            "--name=randwrite",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            // Four connections (one per job), each verifying its own 8 MiB.
            "--numjobs=4",
            "--offset_increment=8m",
            "--size=8m",
            "--group_reporting",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    // Terse format: field 5 is the job's error code.
    let fields: Vec<&str> = out.trim().split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported an error: {out}");
    // Mixed sizes, including requests larger than one tag buffer (4 MiB > 1 MiB).
    run(
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bsrange=512-4m",
            "--size=32m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
}

#[test]
fn qemu_tools_convert_compare_and_io() {
    if !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let scratch = Scratch::new("qemu");
    let host = Host::start(&scratch);
    let uri = host.uri("mem");
    let info = run("qemu-img", &["info", &uri]);
    assert!(
        info.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{info}"
    );
    let src = scratch.path("src.img");
    let mut data = random_file(&src, 8 << 20, 7);
    data.resize(64 << 20, 0);
    std::fs::write(&src, &data).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "read -P 0xab 1M 2M",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "discard 4M 1M",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
    let back = scratch.path("back.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 64 << 20);
}

#[test]
fn nbdsh_exercises_every_command() {
    if !require("nbdsh") {
        return;
    }
    let scratch = Scratch::new("nbdsh");
    let host = Host::start(&scratch);
    let script = r#"
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
h.pwrite(b"\x01" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\x01" * 65536
df = []
h.pread_structured(65536, 0, lambda buf, offset, status, err: df.append(len(buf)), nbd.CMD_FLAG_DF)
assert df == [65536], df
h.trim(4096, 4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(8192, 4096) == bytes(8192)
h.cache(65536, 0)
h.flush()
extents = []
def collect(meta, offset, entries, err):
    assert meta == "base:allocation"
    extents.extend(entries)
h.block_status(1 << 20, 0, collect)
assert extents[0:2] == [4096, 0], extents
assert extents[3] in (0, 3), extents
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, status, len(buf)))
h.pread_structured(1 << 20, 16 << 20, chunk)
assert chunks == [(16 << 20, nbd.READ_HOLE, 1 << 20)], chunks
# libnbd checks bounds itself; the server's own checks are covered by the hostile tests.
try:
    h.pread(512, 64 << 20)
    raise AssertionError("read past the end succeeded")
except nbd.Error:
    pass
big = bytes(range(256)) * 16384
h.pwrite(big, 8 << 20)
assert h.pread(len(big), 8 << 20) == big
h.shutdown()
"#;
    let uri = format!("uri = {:?}\n", host.uri("mem"));
    run("nbdsh", &["-c", &format!("{uri}{script}")]);
    // Without structured replies: simple replies for everything.
    let simple = r#"
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
h.pwrite(b"\x02" * 4096, 0)
assert h.pread(4096, 0) == b"\x02" * 4096
big = bytes(range(256)) * 16384
h.pwrite(big, 8 << 20)
assert h.pread(len(big), 8 << 20) == big
h.shutdown()
"#;
    run("nbdsh", &["-c", &format!("{uri}{simple}")]);
}

#[test]
fn tcp_listener_serves_real_clients() {
    if !require("nbdinfo") || !require("nbdcopy") {
        return;
    }
    let mem = std::sync::Arc::new(MemBackend::new(8 << 20));
    let server = serve_tcp(
        "127.0.0.1:0",
        Exports::new().with("", "default", mem),
        ServerConfig::default(),
    )
    .unwrap();
    let ListenAddr::Tcp(addr) = server.local_addr().clone() else {
        panic!()
    };
    let uri = format!("nbd://127.0.0.1:{}", addr.port());
    let info = run("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 8388608"), "{info}");
    let scratch = Scratch::new("tcp");
    let src = scratch.path("src.img");
    let data = random_file(&src, 8 << 20, 3);
    run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    let back = scratch.path("back.img");
    run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
    server.shutdown();
}

/// qemu >= 8.2 negotiates extended headers (64-bit requests and replies). Debian bookworm's
/// qemu 7.2 does not; `crates/userdm-nbd/scripts/fetch-new-qemu` unpacks bookworm-backports'
/// qemu-utils into a cache directory, where this test finds it (or set USERDM_NEW_QEMU_BIN).
#[test]
fn extended_headers_with_new_qemu() {
    let dir = std::env::var("USERDM_NEW_QEMU_BIN")
        .unwrap_or_else(|_| "/var/cache/userdm-nbd/qemu-bpo/root/usr/bin".into());
    let qemu_io = format!("{dir}/qemu-io");
    let qemu_img = format!("{dir}/qemu-img");
    if !std::path::Path::new(&qemu_io).is_file() {
        println!(
            "SKIP: no qemu >= 8.2 in {dir} (run crates/userdm-nbd/scripts/fetch-new-qemu, or set \
             USERDM_NEW_QEMU_BIN)"
        );
        return;
    }
    let scratch = Scratch::new("qemu-ext");
    let host = Host::start(&scratch);
    let uri = host.uri("mem");
    let out = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "discard 4M 1M",
            "-c",
            "aio_write -P 0x11 8M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x11 8M 64k",
            &uri,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(host.mem.snapshot(0, 1 << 20).iter().all(|&b| b == 0x5a));
    let map = run(&qemu_img, &["map", "--output=json", "-f", "raw", &uri]);
    assert!(
        map.contains(r#""start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true"#),
        "{map}"
    );
    assert!(
        map.contains(r#""start": 8388608, "length": 65536"#),
        "{map}"
    );
    let stats = host.server.as_ref().unwrap().stats();
    assert!(stats.extended_headers >= 2, "{stats:?}");
}
