//! The server library in-process: `serve` on a thread, driven through the readiness socket and
//! the control protocol exactly as the CLI drives it, with a small test target.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use userdm_control::client::{call, call_keep};
use userdm_control::proto::{
    decode, read_value, write_line, Command, CreateConfig, ErrorKind, ReadyReport, Reply,
    RowReport, PROTOCOL_VERSION,
};
use userdm_control::rundir::RunDir;
use userdm_control::server::{serve, TableEvents};
use userdm_control::{ControlError, NoExports};
use userdm_io::{IoHeader, IoResult, OpSet};
use userdm_table::{Dep, MessageError, RowSpec, TableError, Target, TargetType};
use userdm_uring::Reactor;

/// `zero`, and `ev MAJ:MIN`: a target whose message `raise` raises a table event and which
/// depends on the device it names.
struct Mini {
    kind: &'static str,
    dep: Option<(u32, u32)>,
    events: TableEvents,
}

impl Target for Mini {
    type Context = TableEvents;

    fn types() -> &'static [TargetType] {
        &[
            TargetType {
                name: "zero",
                version: [1, 0, 0],
            },
            TargetType {
                name: "error",
                version: [1, 0, 0],
            },
            TargetType {
                name: "ev",
                version: [1, 0, 0],
            },
        ]
    }

    fn construct(events: &TableEvents, row: &RowSpec) -> Result<Mini, TableError> {
        let (kind, dep) = match row.target_type.as_str() {
            "zero" => ("zero", None),
            "error" => ("error", None),
            "ev" => {
                let bad = || TableError::Target {
                    line: row.line,
                    target: "ev".into(),
                    problem: format!("invalid device '{}'", row.params),
                };
                let (a, b) = row.params.split_once(':').ok_or_else(bad)?;
                let dep = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                ("ev", Some(dep))
            }
            other => {
                return Err(TableError::UnknownTarget {
                    line: row.line,
                    target: other.into(),
                })
            }
        };
        Ok(Mini {
            kind,
            dep,
            events: events.clone(),
        })
    }

    fn type_name(&self) -> &'static str {
        self.kind
    }

    fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    fn table_params(&self) -> String {
        self.dep
            .map_or_else(String::new, |(a, b)| format!("{a}:{b}"))
    }

    fn status(&self) -> String {
        if self.kind == "ev" {
            "ok".into()
        } else {
            String::new()
        }
    }

    fn message(&self, argv: &[String]) -> Result<Option<String>, MessageError> {
        match (self.kind, argv.first().map(String::as_str)) {
            ("ev", Some("raise")) => {
                self.events.raise();
                Ok(Some("raised".into()))
            }
            ("ev", _) => Err(MessageError::Invalid("unknown message".into())),
            _ => Err(MessageError::Unsupported),
        }
    }

    fn deps(&self) -> Vec<Dep> {
        self.dep
            .map(|(major, minor)| Dep {
                major,
                minor,
                path: format!("{major}:{minor}"),
            })
            .into_iter()
            .collect()
    }

    async fn io(&self, _rt: &Reactor, _io: IoHeader, buf: &mut [u8]) -> IoResult {
        buf.fill(0);
        Ok(())
    }
}

struct Started {
    _tmp: tempfile::TempDir,
    run: RunDir,
    socket: PathBuf,
    server: JoinHandle<Result<(), ControlError>>,
}

/// Starts a server for `config` on a thread; returns its readiness report.
fn start(config: CreateConfig) -> (Started, ReadyReport) {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::new(tmp.path());
    let lock = run.lock().unwrap();
    let dir = run.claim(&lock).unwrap();
    drop(lock);
    let ready = UnixListener::bind(dir.ready_socket()).unwrap();
    let id = dir.id();
    let server_run = run.clone();
    let server = std::thread::spawn(move || {
        let make_ctx = |_: &CreateConfig, events: TableEvents| events;
        serve::<Mini>(&server_run, id, &make_ctx, &NoExports)
    });
    let (stream, _) = ready.accept().unwrap();
    write_line(&stream, &config).unwrap();
    let value = read_value(BufReader::new(&stream)).unwrap().unwrap();
    let report: ReadyReport = decode(value).unwrap();
    let socket = dir.socket();
    (
        Started {
            _tmp: tmp,
            run,
            socket,
            server,
        },
        report,
    )
}

