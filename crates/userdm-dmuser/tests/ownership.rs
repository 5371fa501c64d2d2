//! The endpoint's owner and mode: the daemon runs unprivileged, and nobody else gets in.
//! Needs root (to chown and to run the probe as other users); skipped otherwise.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;
use userdm_dmuser::UserTarget;
use userdm_io::IoOp;
use userdm_table::Table;

const PROBE_ENV: &str = "DMUSER_OWNERSHIP_PROBE";

/// Run as another user by the tests below: connects, then serves one FLUSH if it got in.
/// Exit codes: 0 served, 3 refused at connect, 4 closed by userdm.
#[test]
fn probe() {
    let Some(path) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    let code = match std::os::unix::net::UnixStream::connect(&path) {
        Err(_) => 3,
        Ok(mut s) => {
            use std::io::{Read, Write};
            let mut h = [0u8; 40];
            match s.read_exact(&mut h) {
                Err(_) => 4,
                Ok(()) => {
                    let seq = u64::from_ne_bytes(h[..8].try_into().unwrap());
                    let reply = userdm_dmuser::wire::DmUserMessage::reply(seq, 0).to_bytes();
                    s.write_all(&reply).map_or(5, |()| 0)
                }
            }
        }
    };
    std::process::exit(code);
}

fn run_probe(path: &std::path::Path, uid: u32, gid: u32, groups: &[u32]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "probe", "--test-threads=1"])
        .env(PROBE_ENV, path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let groups = groups.to_vec();
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))
        });
    }
    cmd.spawn().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn owner_and_mode_admit_the_daemon_and_nobody_else() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempdir();
    let exe = std::env::current_exe().unwrap();
    // The probe binary must be reachable by the other users.
    if std::fs::metadata(&exe).unwrap().mode() & 0o001 == 0 {
        eprintln!("skipped: the test binary is not executable by others");
        return;
    }
    let table = std::sync::Arc::new(
        Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 ctl owner=64000:64001 mode=0660")
            .unwrap(),
    );
    let path = dir.path().join("ctl");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (64000, 64001, 0o660)
    );

    // A stranger cannot connect.
    let out = run_probe(&path, 64002, 64002, &[]).wait().unwrap();
    assert_eq!(out.code(), Some(3));

    // The owner can, and serves IO.
    let flush = io(&table, IoOp::Flush, 0, 0, None);
    let out = run_probe(&path, 64000, 64000, &[]).wait().unwrap();
    assert_eq!(out.code(), Some(0));
    flush.result().unwrap();

    // So can a member of the group, by primary or supplementary group.
    for (gid, groups) in [(64001, vec![]), (64005, vec![64001])] {
        let flush = io(&table, IoOp::Flush, 0, 0, None);
        let out = run_probe(&path, 64003, gid, &groups).wait().unwrap();
        assert_eq!(out.code(), Some(0));
        flush.result().unwrap();
    }
}

#[test]
fn peer_credentials_are_checked_even_if_the_file_allows() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    if std::fs::metadata(&exe).unwrap().mode() & 0o001 == 0 {
        eprintln!("skipped: the test binary is not executable by others");
        return;
    }
    let dir = tempdir();
    let table = std::sync::Arc::new(
        Table::<UserTarget>::parse(&ctx(&dir), "0 8 user 0 8 ctl owner=64000:64001 mode=0600")
            .unwrap(),
    );
    let path = dir.path().join("ctl");
    // Someone loosened the file's mode behind userdm's back: SO_PEERCRED still refuses.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let flush = io(&table, IoOp::Flush, 0, 0, None);
    let out = run_probe(&path, 64002, 64002, &[]).wait().unwrap();
    assert_eq!(out.code(), Some(4));
    assert!(table.status_lines()[0].contains("refused=1"));
    let out = run_probe(&path, 64000, 64000, &[]).wait().unwrap();
    assert_eq!(out.code(), Some(0));
    flush.result().unwrap();
}
