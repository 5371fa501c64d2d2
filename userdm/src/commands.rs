//! Each verb: find the devices, send their servers requests, print the answers.

use std::io::{IsTerminal, Read, Write};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use userdm_control::launch::launch;
use userdm_control::proto::{
    Command, CreateConfig, DepReport, DeviceReport, Reply, RowReport, PROTOCOL_VERSION,
};
use userdm_control::rundir::{Found, RunDir, RunLock};
use userdm_control::{client, ExportSpec};
use userdm_table::{Target, TargetType};
use userdm_targets::AnyTarget;

use crate::cli::{Cli, InfoArgs, QueryArgs, TableSource, Verb};
use crate::{output, BrokenPipe, UsageError};

/// userdm's version, shown where dmsetup shows libdevmapper's and the kernel driver's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) struct Session {
    pub(crate) run: RunDir,
    pub(crate) json: bool,
    verbose: u8,
}

/// Runs one command line.
pub fn run(cli: Cli) -> Result<()> {
    let s = Session {
        run: RunDir::from_env(),
        json: cli.json,
        verbose: cli.verbose,
    };
    match cli.verb {
        Verb::Serve(a) => crate::serve::serve(a),
        Verb::Create(a) => s.create(a),
        Verb::Remove(a) => {
            for name in &a.names {
                s.remove(name, a.deferred, a.force)?;
            }
            Ok(())
        }
        Verb::RemoveAll(a) => s.remove_all(a.force),
        Verb::Suspend(a) => s.each(&a.names, || Command::Suspend {
            noflush: a.noflush,
            nolockfs: a.nolockfs,
        }),
        Verb::Resume(a) => s.each(&a.names, || Command::Resume),
        Verb::Load(a) | Verb::Reload(a) => s.load(&a.name, &a.source),
        Verb::Clear(a) => s.simple(&a.name, Command::Clear),
        Verb::Rename(a) => s.rename(&a.name, &a.new, a.setuuid),
        Verb::Message(a) => s.message(&a.name, a.sector, a.words),
        Verb::Ls(a) => s.ls(a.target.as_deref(), a.tree, a.options.as_deref()),
        Verb::Info(a) => s.info(&a),
        Verb::Deps(a) => s.deps(&a),
        Verb::Status(a) => s.rows(&a, true),
        Verb::Table(a) => s.rows(&a, false),
        Verb::Wait(a) => s.wait(&a.name, a.event_nr),
        Verb::Targets => s.targets(None),
        Verb::TargetVersion(a) => s.targets(Some(&a.targets)),
        Verb::Version => s.version(),
        Verb::Setgeometry(a) => s.simple(
            &a.name,
            Command::SetGeometry {
                cylinders: a.cylinders,
                heads: a.heads,
                sectors: a.sectors,
                start: a.start,
            },
        ),
        Verb::WipeTable(a) => s.each(&a.names, || Command::WipeTable {
            noflush: a.noflush || a.force,
        }),
        Verb::Export(a) => s.export(&a),
        Verb::Add(a) => s.add(a),
        Verb::List(a) => s.list(a.number),
        Verb::Del(a) => s.del(&a),
        Verb::Recover(a) => s.recover(&a),
        Verb::Features => s.features(),
    }
}

pub(crate) fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(BrokenPipe.into()),
        Err(e) => Err(anyhow!(e).context("cannot write to standard output")),
    }
}

pub(crate) fn print_json<V: Serialize>(value: &V) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    print(&text)
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("userdm: warning: {w}");
    }
}

/// The exports of a new device: those named, else ublk where the kernel has it (and
/// `--no-ublk` was not given), else none (the device is then reached through `export` later,
/// or not at all).
fn create_exports(named: &[ExportSpec], no_ublk: bool) -> Vec<ExportSpec> {
    if !named.is_empty() || no_ublk {
        return named.to_vec();
    }
    if crate::exports::ublk_control_path().exists() {
        vec![ExportSpec::Ublk(Default::default())]
    } else {
        Vec::new()
    }
}