fn config(name: &str, table: Option<&str>) -> CreateConfig {
    CreateConfig {
        version: PROTOCOL_VERSION,
        name: name.into(),
        uuid: None,
        read_only: false,
        table: table.map(str::to_string),
        cwd: None,
        exports: vec![],
        uid: None,
        gid: None,
        memory_dir: None,
    }
}

fn rows(s: &Started, command: Command) -> Vec<RowReport> {
    match call(&s.socket, "d", command).unwrap() {
        Reply::Rows { rows } => rows,
        other => panic!("{other:?}"),
    }
}

fn info(s: &Started) -> userdm_control::proto::DeviceReport {
    match call(&s.socket, "d", Command::Info).unwrap() {
        Reply::Info(i) => i,
        other => panic!("{other:?}"),
    }
}

#[test]
fn lifecycle_through_the_protocol() {
    let (s, report) = start(config("d", Some("0 8 zero\n8 8 ev 7:1\n16 8 ev 7:0\n")));
    let ready = report.ready.unwrap();
    assert_eq!((ready.name.as_str(), ready.major, ready.minor), ("d", 0, 0));
    assert!(ready.live_table && !ready.suspended);
    assert_eq!(
        s.run.device_dirs().unwrap()[0].read_meta().unwrap().name,
        "d"
    );

    call(
        &s.socket,
        "d",
        Command::Suspend {
            noflush: false,
            nolockfs: true,
        },
    )
    .unwrap();
    assert!(info(&s).suspended);
    call(&s.socket, "d", Command::Resume).unwrap();
    let load = Command::Load {
        table: "0 4 error\n".into(),
        cwd: None,
    };
    call(&s.socket, "d", load).unwrap();
    assert!(info(&s).inactive_table);
    assert_eq!(
        rows(&s, Command::Table { inactive: true })[0].line(),
        "0 4 error "
    );
    let status = rows(&s, Command::Status { inactive: false });
    assert_eq!(status[1].line(), "8 8 ev ok");
    let deps = match call(&s.socket, "d", Command::Deps { inactive: false }).unwrap() {
        Reply::Deps { deps } => deps,
        other => panic!("{other:?}"),
    };
    // The kernel's order: the device named last first.
    assert_eq!(
        deps.iter().map(|d| (d.major, d.minor)).collect::<Vec<_>>(),
        vec![(7, 0), (7, 1)]
    );
    call(&s.socket, "d", Command::Clear).unwrap();
    assert!(!info(&s).inactive_table);

    let e = call(
        &s.socket,
        "d",
        Command::Load {
            table: "0 4 nosuch\n".into(),
            cwd: None,
        },
    )
    .unwrap_err();
    assert_eq!(e.server_kind(), Some(ErrorKind::Table));
    assert_eq!(e.to_string(), "line 1: nosuch: unknown target type");

    call(
        &s.socket,
        "d",
        Command::Rename {
            new_name: "e".into(),
        },
    )
    .unwrap();
    assert_eq!(
        s.run.device_dirs().unwrap()[0].read_meta().unwrap().name,
        "e"
    );
    call(&s.socket, "d", Command::SetUuid { uuid: "U".into() }).unwrap();
    assert_eq!(info(&s).uuid.as_deref(), Some("U"));

    let removed = call(
        &s.socket,
        "d",
        Command::Remove {
            deferred: false,
            force: false,
        },
    )
    .unwrap();
    assert_eq!(removed, Reply::Removed { now: true });
    s.server.join().unwrap().unwrap();
    assert!(s.run.device_dirs().unwrap().is_empty());
}

