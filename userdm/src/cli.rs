//! The command line, as clap sees it: dmsetup's verbs and options.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use userdm_control::ExportSpec;

const ABOUT: &str = "A device-mapper that lives in user space";

const LONG_ABOUT: &str = "\
userdm manages mapped devices with the kernel device-mapper's lifecycle and dmsetup's command \
line, but serves their tables with its own targets in user space. Each device runs in its own \
server process, started by `userdm create` and ended by `userdm remove`; a device is exported \
to clients with --export (NBD over a Unix or TCP socket).

Tables are dmsetup tables: one row per line, `START LENGTH TARGET [PARAMS...]`, in 512-byte \
sectors, starting at 0 and contiguous. Blank lines and lines starting with '#' are skipped; a \
'#' later in a line ends it. Run `userdm targets` for the target types.

Commands and output follow dmsetup(8) byte for byte, except that device numbers are userdm's: \
major 0 and the device's id as minor while no kernel block device exists. Every query verb \
takes --json for the same facts as JSON.";

const AFTER_HELP: &str = "\
Environment:
  USERDM_RUN_DIR   where servers keep their sockets, pids and logs (default /run/userdm);
                   with ublk recovery also the recovery records and memory rows' bytes
  USERDM_SPIN_US   how long an idle IO thread busy-waits before it sleeps (default 20;
                   0 saves CPU at the cost of latency at low queue depth)

Exit status:
  0  success
  1  the command failed (the device or the table refused it; the message says why)
  2  usage error (unknown verb or option, missing or malformed argument)

Examples:
  userdm create t0 --table '0 2048 zero'
  printf '0 8192 linear a.img 0\\n8192 8192 memory\\n' > t1.table
  userdm create t1 t1.table --export nbd:unix:/run/t1.sock
  userdm suspend t1; userdm load t1 --table '0 16384 zero'; userdm resume t1
  userdm info t1; userdm table; userdm ls --json
  userdm remove_all";

/// `userdm`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "userdm",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Print query results (info, ls, table, status, deps, targets, version) as JSON.
    #[arg(long, global = true)]
    pub json: bool,

    /// More output: `wait -v` prints the device's info after the event, as dmsetup does.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// The command.
    #[command(subcommand)]
    pub verb: Verb,
}

