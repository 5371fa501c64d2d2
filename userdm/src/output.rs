//! dmsetup's output formats, byte for byte (libdm `dm-tools/dmsetup.c`), as pure functions of
//! the facts the servers report.

use std::fmt::Write;

use userdm_control::proto::{DepReport, DeviceReport, RowReport};
use userdm_table::TargetType;

/// `dmsetup info NAME`: the long format (`_display_info_long`), ending with a blank line.
pub fn info_long(r: &DeviceReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Name:              {}", r.name);
    let _ = writeln!(
        s,
        "State:             {}{}{}",
        if r.suspended { "SUSPENDED" } else { "ACTIVE" },
        if r.read_only { " (READ-ONLY)" } else { "" },
        if r.deferred_remove {
            " (DEFERRED REMOVE)"
        } else {
            ""
        }
    );
    // dmsetup reads the read-ahead from the device node, which a device without a live table
    // cannot open, and then leaves the line out (see the VM oracle's create-notable case).
    if r.live_table {
        let _ = writeln!(s, "Read Ahead:        {}", r.read_ahead);
    }
    let tables = match (r.live_table, r.inactive_table) {
        (false, false) => "None",
        (true, false) => "LIVE",
        (false, true) => "INACTIVE",
        (true, true) => "LIVE & INACTIVE",
    };
    let _ = writeln!(s, "Tables present:    {tables}");
    let _ = writeln!(s, "Open count:        {}", r.open_count);
    let _ = writeln!(s, "Event number:      {}", r.event_nr);
    let _ = writeln!(s, "Major, minor:      {}, {}", r.major, r.minor);
    let _ = writeln!(s, "Number of targets: {}", r.target_count);
    if let Some(uuid) = r.uuid.as_deref().filter(|u| !u.is_empty()) {
        let _ = writeln!(s, "UUID: {uuid}");
    }
    s.push('\n');
    s
}

/// The `attr` field of `info -c`: `[L-][I-][s-][rw]` (`_dm_info_status_disp`).
pub fn attr(r: &DeviceReport) -> String {
    let mut a = String::with_capacity(4);
    a.push(if r.live_table { 'L' } else { '-' });
    a.push(if r.inactive_table { 'I' } else { '-' });
    a.push(if r.suspended { 's' } else { '-' });
    a.push(if r.read_only { 'r' } else { 'w' });
    a
}

/// One field of dmsetup's `info -c` report: its `-o` name, heading, default width and whether
/// it aligns right (numbers) or left (strings).
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// The name `-o` takes.
    pub id: &'static str,
    heading: &'static str,
    width: usize,
    right: bool,
    value: fn(&DeviceReport) -> String,
}

/// The fields userdm reports, with dmsetup's headings and widths (`_report_fields`).
pub const FIELDS: &[Field] = &[
    Field {
        id: "name",
        heading: "Name",
        width: 16,
        right: false,
        value: |r| r.name.clone(),
    },
    Field {
        id: "major",
        heading: "Maj",
        width: 3,
        right: true,
        value: |r| r.major.to_string(),
    },
    Field {
        id: "minor",
        heading: "Min",
        width: 3,
        right: true,
        value: |r| r.minor.to_string(),
    },
    Field {
        id: "attr",
        heading: "Stat",
        width: 4,
        right: false,
        value: attr,
    },
    Field {
        id: "open",
        heading: "Open",
        width: 4,
        right: true,
        value: |r| r.open_count.to_string(),
    },
    Field {
        id: "segments",
        heading: "Targ",
        width: 4,
        right: true,
        value: |r| r.target_count.to_string(),
    },
    Field {
        id: "events",
        heading: "Event",
        width: 6,
        right: true,
        value: |r| r.event_nr.to_string(),
    },
    Field {
        id: "uuid",
        heading: "UUID",
        width: 32,
        right: false,
        value: |r| r.uuid.clone().unwrap_or_default(),
    },
    Field {
        id: "read_ahead",
        heading: "RAhead",
        width: 6,
        right: true,
        value: |r| r.read_ahead.to_string(),
    },
    Field {
        id: "tables_loaded",
        heading: "Tables",
        width: 6,
        right: false,
        value: tables_loaded,
    },
    Field {
        id: "suspended",
        heading: "Suspended",
        width: 9,
        right: false,
        value: |r| if r.suspended { "Suspended" } else { "Active" }.to_string(),
    },
    Field {
        id: "readonly",
        heading: "Read-only",
        width: 9,
        right: false,
        value: |r| {
            if r.read_only {
                "Read-only"
            } else {
                "Writeable"
            }
            .to_string()
        },
    },
    Field {
        id: "devno",
        heading: "DevNo",
        width: 5,
        right: false,
        value: |r| format!("{}:{}", r.major, r.minor),
    },
];

