//! libnbd launching the server itself, as its interop tests and `nbdinfo -- [ CMD ]` do: the
//! `nbd-serve` example in inetd mode (`-s`, `nbd_connect_command`) and with systemd socket
//! activation (`--socket-activation`, `nbd_connect_systemd_socket_activation`); and the same
//! modes facing clients that misbehave.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{require, Scratch};

/// The example binary, built by `cargo test` (and `cargo build --examples`) next to the tests.
fn nbd_serve() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("examples/nbd-serve");
    if bin.is_file() {
        Some(bin)
    } else {
        println!(
            "SKIP: {} is not built (cargo build --examples)",
            bin.display()
        );
        None
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let path = std::env::var("PATH").unwrap_or_default();
    Command::new("timeout")
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .arg("60")
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn py_list(argv: &[&str]) -> String {
    let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
    format!("[{}]", quoted.join(", "))
}

#[test]
fn nbd_connect_command_runs_the_server_on_stdin() {
    let Some(bin) = nbd_serve() else { return };
    if !require("nbdsh") {
        return;
    }
    let bin = bin.to_str().unwrap();
    let argv = py_list(&[bin, "-s", "--memory", "64M"]);
    let script = format!(
        "h.connect_command({argv})\n\
         assert h.get_size() == 64 << 20\n\
         assert h.can_multi_conn() and h.can_trim() and h.can_zero()\n\
         h.pwrite(b'x' * 65536, 1 << 20)\n\
         assert h.pread(65536, 1 << 20) == b'x' * 65536\n\
         h.flush()\n\
         h.shutdown()\n\
         print('done')\n"
    );
    assert!(ok(&run("nbdsh", &["-c", &script])).contains("done"));
    // Read-only, from a file, through nbdinfo's view of it.
    let scratch = Scratch::new("stdin-ro");
    let img = scratch.path("disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let argv = py_list(&[bin, "-s", "--file", img.to_str().unwrap(), "--read-only"]);
    let script = format!(
        "h.connect_command({argv})\n\
         assert h.is_read_only()\n\
         assert h.pread(4096, 0) == bytes([7]) * 4096\n\
         try:\n    h.pwrite(b'y' * 512, 0)\n    raise SystemExit('write allowed')\n\
         except nbd.Error as e:\n    print('refused', e.errno)\n"
    );
    assert!(ok(&run("nbdsh", &["-c", &script])).contains("refused"));
    assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 1 << 20]);
}

#[test]
fn socket_activation_serves_libnbd() {
    let Some(bin) = nbd_serve() else { return };
    if !require("nbdsh") || !require("nbdinfo") {
        return;
    }
    let bin = bin.to_str().unwrap();
    let argv = py_list(&[bin, "--socket-activation", "--memory", "1G"]);
    let script = format!(
        "h.connect_systemd_socket_activation({argv})\n\
         assert h.get_size() == 1 << 30\n\
         h.pwrite(b'a' * 4096, 8192)\n\
         assert h.pread(4096, 8192) == b'a' * 4096\n\
         h.shutdown()\n\
         print('done')\n"
    );
    assert!(ok(&run("nbdsh", &["-c", &script])).contains("done"));
    // nbdinfo's `[ CMD ]` form uses socket activation too: the map of an empty memory row.
    let map = ok(&run(
        "nbdinfo",
        &[
            "--map",
            "--",
            "[",
            bin,
            "--socket-activation",
            "--memory",
            "1G",
            "]",
        ],
    ));
    assert!(map.contains("1073741824    3  hole,zero"), "{map}");
}

#[test]
fn activation_variables_are_checked() {
    let Some(bin) = nbd_serve() else { return };
    // No LISTEN_PID, or one that is not this process: refused with a reason, not a hang.
    for pid in [None, Some("1")] {
        let mut cmd = Command::new(&bin);
        cmd.args(["--socket-activation", "--memory", "1M"])
            .env("LISTEN_FDS", "1")
            .stdin(Stdio::null());
        match pid {
            Some(p) => cmd.env("LISTEN_PID", p),
            None => cmd.env_remove("LISTEN_PID"),
        };
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("LISTEN_PID"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn stdin_mode_survives_bad_clients() {
    let Some(bin) = nbd_serve() else { return };
    // Standard input that is not a socket: a clear error.
    let out = Command::new(&bin)
        .args(["-s", "--memory", "1M"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a connected Unix or TCP socket"));
    // A client that sends garbage, one that hangs up mid-request: the server exits cleanly
    // (status 0, no panic) when its one client is gone.
    for script in [&b"garbage, not NBD at all"[..], &b""[..]] {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut child = Command::new(&bin)
            .args(["-s", "--memory", "1M"])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut greeting = [0u8; 18];
        ours.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        let _ = ours.write_all(script);
        drop(ours);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{status}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
