//! The daemon library and the example daemons (Rust and C) serving a `Table<UserTarget>`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userdm_dmuser::{UserTarget, UserTargetContext};
use userdm_dmuser_daemon::{
    block_on, handle, serve_threads, AsyncChannel, Channel, FileDisk, MemoryDisk, Status,
};
use userdm_io::{IoError, IoFlags, IoHeader, IoOp};
use userdm_table::Table;
use userdm_uring::Reactor;

type UserTable = Arc<Table<UserTarget>>;

fn setup(text: &str) -> (tempfile::TempDir, UserTable) {
    let dir = tempfile::Builder::new()
        .prefix("dmd")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctx = UserTargetContext::new().with_dir(dir.path());
    let table = Arc::new(Table::parse(&ctx, text).unwrap());
    (dir, table)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn rw(
    rt: &Reactor,
    table: &UserTable,
    op: IoOp,
    sector: u64,
    buf: &mut [u8],
) -> Result<(), IoError> {
    let hdr = IoHeader {
        op,
        flags: IoFlags::empty(),
        sector,
        len_bytes: buf.len() as u64,
    };
    rt.block_on(table.io(rt, hdr, buf))
}

/// Writes `count` 4 KiB blocks with distinct patterns, reading each back, from `threads`
/// threads; panics on any mismatch.
fn exercise(table: &UserTable, count: u64, threads: u64) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let table = Arc::clone(table);
            s.spawn(move || {
                let rt = Reactor::new(8).unwrap();
                for i in (t..count).step_by(threads as usize) {
                    let mut data = pattern(4096, i);
                    rw(&rt, &table, IoOp::Write, i * 8, &mut data).unwrap();
                    let mut back = vec![0; 4096];
                    rw(&rt, &table, IoOp::Read, i * 8, &mut back).unwrap();
                    assert!(back == pattern(4096, i), "block {i}");
                }
            });
        }
    });
}

#[test]
fn memory_disk_over_several_channels() {
    let (dir, table) = setup("0 2048 user 0 2048 ctl");
    let path = dir.path().join("ctl");
    let daemon = std::thread::spawn(move || serve_threads(&path, 3, &MemoryDisk::new(2048 * 512)));
    exercise(&table, 200, 4);
    let rt = Reactor::new(8).unwrap();
    let hdr = IoHeader {
        op: IoOp::WriteZeroes,
        flags: IoFlags::empty(),
        sector: 0,
        len_bytes: 4096,
    };
    rt.block_on(table.io(&rt, hdr, &mut [])).unwrap();
    let mut back = vec![1; 4096];
    rw(&rt, &table, IoOp::Read, 0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    drop(table);
    assert_eq!(daemon.join().unwrap().unwrap(), 402);
}

#[test]
fn file_disk_keeps_data_across_daemons() {
    let (dir, table) = setup("0 1024 user 0 1024 ctl");
    let file_path = dir.path().join("disk.img");
    let file = std::fs::File::create_new(&file_path).unwrap();
    file.set_len(1024 * 512).unwrap();
    drop(file);
    let path = dir.path().join("ctl");
    let open = || {
        FileDisk::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file_path)
                .unwrap(),
        )
        .unwrap()
    };
    let disk = open();
    let mut ch = Channel::connect(&path).unwrap();
    let daemon = std::thread::spawn(move || userdm_dmuser_daemon::serve(&mut ch, &disk));
    exercise(&table, 64, 2);
    // FLUSH is answered after fdatasync.
    let rt = Reactor::new(8).unwrap();
    let flush = IoHeader {
        op: IoOp::Flush,
        flags: IoFlags::empty(),
        sector: 0,
        len_bytes: 0,
    };
    rt.block_on(table.io(&rt, flush, &mut [])).unwrap();
    drop(table);
    daemon.join().unwrap().unwrap();
    let content = std::fs::read(&file_path).unwrap();
    for i in 0..64usize {
        assert!(content[i * 4096..(i + 1) * 4096] == pattern(4096, i as u64)[..]);
    }
    let _ = open;
}

