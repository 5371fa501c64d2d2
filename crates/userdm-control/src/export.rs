//! Exports as the server sees them: a spec from the command line, and a running export it can
//! stop.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use userdm_device::Device;

/// Where and how a device is exported, as written after `--export`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportSpec {
    /// `nbd:unix:PATH`: an NBD server on a Unix socket.
    NbdUnix(PathBuf),
    /// `nbd:tcp:HOST:PORT`: an NBD server on TCP. `HOST` may be a bracketed IPv6 address.
    NbdTcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `fuse:PATH`: the device as the regular file PATH, through a FUSE mount over it.
    Fuse(PathBuf),
    /// `ublk[:OPTION,...]`: a kernel block device, `/dev/ublkbN`, through the ublk driver.
    Ublk(UblkSpec),
}

/// How a device is served over ublk: `ublk:queues=N,depth=N,id=N,user-copy,zero-copy,recovery`
/// (every option may be left out; the export picks one queue of depth 128 and a free id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UblkSpec {
    /// Hardware queues, one server thread each.
    pub queues: Option<u16>,
    /// Requests in flight per queue.
    pub depth: Option<u16>,
    /// The id to ask for: N in `/dev/ublkbN`.
    pub id: Option<u32>,
    /// Copy data with pread/pwrite on `/dev/ublkcN` (Linux 6.5+).
    pub user_copy: bool,
    /// Zero copy (Linux 6.16+).
    pub zero_copy: bool,
    /// Let the device outlive a crashed server, for `userdm recover`.
    pub recovery: bool,
    /// Take over the existing device with this id after its server died (set by `userdm
    /// recover`, never written by hand).
    pub recover: Option<u32>,
}

impl UblkSpec {
    fn parse(options: &str) -> Result<UblkSpec, &'static str> {
        let mut spec = UblkSpec::default();
        for word in options.split(',').filter(|w| !w.is_empty()) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            let number = |v: Option<&str>| v.and_then(|v| v.parse::<u32>().ok());
            match (key, value) {
                ("queues", v) => {
                    spec.queues = Some(
                        number(v)
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|&n| n > 0)
                            .ok_or("queues= takes a number from 1")?,
                    );
                }
                ("depth", v) => {
                    spec.depth = Some(
                        number(v)
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|&n| n > 0)
                            .ok_or("depth= takes a number from 1")?,
                    );
                }
                ("id", v) => spec.id = Some(number(v).ok_or("id= takes a number")?),
                ("recover", v) => spec.recover = Some(number(v).ok_or("recover= takes an id")?),
                ("user-copy", None) => spec.user_copy = true,
                ("zero-copy", None) => spec.zero_copy = true,
                ("recovery", None) => spec.recovery = true,
                _ => {
                    return Err(
                        "unknown ublk option (use queues=N, depth=N, id=N, user-copy, \
                                zero-copy or recovery)",
                    )
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for UblkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = Vec::new();
        if let Some(n) = self.queues {
            words.push(format!("queues={n}"));
        }
        if let Some(n) = self.depth {
            words.push(format!("depth={n}"));
        }
        if let Some(n) = self.id {
            words.push(format!("id={n}"));
        }
        for (on, word) in [
            (self.user_copy, "user-copy"),
            (self.zero_copy, "zero-copy"),
            (self.recovery, "recovery"),
        ] {
            if on {
                words.push(word.to_string());
            }
        }
        if let Some(n) = self.recover {
            words.push(format!("recover={n}"));
        }
        if words.is_empty() {
            f.write_str("ublk")
        } else {
            write!(f, "ublk:{}", words.join(","))
        }
    }
}