/// dmsetup's default `info -c` fields.
pub const DEFAULT_FIELDS: &str = "name,major,minor,attr,open,segments,events,uuid";

fn tables_loaded(r: &DeviceReport) -> String {
    match (r.live_table, r.inactive_table) {
        (true, true) => "Both",
        (true, false) => "Live",
        (false, true) => "Inactive",
        (false, false) => "None",
    }
    .to_string()
}

/// Resolves `-o`: a comma-separated list of field names; a leading `+` appends to the
/// defaults. `Err` names the unknown field.
pub fn fields(spec: Option<&str>) -> Result<Vec<Field>, String> {
    let spec = match spec {
        None => DEFAULT_FIELDS.to_string(),
        Some(s) => match s.strip_prefix('+') {
            Some(more) => format!("{DEFAULT_FIELDS},{more}"),
            None => s.to_string(),
        },
    };
    spec.split(',')
        .filter(|f| !f.is_empty())
        .map(|id| {
            FIELDS.iter().copied().find(|f| f.id == id).ok_or_else(|| {
                let known: Vec<&str> = FIELDS.iter().map(|f| f.id).collect();
                format!("unrecognised field: {id} (fields: {})", known.join(","))
            })
        })
        .collect()
}

/// Sorts reports for `info -c --sort`: comma-separated fields, each ascending, or descending
/// when prefixed `-`; numbers compare as numbers. `Err` names an unknown field.
pub fn sort_reports(reports: &mut [DeviceReport], spec: &str) -> Result<(), String> {
    let mut keys = Vec::new();
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (descending, id) = match item.strip_prefix('-') {
            Some(id) => (true, id),
            None => (false, item.strip_prefix('+').unwrap_or(item)),
        };
        let field = fields(Some(id))?
            .pop()
            .ok_or_else(|| format!("empty sort field in '{spec}'"))?;
        keys.push((field, descending));
    }
    reports.sort_by(|a, b| {
        for (field, descending) in &keys {
            let (va, vb) = ((field.value)(a), (field.value)(b));
            let order = match (field.right, va.parse::<i64>(), vb.parse::<i64>()) {
                (true, Ok(x), Ok(y)) => x.cmp(&y),
                _ => va.cmp(&vb),
            };
            let order = if *descending { order.reverse() } else { order };
            if order.is_ne() {
                return order;
            }
        }
        std::cmp::Ordering::Equal
    });
    Ok(())
}

/// `dmsetup info -c`: one line per device.
///
/// As libdm's buffered report: aligned (no `--separator`), each column is as wide as the widest
/// of its default width, its heading and its values; strings align left, numbers right,
/// headings left; one space between columns, and the last column is padded too. With a
/// separator, values are joined by it without padding.
pub fn info_report(
    reports: &[DeviceReport],
    fields: &[Field],
    headings: bool,
    separator: Option<&str>,
) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| fields.iter().map(|f| (f.value)(r)).collect())
        .collect();
    let widths: Vec<usize> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|v| v.chars().count())
                .chain([f.width, f.heading.len()])
                .max()
                .unwrap_or(f.width)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut l = cells.join(separator.unwrap_or(" "));
        l.push('\n');
        l
    };
    let mut s = String::new();
    if headings {
        s += &line(
            fields
                .iter()
                .zip(&widths)
                .map(|(f, w)| match separator {
                    Some(_) => f.heading.to_string(),
                    None => format!("{:<w$}", f.heading),
                })
                .collect(),
        );
    }
    for row in rows {
        s += &line(
            row.into_iter()
                .zip(fields.iter().zip(&widths))
                .map(|(v, (f, w))| match separator {
                    Some(_) => v,
                    None if f.right => format!("{v:>w$}"),
                    None => format!("{v:<w$}"),
                })
                .collect(),
        );
    }
    s
}

