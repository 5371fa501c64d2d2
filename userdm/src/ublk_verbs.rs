//! ublksrv's verbs on top of the device-mapper ones: `add`, `list`, `del`, `recover`,
//! `features`. A ublk device added here is an ordinary userdm device (named `ublkN` unless
//! `--name` says otherwise) with a one-row table and the ublk export, so every dmsetup verb
//! works on it too.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use userdm_control::launch::launch;
use userdm_control::proto::{Command, CreateConfig, DeviceReport, PROTOCOL_VERSION};
use userdm_control::rundir::Found;
use userdm_control::{client, ExportSpec, UblkSpec};
use userdm_ublk::{Control, DeleteMode, DevInfo, DevState, FEATURE_INFO};

use crate::cli::{AddArgs, AddTarget, DelArgs, RecoverArgs};
use crate::commands::{print, print_json, Session};
use crate::exports::ublk_control_path;
use crate::UsageError;

/// The size `add -t null` gives a device when `--size` is not given: ublksrv's.
const NULL_SIZE_DEFAULT: u64 = 250 << 30;

impl Session {
    /// `add`: a new userdm device served over ublk.
    pub fn add(&self, a: AddArgs) -> Result<()> {
        let bytes = match (a.target, &a.file, a.size) {
            (AddTarget::Loop, None, _) => {
                return Err(UsageError("add -t loop needs a backing file: -f FILE".into()).into())
            }
            (AddTarget::Loop, Some(file), size) => {
                let meta = std::fs::metadata(file)
                    .with_context(|| format!("add: cannot use {}", file.display()))?;
                let file_bytes = if meta.file_type().is_file() {
                    meta.len()
                } else {
                    block_device_bytes(file)?
                };
                let bytes = size.unwrap_or(file_bytes);
                if bytes > file_bytes {
                    bail!(
                        "add: --size {bytes} is larger than {} ({file_bytes} bytes)",
                        file.display()
                    );
                }
                bytes
            }
            (_, Some(_), _) => {
                return Err(UsageError(format!(
                    "add -t {}: -f is only for the loop target",
                    a.target.name()
                ))
                .into())
            }
            (AddTarget::Null, None, size) => size.unwrap_or(NULL_SIZE_DEFAULT),
            (AddTarget::Memory, None, Some(size)) => size,
            (AddTarget::Memory, None, None) => {
                return Err(UsageError("add -t memory needs --size SIZE".into()).into())
            }
        };
        let sectors = bytes >> 9;
        if sectors == 0 || bytes % 512 != 0 {
            bail!("add: the size must be a non-zero multiple of 512 bytes, not {bytes}");
        }
        let row = match (a.target, &a.file) {
            (AddTarget::Loop, Some(file)) => {
                let path = std::path::absolute(file)
                    .with_context(|| format!("add: cannot resolve {}", file.display()))?;
                format!("0 {sectors} linear {} 0", escape_path(&path)?)
            }
            (AddTarget::Null, _) => format!("0 {sectors} zero"),
            _ => format!("0 {sectors} memory"),
        };
        let mut control = Control::open(ublk_control_path()).map_err(|e| anyhow!("add: {e}"))?;
        let id = match a.number {
            Some(id) => id,
            None => lowest_free_id(&mut control)?,
        };
        let name = a.name.clone().unwrap_or_else(|| format!("ublk{id}"));
        let spec = UblkSpec {
            queues: a.queues,
            depth: a.depth,
            id: Some(id),
            user_copy: a.user_copy,
            zero_copy: a.zero_copy,
            recovery: a.recovery,
            recover: None,
        };
        let config = CreateConfig {
            version: PROTOCOL_VERSION,
            name: name.clone(),
            uuid: None,
            read_only: a.readonly,
            table: Some(row),
            cwd: std::env::current_dir().ok(),
            exports: vec![ExportSpec::Ublk(spec).to_string()],
            uid: None,
            gid: None,
            memory_dir: None,
        };
        let report = self.launch_device(&config)?;
        self.show_added(&mut control, id, &report)?;
        if a.foreground {
            wait_for_exit(report.pid);
        }
        Ok(())
    }

