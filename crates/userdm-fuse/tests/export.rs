//! The FUSE export against an in-memory device: data, flushes, fallocate, attributes, bad
//! input. Each test mounts its own file; all skip (with a printed reason) without /dev/fuse or
//! root.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use common::{fuse_available, pattern, Aligned, TempDir};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use userdm_device::BlockDevice;
use userdm_fuse::mem::MemDevice;
use userdm_fuse::{CacheMode, FuseError, FuseExport, FuseHandle, FuseOptions};
use userdm_io::{IoOp, OpSet};

const MIB: u64 = 1 << 20;

fn start(dev: &Arc<MemDevice>, dir: &TempDir) -> FuseHandle {
    FuseExport::start(dev.clone(), dir.join("disk.img"), FuseOptions::default()).unwrap()
}

fn open_rw(h: &FuseHandle) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(h.path())
        .unwrap()
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let res = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    if res < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Step {
    Write { offset: u64, len: usize, seed: u64 },
    Read { offset: u64, len: usize },
}

fn step(size: u64) -> impl Strategy<Value = Step> {
    // Offsets near sector and page edges and near the end, lengths from 1 byte to past 1 MiB
    // (more than one FUSE request).
    let offset = prop_oneof![
        0..size,
        (0..size / 512).prop_map(|s| s * 512),
        (0..size / 512, 1u64..4).prop_map(|(s, d)| (s * 512).saturating_sub(d)),
        (size - 8192)..size,
    ];
    let len = prop_oneof![
        1usize..1100,
        4000usize..9000,
        (1usize..3).prop_map(|m| m << 20 | 77)
    ];
    prop_oneof![
        (offset.clone(), len.clone(), any::<u64>()).prop_map(|(offset, len, seed)| Step::Write {
            offset,
            len,
            seed
        }),
        (offset, len).prop_map(|(offset, len)| Step::Read { offset, len }),
    ]
}

#[test]
fn unaligned_reads_and_writes_match_a_model() {
    if !fuse_available("unaligned_reads_and_writes_match_a_model") {
        return;
    }
    let size = 8 * MIB;
    let dev = Arc::new(MemDevice::new(size));
    let dir = TempDir::new("model");
    let h = start(&dev, &dir);
    let file = open_rw(&h);
    let model = std::cell::RefCell::new(vec![0u8; size as usize]);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(step(size), 1..12), |steps| {
            let mut model = model.borrow_mut();
            for s in steps {
                match s {
                    Step::Write { offset, len, seed } => {
                        let data = pattern(seed, len);
                        let n = file.write_at(&data, offset).unwrap();
                        // A write past the end is cut short at the end.
                        let want = len.min((size - offset) as usize);
                        prop_assert_eq!(n, want);
                        model[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                    }
                    Step::Read { offset, len } => {
                        let mut got = vec![0u8; len];
                        let n = file.read_at(&mut got, offset).unwrap();
                        let want = len.min((size - offset) as usize);
                        prop_assert_eq!(n, want);
                        prop_assert!(got[..n] == model[offset as usize..offset as usize + n]);
                    }
                }
            }
            prop_assert!(
                dev.read(0, size as usize) == *model,
                "device diverged from model"
            );
            Ok(())
        })
        .unwrap();
    assert!(h.stats().rmw > 0);
    drop(file);
    h.stop().unwrap();
}