/// `dmsetup info -c` with the default fields.
#[cfg(test)]
pub fn info_columns(reports: &[DeviceReport], headings: bool) -> String {
    let fields = fields(None).unwrap_or_default();
    info_report(reports, &fields, headings, None)
}

/// `dmsetup ls`: `NAME\t(MAJOR:MINOR)` per device, or `No devices found`.
///
/// With `-o blkdevname` or `-o devname`, `names` turns a device number into the name shown
/// instead, `NAME\t(DEVNAME)`; a number it cannot name is shown as a number.
pub fn ls(reports: &[DeviceReport], names: DevNames<'_>) -> String {
    if reports.is_empty() {
        return "No devices found\n".to_string();
    }
    reports
        .iter()
        .map(|r| match names(r.major, r.minor) {
            Some(dev) => format!("{}\t({dev})\n", r.name),
            None => format!("{}\t({}:{})\n", r.name, r.major, r.minor),
        })
        .collect()
}

/// Names a device number (`-o blkdevname`/`devname`), or `None` to show the number.
pub type DevNames<'a> = &'a dyn Fn(u32, u32) -> Option<String>;

/// Shows device numbers as numbers.
pub fn numbers(_: u32, _: u32) -> Option<String> {
    None
}

/// `dmsetup ls --target T`: `NAME\t(MAJOR, MINOR)` per device with a row of type T
/// (`_display_dev`). Prints nothing when none matches, as dmsetup.
pub fn ls_target(reports: &[(DeviceReport, Vec<RowReport>)], target: &str) -> String {
    reports
        .iter()
        .filter(|(_, rows)| rows.iter().any(|r| r.target_type == target))
        .map(|(r, _)| format!("{}\t({}, {})\n", r.name, r.major, r.minor))
        .collect()
}

/// `dmsetup ls --tree`: each device, then its dependencies as `(MAJOR:MINOR)` leaves.
pub fn ls_tree(devices: &[(DeviceReport, Vec<DepReport>)]) -> String {
    if devices.is_empty() {
        return "No devices found\n".to_string();
    }
    let mut s = String::new();
    for (r, deps) in devices {
        let _ = writeln!(s, "{} ({}:{})", r.name, r.major, r.minor);
        for (i, d) in deps.iter().enumerate() {
            let branch = if i + 1 == deps.len() { " `-" } else { " |-" };
            let _ = writeln!(s, "{branch} ({}:{})", d.major, d.minor);
        }
    }
    s
}

/// `dmsetup table` / `dmsetup status` for one device (`_status`): one line per row, prefixed
/// `NAME: ` when several devices are listed; a device without rows prints one empty line
/// (with the prefix, if any). With a target filter, only matching rows, and nothing for a
/// device without rows.
pub fn rows(name: Option<&str>, rows: &[RowReport], target: Option<&str>) -> String {
    let prefix = name.map(|n| format!("{n}: ")).unwrap_or_default();
    if rows.is_empty() {
        return if target.is_some() {
            String::new()
        } else {
            format!("{prefix}\n")
        };
    }
    rows.iter()
        .filter(|r| target.is_none_or(|t| r.target_type == t))
        .map(|r| format!("{prefix}{}\n", r.line()))
        .collect()
}

/// `dmsetup deps`: `N dependencies\t: (MAJ, MIN) ...`, prefixed `NAME: ` when several devices
/// are listed; with `-o blkdevname`/`devname`, ` (NAME)` for each device `names` can name.
pub fn deps(name: Option<&str>, deps: &[DepReport], names: DevNames<'_>) -> String {
    let mut s = name.map(|n| format!("{n}: ")).unwrap_or_default();
    let _ = write!(s, "{} dependencies\t:", deps.len());
    for d in deps {
        match names(d.major, d.minor) {
            Some(dev) => {
                let _ = write!(s, " ({dev})");
            }
            None => {
                let _ = write!(s, " ({}, {})", d.major, d.minor);
            }
        }
    }
    s.push('\n');
    s
}

