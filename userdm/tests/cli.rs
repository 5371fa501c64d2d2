//! The `userdm` binary end to end: each test gets its own run directory, creates devices (one
//! server process each), checks dmsetup's output formats and every failure path, and removes
//! its servers in a drop guard however it ends.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use userdm_control::client;
use userdm_control::proto::{Command as Ctl, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_userdm");

/// A run directory with its own servers, all removed on drop.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("userdm-cli")
                .tempdir()
                .unwrap(),
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A zero-filled backing file of `mib` MiB.
    fn file(&self, name: &str, mib: u64) -> String {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(mib << 20).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("USERDM_RUN_DIR", self.run_dir())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "userdm {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        check_fails(args, &out, code)
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn pid(&self, name: &str) -> u64 {
        self.json(&["info", "--json", name])[0]["pid"]
            .as_u64()
            .unwrap()
    }

    fn socket(&self, name: &str) -> PathBuf {
        let minor = self.json(&["info", "--json", name])[0]["minor"]
            .as_u64()
            .unwrap();
        self.run_dir()
            .join("devices")
            .join(minor.to_string())
            .join("control.sock")
    }

    /// Opens the device through the control protocol: counted as an opener until dropped.
    fn hold_open(&self, name: &str) -> UnixStream {
        let (reply, stream) = client::call_keep(&self.socket(name), name, Ctl::Open, None).unwrap();
        assert_eq!(reply, Reply::Opened);
        stream
    }
}

fn check_fails(args: &[&str], out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "userdm {args:?}: expected exit {code}, stdout {:?}, stderr {stderr:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["remove_all", "-f"]);
        // Whatever is still there (open devices, a test that failed half way) is killed.
        if let Ok(entries) = std::fs::read_dir(self.run_dir().join("devices")) {
            for e in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                }
            }
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// t0 and t3 of dmsetup-output-6.12.md, on files instead of loop devices.
fn create_t0_t3(env: &Env) -> (String, String) {
    let a = env.file("a.img", 64);
    let b = env.file("b.img", 64);
    let table = format!(
        "0 2048 zero\n2048 2048 error\n4096 8192 linear {a} 0\n12288 8192 striped 2 128 {a} 16384 {b} 0"
    );
    env.ok(&["create", "t0", "--table", &table]);
    env.ok(&["create", "t3", "--notable"]);
    (a, b)
}

#[test]
fn outputs_match_dmsetup() {
    let env = Env::new();
    let (a, b) = create_t0_t3(&env);
    assert_eq!(env.ok(&["ls"]), "t0\t(0:0)\nt3\t(0:1)\n");
    assert_eq!(
        env.ok(&["info", "t0"]),
        "Name:              t0\nState:             ACTIVE\nRead Ahead:        512\n\
         Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n\
         Major, minor:      0, 0\nNumber of targets: 4\n\n"
    );
    assert_eq!(
        env.ok(&["info", "t3"]),
        "Name:              t3\nState:             ACTIVE\n\
         Tables present:    None\nOpen count:        0\nEvent number:      0\n\
         Major, minor:      0, 1\nNumber of targets: 0\n\n"
    );
    assert_eq!(
        env.ok(&["info", "-c"]),
        "Name             Maj Min Stat Open Targ Event  UUID                            \n\
         t0                 0   0 L--w    0    4      0                                 \n\
         t3                 0   1 ---w    0    0      0                                 \n"
    );
    assert_eq!(
        env.ok(&["table"]),
        format!(
            "t0: 0 2048 zero \nt0: 2048 2048 error \nt0: 4096 8192 linear {a} 0\n\
             t0: 12288 8192 striped 2 128 {a} 16384 {b} 0\nt3: \n"
        )
    );
    assert_eq!(
        env.ok(&["status"]),
        format!(
            "t0: 0 2048 zero \nt0: 2048 2048 error \nt0: 4096 8192 linear \n\
             t0: 12288 8192 striped 2 {a} {b} 1 AA\nt3: \n"
        )
    );
    assert_eq!(
        env.ok(&[
            "info",
            "-c",
            "--noheadings",
            "-o",
            "name,open,tables_loaded",
            "--separator",
            ",",
            "t0",
            "t3"
        ]),
        "t0,0,Live\nt3,0,None\n"
    );
    assert_eq!(env.fails(&["info", "-c", "-o", "nope"], 2), "userdm: unrecognised field: nope (fields: name,major,minor,attr,open,segments,events,uuid,read_ahead,tables_loaded,suspended,readonly,devno)\n");
    assert_eq!(env.ok(&["table", "t3"]), "\n");
    // As dmsetup, the devices before a missing one are shown, then the command fails.
    let out = env.run(&["table", "t3", "t9", "t0"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "t3: \n");
    assert_eq!(
        env.ok(&["table", "t0", "--target", "zero"]),
        "0 2048 zero \n"
    );
    assert_eq!(
        env.ok(&["table", "t0", "t3", "--target", "linear"]),
        format!("t0: 4096 8192 linear {a} 0\n")
    );
    // Files have no device numbers: (0, 0), the last one named first, as the kernel lists.
    assert_eq!(env.ok(&["deps", "t0"]), "2 dependencies\t: (0, 0) (0, 0)\n");
    assert_eq!(
        env.ok(&["deps"]),
        "t0: 2 dependencies\t: (0, 0) (0, 0)\nt3: 0 dependencies\t:\n"
    );
    assert_eq!(
        env.ok(&["ls", "--tree"]),
        "t0 (0:0)\n |- (0:0)\n `- (0:0)\nt3 (0:1)\n"
    );
    assert_eq!(env.ok(&["ls", "--target", "striped"]), "t0\t(0, 0)\n");
    let targets = env.ok(&["targets"]);
    assert!(
        targets.starts_with("linear           v1.4.0\n"),
        "{targets}"
    );
    assert!(targets.contains("\nstriped          v1.6.0\n"));
    assert_eq!(
        env.ok(&["target-version", "striped", "zero"]),
        "striped          v1.6.0\nzero             v1.2.0\n"
    );
    let e = env.fails(&["target-version", "nosuch"], 1);
    assert!(e.contains("target type nosuch is not known"), "{e}");
    let version = env.ok(&["version"]);
    assert!(version.starts_with("Library version:   "), "{version}");
    assert!(version.contains("\nDriver version:    "));
    env.ok(&["remove_all"]);
    assert_eq!(env.ok(&["ls"]), "No devices found\n");
    assert_eq!(env.ok(&["info"]), "No devices found\n");
}

#[test]
fn table_sources() {
    let env = Env::new();
    let out = env.run_stdin(
        &["create", "s0"],
        "0 8 zero\n# comment\n\n8 8 error  # tail\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(env.ok(&["table", "s0"]), "0 8 zero \n8 8 error \n");
    std::fs::write(env.path("t.table"), "0 16 zero\n").unwrap();
    env.ok(&["create", "s1", "t.table"]);
    assert_eq!(env.ok(&["table", "s1"]), "0 16 zero \n");
    // Empty standard input: no table, as dmsetup.
    env.ok(&["create", "s2"]);
    assert!(env
        .ok(&["info", "s2"])
        .contains("Tables present:    None\n"));
    let out = env.run_stdin(&["load", "s2"], "0 32 zero\n");
    assert!(out.status.success(), "{out:?}");
    env.ok(&["resume", "s2"]);
    assert_eq!(env.ok(&["table", "s2"]), "0 32 zero \n");
    env.ok(&["reload", "s2", "t.table"]);
    assert_eq!(env.ok(&["table", "--inactive", "s2"]), "0 16 zero \n");
    // Relative paths resolve against the caller's directory.
    env.file("rel.img", 1);
    env.ok(&["create", "s3", "--table", "0 2048 linear rel.img 0"]);
    assert_eq!(env.ok(&["table", "s3"]), "0 2048 linear rel.img 0\n");
}

#[test]
fn lifecycle() {
    let env = Env::new();
    env.ok(&["create", "t1", "--table", "0 8192 zero", "-u", "USERDM-t1"]);
    let info = env.ok(&["info", "t1"]);
    assert!(
        info.ends_with("Number of targets: 1\nUUID: USERDM-t1\n\n"),
        "{info}"
    );

    env.ok(&["suspend", "t1"]);
    assert!(env
        .ok(&["info", "t1"])
        .contains("\nState:             SUSPENDED\n"));
    assert_eq!(
        env.ok(&["info", "-c", "--noheadings", "t1"])
            .split(':')
            .nth(3),
        Some("L-sw")
    );
    env.ok(&["resume", "t1"]);
    assert!(env
        .ok(&["info", "t1"])
        .contains("\nState:             ACTIVE\n"));

    env.ok(&["load", "t1", "--table", "0 4096 error"]);
    assert!(env
        .ok(&["info", "t1"])
        .contains("\nTables present:    LIVE & INACTIVE\n"));
    assert_eq!(env.ok(&["table", "--inactive", "t1"]), "0 4096 error \n");
    assert_eq!(env.ok(&["table", "t1"]), "0 8192 zero \n");
    env.ok(&["clear", "t1"]);
    assert!(env
        .ok(&["info", "t1"])
        .contains("\nTables present:    LIVE\n"));
    assert_eq!(env.ok(&["table", "--inactive", "t1"]), "\n");
    env.ok(&["load", "t1", "--table", "0 4096 error"]);
    env.ok(&["resume", "t1"]);
    assert_eq!(env.ok(&["table", "t1"]), "0 4096 error \n");

    env.ok(&["rename", "t1", "t2"]);
    env.fails(&["info", "t1"], 1);
    let info = env.ok(&["info", "t2"]);
    assert!(info.starts_with("Name:              t2\n"));
    assert!(info.contains("\nEvent number:      1\n"), "{info}");
    env.ok(&["create", "t1", "--notable"]);
    env.ok(&["rename", "t1", "--setuuid", "USERDM-new"]);
    assert!(env.ok(&["info", "t1"]).contains("\nUUID: USERDM-new\n"));
    let e = env.fails(&["rename", "t1", "--setuuid", "other"], 1);
    assert!(e.contains("a uuid can be set only once"), "{e}");
    let e = env.fails(&["rename", "t1", "t2"], 1);
    assert_eq!(e, "userdm: device name t2 is already in use\n");
    let e = env.fails(&["create", "t9", "--notable", "-u", "USERDM-t1"], 1);
    assert_eq!(e, "userdm: uuid USERDM-t1 is already in use by device t2\n");

    env.ok(&["setgeometry", "t2", "1", "2", "3", "0"]);
    let g = &env.json(&["info", "--json", "t2"])[0]["geometry"];
    assert_eq!(g["cylinders"], 1);
    let e = env.fails(&["setgeometry", "t2", "65536", "1", "1", "0"], 1);
    assert!(e.contains("invalid geometry"), "{e}");

    env.ok(&["wipe_table", "t2"]);
    assert_eq!(env.ok(&["table", "t2"]), "0 4096 error \n");

    env.ok(&["remove", "t1", "t2"]);
    assert_eq!(env.ok(&["ls"]), "No devices found\n");
}

#[test]
fn wait_for_events() {
    let env = Env::new();
    env.ok(&["create", "w0", "--table", "0 8 zero"]);
    // Event 0 is current: `wait w0` blocks until the next event.
    let waiter = env
        .command(&["wait", "-v", "w0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["rename", "w0", "w1"]);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Name:              w1\n"), "{text}");
    assert!(text.contains("Event number:      1\n"), "{text}");
    // A number already passed returns at once.
    assert_eq!(env.ok(&["wait", "w1", "0"]), "");
}

#[test]
fn messages() {
    let env = Env::new();
    let a = env.file("a.img", 4);
    env.ok(&["create", "d0", "--table", &format!("0 8192 dust {a} 0 512")]);
    assert_eq!(
        env.ok(&["message", "d0", "0", "countbadblocks"]),
        "countbadblocks: 0 badblock(s) found\n"
    );
    assert_eq!(env.ok(&["message", "d0", "0", "addbadblock", "5"]), "");
    assert_eq!(
        env.ok(&["message", "d0", "0", "countbadblocks"]),
        "countbadblocks: 1 badblock(s) found\n"
    );
    let e = env.fails(&["message", "d0", "8192", "countbadblocks"], 1);
    assert_eq!(e, "userdm: message d0: no target at sector 8192\n");
    env.ok(&["create", "z0", "--table", "0 8 zero"]);
    let e = env.fails(&["message", "z0", "0", "foo"], 1);
    assert_eq!(
        e,
        "userdm: message z0: target type does not support messages\n"
    );
    let e = env.fails(&["message", "z0", "0", "@cancel_deferred_remove"], 1);
    assert!(e.contains("not marked for deferred removal"), "{e}");
}

/// Every refused input: the exit code, a message naming the problem, and nothing changed.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let env = Env::new();
    let (a, _) = create_t0_t3(&env);
    let before = (env.ok(&["ls"]), env.ok(&["table"]), env.ok(&["info"]));
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["create", "x", "--table", "0 100"],
            1,
            "create x: line 1: expected 'start length target",
        ),
        (
            &["create", "x", "--table", "0 100 zero\n200 100 zero"],
            1,
            "create x: line 2: gap in table",
        ),
        (
            &["create", "x", "--table", "0 100 zero\nnosuch"],
            1,
            "line 2: expected",
        ),
        (
            &["create", "x", "--table", "0 100 nosuch"],
            1,
            "create x: line 1: nosuch: unknown target type",
        ),
        (
            &["create", "x", "--table", "0 100 linear /x"],
            1,
            "create x: line 1: linear: Invalid argument count",
        ),
        (
            &["create", "x", "--table", "0 100 linear /nonexistent/file 0"],
            1,
            "/nonexistent/file",
        ),
        (&["create", "x", "--table", "0 0 zero"], 1, "zero-length"),
        (
            &["create", "x", "nosuch.table"],
            1,
            "cannot read table file nosuch.table",
        ),
        (
            &["create", "t0", "--table", "0 8 zero"],
            1,
            "device name t0 is already in use",
        ),
        (
            &["create", "bad/name", "--table", "0 8 zero"],
            1,
            "invalid device name",
        ),
        (
            &["load", "t0", "--table", "0 8 nosuch"],
            1,
            "load t0: line 1: nosuch: unknown target type",
        ),
        (&["load", "t0"], 2, "no table rows given"),
        (&["info", "t9"], 1, "device t9 does not exist"),
        (&["table", "t9"], 1, "device t9 does not exist"),
        (&["status", "t0", "t9"], 1, "device t9 does not exist"),
        (&["info", "t9", "t0"], 1, "device t9 does not exist"),
        (&["remove", "t9"], 1, "device t9 does not exist"),
        (&["suspend", "t9"], 1, "device t9 does not exist"),
        (&["rename", "t9", "t10"], 1, "device t9 does not exist"),
        (&["message", "t9", "0", "x"], 1, "device t9 does not exist"),
        (
            &["message", "t0", "99999", "x"],
            1,
            "message t0: no target at sector 99999",
        ),
        (&["message", "t0", "x", "y"], 2, "invalid sector 'x'"),
        (&["message", "t3", "0", "x"], 1, "has no live table"),
        (&["setgeometry", "t0", "1", "1", "1"], 2, "required"),
        (
            &["create", "x", "--notable", "--table", "0 8 zero"],
            2,
            "cannot be used with",
        ),
        (
            &["create", "x", "--export", "ftp:x"],
            2,
            "invalid export 'ftp:x'",
        ),
        (
            &[
                "create",
                "x",
                "--table",
                "0 8 zero",
                "--export",
                "nbd:unix:/nonexistent/s.sock",
            ],
            1,
            "create x: export nbd:unix:/nonexistent/s.sock: cannot listen",
        ),
        (&["nosuch"], 2, "unrecognized subcommand"),
        (&[], 2, "Usage"),
    ];
    for (args, code, needle) in cases {
        let e = env.fails(args, *code);
        assert!(
            e.contains(needle),
            "userdm {args:?}: {e:?} does not say {needle:?}"
        );
        if *code == 1 {
            assert!(e.starts_with("userdm: "), "{e}");
        }
        assert_eq!(
            (env.ok(&["ls"]), env.ok(&["table"]), env.ok(&["info"])),
            before,
            "userdm {args:?} changed something"
        );
    }
    // The data of t0 is untouched too: its linear row still maps a.img.
    assert!(env.ok(&["table", "t0"]).contains(&format!("linear {a} 0")));
    let dirs = std::fs::read_dir(env.run_dir().join("devices"))
        .unwrap()
        .count();
    assert_eq!(dirs, 2, "failed creates left directories behind");
}