#[test]
fn table_events_wake_waiters() {
    let (s, _) = start(config("d", Some("0 8 ev 1:2\n")));
    let socket = s.socket.clone();
    let waiter = std::thread::spawn(move || {
        call(
            &socket,
            "d",
            Command::Wait {
                event_nr: Some(0),
                timeout_ms: Some(10_000),
            },
        )
    });
    std::thread::sleep(Duration::from_millis(100));
    let reply = call(
        &s.socket,
        "d",
        Command::Message {
            sector: 0,
            argv: vec!["raise".into()],
        },
    )
    .unwrap();
    assert_eq!(
        reply,
        Reply::Message {
            reply: Some("raised".into())
        }
    );
    assert_eq!(
        waiter.join().unwrap().unwrap(),
        Reply::Event { event_nr: 1 }
    );
    let timed_out = call(
        &s.socket,
        "d",
        Command::Wait {
            event_nr: None,
            timeout_ms: Some(50),
        },
    )
    .unwrap();
    assert_eq!(timed_out, Reply::Event { event_nr: 1 });
    // An abandoned wait ends with its client: the next event finds nobody to answer.
    let abandoned = UnixStream::connect(&s.socket).unwrap();
    std::io::Write::write_all(
        &mut &abandoned,
        b"{\"version\":1,\"command\":{\"op\":\"wait\"}}\n",
    )
    .unwrap();
    drop(abandoned);
    let e = call(
        &s.socket,
        "d",
        Command::Message {
            sector: 0,
            argv: vec!["bogus".into()],
        },
    )
    .unwrap_err();
    assert_eq!(e.server_kind(), Some(ErrorKind::Message));
    call(&s.socket, "d", Command::Shutdown).unwrap();
    s.server.join().unwrap().unwrap();
}

#[test]
fn deferred_removal_completes_at_the_last_close() {
    let (s, _) = start(config("d", None));
    let (reply, held) = call_keep(&s.socket, "d", Command::Open, None).unwrap();
    assert_eq!(reply, Reply::Opened);
    assert_eq!(info(&s).open_count, 1);
    let busy = call(
        &s.socket,
        "d",
        Command::Remove {
            deferred: false,
            force: false,
        },
    )
    .unwrap_err();
    assert_eq!(busy.server_kind(), Some(ErrorKind::Busy));
    let deferred = call(
        &s.socket,
        "d",
        Command::Remove {
            deferred: true,
            force: false,
        },
    )
    .unwrap();
    assert_eq!(deferred, Reply::Removed { now: false });
    assert!(info(&s).deferred_remove);
    drop(held);
    s.server.join().unwrap().unwrap();
    assert!(s.run.device_dirs().unwrap().is_empty());
}

#[test]
fn failures_to_come_up_are_reported() {
    let (s, report) = start(config("d", Some("0 8 zero\n16 8 zero\n")));
    assert_eq!(
        report.error.as_deref(),
        Some("line 2: gap in table: row starts at sector 16, expected 8")
    );
    assert!(s.server.join().unwrap().is_err());
    assert!(!s.socket.exists());

    let mut c = config("d", Some("0 8 zero"));
    c.exports = vec!["nbd:unix:/tmp/x.sock".into()];
    let (s, report) = start(c);
    assert!(report.error.unwrap().contains("exports are not available"));
    assert!(s.server.join().unwrap().is_err());

    let (s, report) = start(config("bad/name", None));
    assert!(report.error.unwrap().contains("invalid device name"));
    assert!(s.server.join().unwrap().is_err());

    let mut c = config("d", None);
    c.version = PROTOCOL_VERSION + 1;
    let (s, report) = start(c);
    assert!(report.error.unwrap().contains("protocol version mismatch"));
    assert!(s.server.join().unwrap().is_err());
}