/// `dmsetup targets`: `%-16s v%d.%d.%d` per target type.
pub fn targets(types: &[TargetType]) -> String {
    types
        .iter()
        .map(|t| {
            format!(
                "{:<16} v{}.{}.{}\n",
                t.name, t.version[0], t.version[1], t.version[2]
            )
        })
        .collect()
}

/// `dmsetup version`, with userdm's versions in place of libdevmapper's and the kernel's.
pub fn version(library: &str, driver: &str) -> String {
    format!("Library version:   {library}\nDriver version:    {driver}\n")
}

/// `dmsetup message`'s reply: printed with a newline added if missing (`_message`).
pub fn message_reply(reply: &str) -> String {
    if reply.ends_with('\n') {
        reply.to_string()
    } else {
        format!("{reply}\n")
    }
}

#[cfg(test)]
mod tests {
    //! Expected strings are copied from `shared/reference/dmsetup-output-6.12.md`, captured
    //! from dmsetup 1.02.185 on Linux 6.12, with device numbers as captured.

    use super::*;

    fn report(name: &str, minor: u32) -> DeviceReport {
        DeviceReport {
            name: name.into(),
            uuid: None,
            suspended: false,
            read_only: false,
            live_table: true,
            inactive_table: false,
            open_count: 0,
            event_nr: 0,
            target_count: 1,
            deferred_remove: false,
            size_sectors: 8192,
            major: 254,
            minor,
            read_ahead: 256,
            pid: 1,
            owner_uid: None,
            exports: vec![],
            block_device: None,
            geometry: None,
            io: Default::default(),
        }
    }

    fn row(start: u64, length: u64, t: &str, params: &str) -> RowReport {
        RowReport {
            start,
            length,
            target_type: t.into(),
            params: params.into(),
        }
    }

    fn t0_rows() -> Vec<RowReport> {
        vec![
            row(0, 2048, "zero", ""),
            row(2048, 2048, "error", ""),
            row(4096, 8192, "linear", "7:0 0"),
            row(12288, 8192, "striped", "2 128 7:0 16384 7:1 0"),
        ]
    }

    #[test]
    fn info_long_t0() {
        let r = DeviceReport {
            target_count: 4,
            read_ahead: 512,
            ..report("t0", 0)
        };
        assert_eq!(
            info_long(&r),
            "Name:              t0\n\
             State:             ACTIVE\n\
             Read Ahead:        512\n\
             Tables present:    LIVE\n\
             Open count:        0\n\
             Event number:      0\n\
             Major, minor:      254, 0\n\
             Number of targets: 4\n\
             \n"
        );
    }

    #[test]
    fn info_long_states() {
        let suspended = DeviceReport {
            suspended: true,
            ..report("t1", 1)
        };
        assert_eq!(
            info_long(&suspended),
            "Name:              t1\nState:             SUSPENDED\nRead Ahead:        256\n\
             Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n\
             Major, minor:      254, 1\nNumber of targets: 1\n\n"
        );
        let both = DeviceReport {
            inactive_table: true,
            ..report("t2", 2)
        };
        assert_eq!(
            info_long(&both),
            "Name:              t2\nState:             ACTIVE\nRead Ahead:        256\n\
             Tables present:    LIVE & INACTIVE\nOpen count:        0\nEvent number:      0\n\
             Major, minor:      254, 2\nNumber of targets: 1\n\n"
        );
        let none = DeviceReport {
            live_table: false,
            target_count: 0,
            ..report("t3", 3)
        };
        assert_eq!(
            info_long(&none),
            "Name:              t3\nState:             ACTIVE\nTables present:    None\n\
             Open count:        0\nEvent number:      0\nMajor, minor:      254, 3\n\
             Number of targets: 0\n\n",
            "no live table: no node to read the read-ahead from, so no line (dmsetup, 6.12)"
        );
        let odd = DeviceReport {
            read_only: true,
            deferred_remove: true,
            live_table: false,
            inactive_table: true,
            uuid: Some("USERDM-x".into()),
            ..report("t4", 4)
        };
        let text = info_long(&odd);
        assert!(text.contains("\nState:             ACTIVE (READ-ONLY) (DEFERRED REMOVE)\n"));
        assert!(text.contains("\nTables present:    INACTIVE\n"));
        assert!(text.ends_with("Number of targets: 1\nUUID: USERDM-x\n\n"));
        let empty_uuid = DeviceReport {
            uuid: Some(String::new()),
            ..report("t5", 5)
        };
        assert!(!info_long(&empty_uuid).contains("UUID"));
    }