/// Reads a table from --table, else the file, else standard input when it is not a terminal.
/// `None` when there is no source, or when the text has no rows (as dmsetup, which then
/// creates the device without a table).
fn read_table(source: &TableSource) -> Result<Option<String>> {
    let text = if let Some(t) = &source.table {
        t.clone()
    } else if let Some(path) = &source.table_file {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read table file {}", path.display()))?
    } else if !std::io::stdin().is_terminal() {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("cannot read the table from standard input")?;
        t
    } else {
        return Ok(None);
    };
    match userdm_table::parse_table_text(&text) {
        Ok(rows) if rows.is_empty() => Ok(None),
        // Syntax errors are the server's to report, in the same words as every other table
        // error.
        _ => Ok(Some(text)),
    }
}

impl Session {
    fn find(&self, name: &str, lock: Option<&RunLock>) -> Result<Found> {
        let mut warnings = Vec::new();
        let found = self.run.find(name, lock, &mut warnings);
        warn(&warnings);
        found?.ok_or_else(|| anyhow!("device {name} does not exist"))
    }

    pub(crate) fn all(&self, lock: Option<&RunLock>) -> Result<Vec<Found>> {
        let scan = self.run.scan(lock)?;
        warn(&scan.warnings);
        let mut devices = scan.devices;
        devices.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(devices)
    }

    /// Calls `f` for each device named, in order, looking each up just before (so that, as in
    /// dmsetup, the devices before a missing one are still shown); or for every device when
    /// none is named. Returns how many devices there were.
    fn for_each(&self, names: &[String], mut f: impl FnMut(&Found) -> Result<()>) -> Result<usize> {
        if names.is_empty() {
            let all = self.all(None)?;
            for d in &all {
                f(d)?;
            }
            return Ok(all.len());
        }
        for name in names {
            f(&self.find(name, None)?)?;
        }
        Ok(names.len())
    }

    fn call(&self, found: &Found, command: Command) -> Result<Reply> {
        let verb = command.name();
        let reply = client::call(&found.dir.socket(), &found.info.name, command)
            .map_err(|e| anyhow!(e).context(format!("{verb} {}", found.info.name)))?;
        if let Reply::Warnings { warnings } = &reply {
            let named: Vec<String> = warnings
                .iter()
                .map(|w| format!("{verb} {}: {w}", found.info.name))
                .collect();
            warn(&named);
        }
        Ok(reply)
    }

    fn simple(&self, name: &str, command: Command) -> Result<()> {
        let found = self.find(name, None)?;
        self.call(&found, command)?;
        Ok(())
    }

    /// Runs a command on each device in turn, stopping at the first failure (as dmsetup).
    fn each(&self, names: &[String], command: impl Fn() -> Command) -> Result<()> {
        for name in names {
            self.simple(name, command())?;
        }
        Ok(())
    }

    fn create(&self, a: crate::cli::CreateArgs) -> Result<()> {
        let table = if a.notable {
            None
        } else {
            read_table(&a.source).with_context(|| format!("create {}", a.name))?
        };
        let exe = std::env::current_exe().context("cannot find the userdm binary")?;
        let cwd = std::env::current_dir().ok();
        let lock = self.run.lock()?;
        let devices = self.all(Some(&lock))?;
        if devices.iter().any(|d| d.info.name == a.name) {
            bail!("device name {} is already in use", a.name);
        }
        if let Some(uuid) = a.uuid.as_deref().filter(|u| !u.is_empty()) {
            if let Some(d) = devices
                .iter()
                .find(|d| d.info.uuid.as_deref() == Some(uuid))
            {
                bail!("uuid {uuid} is already in use by device {}", d.info.name);
            }
        }
        let config = CreateConfig {
            version: PROTOCOL_VERSION,
            name: a.name.clone(),
            uuid: a.uuid.clone().filter(|u| !u.is_empty()),
            read_only: a.readonly,
            table,
            cwd,
            exports: create_exports(&a.export, a.no_ublk)
                .iter()
                .map(ToString::to_string)
                .collect(),
            uid: a.uid,
            gid: a.gid,
            memory_dir: None,
        };
        let (_, report) = launch(&self.run, &lock, &exe, &config)
            .map_err(|e| anyhow!(e).context(format!("create {}", a.name)))?;
        // The one line a script needs: where the kernel block device is.
        if let Some(block) = report.block_device {
            print(&format!("{}\n", block.display()))?;
        }
        Ok(())
    }