/// Why an export spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid export '{spec}': {problem}; expected ublk[:OPTIONS], nbd:unix:PATH, \
     nbd:tcp:HOST:PORT or fuse:PATH"
)]
pub struct ExportSpecError {
    /// The spec given.
    pub spec: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl ExportSpec {
    /// Parses `ublk[:OPTIONS]`, `nbd:unix:PATH`, `nbd:tcp:HOST:PORT` or `fuse:PATH`.
    pub fn parse(spec: &str) -> Result<ExportSpec, ExportSpecError> {
        let err = |problem| ExportSpecError {
            spec: spec.to_string(),
            problem,
        };
        if spec == "ublk" {
            return Ok(ExportSpec::Ublk(UblkSpec::default()));
        }
        if let Some(options) = spec.strip_prefix("ublk:") {
            return UblkSpec::parse(options).map(ExportSpec::Ublk).map_err(err);
        }
        let (kind, rest) = spec.split_once(':').ok_or_else(|| err("no export kind"))?;
        if kind == "fuse" {
            if rest.is_empty() {
                return Err(err("empty file path"));
            }
            return Ok(ExportSpec::Fuse(PathBuf::from(rest)));
        }
        if kind != "nbd" {
            return Err(err("unknown export kind (use ublk, nbd or fuse)"));
        }
        let (transport, addr) = rest.split_once(':').ok_or_else(|| err("no transport"))?;
        match transport {
            "unix" => {
                if addr.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(ExportSpec::NbdUnix(PathBuf::from(addr)))
            }
            "tcp" => {
                let (host, port) = addr.rsplit_once(':').ok_or_else(|| err("no port"))?;
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                if host.is_empty() {
                    return Err(err("empty host"));
                }
                let port = port.parse().map_err(|_| err("invalid port"))?;
                Ok(ExportSpec::NbdTcp {
                    host: host.to_string(),
                    port,
                })
            }
            _ => Err(err("unknown transport (use unix or tcp)")),
        }
    }
}

impl fmt::Display for ExportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportSpec::NbdUnix(p) => write!(f, "nbd:unix:{}", p.display()),
            ExportSpec::NbdTcp { host, port } if host.contains(':') => {
                write!(f, "nbd:tcp:[{host}]:{port}")
            }
            ExportSpec::NbdTcp { host, port } => write!(f, "nbd:tcp:{host}:{port}"),
            ExportSpec::Fuse(p) => write!(f, "fuse:{}", p.display()),
            ExportSpec::Ublk(u) => u.fmt(f),
        }
    }
}

/// Counts a kernel block device's users; see [`Export::kernel_users`].
pub type UserCounter = Arc<dyn Fn() -> u32 + Send + Sync>;

/// A running export. The server stops every export before its process exits.
pub trait Export: Send {
    /// The device number the kernel gave the exported block device, if the export makes one
    /// (ublk: `ublkbN`'s major and minor). `None` for NBD over a socket, whose clients are
    /// not kernel devices.
    fn device_number(&self) -> Option<(u32, u32)> {
        None
    }

    /// The kernel block device the export made, if any (`/dev/ublkbN`).
    fn block_device(&self) -> Option<PathBuf> {
        None
    }

    /// A counter of the users the kernel block device has that userdm does not see itself
    /// (open descriptors, mounts, devices stacked on it), if the export makes one. Each call
    /// is a snapshot; `info` and `remove` call it, and a deferred removal polls it from
    /// another thread.
    fn kernel_users(&self) -> Option<UserCounter> {
        None
    }