#[test]
fn busy_devices_and_deferred_removal() {
    let env = Env::new();
    env.ok(&["create", "b0", "--table", "0 8 zero"]);
    env.ok(&["create", "b1", "--table", "0 8 zero"]);
    let held = env.hold_open("b0");
    assert!(env.ok(&["info", "b0"]).contains("\nOpen count:        1\n"));
    let e = env.fails(&["remove", "b0"], 1);
    assert!(
        e.contains("remove b0: device b0 is busy: open count 1"),
        "{e}"
    );
    let e = env.fails(&["remove_all"], 1);
    assert!(e.contains("b0 left in place"), "{e}");
    assert_eq!(env.ok(&["ls"]), "b0\t(0:0)\n");
    env.ok(&["remove", "--deferred", "b0"]);
    assert!(env
        .ok(&["info", "b0"])
        .contains("\nState:             ACTIVE (DEFERRED REMOVE)\n"));
    drop(held);
    wait_until("deferred removal", || {
        env.ok(&["ls"]) == "No devices found\n"
    });

    env.ok(&["create", "b2", "--table", "0 8 zero"]);
    let held = env.hold_open("b2");
    env.ok(&["remove", "--deferred", "b2"]);
    env.ok(&["message", "b2", "0", "@cancel_deferred_remove"]);
    assert!(env
        .ok(&["info", "b2"])
        .contains("\nState:             ACTIVE\n"));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(env.ok(&["ls"]), "b2\t(0:0)\n");
    // remove -f of an open device: the table fails all IO, the device stays while open.
    let held = env.hold_open("b2");
    env.fails(&["remove", "-f", "b2"], 1);
    assert_eq!(env.ok(&["table", "b2"]), "0 8 error \n");
    drop(held);
    wait_until("close", || {
        env.ok(&["info", "b2"]).contains("Open count:        0\n")
    });
    env.ok(&["remove", "b2"]);
}