/// A verb's after-help: its examples, then the exit status.
macro_rules! examples {
    ($($line:literal),+ $(,)?) => {
        concat!(
            "Examples:\n",
            $("  ", $line, "\n",)+
            "\nExit status: 0 success, 1 the command failed, 2 usage error."
        )
    };
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a device and make its table live.
    #[command(
        long_about = "Create the device NAME, load its table and resume it, as `dmsetup create` \
                      does. The table comes from --table, else from TABLE_FILE, else from \
                      standard input when it is not a terminal; --notable (or an empty table) \
                      creates the device without one. A server process for the device is \
                      started in the background; the command returns once the device is live \
                      and its exports listen, or prints the server's error and fails, leaving \
                      nothing behind.

Where the kernel has ublk (/dev/ublk-control), the device is served as the kernel block \
device /dev/ublkbN unless --export names other exports or --no-ublk is given; create then \
prints that path, and /dev/userdm/NAME links to it while it exists. `ublk:OPTIONS` takes \
comma-separated queues=N (threads, default 1), depth=N (requests in flight per queue, \
default 128), id=N (ask for /dev/ublkbN), user-copy, zero-copy (Linux 6.16+) and recovery \
(the device outlives a crashed server; see `userdm recover`). A device created without a \
table gets its ublk device at the first resume that makes a table live.",
        after_help = examples!(
            "userdm create t0 --table '0 2048 zero'",
            "userdm create t1 t1.table --uuid USERDM-t1 --export nbd:unix:/run/t1.sock",
            "userdm create t2 --table '0 8192 memory' --export nbd:tcp:127.0.0.1:10809",
            "echo '0 8 error' | userdm create t3 --readonly",
            "userdm create t4 --notable",
            "dev=$(userdm create t5 --table '0 2097152 memory' --export ublk:queues=2)",
        )
    )]
    Create(CreateArgs),

    /// Remove devices.
    #[command(
        long_about = "Remove each device, as `dmsetup remove` does: its exports stop, its \
                      server exits and its name is free again. An open device (one with \
                      connected clients) is refused unless --deferred, which removes it at its \
                      last close. --force first replaces the table with one that fails all IO. \
                      Devices are processed in order; the first failure stops the command.",
        after_help = examples!("userdm remove t0 t1", "userdm remove --deferred t0")
    )]
    Remove(RemoveArgs),

    /// Remove every device.
    #[command(
        name = "remove_all",
        long_about = "Remove every device, as `dmsetup remove_all` does. Open devices are left \
                      in place, and then the command fails; --force replaces their tables with \
                      ones that fail all IO first (they still stay while open).",
        after_help = examples!("userdm remove_all", "userdm remove_all --force")
    )]
    RemoveAll(RemoveAllArgs),

    /// Suspend devices: hold new IO, let IO in flight finish.
    #[command(
        long_about = "Suspend each device, as `dmsetup suspend` does: new IO waits, IO in \
                      flight completes. Suspending a suspended device does nothing.",
        after_help = examples!(
            "userdm suspend t0 && userdm load t0 new.table && userdm resume t0",
            "userdm suspend --noflush t0 t1",
        )
    )]
    Suspend(SuspendArgs),

    /// Resume devices, making a loaded table live.
    #[command(
        long_about = "Resume each device, as `dmsetup resume` does: if a table was loaded, it \
                      replaces the live one (the device is suspended for the swap if needed), \
                      then held IO continues against the live table.",
        after_help = examples!("userdm resume t0", "userdm resume t0 t1")
    )]
    Resume(DevicesArgs),

    /// Load a table into a device's inactive slot.
    #[command(
        long_about = "Load a table into the device's inactive slot, as `dmsetup load` does; \
                      `resume` makes it live. The table comes from --table, else TABLE_FILE, \
                      else standard input when it is not a terminal. Relative paths in the \
                      table resolve against the current directory.",
        after_help = examples!(
            "userdm load t0 --table '0 4096 zero' && userdm resume t0",
            "userdm load t0 new.table",
            "printf '0 8 zero\\n8 8 error\\n' | userdm load t0",
        )
    )]
    Load(LoadArgs),

    /// The same as load.
    #[command(
        long_about = "The same as `load`, as in dmsetup.",
        after_help = examples!("userdm reload t0 new.table")
    )]
    Reload(LoadArgs),

    /// Drop a device's inactive table.
    #[command(
        long_about = "Drop the table loaded into the device's inactive slot, as `dmsetup \
                      clear` does. The live table is untouched.",
        after_help = examples!("userdm clear t0")
    )]
    Clear(DeviceArg),

    /// Rename a device, or set its uuid.
    #[command(
        long_about = "Rename the device NAME to NEW, as `dmsetup rename` does, or with \
                      --setuuid set its uuid to NEW (a uuid can be set only once). Names and \
                      uuids must be unused.",
        after_help = examples!("userdm rename t0 data", "userdm rename data --setuuid USERDM-data")
    )]
    Rename(RenameArgs),

    /// Send a message to a device's target.
    #[command(
        long_about = "Send a message to the target of the live table's row that holds SECTOR, \
                      as `dmsetup message` does. The words are joined with single spaces. A \
                      reply is printed, ending with a newline. `@cancel_deferred_remove` \
                      cancels a deferred removal.",
        after_help = examples!(
            "userdm message t0 0 countbadblocks",
            "userdm message t0 0 @cancel_deferred_remove",
        )
    )]
    Message(MessageArgs),

    /// List devices.
    #[command(
        long_about = "List devices as `NAME\\t(MAJOR:MINOR)`, as `dmsetup ls` does; `No \
                      devices found` when there are none. --target lists only devices with a \
                      row of that target type (as `NAME\\t(MAJOR, MINOR)`, as dmsetup); --tree \
                      draws each device with its dependencies. A device whose server has died \
                      is removed, with a warning.",
        after_help = examples!("userdm ls", "userdm ls --target linear", "userdm ls --tree --json")
    )]
    Ls(LsArgs),

    /// Show devices' state.
    #[command(
        long_about = "Show each device's state in dmsetup's long format, or with --columns in \
                      its one-line-per-device report (`Name Maj Min Stat Open Targ Event \
                      UUID`; Stat is [L-][I-][s-][rw]: live table, inactive table, suspended, \
                      read-only or writable). Without names, every device.",
        after_help = examples!("userdm info t0", "userdm info -c", "userdm info --json")
    )]
    Info(InfoArgs),

    /// Show the devices each device depends on.
    #[command(
        long_about = "Show the devices each device's table uses, as `dmsetup deps` does: `N \
                      dependencies\\t: (MAJOR, MINOR)...`, the most recently named first. \
                      Regular files have no device number and show as (0, 0).",
        after_help = examples!("userdm deps t0", "userdm deps --json")
    )]
    Deps(QueryArgs),

    /// Show the status of each row of devices' tables.
    #[command(
        long_about = "Show each row's status, as `dmsetup status` does: `START LENGTH TARGET \
                      STATUS`, prefixed `NAME: ` when several devices are shown. Without \
                      names, every device.",
        after_help = examples!("userdm status t0", "userdm status --target striped", "userdm status --inactive t0")
    )]
    Status(QueryArgs),

    /// Show devices' tables.
    #[command(
        long_about = "Show each device's table, as `dmsetup table` does: `START LENGTH TARGET \
                      PARAMS`, prefixed `NAME: ` when several devices are shown; a device \
                      without a table shows an empty line. Without names, every device.",
        after_help = examples!("userdm table t0", "userdm table --inactive t0", "userdm table --json")
    )]
    Table(QueryArgs),

    /// Wait for a device's event counter to pass a number.
    #[command(
        long_about = "Wait until the device's event number differs from EVENT_NR (default 0), \
                      as `dmsetup wait` does. Events are raised by renames, removal and \
                      targets (a failing stripe). With -v, print the device's info afterwards.",
        after_help = examples!("userdm wait t0", "userdm wait -v t0 3")
    )]
    Wait(WaitArgs),

    /// List the target types.
    #[command(
        long_about = "List the target types userdm serves, as `dmsetup targets` does: \
                      `NAME vMAJOR.MINOR.PATCH`, with the kernel's versions where the kernel \
                      has the target.",
        after_help = examples!("userdm targets", "userdm targets --json")
    )]
    Targets,

    /// Show the versions of named target types.
    #[command(
        name = "target-version",
        long_about = "Show the version of each named target type in the format of `targets`, \
                      as `dmsetup target-version` does; an unknown type fails.",
        after_help = examples!("userdm target-version linear striped")
    )]
    TargetVersion(TargetVersionArgs),

    /// Show userdm's version.
    #[command(
        long_about = "Show the version in dmsetup's two-line format. Both lines give userdm's \
                      version (the driver line adds the control protocol version), since no \
                      libdevmapper or kernel driver is involved.",
        after_help = examples!("userdm version")
    )]
    Version,

    /// Set a device's geometry.
    #[command(
        long_about = "Set the device's disk geometry, as `dmsetup setgeometry` does: at most \
                      65535 cylinders, 255 heads and 255 sectors per track, not beyond the \
                      device's size.",
        after_help = examples!("userdm setgeometry t0 16 4 32 0")
    )]
    Setgeometry(GeometryArgs),

    /// Replace a device's table with one that fails all IO.
    #[command(
        name = "wipe_table",
        long_about = "Load a table of one `error` row of the device's size and resume, as \
                      `dmsetup wipe_table` does.",
        after_help = examples!("userdm wipe_table t0", "userdm wipe_table -f t0 t1")
    )]
    WipeTable(WipeArgs),

    /// Add, remove or list the exports of a running device.
    #[command(
        long_about = "With SPEC, start one more export of the running device NAME, in \
                      --export syntax (ublk[:OPTIONS], nbd:unix:PATH, nbd:tcp:HOST:PORT, \
                      fuse:PATH), and print where clients reach it. With --remove SPEC, stop \
                      that export (as given or as listed): its clients are disconnected, and a \
                      kernel block device still in use is refused as `remove` refuses it. With \
                      neither, list the exports, one per line. Exports keep serving across \
                      suspend, load and resume. Adding an export is for root only.",
        after_help = examples!(
            "userdm export t0 nbd:unix:/run/t0.sock",
            "userdm export t0 nbd:tcp:127.0.0.1:0",
            "userdm export t0 --remove nbd:unix:/run/t0.sock",
            "userdm export t0 --json",
        )
    )]
    Export(ExportArgs),

    /// Add a ublk device, as ublksrv's `ublk add`.
    #[command(
        long_about = "Add a ublk device served by userdm, as ublksrv's `ublk add` does, and print \
                      it as `list` does. It is an ordinary userdm device, named ublkN unless \
                      --name is given, with a one-row table: `-t null` a zero row (reads give \
                      zeros, writes are dropped; 250 GiB unless --size), `-t memory` a sparse \
                      RAM disk of --size bytes, `-t loop -f FILE` a linear row over FILE (its \
                      size unless --size). Every dmsetup verb works on it; `del` removes it. \
                      Sizes take the suffixes K, M, G, T (powers of 1024).",
        after_help = examples!(
            "userdm add -t null",
            "userdm add -t memory --size 1G -q 2 -d 128",
            "userdm add -t loop -f disk.img -n 3 --recovery",
            "userdm add -t loop -f disk.img --json",
        )
    )]
    Add(AddArgs),

    /// List ublk devices, as ublksrv's `ublk list`.
    #[command(
        long_about = "List the kernel's ublk devices in ublksrv's layout (`dev id N: \
                      nr_hw_queues ...`, then max rq size, daemon pid, flags and state, then the \
                      device numbers), with the userdm device that serves each. With -n, one \
                      device.",
        after_help = examples!("userdm list", "userdm list -n 0 --json")
    )]
    List(ListArgs),

    /// Delete ublk devices, as ublksrv's `ublk del`.
    #[command(
        long_about = "Delete ublk device ID (-n) or every ublk device (-a). A device served by \
                      userdm is removed as `remove` does: refused while it is open or mounted. \
                      A device left behind by a dead server is deleted through the driver.",
        after_help = examples!("userdm del -n 0", "userdm del -a")
    )]
    Del(DelArgs),

    /// Take over a ublk device whose server died, as ublksrv's `ublk recover`.
    #[command(
        long_about = "Start a new server for ublk device ID, which was added or created with \
                      recovery and whose server died (the device is QUIESCED: IO waits). The \
                      new server rebuilds the userdm device from the record the old one kept \
                      (name, table, options) and IO resumes; requests the dead server had \
                      taken are sent again. Rows over files and block devices keep their data; \
                      a memory row comes back empty.",
        after_help = examples!("userdm recover -n 0")
    )]
    Recover(RecoverArgs),

    /// Show what the kernel's ublk driver offers.
    #[command(
        long_about = "Show the ublk driver's feature flags (GET_FEATURES), each with what it \
                      does, and the ones it lacks with the first Linux version that has them.",
        after_help = examples!("userdm features", "userdm features --json")
    )]
    Features,

    /// Run a device's server (started by `create`; not for direct use).
    #[command(name = "__serve", hide = true)]
    Serve(ServeArgs),
}