#[test]
fn async_channel_replies_out_of_order() {
    let (dir, table) = setup("0 1024 user 0 1024 ctl");
    let channel = AsyncChannel::connect(dir.path().join("ctl")).unwrap();
    let disk = Arc::new(MemoryDisk::new(1024 * 512));
    let daemon = std::thread::spawn(move || {
        block_on(async {
            let mut held = Vec::new();
            let mut buf = Vec::new();
            let mut n = 0;
            while let Ok(Some(req)) = channel.next_request().await {
                held.push(req);
                n += 1;
                // Answer in batches of four, newest first.
                if held.len() == 4 {
                    for req in held.drain(..).rev() {
                        let status = handle(&*disk, &req, &mut buf);
                        let data: &[u8] = if req.op() == Some(IoOp::Read) {
                            &buf
                        } else {
                            &[]
                        };
                        channel
                            .responder()
                            .reply(req.header.seq, status, data)
                            .unwrap();
                    }
                }
            }
            n
        })
    });
    // Four writers at once, then four readers at once.
    for op in [IoOp::Write, IoOp::Read] {
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let table = Arc::clone(&table);
                s.spawn(move || {
                    let rt = Reactor::new(8).unwrap();
                    let mut buf = if op == IoOp::Write {
                        pattern(4096, i)
                    } else {
                        vec![0; 4096]
                    };
                    rw(&rt, &table, op, i * 8, &mut buf).unwrap();
                    assert!(buf == pattern(4096, i));
                });
            }
        });
    }
    drop(table);
    assert_eq!(daemon.join().unwrap(), 8);
}

#[test]
fn status_codes() {
    assert_eq!(Status::Success.code(), 0);
    assert_eq!(Status::Error.code(), 1);
    assert_eq!(Status::Unsupported.code(), 2);
}

/// Builds the C example with the system compiler, once per test process.
fn c_daemon() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/mem_daemon.c");
            let out = std::env::temp_dir().join(format!("dmuser-c-daemon-{}", std::process::id()));
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
            let status = Command::new(cc)
                .args([
                    "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-pthread", "-o",
                ])
                .arg(&out)
                .arg(&src)
                .status()
                .expect("a C compiler (cc) is needed for this test");
            assert!(status.success(), "the C example does not compile");
            out
        })
        .clone()
}

fn spawn_c(endpoint: &Path, backing: &str, threads: u32) -> Child {
    let child = Command::new(c_daemon())
        .arg(endpoint)
        .arg(backing)
        .arg(threads.to_string())
        .spawn()
        .unwrap();
    child
}

#[test]
fn the_c_daemon_serves_a_table() {
    let (dir, table) = setup("0 2048 user 0 2048 ctl");
    let mut child = spawn_c(&dir.path().join("ctl"), &(2048 * 512).to_string(), 2);
    exercise(&table, 128, 3);
    drop(table);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the C daemon exits 0 when the target is removed"
    );
}

#[test]
fn killing_the_c_daemon_mid_traffic_loses_nothing() {
    let (dir, table) = setup("0 4096 user 0 4096 ctl");
    let backing = dir.path().join("disk.img");
    std::fs::File::create_new(&backing)
        .unwrap()
        .set_len(4096 * 512)
        .unwrap();
    let endpoint = dir.path().join("ctl");
    let backing_arg = backing.to_str().unwrap().to_string();
    let mut child = spawn_c(&endpoint, &backing_arg, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = Arc::clone(&stop);
        let endpoint = endpoint.clone();
        let backing_arg = backing_arg.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(40));
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                child = spawn_c(&endpoint, &backing_arg, 2);
            }
            (child, kills)
        })
    };
    exercise(&table, 512, 4);
    stop.store(true, Ordering::Relaxed);
    let (mut child, kills) = killer.join().unwrap();
    assert!(kills >= 1, "the daemon was never killed during the traffic");
    // The last daemon's two threads connect on their own time; wait for both, or dropping the
    // table below would race a thread that has not connected yet (and exits 1 for it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !table.status_lines()[0].contains("channels=2") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Everything written reads back, through the last daemon.
    let rt = Reactor::new(8).unwrap();
    for i in 0..512u64 {
        let mut back = vec![0; 4096];
        rw(&rt, &table, IoOp::Read, i * 8, &mut back).unwrap();
        assert!(back == pattern(4096, i), "block {i}");
    }
    assert!(table.status_lines()[0].contains("timed_out=0"));
    drop(table);
    assert!(child.wait().unwrap().success());
}