#[test]
fn silent_and_broken_clients_do_not_stop_the_server() {
    let (s, _) = start(config("d", Some("0 8 zero")));
    // A client that connects and says nothing holds up nobody.
    let silent = UnixStream::connect(&s.socket).unwrap();
    let asked = std::time::Instant::now();
    assert_eq!(info(&s).name, "d");
    assert!(asked.elapsed() < Duration::from_secs(2));
    drop(silent);
    drop(UnixStream::connect(&s.socket).unwrap());
    let half = UnixStream::connect(&s.socket).unwrap();
    std::io::Write::write_all(&mut &half, b"{\"version\":1,").unwrap();
    drop(half);
    assert_eq!(info(&s).name, "d");
    call(&s.socket, "d", Command::Shutdown).unwrap();
    s.server.join().unwrap().unwrap();
}

/// A stand-in for the ublk export: a kernel device whose users the test sets, recoverable as
/// id 5.
/// The test's export factory.
struct FakeKernelExports {
    users: std::sync::Arc<std::sync::atomic::AtomicU32>,
    resized: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

struct FakeKernel {
    users: std::sync::Arc<std::sync::atomic::AtomicU32>,
    resized: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl userdm_control::Export for FakeKernel {
    fn device_number(&self) -> Option<(u32, u32)> {
        Some((250, 5))
    }
    fn block_device(&self) -> Option<PathBuf> {
        Some("/dev/fakeb5".into())
    }
    fn kernel_users(&self) -> Option<userdm_control::UserCounter> {
        let users = self.users.clone();
        Some(std::sync::Arc::new(move || {
            users.load(std::sync::atomic::Ordering::SeqCst)
        }))
    }
    fn recoverable_id(&self) -> Option<u32> {
        Some(5)
    }
    fn resized(&mut self) -> Result<(), String> {
        self.resized
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err("/dev/fakeb5 keeps its old size: no UPDATE_SIZE".into())
    }
    fn stop(&mut self) {}
}

impl userdm_control::ExportFactory<Mini> for FakeKernelExports {
    fn start(
        &self,
        spec: &userdm_control::ExportSpec,
        _: userdm_control::DeviceHandle<Mini>,
    ) -> Result<Box<dyn userdm_control::Export>, String> {
        match spec {
            userdm_control::ExportSpec::Ublk(_) => Ok(Box::new(FakeKernel {
                users: self.users.clone(),
                resized: self.resized.clone(),
            })),
            other => Err(format!("{other}: not in this test")),
        }
    }
}

/// Kernel devices' users count as openers: `remove` refuses, `--deferred` waits for the last
/// to go. The recovery record follows the live table, and goes with the device; a kernel
/// export named for a device without a table starts at the first resume with one.
#[test]
fn kernel_exports_openers_links_and_recovery_records() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let links = tempfile::tempdir().unwrap();
    std::env::set_var("USERDM_DEV_DIR", links.path());
    let users = Arc::new(AtomicU32::new(0));
    let resized = Arc::new(AtomicU32::new(0));
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::new(tmp.path());
    let launch = |name: &str, table: Option<&str>| {
        let lock = run.lock().unwrap();
        let dir = run.claim(&lock).unwrap();
        drop(lock);
        let ready = UnixListener::bind(dir.ready_socket()).unwrap();
        let (id, server_run) = (dir.id(), run.clone());
        let factory = FakeKernelExports {
            users: users.clone(),
            resized: resized.clone(),
        };
        let server = std::thread::spawn(move || {
            let make_ctx = |_: &CreateConfig, events: TableEvents| events;
            serve::<Mini>(&server_run, id, &make_ctx, &factory)
        });
        let (stream, _) = ready.accept().unwrap();
        let mut c = config(name, table);
        c.exports = vec!["ublk:recovery".into()];
        write_line(&stream, &c).unwrap();
        let value = read_value(BufReader::new(&stream)).unwrap().unwrap();
        let report: ReadyReport = decode(value).unwrap();
        (dir.socket(), server, report.ready.unwrap())
    };