    fn export(&self, a: &crate::cli::ExportArgs) -> Result<()> {
        let found = self.find(&a.name, None)?;
        if let Some(spec) = &a.spec {
            let command = Command::AddExport {
                spec: spec.to_string(),
            };
            if let Reply::Exported { address } = self.call(&found, command)? {
                print(&format!("{address}\n"))?;
            }
            return Ok(());
        }
        if let Some(spec) = &a.remove {
            self.call(&found, Command::RemoveExport { spec: spec.clone() })?;
            return Ok(());
        }
        let Reply::Info(info) = self.call(&found, Command::Info)? else {
            bail!("export {}: the server sent no info", a.name);
        };
        if self.json {
            return print_json(&info.exports);
        }
        print(
            &info
                .exports
                .iter()
                .map(|e| format!("{e}\n"))
                .collect::<String>(),
        )
    }

    fn remove(&self, name: &str, deferred: bool, force: bool) -> Result<()> {
        let found = self.find(name, None)?;
        self.call(&found, Command::Remove { deferred, force })?;
        Ok(())
    }

    fn remove_all(&self, force: bool) -> Result<()> {
        let mut failed = Vec::new();
        for found in self.all(None)? {
            let command = Command::Remove {
                deferred: false,
                force,
            };
            if let Err(e) = self.call(&found, command) {
                eprintln!("userdm: {e:#}");
                failed.push(found.info.name);
            }
        }
        if !failed.is_empty() {
            bail!("remove_all: {} left in place", failed.join(", "));
        }
        Ok(())
    }

    fn load(&self, name: &str, source: &TableSource) -> Result<()> {
        let table = read_table(source)
            .with_context(|| format!("load {name}"))?
            .ok_or_else(|| {
                UsageError(format!(
                    "load {name}: no table rows given: use --table ROWS, a TABLE_FILE, or \
                     standard input"
                ))
            })?;
        let found = self.find(name, None)?;
        let cwd = std::env::current_dir().ok();
        self.call(&found, Command::Load { table, cwd })?;
        Ok(())
    }

    fn rename(&self, name: &str, new: &str, setuuid: bool) -> Result<()> {
        let lock = self.run.lock()?;
        let found = self.find(name, Some(&lock))?;
        let devices = self.all(Some(&lock))?;
        if setuuid {
            if let Some(d) = devices
                .iter()
                .find(|d| d.info.uuid.as_deref() == Some(new) && d.info.name != name)
            {
                bail!("uuid {new} is already in use by device {}", d.info.name);
            }
            self.call(
                &found,
                Command::SetUuid {
                    uuid: new.to_string(),
                },
            )?;
        } else {
            if devices.iter().any(|d| d.info.name == new) {
                bail!("device name {new} is already in use");
            }
            self.call(
                &found,
                Command::Rename {
                    new_name: new.to_string(),
                },
            )?;
        }
        Ok(())
    }

    fn message(&self, name: &str, sector: u64, words: Vec<String>) -> Result<()> {
        let found = self.find(name, None)?;
        // dmsetup joins the words with single spaces; targets split them again.
        let argv: Vec<String> = words
            .join(" ")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if let Reply::Message { reply: Some(r) } =
            self.call(&found, Command::Message { sector, argv })?
        {
            print(&output::message_reply(&r))?;
        }
        Ok(())
    }