    /// Starts a server for `config` after checking that its name is free.
    fn launch_device(&self, config: &CreateConfig) -> Result<DeviceReport> {
        let exe = std::env::current_exe().context("cannot find the userdm binary")?;
        let lock = self.run.lock()?;
        if self
            .all(Some(&lock))?
            .iter()
            .any(|d| d.info.name == config.name)
        {
            bail!("device name {} is already in use", config.name);
        }
        let (_, report) = launch(&self.run, &lock, &exe, config)
            .map_err(|e| anyhow!(e).context(format!("add {}", config.name)))?;
        Ok(report)
    }

    fn show_added(&self, control: &mut Control, id: u32, report: &DeviceReport) -> Result<()> {
        let info = control
            .dev_info(id)
            .map_err(|e| anyhow!("ublk {id}: {e}"))?;
        let entry = ListEntry::new(&info, control, Some(report));
        if self.json {
            print_json(&entry)
        } else {
            print(&entry.text())
        }
    }

    /// `list`: the kernel's ublk devices, with the userdm device that serves each.
    pub fn list(&self, number: Option<u32>) -> Result<()> {
        let mut control = Control::open(ublk_control_path()).map_err(|e| anyhow!("list: {e}"))?;
        let devices = userdm_ublk::list(&mut control).map_err(|e| anyhow!("list: {e}"))?;
        let served = self.served()?;
        let mut entries = Vec::new();
        for info in devices.iter().filter(|d| number.is_none_or(|n| d.id == n)) {
            let report = served.iter().find(|(id, _)| *id == info.id).map(|(_, r)| r);
            entries.push(ListEntry::new(info, &mut control, report));
        }
        if let Some(n) = number {
            if entries.is_empty() {
                bail!("list: there is no ublk device {n}");
            }
        }
        if self.json {
            return print_json(&entries);
        }
        let text: String = entries.iter().map(ListEntry::text).collect();
        print(&text)
    }

    /// The userdm devices that have a ublk device, by ublk id.
    fn served(&self) -> Result<Vec<(u32, DeviceReport)>> {
        Ok(self
            .all(None)?
            .into_iter()
            .filter_map(|d| {
                let id = ublk_id(d.info.block_device.as_deref()?)?;
                Some((id, d.info))
            })
            .collect())
    }

    fn found_for(&self, id: u32) -> Result<Option<Found>> {
        Ok(self.all(None)?.into_iter().find(|d| {
            d.info
                .block_device
                .as_deref()
                .and_then(ublk_id)
                .is_some_and(|n| n == id)
        }))
    }