    let (socket, server, ready) = launch("k", Some("0 8 zero\n"));
    assert_eq!(ready.block_device.as_deref(), Some("/dev/fakeb5".as_ref()));
    assert_eq!((ready.major, ready.minor), (250, 5));
    let link = links.path().join("k");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        PathBuf::from("/dev/fakeb5")
    );
    let record = run.read_recovery_record(5).unwrap();
    assert_eq!(record.name, "k");
    assert_eq!(record.table.as_deref(), Some("0 8 zero\n"));
    assert_eq!(
        record.exports,
        vec!["ublk:id=5,recovery,recover=5".to_string()]
    );
    // With recovery, `memory` rows keep their bytes in the run directory, where the recovering
    // server (which reads this record) finds them.
    let memory_dir = record
        .memory_dir
        .clone()
        .expect("recovery gives a memory directory");
    assert_eq!(memory_dir.parent(), Some(run.memory_root().as_path()));
    std::fs::create_dir_all(&memory_dir).unwrap();
    std::fs::write(memory_dir.join("0-8.mem"), b"bytes").unwrap();

    // A bigger table: the export hears of the new size, its warning reaches the client, and
    // the record holds the new table.
    let load = Command::Load {
        table: "0 16 zero\n".into(),
        cwd: None,
    };
    call(&socket, "k", load).unwrap();
    match call(&socket, "k", Command::Resume).unwrap() {
        Reply::Warnings { warnings } => assert!(warnings[0].contains("keeps its old size")),
        other => panic!("{other:?}"),
    }
    assert_eq!(resized.load(Ordering::SeqCst), 1);
    let record = run.read_recovery_record(5).unwrap();
    assert_eq!(record.table.as_deref(), Some("0 16 zero\n"));

    // Rename moves the link.
    call(
        &socket,
        "k",
        Command::Rename {
            new_name: "k2".into(),
        },
    )
    .unwrap();
    assert!(!link.exists());
    let link = links.path().join("k2");
    assert!(std::fs::read_link(&link).is_ok());

    users.store(2, Ordering::SeqCst);
    let report = match call(&socket, "k2", Command::Info).unwrap() {
        Reply::Info(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.open_count, 2);
    let remove = |deferred| Command::Remove {
        deferred,
        force: false,
    };
    let e = call(&socket, "k2", remove(false)).unwrap_err();
    assert_eq!(e.server_kind(), Some(ErrorKind::Busy), "{e}");
    assert!(e.to_string().contains("2 users"), "{e}");
    assert_eq!(
        call(&socket, "k2", remove(true)).unwrap(),
        Reply::Removed { now: false }
    );
    let report = match call(&socket, "k2", Command::Info).unwrap() {
        Reply::Info(i) => i,
        other => panic!("{other:?}"),
    };
    assert!(report.deferred_remove);
    assert_eq!(report.open_count, 2, "the watcher's hold is not an opener");
    users.store(0, Ordering::SeqCst);
    server.join().unwrap().unwrap();
    assert!(!link.exists(), "the link outlived the device");
    assert!(
        run.read_recovery_record(5).is_err(),
        "the record outlived the device"
    );
    assert!(
        !memory_dir.exists(),
        "the memory directory outlived the device"
    );

    // No table: the kernel export waits for one.
    let (socket, server, ready) = launch("n", None);
    assert_eq!(ready.block_device, None);
    assert_eq!((ready.major, ready.minor), (0, 0));
    let load = Command::Load {
        table: "0 8 zero\n".into(),
        cwd: None,
    };
    call(&socket, "n", load).unwrap();
    call(&socket, "n", Command::Resume).unwrap();
    let report = match call(&socket, "n", Command::Info).unwrap() {
        Reply::Info(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.block_device.as_deref(), Some("/dev/fakeb5".as_ref()));
    assert_eq!(
        call(&socket, "n", remove(false)).unwrap(),
        Reply::Removed { now: true }
    );
    server.join().unwrap().unwrap();
}