    /// Ends the export for a removal unless the kernel block device is in use, atomically
    /// where the kernel can check (ublk's TRY_STOP_DEV). `Err` says who holds it; the export
    /// then stays as it was.
    fn release(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The id under which a new server can take this export over after this one dies (a
    /// ublk device with recovery), if it can.
    fn recoverable_id(&self) -> Option<u32> {
        None
    }

    /// The device's size changed with a new live table: tell the kernel, where the export
    /// has a kernel device. `Err` is a warning (the kernel cannot resize it).
    fn resized(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Where clients reach the export, when it differs from the spec given: a TCP port 0
    /// becomes the port the kernel picked (in `--export` syntax), a ublk export names its
    /// device (`ublk:/dev/ublkbN`).
    fn address(&self) -> Option<String> {
        None
    }

    /// Stops accepting clients, disconnects the ones connected and joins the export's threads.
    /// Called on the server's main thread.
    fn stop(&mut self);
}

/// Starts exports for a server. Implemented by the binary, which knows every export crate; the
/// server calls it on its main thread while the device comes up.
pub trait ExportFactory<T>: Send + Sync {
    /// Starts one export of `handle`'s device.
    fn start(&self, spec: &ExportSpec, handle: DeviceHandle<T>) -> Result<Box<dyn Export>, String>;
}

/// An export factory with no exports: every spec is refused. For tests and tools that only
/// need the control plane.
pub struct NoExports;

impl<T> ExportFactory<T> for NoExports {
    fn start(&self, spec: &ExportSpec, _: DeviceHandle<T>) -> Result<Box<dyn Export>, String> {
        Err(format!(
            "export {spec}: exports are not available in this build"
        ))
    }
}

/// What an export holds: the device, and the way to tell the server that the last close of a
/// device whose removal was deferred has happened.
pub struct DeviceHandle<T> {
    device: Arc<Device<T>>,
    exit: ExitSignal,
}

impl<T> Clone for DeviceHandle<T> {
    fn clone(&self) -> Self {
        DeviceHandle {
            device: self.device.clone(),
            exit: self.exit.clone(),
        }
    }
}

impl<T: userdm_table::Target> DeviceHandle<T> {
    pub(crate) fn new(device: Arc<Device<T>>, exit: ExitSignal) -> DeviceHandle<T> {
        DeviceHandle { device, exit }
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device<T>> {
        &self.device
    }

    /// Counts an opener in: call when a client connects.
    pub fn open(&self) {
        self.device.open();
    }

    /// Counts an opener out: call when a client disconnects. The last close of a device whose
    /// removal was deferred makes the server remove it and exit.
    pub fn close(&self) {
        if self.device.close() {
            self.exit.request();
        }
    }

    /// Whether the server is going away; exports stop accepting clients then.
    pub fn exiting(&self) -> bool {
        self.exit.requested()
    }
}

/// Tells the server's main thread to finish: sets a flag, then wakes its blocking `accept` by
/// connecting to its control socket.
#[derive(Clone, Debug)]
pub struct ExitSignal {
    pub(crate) flag: Arc<AtomicBool>,
    socket: PathBuf,
}

impl ExitSignal {
    pub(crate) fn new(socket: PathBuf) -> ExitSignal {
        ExitSignal {
            flag: Arc::new(AtomicBool::new(false)),
            socket,
        }
    }

    /// Asks the server to finish.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
    }

    /// Whether the server was asked to finish.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "nbd:unix:/tmp/x.sock",
            "nbd:tcp:127.0.0.1:10809",
            "nbd:tcp:localhost:1",
            "nbd:tcp:[::1]:10809",
            "fuse:/var/lib/disk.img",
            "ublk",
            "ublk:queues=2,depth=64,id=7,user-copy,zero-copy,recovery",
            "ublk:recovery,recover=3",
        ] {
            assert_eq!(ExportSpec::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            ExportSpec::parse("nbd:tcp:[::1]:5").unwrap(),
            ExportSpec::NbdTcp {
                host: "::1".into(),
                port: 5
            }
        );
    }

    #[test]
    fn bad_specs_say_why() {
        for (s, why) in [
            ("", "no export kind"),
            ("ublk0", "no export kind"),
            ("ublkx:1", "unknown export kind"),
            ("ublk:queues=0", "queues= takes"),
            ("ublk:depth=x", "depth= takes"),
            ("ublk:fast", "unknown ublk option"),
            ("ublk:recovery=1", "unknown ublk option"),
            ("nbd", "no export kind"),
            ("nbd:unix:", "empty socket path"),
            ("nbd:tcp:host", "no port"),
            ("nbd:tcp:host:99999", "invalid port"),
            ("nbd:tcp::80", "empty host"),
            ("nbd:udp:x:1", "unknown transport"),
            ("fuse:", "empty file path"),
        ] {
            let e = ExportSpec::parse(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