/// Where a table comes from.
#[derive(Debug, Args)]
pub struct TableSource {
    /// The table, rows separated by newlines.
    #[arg(long, value_name = "ROWS")]
    pub table: Option<String>,

    /// A file holding the table.
    #[arg(value_name = "TABLE_FILE", conflicts_with = "table")]
    pub table_file: Option<PathBuf>,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The device's name.
    pub name: String,

    #[command(flatten)]
    pub source: TableSource,

    /// Create the device without a table.
    #[arg(short = 'n', long, conflicts_with_all = ["table", "table_file"])]
    pub notable: bool,

    /// The device's uuid.
    #[arg(short = 'u', long)]
    pub uuid: Option<String>,

    /// Make the device read-only.
    #[arg(short = 'r', long)]
    pub readonly: bool,

    /// Export the device: ublk[:OPTIONS], nbd:unix:PATH, nbd:tcp:HOST:PORT or fuse:PATH. May
    /// be repeated. Without it, the device is served over ublk where the kernel has ublk.
    #[arg(long, value_name = "SPEC", value_parser = parse_export)]
    pub export: Vec<ExportSpec>,

    /// Do not serve the device over ublk by default.
    #[arg(long, conflicts_with = "export")]
    pub no_ublk: bool,

    /// Owner uid allowed to control the device besides root; its control socket is chowned.
    #[arg(short = 'U', long)]
    pub uid: Option<u32>,