#[test]
fn o_direct_reads_and_writes() {
    if !fuse_available("o_direct_reads_and_writes") {
        return;
    }
    let dev = Arc::new(MemDevice::new(16 * MIB));
    let dir = TempDir::new("direct");
    let h = start(&dev, &dir);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(h.path())
        .unwrap();
    for (i, (offset, len)) in [
        (0u64, 4096usize),
        (8192, 65536),
        (MIB, MIB as usize),
        (4096, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let mut buf = Aligned::new(len);
        buf.as_mut_slice().copy_from_slice(&pattern(i as u64, len));
        assert_eq!(file.write_at(buf.as_slice(), offset).unwrap(), len);
        assert!(
            dev.read(offset, len) == buf.as_slice(),
            "write {i} not on the device"
        );
        let mut back = Aligned::new(len);
        assert_eq!(file.read_at(back.as_mut_slice(), offset).unwrap(), len);
        assert!(back.as_slice() == buf.as_slice(), "read {i} differs");
    }
    // Coherence: a change made behind the export's back (as another export would) is seen by
    // the next direct read.
    dev.write(0, &[7u8; 4096]);
    let mut back = Aligned::new(4096);
    file.read_at(back.as_mut_slice(), 0).unwrap();
    assert!(back.as_slice().iter().all(|&b| b == 7));
    assert_eq!(
        h.stats().rmw,
        0,
        "aligned direct IO needs no read-modify-write"
    );
}

#[test]
fn fsync_and_close_flush_the_device() {
    if !fuse_available("fsync_and_close_flush_the_device") {
        return;
    }
    let dev = Arc::new(MemDevice::new(4 * MIB));
    let dir = TempDir::new("fsync");
    let h = start(&dev, &dir);
    let file = open_rw(&h);
    file.write_at(b"data", 100).unwrap();
    let before = dev.counts().flushes;
    file.sync_all().unwrap();
    assert_eq!(dev.counts().flushes, before + 1);
    // Nothing written since: no device flush needed.
    file.sync_data().unwrap();
    assert_eq!(dev.counts().flushes, before + 1);
    file.write_at(b"more", 5000).unwrap();
    file.sync_data().unwrap();
    assert_eq!(dev.counts().flushes, before + 2);
    // close(2) sends FUSE_FLUSH, which flushes outstanding writes too.
    file.write_at(b"last", 9000).unwrap();
    drop(file);
    assert_eq!(dev.counts().flushes, before + 3);
    assert_eq!(h.stats().device_flushes, 3);
}

#[test]
fn fallocate_maps_to_discard_and_write_zeroes() {
    if !fuse_available("fallocate_maps_to_discard_and_write_zeroes") {
        return;
    }
    let size = 4 * MIB;
    let dev = Arc::new(MemDevice::new(size));
    dev.write(0, &[0xaa; 4 * MIB as usize]);
    let dir = TempDir::new("falloc");
    let h = start(&dev, &dir);
    let file = open_rw(&h);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

    // Aligned punch: one DISCARD, range reads as zeros.
    fallocate(&file, punch, 4096, 8192).unwrap();
    assert_eq!(dev.counts().discards, 1);
    assert!(dev.read(4096, 8192).iter().all(|&b| b == 0));
    assert_eq!(dev.read(4095, 1), [0xaa]);
    assert_eq!(dev.read(12288, 1), [0xaa]);

    // Unaligned punch: the whole sectors inside are discarded, the edges zeroed in place.
    fallocate(&file, punch, 100_000, 2000).unwrap();
    assert_eq!(dev.counts().discards, 2);
    assert!(dev.read(100_000, 2000).iter().all(|&b| b == 0));
    assert_eq!(dev.read(99_999, 1), [0xaa]);
    assert_eq!(dev.read(102_000, 1), [0xaa]);
    // Inside one sector: no discard at all, only zeroed bytes.
    fallocate(&file, punch, 200_010, 10).unwrap();
    assert_eq!(dev.counts().discards, 2);
    assert_eq!(
        dev.read(200_009, 12),
        [&[0xaa][..], &[0; 10], &[0xaa]].concat()
    );

    // Zero range: WRITE_ZEROES.
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, MIB, MIB).unwrap();
    assert_eq!(dev.counts().write_zeroes, 1);
    assert!(dev.read(MIB, MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(dev.read(2 * MIB, 1), [0xaa]);

    // Plain allocation inside the file is a no-op; past the end it cannot grow the file.
    let writes = dev.counts().writes;
    fallocate(&file, 0, 0, size).unwrap();
    assert_eq!(dev.counts().writes, writes);
    let err = fallocate(&file, 0, size - 10, 100).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
    fallocate(&file, libc::FALLOC_FL_KEEP_SIZE, size - 10, 100).unwrap();
    let err = fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, size - 512, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
    let err = fallocate(&file, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
    assert_eq!(std::fs::metadata(h.path()).unwrap().len(), size);
}

#[test]
fn zero_range_without_write_zeroes_writes_zeros() {
    if !fuse_available("zero_range_without_write_zeroes_writes_zeros") {
        return;
    }
    let dev = Arc::new(MemDevice::with_ops(4 * MIB, OpSet::RW_FLUSH));
    dev.write(0, &[0x55; 4 * MIB as usize]);
    let dir = TempDir::new("nozeroes");
    let h = start(&dev, &dir);
    let file = open_rw(&h);
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, 1000, 3 * MIB).unwrap();
    assert!(dev.read(1000, 3 * MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(dev.read(999, 1), [0x55]);
    assert_eq!(dev.counts().write_zeroes, 0);
    // Without DISCARD, punching a hole is unsupported rather than silently not done.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let err = fallocate(&file, punch, 0, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
    assert!(!dev.ops().contains(IoOp::Discard));
}

#[test]
fn attributes_size_and_truncate() {
    if !fuse_available("attributes_size_and_truncate") {
        return;
    }
    let size = 3 * MIB;
    let dev = Arc::new(MemDevice::new(size));
    let dir = TempDir::new("attr");
    let h = start(&dev, &dir);
    let meta = std::fs::metadata(h.path()).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), size);
    let file = open_rw(&h);
    let err = file.set_len(MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    let err = file.set_len(size * 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    file.set_len(size).unwrap();
    // O_TRUNC is a truncate to 0: refused, and the data survives.
    file.write_at(b"keep", 0).unwrap();
    let err = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(h.path())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(dev.read(0, 4), b"keep");
    // Mode changes are kept; SEEK_DATA/SEEK_HOLE see one data extent.
    std::fs::set_permissions(h.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let perm = std::fs::metadata(h.path()).unwrap().permissions().mode();
    assert_eq!(perm & 0o7777, 0o640);
    // SAFETY: lseek on a descriptor we own.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 10, libc::SEEK_HOLE) };
    assert_eq!(hole as u64, size);
    // SAFETY: as above.
    let data = unsafe { libc::lseek(file.as_raw_fd(), 10, libc::SEEK_DATA) };
    assert_eq!(data, 10);
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    let cpath = std::ffi::CString::new(h.path().to_str().unwrap()).unwrap();
    // SAFETY: statfs writes one struct into `st`, which is sized for it.
    assert_eq!(unsafe { libc::statfs(cpath.as_ptr(), st.as_mut_ptr()) }, 0);
}

#[test]
fn concurrent_writers_share_sectors_without_losing_bytes() {
    if !fuse_available("concurrent_writers_share_sectors_without_losing_bytes") {
        return;
    }
    // Eight writers each own 61-byte slots spread through every sector, so almost every write
    // is a read-modify-write of a sector another writer is modifying at the same time. A lost
    // update would resurrect another writer's old bytes.
    let size = 2 * MIB;
    let dev = Arc::new(MemDevice::new(size).with_io_delay(std::time::Duration::from_micros(50)));
    let dir = TempDir::new("concurrent");
    let h = start(&dev, &dir);
    const WRITERS: u64 = 8;
    const SLOT: u64 = 61;
    let slots = 1500;
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let path = h.path().to_path_buf();
            s.spawn(move || {
                let file = OpenOptions::new().write(true).open(path).unwrap();
                for k in 0..slots {
                    let offset = (k * WRITERS + w) * SLOT;
                    let data = vec![(w as u8 + 1) * 16 + (k % 16) as u8; SLOT as usize];
                    file.write_at(&data, offset).unwrap();
                }
            });
        }
    });
    let bytes = dev.read(0, (slots * WRITERS * SLOT) as usize);
    for k in 0..slots {
        for w in 0..WRITERS {
            let offset = ((k * WRITERS + w) * SLOT) as usize;
            let want = (w as u8 + 1) * 16 + (k % 16) as u8;
            assert!(
                bytes[offset..offset + SLOT as usize]
                    .iter()
                    .all(|&b| b == want),
                "slot {k} of writer {w} lost"
            );
        }
    }
    assert!(h.stats().rmw > 0);
}

#[test]
fn page_cache_mode_reads_back_writes() {
    if !fuse_available("page_cache_mode_reads_back_writes") {
        return;
    }
    let dev = Arc::new(MemDevice::new(4 * MIB));
    let dir = TempDir::new("pagecache");
    let options = FuseOptions {
        cache: CacheMode::PageCache,
        threads: 1,
        queue_depth: 4,
        ..FuseOptions::default()
    };
    let h = FuseExport::start(dev.clone(), dir.join("disk.img"), options).unwrap();
    let file = open_rw(&h);
    let data = pattern(9, 300_000);
    file.write_at(&data, 12_345).unwrap();
    let mut back = vec![0u8; data.len()];
    file.read_exact_at(&mut back, 12_345).unwrap();
    assert!(back == data);
    file.sync_all().unwrap();
    assert!(dev.read(12_345, data.len()) == data);
}

#[test]
fn read_only_device_refuses_writes() {
    if !fuse_available("read_only_device_refuses_writes") {
        return;
    }
    let dev = MemDevice::new(MIB);
    dev.write(0, b"readonly");
    let dev = Arc::new(dev.read_only());
    let dir = TempDir::new("ro");
    let h = start(&dev, &dir);
    let err = OpenOptions::new().write(true).open(h.path()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let file = File::open(h.path()).unwrap();
    let mut buf = [0u8; 8];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"readonly");
}

#[test]
fn an_existing_file_is_covered_then_uncovered() {
    if !fuse_available("an_existing_file_is_covered_then_uncovered") {
        return;
    }
    let dir = TempDir::new("existing");
    let path = dir.join("disk.img");
    std::fs::write(&path, b"underlying").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dev = Arc::new(MemDevice::new(MIB));
    let h = FuseExport::start(dev.clone(), &path, FuseOptions::default()).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), MIB);
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o644,
        "mode comes from the file"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_at(b"exported", 0)
        .unwrap();
    h.stop().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"underlying");
    assert_eq!(dev.read(0, 8), b"exported");
    // A file the export created is removed at stop.
    let created = dir.join("new.img");
    let h = FuseExport::start(dev, &created, FuseOptions::default()).unwrap();
    assert!(created.exists());
    drop(h);
    assert!(!created.exists());
}