#[test]
fn a_killed_server_takes_only_its_device() {
    let env = Env::new();
    env.ok(&["create", "k0", "--table", "0 8 zero"]);
    env.ok(&["create", "k1", "--table", "0 16 zero"]);
    let pid = env.pid("k0");
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("k0's server to die", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    let out = env.run(&["ls"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "k1\t(0:1)\n");
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("warning: removed stale device k0 (id 0)"),
        "{warning}"
    );
    assert_eq!(env.ok(&["table", "k1"]), "0 16 zero \n");
    assert!(!env.run_dir().join("devices/0").exists());
    // The name and the id are free again.
    env.ok(&["create", "k0", "--table", "0 8 zero"]);
    assert_eq!(env.ok(&["ls"]), "k0\t(0:0)\nk1\t(0:1)\n");
}

#[test]
fn concurrent_creates_of_one_name() {
    let env = Env::new();
    let children: Vec<_> = (0..4)
        .map(|_| {
            env.command(&["create", "same", "--table", "0 8 zero"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1, "{codes:?}");
    assert_eq!(env.ok(&["ls"]), "same\t(0:0)\n");
}

#[test]
fn json_output() {
    let env = Env::new();
    create_t0_t3(&env);
    let info = env.json(&["info", "--json"]);
    assert_eq!(info[0]["name"], "t0");
    assert_eq!(info[0]["target_count"], 4);
    assert_eq!(info[0]["read_ahead"], 512);
    assert_eq!(info[1]["live_table"], false);
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(
        ls,
        serde_json::json!([
            {"name": "t0", "major": 0, "minor": 0},
            {"name": "t3", "major": 0, "minor": 1}
        ])
    );
    let table = env.json(&["table", "--json", "t0"]);
    assert_eq!(table[0]["rows"][1]["target_type"], "error");
    assert_eq!(table[0]["rows"][3]["start"], 12288);
    let status = env.json(&["--json", "status"]);
    assert_eq!(
        status[0]["rows"][3]["params"]
            .as_str()
            .unwrap()
            .split(' ')
            .next_back(),
        Some("AA")
    );
    assert_eq!(status[1]["rows"], serde_json::json!([]));
    let deps = env.json(&["deps", "--json", "t0"]);
    assert_eq!(deps[0]["deps"].as_array().unwrap().len(), 2);
    let targets = env.json(&["targets", "--json"]);
    assert!(targets
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "striped"));
    let version = env.json(&["version", "--json"]);
    assert_eq!(version["protocol"], 1);
    let tree = env.json(&["ls", "--tree", "--json"]);
    assert_eq!(tree[0]["deps"].as_array().unwrap().len(), 2);
}

#[test]
fn protocol_mismatch_and_garbage_are_answered() {
    let env = Env::new();
    env.ok(&["create", "p0", "--table", "0 8 zero"]);
    let sock = env.socket("p0");
    let ask = |line: &str| {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str::<Value>(&reply).unwrap()
    };
    let r = ask("{\"version\":999,\"command\":{\"op\":\"info\"}}\n");
    assert_eq!(r["error"]["kind"], "version");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("protocol version mismatch"));
    let r = ask("not json\n");
    assert_eq!(r["error"]["kind"], "bad_request");
    let r = ask("{\"version\":1,\"command\":{\"op\":\"fly\"}}\n");
    assert_eq!(r["error"]["kind"], "bad_request");
    let r = ask("{\"version\":1,\"command\":{\"op\":\"message\",\"sector\":-1}}\n");
    assert_eq!(r["error"]["kind"], "bad_request");
    // A silent client and a client that hangs up do not hurt the server.
    drop(UnixStream::connect(&sock).unwrap());
    assert_eq!(env.ok(&["table", "p0"]), "0 8 zero \n");
}

#[test]
fn help_documents_verbs_and_exit_codes() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    for needle in [
        "Exit status:",
        "2  usage error",
        "USERDM_RUN_DIR",
        "remove_all",
        "wipe_table",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
    assert!(!help.contains("__serve"));
    for verb in [
        "create",
        "remove",
        "remove_all",
        "suspend",
        "resume",
        "load",
        "reload",
        "clear",
        "rename",
        "message",
        "ls",
        "info",
        "deps",
        "status",
        "table",
        "wait",
        "targets",
        "target-version",
        "version",
        "setgeometry",
        "wipe_table",
        "export",
        "add",
        "list",
        "del",
        "recover",
        "features",
    ] {
        let h = env.ok(&[verb, "--help"]);
        assert!(h.contains("Usage: userdm"), "{verb} --help: {h}");
        assert!(h.contains("\nExamples:\n  userdm "), "{verb} --help: {h}");
        assert!(h.contains("Exit status: 0 success, 1 the command failed, 2 usage error."));
    }
    assert!(env.ok(&["create", "--help"]).contains("Examples:"));
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Linear, striped and memory rows behind one NBD export: what nbdcopy writes, it reads back.
#[test]
fn nbd_export_round_trip() {
    if !have("nbdcopy") || !have("nbdinfo") {
        eprintln!("skipped: nbdcopy/nbdinfo (libnbd-bin) are not installed");
        return;
    }
    let env = Env::new();
    let a = env.file("a.img", 8);
    let b = env.file("b.img", 8);
    let sock = env.path("n0.sock");
    let table =
        format!("0 8192 linear {a} 0\n8192 8192 striped 2 64 {a} 8192 {b} 0\n16384 8192 memory\n");
    env.ok(&[
        "create",
        "n0",
        "--table",
        &table,
        "--export",
        &format!("nbd:unix:{}", sock.display()),
    ]);
    let uri = format!("nbd+unix:///n0?socket={}", sock.display());
    let size = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "12582912");
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(env.path("src.img"), &data).unwrap();
    let st = Command::new("nbdcopy")
        .args([env.path("src.img").to_str().unwrap(), &uri])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("nbdcopy")
        .args([&uri, env.path("out.img").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        std::fs::read(env.path("out.img")).unwrap() == data,
        "read back differs"
    );
    let io = &env.json(&["info", "--json", "n0"])[0]["io"];
    assert!(io["write_bytes"].as_u64().unwrap() >= 12 << 20, "{io}");
    assert!(io["read_bytes"].as_u64().unwrap() >= 12 << 20, "{io}");
    assert_eq!(io["errors"], 0);
    // The linear row's bytes are in a.img at offset 0.
    let a_bytes = std::fs::read(&a).unwrap();
    assert!(a_bytes[..4 << 20] == data[..4 << 20]);
    env.ok(&["remove", "n0"]);
    assert!(!sock.exists());
}

/// fio verifies every block it wrote while the device is suspended, resumed and reloaded under
/// it.
#[test]
fn nbd_fio_verify_across_suspend_and_reload() {
    if !have("fio") {
        eprintln!("skipped: fio is not installed");
        return;
    }
    let env = Env::new();
    let a = env.file("a.img", 16);
    let b = env.file("b.img", 16);
    let sock = env.path("f0.sock");
    // Rows map disjoint parts of the files: linear a[0, 8 MiB), striped a[8, 12 MiB) and
    // b[4, 8 MiB); then 8 MiB of RAM, which every reload must keep.
    let table = format!(
        "0 16384 linear {a} 0\n16384 16384 striped 2 128 {a} 16384 {b} 8192\n\
         32768 16384 memory\n"
    );
    std::fs::write(env.path("f0.table"), &table).unwrap();
    env.ok(&[
        "create",
        "f0",
        "f0.table",
        "--export",
        &format!("nbd:unix:{}", sock.display()),
    ]);
    let uri = format!("nbd+unix:///f0?socket={}", sock.display());
    let mut fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=24m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the crate directory (fio's default is the cwd).
            "--verify_state_save=0",
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cycles = 0;
    while fio.try_wait().unwrap().is_none() {
        env.ok(&["suspend", "f0"]);
        std::thread::sleep(Duration::from_millis(20));
        if cycles % 2 == 0 {
            env.ok(&["resume", "f0"]);
        } else {
            env.ok(&["load", "f0", "f0.table"]);
            env.ok(&["resume", "f0"]);
        }
        cycles += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cycles >= 2,
        "fio finished before the device was suspended twice"
    );
    // Terse format: field 5 is the job's error code.
    let terse = String::from_utf8_lossy(&out.stdout);
    let line = terse.lines().find(|l| l.contains(";verify;")).unwrap();
    assert_eq!(line.split(';').nth(4), Some("0"), "{line}");
    let info = env.json(&["info", "--json", "f0"]);
    assert_eq!(info[0]["open_count"], 0);
}

/// A TCP export on port 0 reports the port it got; a second device cannot take a Unix socket
/// that is in use.
#[test]
fn nbd_tcp_port_and_socket_in_use() {
    if !have("nbdinfo") {
        eprintln!("skipped: nbdinfo (libnbd-bin) is not installed");
        return;
    }
    let env = Env::new();
    env.ok(&[
        "create",
        "m0",
        "--table",
        "0 8192 memory",
        "--export",
        "nbd:tcp:127.0.0.1:0",
    ]);
    let export = env.json(&["info", "--json", "m0"])[0]["exports"][0]
        .as_str()
        .unwrap()
        .to_string();
    let port = export.strip_prefix("nbd:tcp:127.0.0.1:").unwrap();
    assert_ne!(port, "0");
    let out = Command::new("nbdinfo")
        .args(["--size", &format!("nbd://127.0.0.1:{port}/m0")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4194304");
    let sock = env.path("m1.sock");
    let spec = format!("nbd:unix:{}", sock.display());
    env.ok(&["create", "m1", "--table", "0 8 zero", "--export", &spec]);
    let e = env.fails(
        &["create", "m2", "--table", "0 8 zero", "--export", &spec],
        1,
    );
    assert!(e.contains("is in use by another server"), "{e}");
    assert_eq!(env.ok(&["ls"]), "m0\t(0:0)\nm1\t(0:1)\n");
    // A read-only device is exported read-only.
    let ro = env.path("ro.sock");
    env.ok(&[
        "create",
        "ro",
        "--readonly",
        "--table",
        "0 8 zero",
        "--export",
        &format!("nbd:unix:{}", ro.display()),
    ]);
    let out = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///ro?socket={}", ro.display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("is_read_only: true"));
    assert!(env
        .ok(&["info", "ro"])
        .contains("State:             ACTIVE (READ-ONLY)\n"));
}

/// Root and the owner named at create may change a device; anyone who can reach the socket
/// may query it.
#[test]
fn owners_and_strangers() {
    if !have("setpriv") || !is_root() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let env = Env::new();
    // Let other users traverse the test's directory.
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    env.ok(&[
        "create", "o0", "--table", "0 8 zero", "--uid", "65534", "--gid", "65534",
    ]);
    let as_user = |uid: &str, args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            BIN,
        ])
        .args(args)
        .env("USERDM_RUN_DIR", env.run_dir())
        .stdin(Stdio::null());
        c.output().unwrap()
    };
    let socket = env.socket("o0");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&meta) & 0o777, 0o600);
    let out = as_user("65534", &["suspend", "o0"]);
    assert!(out.status.success(), "{out:?}");
    let out = as_user("65534", &["rename", "o0", "o1"]);
    assert!(out.status.success(), "{out:?}");
    env.ok(&["resume", "o1"]);
    // The owner may not load tables: the server would open their files with root's rights.
    let out = as_user(
        "65534",
        &["load", "o1", "--table", "0 8 linear /etc/shadow 0"],
    );
    let e = check_fails(&["load"], &out, 1);
    assert!(
        e.contains("only root may load a table into device o1"),
        "{e}"
    );
    // A stranger cannot even connect to a 0600 socket...
    let out = as_user("65533", &["suspend", "o1"]);
    check_fails(&["suspend"], &out, 1);
    // ...and behind a socket opened up by hand, may only query.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = as_user("65533", &["table", "o1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0 8 zero \n");
    let out = as_user("65533", &["suspend", "o1"]);
    let e = check_fails(&["suspend"], &out, 1);
    assert!(
        e.contains(
            "permission denied: only root and the device's owner may send suspend to device o1"
        ),
        "{e}"
    );
    assert!(env
        .ok(&["info", "o1"])
        .contains("State:             ACTIVE\n"));
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `-o` of ls and deps, and --sort of info -c; deps of a real block device (a loop device,
/// when one can be attached) by number and by name.
#[test]
fn name_options_and_sorting() {
    let env = Env::new();
    env.ok(&["create", "b", "--table", "0 8 zero"]);
    env.ok(&["create", "a", "--table", "0 8 zero"]);
    // Without a kernel device, names fall back to numbers, as dmsetup's do.
    assert_eq!(env.ok(&["ls", "-o", "blkdevname"]), "a\t(0:1)\nb\t(0:0)\n");
    assert_eq!(
        env.ok(&["ls", "--tree", "-o", "ascii"]),
        "a (0:1)\nb (0:0)\n"
    );
    env.fails(&["ls", "-o", "ascii"], 2);
    env.fails(&["table", "-o", "devname"], 2);
    assert_eq!(
        env.ok(&[
            "info",
            "-c",
            "--noheadings",
            "-o",
            "name",
            "--sort",
            "-minor"
        ]),
        "a\nb\n",
        "without headings or a separator, dmsetup joins fields with ':' and pads nothing"
    );
    assert_eq!(
        env.ok(&[
            "info",
            "-c",
            "--noheadings",
            "-o",
            "name",
            "--sort",
            "minor"
        ]),
        "b\na\n"
    );
    let img = env.file("loop.img", 4);
    let Ok(out) = Command::new("losetup")
        .args(["-f", "--show", &img])
        .output()
    else {
        eprintln!("skipped the loop device part: no losetup");
        return;
    };
    if !out.status.success() {
        eprintln!(
            "skipped the loop device part: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let kname = dev.trim_start_matches("/dev/").to_string();
    let minor: u32 = kname.trim_start_matches("loop").parse().unwrap();
    env.ok(&["create", "l", "--table", &format!("0 8192 linear {dev} 0")]);
    assert_eq!(
        env.ok(&["table", "l"]),
        format!("0 8192 linear 7:{minor} 0\n")
    );
    assert_eq!(
        env.ok(&["deps", "l"]),
        format!("1 dependencies\t: (7, {minor})\n")
    );
    assert_eq!(
        env.ok(&["deps", "-o", "blkdevname", "l"]),
        format!("1 dependencies\t: ({kname})\n")
    );
    assert_eq!(
        env.ok(&["deps", "-o", "devname", "l"]),
        format!("1 dependencies\t: ({kname})\n")
    );
    assert_eq!(
        env.ok(&["ls", "--tree"]),
        format!("a (0:1)\nb (0:0)\nl (0:2)\n `- (7:{minor})\n")
    );
    env.ok(&["remove", "l"]);
}

/// An NBD client counts as an opener: removal is refused while it is connected, and a deferred
/// removal completes when it disconnects.
#[test]
fn nbd_clients_hold_the_device_open() {
    // libnbd's Python binding, from the system's Python (nbdsh would pick whatever python3 is
    // first in PATH).
    let python = "/usr/bin/python3";
    let has_binding = Command::new(python)
        .args(["-c", "import nbd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_binding {
        eprintln!("skipped: python3-libnbd is not installed");
        return;
    }
    let env = Env::new();
    let sock = env.path("h0.sock");
    env.ok(&[
        "create",
        "h0",
        "--table",
        "0 2048 memory",
        "--export",
        &format!("nbd:unix:{}", sock.display()),
    ]);
    let uri = format!("nbd+unix:///h0?socket={}", sock.display());
    // The client writes, then stays connected until its standard input closes.
    let script = "import nbd, sys\n\
                  h = nbd.NBD()\n\
                  h.connect_uri(sys.argv[1])\n\
                  h.pwrite(b'x' * 512, 0)\n\
                  h.flush()\n\
                  print('connected', flush=True)\n\
                  sys.stdin.read()\n\
                  h.shutdown()\n";
    let mut client = Command::new(python)
        .args(["-c", script, &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "connected\n");
    assert!(env.ok(&["info", "h0"]).contains("\nOpen count:        1\n"));
    let e = env.fails(&["remove", "h0"], 1);
    assert!(e.contains("device h0 is busy: open count 1"), "{e}");
    env.ok(&["remove", "--deferred", "h0"]);
    assert!(env.ok(&["info", "h0"]).contains("(DEFERRED REMOVE)"));
    drop(client.stdin.take());
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the deferred removal", || {
        env.ok(&["ls"]) == "No devices found\n"
    });
    assert!(!sock.exists());
}

/// `--export fuse:PATH` beside an NBD export of the same device: a loop device on the FUSE file
/// takes mkfs.ext4 and mount, and what the filesystem wrote reads back the same through NBD.
#[test]
fn fuse_export_takes_ext4_and_agrees_with_nbd() {
    if !is_root() || !Path::new("/dev/fuse").exists() || !have("nbdcopy") {
        eprintln!("skipped: needs root, /dev/fuse and nbdcopy");
        return;
    }
    let env = Env::new();
    let file = env.path("disk.raw");
    let sock = env.path("f0.sock");
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    env.ok(&[
        "create",
        "f0",
        "--table",
        "0 131072 memory",
        "--export",
        &format!("fuse:{}", file.display()),
        "--export",
        &format!("nbd:unix:{}", sock.display()),
    ]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let f = file.display();
    let m = mnt.display();
    let loopdev = sh(&format!("losetup --find --show {f}"));
    let cleanup =
        format!("umount {m} 2>/dev/null || true; losetup -d {loopdev} 2>/dev/null || true");
    let result = std::panic::catch_unwind(|| {
        sh(&format!("mkfs.ext4 -q -F {loopdev}"));
        sh(&format!("mount {loopdev} {m}"));
        sh(&format!(
            "for i in 1 2 3 4; do head -c 1M /dev/urandom > {m}/f$i; done; \
             sha256sum {m}/f* > {m}/../sums; sync"
        ));
        sh(&format!("umount {m}"));
        sh(&format!("e2fsck -fn {loopdev}"));
        sh(&format!(
            "mount {loopdev} {m}; cd {m} && sha256sum -c ../sums; cd /; umount {m}"
        ));
    });
    sh(&cleanup);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    // The same bytes through NBD as through the file.
    let uri = format!("nbd+unix:///f0?socket={}", sock.display());
    let via_nbd = env.path("via-nbd.raw");
    let st = Command::new("nbdcopy")
        .args([&uri, via_nbd.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let a = std::fs::read(&file).unwrap();
    let b = std::fs::read(&via_nbd).unwrap();
    assert!(a == b, "the FUSE file and the NBD export disagree");
    assert_eq!(&a[1080..1082], &[0x53, 0xef], "ext4 superblock magic");
    env.ok(&["remove", "f0"]);
    assert!(!sock.exists());
}

/// `userdm export` on a running device: an NBD export added later serves what the device
/// holds, survives a reload, is listed, and goes with `--remove`; mistakes are refused and
/// change nothing.
#[test]
fn exports_added_and_removed_on_a_running_device() {
    if !have("nbdinfo") || !have("nbdcopy") {
        eprintln!("skipped: nbdinfo/nbdcopy (libnbd-bin) are not installed");
        return;
    }
    let env = Env::new();
    env.ok(&["create", "x0", "--table", "0 8192 memory"]);
    assert_eq!(env.ok(&["export", "x0"]), "");
    let sock = env.path("x0.sock");
    let spec = format!("nbd:unix:{}", sock.display());
    assert_eq!(env.ok(&["export", "x0", &spec]), format!("{spec}\n"));
    let tcp = env.ok(&["export", "x0", "nbd:tcp:127.0.0.1:0"]);
    assert!(
        tcp.starts_with("nbd:tcp:127.0.0.1:") && !tcp.ends_with(":0\n"),
        "{tcp}"
    );
    assert_eq!(env.ok(&["export", "x0"]), format!("{spec}\n{tcp}"));
    assert_eq!(
        env.json(&["export", "x0", "--json"]),
        serde_json::json!([spec, tcp.trim_end()])
    );
    let e = env.fails(&["export", "x0", &spec], 1);
    assert!(e.contains("already has export"), "{e}");
    let e = env.fails(&["export", "x0", "nbd:udp:x:1"], 2);
    assert!(e.contains("unknown transport"), "{e}");
    let e = env.fails(&["export", "x0", "--remove", "nbd:unix:/nowhere"], 1);
    assert!(e.contains("has no export nbd:unix:/nowhere"), "{e}");
    let e = env.fails(&["export", "nosuch", &spec], 1);
    assert!(e.contains("device nosuch does not exist"), "{e}");

    // Data written through the first export, read back through one added after a reload.
    let data = env.path("data");
    std::fs::write(&data, vec![0x5au8; 8192 * 512]).unwrap();
    let uri = format!("nbd+unix:///x0?socket={}", sock.display());
    let status = Command::new("nbdcopy")
        .args([data.to_str().unwrap(), &uri])
        .status()
        .unwrap();
    assert!(status.success());
    env.ok(&["suspend", "x0"]);
    env.ok(&["load", "x0", "--table", "0 8192 memory"]);
    env.ok(&["resume", "x0"]);
    env.ok(&["export", "x0", "--remove", &spec]);
    assert!(!sock.exists(), "a removed export left its socket");
    assert_eq!(env.ok(&["export", "x0"]), tcp);
    let sock2 = env.path("x0b.sock");
    let spec2 = format!("nbd:unix:{}", sock2.display());
    env.ok(&["export", "x0", &spec2]);
    let back = env.path("back");
    let uri2 = format!("nbd+unix:///x0?socket={}", sock2.display());
    let status = Command::new("nbdcopy")
        .args([&uri2, back.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&data).unwrap());
    env.ok(&["remove", "x0"]);
    assert!(!sock2.exists());
}

/// Without ublk in the kernel (this machine, or a control path that does not exist), `create`
/// serves no kernel device by default, and every ublk verb says what is missing.
#[test]
fn ublk_verbs_without_ublk_say_so() {
    let env = Env::new();
    let run = |args: &[&str]| {
        env.command(args)
            .env("USERDM_UBLK_CONTROL", "/nonexistent/ublk-control")
            .output()
            .unwrap()
    };
    let out = run(&["create", "n0", "--table", "0 8 zero"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(env.ok(&["export", "n0"]), "");
    for args in [
        &["create", "n1", "--table", "0 8 zero", "--export", "ublk"][..],
        &["export", "n0", "ublk:queues=2"],
        &["add", "-t", "null"],
        &["list"],
        &["del", "-a"],
        &["recover", "-n", "0"],
        &["features"],
    ] {
        let out = run(args);
        let e = check_fails(args, &out, 1);
        assert!(e.contains("modprobe ublk_drv"), "{args:?}: {e}");
    }
    assert_eq!(env.ok(&["ls"]), "n0\t(0:0)\n");
    for (args, why) in [
        (&["add", "-t", "loop"][..], "needs a backing file"),
        (&["add", "-t", "memory"], "needs --size"),
        (
            &["add", "-t", "null", "-f", "x"],
            "only for the loop target",
        ),
        (&["add", "-t", "disk"], "invalid value"),
        (
            &["add", "-t", "null", "--size", "1Q"],
            "unknown size suffix",
        ),
        (&["del"], "required"),
        (
            &[
                "create",
                "n2",
                "--no-ublk",
                "--export",
                "ublk",
                "--table",
                "0 8 zero",
            ],
            "cannot be used",
        ),
        (
            &[
                "create",
                "n2",
                "--export",
                "ublk:depth=0",
                "--table",
                "0 8 zero",
            ],
            "depth= takes",
        ),
    ] {
        let out = run(args);
        let e = check_fails(args, &out, 2);
        assert!(e.contains(why), "{args:?}: {e}");
    }
}