    /// Group of the device's control socket.
    #[arg(short = 'G', long)]
    pub gid: Option<u32>,
}

/// `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The device.
    pub name: String,

    /// The export to start.
    #[arg(value_name = "SPEC", value_parser = parse_export, conflicts_with = "remove")]
    pub spec: Option<ExportSpec>,

    /// Stop this export.
    #[arg(long, value_name = "SPEC")]
    pub remove: Option<String>,
}

/// `add`'s targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AddTarget {
    /// Reads give zeros, writes are dropped.
    Null,
    /// A sparse RAM disk.
    Memory,
    /// A file or block device.
    Loop,
}

impl AddTarget {
    /// The name `-t` takes.
    pub fn name(self) -> &'static str {
        match self {
            AddTarget::Null => "null",
            AddTarget::Memory => "memory",
            AddTarget::Loop => "loop",
        }
    }
}

/// `add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The target: null, memory or loop.
    #[arg(short = 't', long = "type", value_enum)]
    pub target: AddTarget,

    /// The backing file or block device of a loop device.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,

    /// The device's size in bytes (suffixes K, M, G, T).
    #[arg(short = 's', long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Hardware queues (one server thread each).
    #[arg(short = 'q', long)]
    pub queues: Option<u16>,

    /// Requests in flight per queue.
    #[arg(short = 'd', long)]
    pub depth: Option<u16>,

    /// The device id: N in /dev/ublkbN (default: the lowest free one).
    #[arg(short = 'n', long)]
    pub number: Option<u32>,

    /// The userdm device's name (default ublkN).
    #[arg(long)]
    pub name: Option<String>,

    /// Let the device outlive a crashed server, for `recover`.
    #[arg(short = 'r', long)]
    pub recovery: bool,

    /// Copy data with pread/pwrite on /dev/ublkcN (Linux 6.5+).
    #[arg(short = 'u', long)]
    pub user_copy: bool,

    /// Zero copy (Linux 6.16+).
    #[arg(short = 'z', long)]
    pub zero_copy: bool,

    /// Make the device read-only.
    #[arg(long)]
    pub readonly: bool,

    /// Stay until the device is deleted (the server itself runs in the background either
    /// way; ^C ends only this command).
    #[arg(long)]
    pub foreground: bool,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only device ID.
    #[arg(short = 'n', long)]
    pub number: Option<u32>,
}