#[test]
fn unmounting_from_outside_ends_the_export() {
    if !fuse_available("unmounting_from_outside_ends_the_export") {
        return;
    }
    let dev = Arc::new(MemDevice::new(MIB));
    let dir = TempDir::new("umount");
    let h = start(&dev, &dir);
    assert!(h.is_serving());
    let status = std::process::Command::new("umount")
        .arg(h.path())
        .status()
        .unwrap();
    assert!(status.success());
    // wait() returns once the kernel ends the connection.
    h.wait().unwrap();
}

#[test]
fn bad_paths_and_devices_are_refused() {
    if !fuse_available("bad_paths_and_devices_are_refused") {
        return;
    }
    let dir = TempDir::new("bad");
    let dev = Arc::new(MemDevice::new(MIB));
    let opts = FuseOptions::default;

    let err = FuseExport::start(dev.clone(), dir.path(), opts()).unwrap_err();
    assert!(matches!(err, FuseError::IsDirectory(_)), "{err}");
    assert!(err.to_string().contains("is a directory"));

    let missing = dir.join("no/such/dir/disk.img");
    let err = FuseExport::start(dev.clone(), &missing, opts()).unwrap_err();
    assert!(matches!(err, FuseError::Create { .. }), "{err}");
    assert!(err.to_string().contains("does its directory exist"));

    let err = FuseExport::start(dev.clone(), "/dev/null", opts()).unwrap_err();
    assert!(
        matches!(
            err,
            FuseError::NotRegularFile {
                kind: "character device",
                ..
            }
        ),
        "{err}"
    );

    let path = dir.join("disk.img");
    let h = FuseExport::start(dev.clone(), &path, opts()).unwrap();
    let err = FuseExport::start(dev.clone(), &path, opts()).unwrap_err();
    assert!(matches!(err, FuseError::AlreadyMounted(_)), "{err}");
    // The first export is unharmed.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
    drop(h);

    let err = FuseExport::start(Arc::new(MemDevice::new(0)), &path, opts()).unwrap_err();
    assert!(matches!(err, FuseError::EmptyDevice), "{err}");
    let err = FuseExport::start(Arc::new(MemDevice::new(1000)), &path, opts()).unwrap_err();
    assert!(matches!(err, FuseError::UnalignedSize(1000)), "{err}");
    assert!(!path.exists(), "a refused start leaves no file behind");

    for bad in [
        FuseOptions {
            threads: 0,
            ..opts()
        },
        FuseOptions {
            queue_depth: 65,
            ..opts()
        },
        FuseOptions {
            max_write_bytes: 5000,
            ..opts()
        },
    ] {
        let err = FuseExport::start(dev.clone(), &path, bad).unwrap_err();
        assert!(matches!(err, FuseError::InvalidOptions(_)), "{err}");
    }
}