    #[test]
    fn info_columns_as_captured() {
        let t0 = DeviceReport {
            target_count: 4,
            ..report("t0", 0)
        };
        let t3 = DeviceReport {
            live_table: false,
            target_count: 0,
            ..report("t3", 3)
        };
        let all = [t0, report("t1", 1), report("t2", 2), t3];
        let expected = "\
Name             Maj Min Stat Open Targ Event  UUID                            \n\
t0               254   0 L--w    0    4      0                                 \n\
t1               254   1 L--w    0    1      0                                 \n\
t2               254   2 L--w    0    1      0                                 \n\
t3               254   3 ---w    0    0      0                                 \n";
        assert_eq!(info_columns(&all, true), expected);
        let body: String = expected.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert_eq!(info_columns(&all, false), body);
    }

    #[test]
    fn info_columns_grow_with_values() {
        let r = DeviceReport {
            name: "a-name-longer-than-16".into(),
            uuid: Some("U".repeat(40)),
            suspended: true,
            inactive_table: true,
            read_only: true,
            major: 0,
            minor: 1234,
            ..report("", 0)
        };
        let text = info_columns(&[r], true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "Name                  Maj Min  Stat Open Targ Event  UUID{}",
                " ".repeat(36)
            )
        );
        assert_eq!(
            lines[1],
            format!(
                "a-name-longer-than-16   0 1234 LIsr    0    1      0 {}",
                "U".repeat(40)
            )
        );
    }

    #[test]
    fn info_report_fields_and_separator() {
        let r = DeviceReport {
            suspended: true,
            inactive_table: true,
            ..report("t1", 1)
        };
        let f = fields(Some(
            "name,open,tables_loaded,suspended,readonly,devno,read_ahead",
        ))
        .unwrap();
        assert_eq!(
            info_report(std::slice::from_ref(&r), &f, true, None),
            "Name             Open Tables Suspended Read-only DevNo RAhead\n\
             t1                  0 Both   Suspended Writeable 254:1    256\n"
        );
        assert_eq!(
            info_report(
                std::slice::from_ref(&r),
                &fields(Some("name,attr")).unwrap(),
                true,
                Some(":")
            ),
            "Name:Stat\nt1:LIsw\n"
        );
        assert_eq!(
            info_report(&[r], &fields(Some("open")).unwrap(), false, None),
            "   0\n"
        );
        let plus = fields(Some("+devno")).unwrap();
        assert_eq!(plus.len(), 9);
        assert_eq!(plus[8].id, "devno");
        let mut rs = vec![report("b", 2), report("a", 10), report("c", 1)];
        sort_reports(&mut rs, "minor").unwrap();
        assert_eq!(
            rs.iter().map(|r| r.minor).collect::<Vec<_>>(),
            vec![1, 2, 10]
        );
        sort_reports(&mut rs, "-name").unwrap();
        assert_eq!(
            rs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            vec!["c", "b", "a"]
        );
        assert!(sort_reports(&mut rs, "nope").is_err());
        let e = fields(Some("name,bogus")).unwrap_err();
        assert!(
            e.starts_with("unrecognised field: bogus (fields: name,major,"),
            "{e}"
        );
    }

    #[test]
    fn ls_as_captured() {
        let all = [
            report("t0", 0),
            report("t1", 1),
            report("t2", 2),
            report("t3", 3),
        ];
        assert_eq!(
            ls(&all, &numbers),
            "t0\t(254:0)\nt1\t(254:1)\nt2\t(254:2)\nt3\t(254:3)\n"
        );
        assert_eq!(ls(&[], &numbers), "No devices found\n");
        let with_rows = vec![
            (report("t0", 0), t0_rows()),
            (report("t1", 1), vec![row(0, 8192, "delay", "7:0 0 50")]),
        ];
        assert_eq!(ls_target(&with_rows, "striped"), "t0\t(254, 0)\n");
        assert_eq!(ls_target(&with_rows, "nosuch"), "");
    }

    #[test]
    fn ls_tree_as_captured() {
        let dep = |major, minor| DepReport {
            major,
            minor,
            path: String::new(),
        };
        let devices = vec![
            (report("t0", 0), vec![dep(7, 1), dep(7, 0)]),
            (report("t1", 1), vec![dep(7, 0)]),
            (report("t2", 2), vec![dep(7, 1)]),
            (report("t3", 3), vec![]),
        ];
        assert_eq!(
            ls_tree(&devices),
            "t0 (254:0)\n |- (7:1)\n `- (7:0)\nt1 (254:1)\n `- (7:0)\nt2 (254:2)\n `- (7:1)\n\
             t3 (254:3)\n"
        );
    }

    #[test]
    fn table_and_status_as_captured() {
        let mut all = String::new();
        all += &rows(Some("t0"), &t0_rows(), None);
        all += &rows(Some("t1"), &[row(0, 8192, "delay", "7:0 0 50")], None);
        all += &rows(
            Some("t2"),
            &[row(
                0,
                8192,
                "flakey",
                "7:1 0 5 5 2 error_reads error_writes",
            )],
            None,
        );
        all += &rows(Some("t3"), &[], None);
        assert_eq!(
            all,
            "t0: 0 2048 zero \nt0: 2048 2048 error \nt0: 4096 8192 linear 7:0 0\n\
             t0: 12288 8192 striped 2 128 7:0 16384 7:1 0\nt1: 0 8192 delay 7:0 0 50\n\
             t2: 0 8192 flakey 7:1 0 5 5 2 error_reads error_writes\nt3: \n"
        );
        let status = [
            row(0, 2048, "zero", ""),
            row(2048, 2048, "error", ""),
            row(4096, 8192, "linear", ""),
            row(12288, 8192, "striped", "2 7:0 7:1 1 AA"),
        ];
        assert_eq!(
            rows(Some("t0"), &status, None),
            "t0: 0 2048 zero \nt0: 2048 2048 error \nt0: 4096 8192 linear \n\
             t0: 12288 8192 striped 2 7:0 7:1 1 AA\n"
        );
        // `table --inactive t2`: one device, no prefix.
        assert_eq!(
            rows(None, &[row(0, 8192, "zero", "")], None),
            "0 8192 zero \n"
        );
        assert_eq!(rows(None, &[], None), "\n");
        assert_eq!(
            rows(Some("t0"), &t0_rows(), Some("linear")),
            "t0: 4096 8192 linear 7:0 0\n"
        );
        assert_eq!(rows(Some("t3"), &[], Some("linear")), "");
    }

    #[test]
    fn deps_as_captured() {
        let d = |major, minor| DepReport {
            major,
            minor,
            path: String::new(),
        };
        assert_eq!(
            deps(None, &[d(7, 1), d(7, 0)], &numbers),
            "2 dependencies\t: (7, 1) (7, 0)\n"
        );
        assert_eq!(deps(Some("t3"), &[], &numbers), "t3: 0 dependencies\t:\n");
        let loops = |major, minor| (major == 7).then(|| format!("loop{minor}"));
        assert_eq!(
            deps(None, &[d(7, 1), d(0, 0)], &loops),
            "2 dependencies\t: (loop1) (0, 0)\n"
        );
        assert_eq!(
            ls(&[report("t0", 0)], &|_, _| Some("dm-0".into())),
            "t0\t(dm-0)\n"
        );
    }

    #[test]
    fn targets_as_captured() {
        let types = [
            TargetType {
                name: "crypt",
                version: [1, 28, 0],
            },
            TargetType {
                name: "snapshot-merge",
                version: [1, 5, 0],
            },
            TargetType {
                name: "zero",
                version: [1, 2, 0],
            },
        ];
        assert_eq!(
            targets(&types),
            "crypt            v1.28.0\nsnapshot-merge   v1.5.0\nzero             v1.2.0\n"
        );
    }

    #[test]
    fn version_and_message() {
        assert_eq!(
            version("1.02.185 (2022-05-18)", "4.48.0"),
            "Library version:   1.02.185 (2022-05-18)\nDriver version:    4.48.0\n"
        );
        assert_eq!(
            message_reply("3 badblock(s) found"),
            "3 badblock(s) found\n"
        );
        assert_eq!(message_reply("x\n"), "x\n");
    }
}
