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