#[test]
fn a_mount_left_by_a_dead_server_is_reported_and_cleanable() {
    if !fuse_available("a_mount_left_by_a_dead_server_is_reported_and_cleanable") {
        return;
    }
    let dir = TempDir::new("stale");
    let path = dir.join("disk.img");
    std::fs::write(&path, b"").unwrap();
    // Play a server that dies: mount a FUSE file on a /dev/fuse descriptor, then close it
    // without ever answering. The kernel aborts the connection and the mount stays behind.
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let data = std::ffi::CString::new(format!(
        "fd={},rootmode=100000,user_id=0,group_id=0",
        fuse.as_raw_fd()
    ))
    .unwrap();
    let target = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings that live across the call.
    let res = unsafe {
        libc::mount(
            c"dead".as_ptr(),
            target.as_ptr(),
            c"fuse.dead".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(res, 0, "{}", std::io::Error::last_os_error());
    drop(fuse);
    let err = std::fs::metadata(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));

    let dev = Arc::new(MemDevice::new(MIB));
    let err = FuseExport::start(dev.clone(), &path, FuseOptions::default()).unwrap_err();
    assert!(matches!(err, FuseError::StaleMount(_)), "{err}");
    assert!(err.to_string().contains("umount -l"), "{err}");

    // The documented cleanup works, and the path can be exported again.
    let status = std::process::Command::new("umount")
        .arg("-l")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let h = FuseExport::start(dev, &path, FuseOptions::default()).unwrap();
    assert_eq!(std::fs::metadata(h.path()).unwrap().len(), MIB);
}
