//! End to end: a loop device on the exported file takes mkfs.ext4, a mount, files and fsck,
//! and the bytes land on the device. Skips (with a printed reason) without /dev/fuse, root,
//! loop devices or e2fsprogs.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{fuse_available, pattern, TempDir};
use userdm_fuse::mem::MemDevice;
use userdm_fuse::{FuseExport, FuseOptions};

const SIZE: u64 = 256 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn tools_available() -> bool {
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP loop_ext4: no /dev/loop-control (loop devices unavailable)");
        return false;
    }
    for tool in ["losetup", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("SKIP loop_ext4: {tool} is not installed (scripts/install-deps)");
            return false;
        }
    }
    true
}

/// Detaches the loop device and unmounts even when an assertion fails midway.
struct Cleanup {
    mnt: std::path::PathBuf,
    loopdev: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).output();
        if let Some(dev) = self.loopdev.take() {
            let _ = Command::new("losetup").args(["-d", &dev]).output();
        }
    }
}

#[test]
fn loop_device_on_the_file_takes_ext4() {
    if !fuse_available("loop_ext4") || !tools_available() {
        return;
    }
    let dir = TempDir::new("ext4");
    let image = dir.join("disk.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dev = Arc::new(MemDevice::new(SIZE));
    let export = FuseExport::start(dev.clone(), &image, FuseOptions::default()).unwrap();
    let image_str = image.to_str().unwrap();
    let mnt_str = mnt.to_str().unwrap();

    let loopdev = run("losetup", &["--find", "--show", image_str]);
    let mut cleanup = Cleanup {
        mnt: mnt.clone(),
        loopdev: Some(loopdev.clone()),
    };
    run("mkfs.ext4", &["-F", "-q", &loopdev]);
    run("mount", &[&loopdev, mnt_str]);
    let files: Vec<(String, Vec<u8>)> = (0..24u64)
        .map(|i| {
            let len = [1usize, 511, 4096, 70_000, 1 << 20, 3_000_001][i as usize % 6];
            (format!("file-{i}"), pattern(i + 1000, len))
        })
        .collect();
    for (name, data) in &files {
        std::fs::write(mnt.join(name), data).unwrap();
    }
    run("sync", &[]);
    run("umount", &[mnt_str]);
    run("e2fsck", &["-fn", &loopdev]);
    // Mount again and read everything back through the whole stack.
    run("mount", &["-o", "ro", &loopdev, mnt_str]);
    for (name, data) in &files {
        let back = std::fs::read(mnt.join(name)).unwrap();
        assert!(back == *data, "{name} differs after remount");
    }
    run("umount", &[mnt_str]);
    run("losetup", &["-d", &loopdev]);
    cleanup.loopdev = None;
    drop(cleanup);
    let stats = export.stats();
    export.stop().unwrap();
    assert!(stats.write_bytes > 4 << 20, "{stats:?}");
    // mkfs.ext4 discards the whole device first: loop turns that into fallocate(PUNCH_HOLE)
    // on the file, which reaches the device as DISCARD.
    assert!(dev.counts().discards > 0, "{:?}", dev.counts());

    // The device itself holds an ext4 filesystem: the superblock magic 0xEF53 at 1080.
    assert_eq!(dev.read(1080, 2), [0x53, 0xef]);

    // Export the same device again and check the filesystem through the file directly.
    let again = dir.join("again.img");
    let export = FuseExport::start(dev, &again, FuseOptions::default()).unwrap();
    run("e2fsck", &["-fn", again.to_str().unwrap()]);
    export.stop().unwrap();
}