    fn ls(&self, target: Option<&str>, tree: bool, options: Option<&str>) -> Result<()> {
        let names = dev_names(options, tree)?;
        let devices = self.all(None)?;
        if tree {
            let mut with_deps = Vec::new();
            for d in &devices {
                with_deps.push((d.info.clone(), self.deps_of(d, false)?));
            }
            if self.json {
                #[derive(Serialize)]
                struct Entry<'a> {
                    name: &'a str,
                    major: u32,
                    minor: u32,
                    deps: &'a [DepReport],
                }
                let v: Vec<Entry> = with_deps
                    .iter()
                    .map(|(r, deps)| Entry {
                        name: &r.name,
                        major: r.major,
                        minor: r.minor,
                        deps,
                    })
                    .collect();
                return print_json(&v);
            }
            return print(&output::ls_tree(&with_deps));
        }
        let mut shown: Vec<DeviceReport> = devices.iter().map(|d| d.info.clone()).collect();
        let mut text = None;
        if let Some(t) = target {
            let mut with_rows = Vec::new();
            for d in &devices {
                with_rows.push((d.info.clone(), self.rows_of(d, false, false)?));
            }
            text = Some(output::ls_target(&with_rows, t));
            shown = with_rows
                .into_iter()
                .filter(|(_, rows)| rows.iter().any(|r| r.target_type == t))
                .map(|(r, _)| r)
                .collect();
        }
        if self.json {
            #[derive(Serialize)]
            struct Entry<'a> {
                name: &'a str,
                major: u32,
                minor: u32,
            }
            let v: Vec<Entry> = shown
                .iter()
                .map(|r| Entry {
                    name: &r.name,
                    major: r.major,
                    minor: r.minor,
                })
                .collect();
            return print_json(&v);
        }
        print(&text.unwrap_or_else(|| output::ls(&shown, names)))
    }

    fn info(&self, a: &InfoArgs) -> Result<()> {
        let columns = a.columns || a.options.is_some() || a.separator.is_some() || a.sort.is_some();
        let fields = output::fields(a.options.as_deref()).map_err(UsageError)?;
        let collect = self.json || columns;
        let mut reports: Vec<DeviceReport> = Vec::new();
        let count = self.for_each(&a.names, |d| {
            if collect {
                reports.push(d.info.clone());
                Ok(())
            } else {
                print(&output::info_long(&d.info))
            }
        })?;
        if self.json {
            return print_json(&reports);
        }
        if count == 0 {
            return print("No devices found\n");
        }
        if let Some(spec) = &a.sort {
            output::sort_reports(&mut reports, spec).map_err(UsageError)?;
        }
        if columns {
            // dmsetup's report without headings and without --separator joins fields with ':'
            // (seen in the VM oracle, tests/vm/oracle/*/raw/info-columns.txt).
            let separator = match (&a.separator, a.noheadings) {
                (Some(s), _) => Some(s.as_str()),
                (None, true) => Some(":"),
                (None, false) => None,
            };
            return print(&output::info_report(
                &reports,
                &fields,
                !a.noheadings,
                separator,
            ));
        }
        Ok(())
    }

    fn rows_of(&self, d: &Found, inactive: bool, status: bool) -> Result<Vec<RowReport>> {
        let command = if status {
            Command::Status { inactive }
        } else {
            Command::Table { inactive }
        };
        match self.call(d, command)? {
            Reply::Rows { rows } => Ok(rows),
            other => bail!("unexpected reply from device {}: {other:?}", d.info.name),
        }
    }

    fn deps_of(&self, d: &Found, inactive: bool) -> Result<Vec<DepReport>> {
        match self.call(d, Command::Deps { inactive })? {
            Reply::Deps { deps } => Ok(deps),
            other => bail!("unexpected reply from device {}: {other:?}", d.info.name),
        }
    }

    fn rows(&self, a: &QueryArgs, status: bool) -> Result<()> {
        if a.options.is_some() {
            let verb = if status { "status" } else { "table" };
            return Err(UsageError(format!("{verb} takes no -o/--options")).into());
        }
        let multiple = a.names.len() != 1;
        #[derive(Serialize)]
        struct Entry {
            name: String,
            rows: Vec<RowReport>,
        }
        let mut entries = Vec::new();
        let count = self.for_each(&a.names, |d| {
            let rows = self.rows_of(d, a.inactive, status)?;
            if self.json {
                let rows = rows
                    .into_iter()
                    .filter(|r| a.target.as_ref().is_none_or(|t| &r.target_type == t))
                    .collect();
                entries.push(Entry {
                    name: d.info.name.clone(),
                    rows,
                });
                Ok(())
            } else {
                let name = multiple.then_some(d.info.name.as_str());
                print(&output::rows(name, &rows, a.target.as_deref()))
            }
        })?;
        if self.json {
            return print_json(&entries);
        }
        if count == 0 {
            return print("No devices found\n");
        }
        Ok(())
    }

    fn deps(&self, a: &QueryArgs) -> Result<()> {
        let names = dev_names(a.options.as_deref(), false)?;
        let multiple = a.names.len() != 1;
        #[derive(Serialize)]
        struct Entry {
            name: String,
            deps: Vec<DepReport>,
        }
        let mut entries = Vec::new();
        let count = self.for_each(&a.names, |d| {
            let deps = self.deps_of(d, a.inactive)?;
            if self.json {
                entries.push(Entry {
                    name: d.info.name.clone(),
                    deps,
                });
                Ok(())
            } else {
                let name = multiple.then_some(d.info.name.as_str());
                print(&output::deps(name, &deps, names))
            }
        })?;
        if self.json {
            return print_json(&entries);
        }
        if count == 0 {
            return print("No devices found\n");
        }
        Ok(())
    }

    fn wait(&self, name: &str, event_nr: u32) -> Result<()> {
        let found = self.find(name, None)?;
        let command = Command::Wait {
            event_nr: Some(event_nr),
            timeout_ms: None,
        };
        self.call(&found, command)?;
        if self.verbose > 0 || self.json {
            // The event may have been a rename: ask the same server, not the name.
            let info = match self.call(&found, Command::Info)? {
                Reply::Info(info) => info,
                other => bail!("unexpected reply from device {name}: {other:?}"),
            };
            if self.json {
                return print_json(&[info]);
            }
            return print(&output::info_long(&info));
        }
        Ok(())
    }

    fn targets(&self, names: Option<&[String]>) -> Result<()> {
        let all = AnyTarget::types();
        let types: Vec<TargetType> = match names {
            None => all.to_vec(),
            Some(names) => names
                .iter()
                .map(|n| {
                    all.iter().find(|t| t.name == n).copied().ok_or_else(|| {
                        anyhow!("target type {n} is not known; see `userdm targets`")
                    })
                })
                .collect::<Result<_>>()?,
        };
        let types = &types[..];
        if self.json {
            #[derive(Serialize)]
            struct Entry {
                name: &'static str,
                version: [u32; 3],
            }
            let v: Vec<Entry> = types
                .iter()
                .map(|t| Entry {
                    name: t.name,
                    version: t.version,
                })
                .collect();
            return print_json(&v);
        }
        print(&output::targets(types))
    }

    fn version(&self) -> Result<()> {
        if self.json {
            return print_json(&serde_json::json!({
                "library": VERSION,
                "driver": VERSION,
                "protocol": PROTOCOL_VERSION,
            }));
        }
        print(&output::version(
            &format!("{VERSION} (userdm)"),
            &format!("{VERSION} (userdm, control protocol {PROTOCOL_VERSION})"),
        ))
    }
}