    /// `del`: removes ublk devices: through their userdm server when one serves them (busy
    /// while in use, as `remove`), else directly through the driver.
    pub fn del(&self, a: &DelArgs) -> Result<()> {
        let mut control = Control::open(ublk_control_path()).map_err(|e| anyhow!("del: {e}"))?;
        let ids: Vec<u32> = match a.number {
            Some(id) => vec![id],
            None => userdm_ublk::list(&mut control)
                .map_err(|e| anyhow!("del: {e}"))?
                .iter()
                .map(|d| d.id)
                .collect(),
        };
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = self.del_one(&mut control, id) {
                if a.number.is_some() {
                    return Err(e);
                }
                eprintln!("userdm: {e:#}");
                failed.push(id.to_string());
            }
        }
        if !failed.is_empty() {
            bail!("del -a: ublk devices {} left in place", failed.join(", "));
        }
        Ok(())
    }

    fn del_one(&self, control: &mut Control, id: u32) -> Result<()> {
        if let Some(found) = self.found_for(id)? {
            client::call(
                &found.dir.socket(),
                &found.info.name,
                Command::Remove {
                    deferred: false,
                    force: false,
                },
            )
            .map_err(|e| anyhow!(e).context(format!("del {id} ({})", found.info.name)))?;
            return Ok(());
        }
        // No live userdm server: a device left for recovery, or another server's.
        userdm_ublk::delete(control, id, DeleteMode::Safe).map_err(|e| anyhow!("del {id}: {e}"))?;
        // The device is gone, so the bytes its `memory` rows kept for a recovery go too.
        if let Some(dir) = self
            .run
            .read_recovery_record(id)
            .ok()
            .and_then(|r| r.memory_dir)
        {
            self.run.remove_memory_dir(&dir);
        }
        let _ = std::fs::remove_file(self.run.recovery_record(id));
        Ok(())
    }

    /// `recover`: a new server takes over a ublk device whose server died, from the record
    /// the old one left.
    pub fn recover(&self, a: &RecoverArgs) -> Result<()> {
        let id = a.number;
        let mut control =
            Control::open(ublk_control_path()).map_err(|e| anyhow!("recover: {e}"))?;
        let info = control
            .dev_info(id)
            .map_err(|e| anyhow!("recover {id}: {e}"))?;
        if !info.recoverable() {
            bail!("recover {id}: the device was added without --recovery");
        }
        if !matches!(info.state, DevState::Quiesced | DevState::FailIo) {
            bail!(
                "recover {id}: the device is {}, not waiting for recovery{}",
                info.state.name(),
                info.server_pid
                    .map(|p| format!(" (served by process {p})"))
                    .unwrap_or_default()
            );
        }
        let config = self
            .run
            .read_recovery_record(id)
            .map_err(|e| anyhow!("recover {id}: {e}"))?;
        let report = self.launch_device(&config)?;
        self.show_added(&mut control, id, &report)
    }

    /// `features`: what the ublk driver offers.
    pub fn features(&self) -> Result<()> {
        let offered =
            userdm_ublk::features(ublk_control_path()).map_err(|e| anyhow!("features: {e}"))?;
        #[derive(Serialize)]
        struct Feature {
            name: &'static str,
            flag: u64,
            offered: bool,
            since: &'static str,
            what: &'static str,
        }
        let list: Vec<Feature> = FEATURE_INFO
            .iter()
            .map(|f| Feature {
                name: f.name,
                flag: f.flag,
                offered: offered.contains(f.flag),
                since: f.since,
                what: f.what,
            })
            .collect();
        if self.json {
            #[derive(Serialize)]
            struct Features {
                bits: u64,
                features: Vec<Feature>,
            }
            return print_json(&Features {
                bits: offered.bits(),
                features: list,
            });
        }
        let mut text = format!("ublk features: {:#x}\n", offered.bits());
        for f in list.iter().filter(|f| f.offered) {
            text.push_str(&format!("\t{:<28} {}\n", f.name, f.what));
        }
        for f in list.iter().filter(|f| !f.offered) {
            text.push_str(&format!(
                "\t{:<28} not offered (Linux {}+)\n",
                f.name, f.since
            ));
        }
        print(&text)
    }
}

/// One device as `list` shows it.
#[derive(Serialize)]
struct ListEntry {
    id: u32,
    queues: u16,
    depth: u16,
    max_io_bytes: u32,
    sectors: u64,
    logical_block_size: u32,
    state: String,
    server_pid: Option<i32>,
    flags: u64,
    flag_names: Vec<String>,
    char_devt: Option<(u32, u32)>,
    block_devt: Option<(u32, u32)>,
    owner: (u32, u32),
    /// The userdm device serving it, if any.
    name: Option<String>,
    table: Option<String>,
}

impl ListEntry {
    fn new(info: &DevInfo, control: &mut Control, report: Option<&DeviceReport>) -> ListEntry {
        let params = control.params(info.id).ok();
        let char_devt = devt_of(&info.char_path());
        ListEntry {
            id: info.id,
            queues: info.queues,
            depth: info.depth,
            max_io_bytes: info.max_io_bytes,
            sectors: params.map_or(0, |p| p.basic.dev_sectors),
            logical_block_size: params.map_or(512, |p| 1 << p.basic.logical_bs_shift),
            state: info.state.name(),
            server_pid: info.server_pid,
            flags: info.flags.bits(),
            flag_names: info.flags.names(),
            char_devt,
            block_devt: params
                .map(|p| (p.devt.disk_major, p.devt.disk_minor))
                .filter(|d| d.0 != 0),
            owner: (info.owner_uid, info.owner_gid),
            name: report.map(|r| r.name.clone()),
            table: None,
        }
    }

    /// ublksrv's layout (`ublk list`), which scripts scrape by field: the pid is field 7 of
    /// the second line and the state field 11.
    fn text(&self) -> String {
        let devt =
            |d: Option<(u32, u32)>| d.map_or_else(|| "-".into(), |(a, b)| format!("{a}:{b}"));
        let mut t = format!(
            "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n",
            self.id, self.queues, self.depth, self.logical_block_size, self.sectors
        );
        t.push_str(&format!(
            "\tmax rq size {} daemon pid {} flags {:#x} state {}\n",
            self.max_io_bytes,
            self.server_pid.unwrap_or(-1),
            self.flags,
            self.state
        ));
        t.push_str(&format!(
            "\tublkc: {} ublkb: {} owner: {}:{}\n",
            devt(self.char_devt),
            devt(self.block_devt),
            self.owner.0,
            self.owner.1
        ));
        if let Some(name) = &self.name {
            t.push_str(&format!("\tuserdm device: {name}\n"));
        }
        t
    }
}

