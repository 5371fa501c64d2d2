//! Serves one userdm device over NBD: a `memory` row, or a `linear` row onto a file, through the
//! same engine (`Device<AnyTarget>`) the `userdm` command uses.
//!
//! ```text
//! nbd-serve (--unix PATH | --tcp HOST:PORT | -s | --socket-activation)
//!           (--memory SIZE | --file PATH | --test-memory SIZE)
//!           [--name NAME] [--read-only] [--queue-depth N] [--persistent]
//!           [--tls off|on|require --tls-cert PEM --tls-key PEM [--tls-verify-clients CA_PEM]]
//! ```
//!
//! - `--unix`/`--tcp` listen until the process is killed;
//! - `-s` serves one client on standard input (inetd style; libnbd's `nbd_connect_command`);
//! - `--socket-activation` listens on the socket passed as `LISTEN_FDS` (systemd, or libnbd's
//!   `nbd_connect_systemd_socket_activation`) and exits when its first client is done, as
//!   qemu-nbd does, unless `--persistent`.
//!
//! `--memory SIZE` is the sparse `memory` target; `--file PATH` maps the whole file with
//! `linear`; `--test-memory SIZE` is the crate's own test backend (`MemBackend`), without the
//! device layer. SIZE takes K, M, G and T suffixes (powers of 1024). Nothing is printed on
//! standard output (in `-s` mode it is the client's socket); errors go to standard error.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use userdm_device::Device;
use userdm_nbd::{
    serve_listen_fds, serve_stream, serve_tcp, serve_unix, Backend, DeviceBackend, Exports,
    MemBackend, NbdServer, ServerConfig, Stream, TlsConfig, TlsMode,
};
use userdm_table::Table;
use userdm_targets::{AnyTarget, TargetContext};

const USAGE: &str = "usage: nbd-serve (--unix PATH | --tcp HOST:PORT | -s | --socket-activation) \
(--memory SIZE | --file PATH | --test-memory SIZE) [--name NAME] [--read-only] [--queue-depth N] \
[--persistent] [--tls off|on|require --tls-cert PEM --tls-key PEM [--tls-verify-clients CA_PEM]]";

enum Listen {
    Unix(PathBuf),
    Tcp(String),
    Stdin,
    SocketActivation,
}

enum Storage {
    Memory(u64),
    File(PathBuf),
    TestMemory(u64),
}

struct Args {
    listen: Listen,
    storage: Storage,
    name: String,
    read_only: bool,
    persistent: bool,
    queue_depth: Option<u16>,
    tls_mode: TlsMode,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n >= 512)
        .ok_or_else(|| format!("invalid size '{s}'"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut storage) = (None, None);
    let mut args = Args {
        listen: Listen::Stdin,
        storage: Storage::TestMemory(0),
        name: String::new(),
        read_only: false,
        persistent: false,
        queue_depth: None,
        tls_mode: TlsMode::Off,
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
    };
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{arg} needs {what}"));
        match arg.as_str() {
            "--unix" => listen = Some(Listen::Unix(value("a path")?.into())),
            "--tcp" => listen = Some(Listen::Tcp(value("HOST:PORT")?)),
            "-s" | "--stdin" => listen = Some(Listen::Stdin),
            "--socket-activation" => listen = Some(Listen::SocketActivation),
            "--memory" => storage = Some(Storage::Memory(parse_size(&value("a size")?)?)),
            "--test-memory" => storage = Some(Storage::TestMemory(parse_size(&value("a size")?)?)),
            "--file" => storage = Some(Storage::File(value("a path")?.into())),
            "--name" => args.name = value("a name")?,
            "--read-only" | "-r" => args.read_only = true,
            "--persistent" | "-t" => args.persistent = true,
            "--queue-depth" => {
                args.queue_depth = Some(value("a number")?.parse().map_err(|_| "bad depth")?)
            }
            "--tls" => {
                args.tls_mode = value("off, on or require")?
                    .parse()
                    .map_err(|e| format!("{e}"))?
            }
            "--tls-cert" => args.tls_cert = Some(value("a PEM file")?.into()),
            "--tls-key" => args.tls_key = Some(value("a PEM file")?.into()),
            "--tls-verify-clients" => args.tls_ca = Some(value("a PEM file")?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    args.listen = listen.ok_or("no listener given")?;
    args.storage = storage.ok_or("no storage given")?;
    Ok(args)
}

fn device(storage: &Storage, read_only: bool) -> Result<Arc<Device<AnyTarget>>, String> {
    let (ctx, text) = match storage {
        Storage::Memory(size) => (TargetContext::new(), format!("0 {} memory", size / 512)),
        Storage::File(path) => {
            let len = std::fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            if len < 512 {
                return Err(format!("{}: smaller than one sector", path.display()));
            }
            (
                TargetContext::new().with_read_only(read_only),
                format!("0 {} linear {} 0", len / 512, path.display()),
            )
        }
        Storage::TestMemory(_) => unreachable!("not a device"),
    };
    let table = Table::parse(&ctx, &text).map_err(|e| e.to_string())?;
    let d = Device::new("nbd-serve", None, read_only).map_err(|e| e.to_string())?;
    d.load(table);
    d.resume().map_err(|e| e.to_string())?;
    Ok(Arc::new(d))
}

fn config(args: &Args) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::default();
    if let Some(depth) = args.queue_depth {
        config.queue_depth = depth;
    }
    if args.tls_mode != TlsMode::Off {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            return Err("--tls on|require needs --tls-cert and --tls-key".into());
        };
        let tls = TlsConfig::from_pem_files(args.tls_mode, cert, key, args.tls_ca.as_deref())
            .map_err(|e| e.to_string())?;
        config.handshake.tls = Some(tls);
    }
    Ok(config)
}

fn run<B: Backend>(args: &Args, backend: Arc<B>, config: ServerConfig) -> Result<(), String> {
    let exports = Exports::new().with(&args.name, "userdm nbd-serve", backend);
    let server: NbdServer = match &args.listen {
        Listen::Stdin => {
            let stream = Stream::from_stdin().map_err(|e| format!("-s: {e}"))?;
            // A client that aborts or disconnects is a normal end for a one-client server.
            if let Err(e) = serve_stream(stream, &exports, &config) {
                eprintln!("nbd-serve: {e}");
            }
            return Ok(());
        }
        Listen::Unix(path) => serve_unix(path, exports, config),
        Listen::Tcp(addr) => serve_tcp(addr.as_str(), exports, config),
        Listen::SocketActivation => serve_listen_fds(exports, config),
    }
    .map_err(|e| format!("cannot listen: {e}"))?;
    let one_client = matches!(args.listen, Listen::SocketActivation) && !args.persistent;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let stats = server.stats();
        if one_client && stats.accepted > 0 && stats.active == 0 {
            break;
        }
    }
    server.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("nbd-serve: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = config(&args).and_then(|config| match &args.storage {
        Storage::TestMemory(size) => {
            let mut mem = MemBackend::new(*size);
            if args.read_only {
                mem = mem.read_only();
            }
            run(&args, Arc::new(mem), config)
        }
        storage => {
            let d = device(storage, args.read_only)?;
            run(&args, Arc::new(DeviceBackend(d)), config)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-serve: {e}");
            ExitCode::FAILURE
        }
    }
}