/// How `-o` of `ls` and `deps` names devices: `blkdevname` by kernel name (`loop0`, `dm-3`),
/// `devname` by device-mapper name where there is one, else as numbers. `ls --tree` also takes
/// dmsetup's drawing options, which change nothing here.
fn dev_names(options: Option<&str>, tree: bool) -> Result<output::DevNames<'static>> {
    const TREE: [&str; 11] = [
        "ascii", "utf", "vt100", "compact", "inverted", "notrunc", "device", "active", "open",
        "rw", "uuid",
    ];
    let mut names: output::DevNames<'static> = &output::numbers;
    for option in options.unwrap_or("").split(',').filter(|o| !o.is_empty()) {
        match option {
            "blkdevname" => names = &kernel_name,
            "devname" => names = &mapped_name,
            "devno" => names = &output::numbers,
            o if tree && TREE.contains(&o) => {}
            o => return Err(UsageError(format!("unknown option '{o}' for -o")).into()),
        }
    }
    Ok(names)
}

/// The kernel's name of a block device (`/sys/dev/block/MAJ:MIN` links to it). Major 0 (no
/// kernel device) has none.
fn kernel_name(major: u32, minor: u32) -> Option<String> {
    if major == 0 {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(link.file_name()?.to_str()?.to_string())
}

/// A kernel device-mapper device's name, else the kernel's name.
fn mapped_name(major: u32, minor: u32) -> Option<String> {
    if major == 0 {
        return None;
    }
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/name"))
        .ok()
        .map(|n| n.trim_end().to_string())
        .filter(|n| !n.is_empty())
        .or_else(|| kernel_name(major, minor))
}