fn devt_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    Some(split_devt(std::fs::metadata(path).ok()?.rdev()))
}

/// Major and minor of a `dev_t`, in glibc's encoding.
fn split_devt(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// N of `/dev/ublkbN`.
fn ublk_id(block: &Path) -> Option<u32> {
    block.to_str()?.strip_prefix("/dev/ublkb")?.parse().ok()
}

/// The lowest id no ublk device has (ublksrv's choice when `-n` is not given).
fn lowest_free_id(control: &mut Control) -> Result<u32> {
    let taken: Vec<u32> = userdm_ublk::list(control)
        .map_err(|e| anyhow!("add: {e}"))?
        .iter()
        .map(|d| d.id)
        .collect();
    Ok((0..).find(|id| !taken.contains(id)).unwrap_or(0))
}

/// A block device's size, read through its sysfs entry.
fn block_device_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let (major, minor) = split_devt(std::fs::metadata(path)?.rdev());
    let sectors = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .with_context(|| format!("add: cannot read the size of {}", path.display()))?;
    Ok(sectors.trim().parse::<u64>().unwrap_or(0) << 9)
}

/// A path as a table parameter: whitespace and backslashes escaped, as the table parser
/// reads them back. A '#' or a line break cannot be written in a table row.
fn escape_path(path: &Path) -> Result<String> {
    let text = path.to_string_lossy();
    if text.contains(['#', '\n', '\r']) {
        bail!(
            "add: {} cannot be named in a table ('#' and line breaks end a row)",
            path.display()
        );
    }
    let mut out = String::new();
    for c in text.chars() {
        if c.is_whitespace() || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    Ok(out)
}

/// Waits until process `pid` has ended (`add --foreground`).
fn wait_for_exit(pid: u32) {
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_keep_ublksrv_fields() {
        let entry = ListEntry {
            id: 3,
            queues: 2,
            depth: 128,
            max_io_bytes: 524288,
            sectors: 131072,
            logical_block_size: 512,
            state: "LIVE".into(),
            server_pid: Some(4242),
            flags: 0x42,
            flag_names: vec![],
            char_devt: Some((245, 3)),
            block_devt: Some((259, 1)),
            owner: (0, 0),
            name: Some("ublk3".into()),
            table: None,
        };
        let text = entry.text();
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0][..3], ["dev", "id", "3:"]);
        // Scripts written for ublksrv and kublk take the pid from field 7 and the state from
        // field 11 of the second line (awk's numbering).
        assert_eq!(lines[1][6], "4242");
        assert_eq!(lines[1][10], "LIVE");
        assert_eq!(
            lines[2],
            ["ublkc:", "245:3", "ublkb:", "259:1", "owner:", "0:0"]
        );
        assert_eq!(lines[3], ["userdm", "device:", "ublk3"]);
    }

    #[test]
    fn device_numbers_split_as_glibc() {
        assert_eq!(split_devt(0x0000_0000_0000_0801), (8, 1));
        // Large numbers: the minor's high bits sit above the major's low 12 bits.
        let (major, minor) = (259u64, 1_048_575u64);
        let rdev = ((major & 0xfff) << 8)
            | ((major & !0xfff) << 32)
            | (minor & 0xff)
            | ((minor & !0xff) << 12);
        assert_eq!(split_devt(rdev), (259, 1_048_575));
        assert_eq!(ublk_id(Path::new("/dev/ublkb12")), Some(12));
        assert_eq!(ublk_id(Path::new("/dev/nbd0")), None);
    }

    #[test]
    fn table_paths_are_escaped_or_refused() {
        assert_eq!(
            escape_path(Path::new("/a b/c\\d")).unwrap(),
            "/a\\ b/c\\\\d"
        );
        assert!(escape_path(Path::new("/a#b")).is_err());
        assert!(escape_path(Path::new("/a\nb")).is_err());
    }
}