/// `del`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["number", "all"])))]
pub struct DelArgs {
    /// The device id.
    #[arg(short = 'n', long)]
    pub number: Option<u32>,

    /// Every ublk device.
    #[arg(short = 'a', long)]
    pub all: bool,
}

/// `recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The device id.
    #[arg(short = 'n', long)]
    pub number: u32,
}

/// Bytes, with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected a number with K, M, G or T"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_export(s: &str) -> Result<ExportSpec, String> {
    ExportSpec::parse(s).map_err(|e| e.to_string())
}

/// `remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Remove at the last close if the device is open.
    #[arg(long)]
    pub deferred: bool,

    /// Replace the table with one that fails all IO first.
    #[arg(short, long)]
    pub force: bool,

    /// Accepted for dmsetup compatibility (userdm has no udev to race with).
    #[arg(long)]
    pub retry: bool,

    /// The devices.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// `remove_all`.
#[derive(Debug, Args)]
pub struct RemoveAllArgs {
    /// Make open devices fail all IO first.
    #[arg(short, long)]
    pub force: bool,
}

/// `suspend`.
#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// Let targets that queue IO keep it instead of completing it.
    #[arg(long)]
    pub noflush: bool,

    /// Accepted for dmsetup compatibility: there is no filesystem to freeze in user space.
    #[arg(long)]
    pub nolockfs: bool,

    /// The devices.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// Verbs taking one or more device names.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Accepted for dmsetup compatibility.
    #[arg(long, hide = true)]
    pub noflush: bool,

    /// Accepted for dmsetup compatibility.
    #[arg(long, hide = true)]
    pub nolockfs: bool,

    /// The devices.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// Verbs taking one device name.
#[derive(Debug, Args)]
pub struct DeviceArg {
    /// The device.
    pub name: String,
}

/// `load` and `reload`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The device.
    pub name: String,

    #[command(flatten)]
    pub source: TableSource,
}

/// `rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// The device.
    pub name: String,

    /// Set the uuid to NEW instead of renaming.
    #[arg(long)]
    pub setuuid: bool,

    /// The new name, or with --setuuid the uuid.
    #[arg(value_name = "NEW")]
    pub new: String,
}

/// `message`.
#[derive(Debug, Args)]
pub struct MessageArgs {
    /// The device.
    pub name: String,

    /// A sector of the row whose target gets the message.
    #[arg(value_parser = parse_sector)]
    pub sector: u64,

    /// The message.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub words: Vec<String>,
}

fn parse_sector(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = s.parse() {
            return Ok(v);
        }
    }
    Err(format!("invalid sector '{s}'"))
}

/// `ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only devices with a row of this target type.
    #[arg(long, value_name = "TYPE")]
    pub target: Option<String>,

    /// Show devices with their dependencies as a tree.
    #[arg(long)]
    pub tree: bool,

    /// `blkdevname` or `devname`: show devices by kernel name instead of number. With --tree,
    /// dmsetup's drawing options (ascii, utf, vt100, compact, inverted, notrunc, device,
    /// active, open, rw, uuid) are accepted; the drawing is always ASCII.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Option<String>,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// One line per device, in columns (dmsetup's `info -c`).
    #[arg(short = 'c', short_alias = 'C', long)]
    pub columns: bool,

    /// With --columns: no heading line.
    #[arg(long)]
    pub noheadings: bool,

    /// With --columns: the fields, comma-separated (`+F` adds to the default
    /// name,major,minor,attr,open,segments,events,uuid). Also: read_ahead, tables_loaded,
    /// suspended, readonly, devno.
    #[arg(short = 'o', long = "options", value_name = "FIELDS")]
    pub options: Option<String>,

    /// With --columns: separate fields with SEP instead of aligning them.
    #[arg(long, value_name = "SEP")]
    pub separator: Option<String>,

    /// With --columns: sort by these fields (comma-separated; `-F` sorts descending).
    #[arg(short = 'O', long, value_name = "FIELDS", allow_hyphen_values = true)]
    pub sort: Option<String>,

    /// The devices (default: all).
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
}

/// `table`, `status`, `deps`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// deps only: `blkdevname` or `devname` shows devices by kernel name instead of number.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Option<String>,

    /// Only rows of this target type.
    #[arg(long, value_name = "TYPE")]
    pub target: Option<String>,

    /// Of the inactive table.
    #[arg(long)]
    pub inactive: bool,

    /// Accepted for dmsetup compatibility.
    #[arg(long, hide = true)]
    pub noflush: bool,

    /// The devices (default: all).
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
}

/// `wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The device.
    pub name: String,

    /// Wait until the event number differs from this.
    #[arg(default_value_t = 0)]
    pub event_nr: u32,

    /// Accepted for dmsetup compatibility.
    #[arg(long, hide = true)]
    pub noflush: bool,
}

/// `setgeometry`.
#[derive(Debug, Args)]
pub struct GeometryArgs {
    /// The device.
    pub name: String,
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Start sector.
    pub start: u64,
}

/// `wipe_table`.
#[derive(Debug, Args)]
pub struct WipeArgs {
    /// Implies --noflush and --nolockfs, as in dmsetup.
    #[arg(short, long)]
    pub force: bool,

    /// Suspend without flushing.
    #[arg(long)]
    pub noflush: bool,

    /// Accepted for dmsetup compatibility.
    #[arg(long)]
    pub nolockfs: bool,

    /// The devices.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// `target-version`.
#[derive(Debug, Args)]
pub struct TargetVersionArgs {
    /// The target types.
    #[arg(required = true, value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// `__serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The run directory.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// The device id.
    #[arg(long)]
    pub id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1X").unwrap_err().contains("suffix"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn dmsetup_spellings_parse() {
        let p = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let c = p(&[
            "userdm", "create", "t0", "--table", "0 8 zero", "-u", "U", "-r",
        ])
        .unwrap();
        let Verb::Create(a) = c.verb else { panic!() };
        assert_eq!(a.source.table.as_deref(), Some("0 8 zero"));
        assert!(a.readonly);
        assert!(p(&["userdm", "create", "t0", "-n", "--table", "x"]).is_err());
        let c = p(&["userdm", "rename", "t0", "--setuuid", "U"]).unwrap();
        let Verb::Rename(a) = c.verb else { panic!() };
        assert!(a.setuuid && a.new == "U");
        let c = p(&["userdm", "message", "t0", "0", "a", "-b", "c"]).unwrap();
        let Verb::Message(a) = c.verb else { panic!() };
        assert_eq!(a.words, vec!["a", "-b", "c"]);
        assert!(p(&["userdm", "message", "t0", "x", "a"]).is_err());
        assert!(p(&["userdm", "remove_all", "-f"]).is_ok());
        assert!(p(&["userdm", "info", "-c", "--json"]).is_ok());
        assert!(p(&["userdm", "--json", "ls"]).is_ok());
        assert!(p(&["userdm", "wait", "t0", "3", "-v"]).is_ok());
        assert!(p(&["userdm", "create", "t0", "--export", "bogus"]).is_err());
        assert!(p(&["userdm", "nosuch"]).is_err());
    }
}
