//! Construction errors with their messages, and `dmsetup table` / `status` output, per target.

mod common;

use common::{disk, table, table_error};
use userdm_table::{Dep, Table, Target};
use userdm_targets::{AnyTarget, TargetContext, UserTargetContext};

fn ctx() -> TargetContext {
    TargetContext::new()
}

/// Asserts each table fails with exactly the message given (`%P` in tables and messages stands for
/// the path of a 64 KiB backing file).
fn assert_errors(cases: &[(&str, &str)]) {
    let d = disk(64 * 1024, 0);
    for (text, want) in cases {
        let text = text.replace("%P", &d.path);
        let want = want.replace("%P", &d.path);
        assert_eq!(table_error(&ctx(), &text), want, "table {text:?}");
    }
}

const MISSING: &str = "cannot open '/nonexistent/disk': No such file or directory (os error 2)";

#[test]
fn linear_errors() {
    assert_errors(&[
        (
            "0 8 linear",
            "line 1: linear: Invalid argument count: expected 2 (<dev_path> <offset>), got 0",
        ),
        (
            "0 8 linear %P 0 1",
            "line 1: linear: Invalid argument count: expected 2 (<dev_path> <offset>), got 3",
        ),
        (
            "0 8 linear %P x",
            "line 1: linear: Invalid device sector 'x'",
        ),
        (
            "0 8 linear %P -1",
            "line 1: linear: Invalid device sector '-1'",
        ),
        (
            "0 8 linear /nonexistent/disk 0",
            &format!("line 1: linear: Device lookup failed: {MISSING}"),
        ),
        (
            "0 129 linear %P 0",
            "line 1: linear: '%P' too small for target: start=0, len=129, dev_size=128 (sectors): \
             needs 66048 bytes, has 65536 bytes",
        ),
        (
            "0 8 zero\n8 8 linear %P 121",
            "line 2: linear: '%P' too small for target: start=121, len=8, dev_size=128 (sectors): \
             needs 66048 bytes, has 65536 bytes",
        ),
    ]);
}

#[test]
fn striped_errors() {
    assert_errors(&[
        (
            "0 16 striped 2",
            "line 1: striped: Not enough arguments: expected <#stripes> <chunk_sectors> \
             (<dev> <offset>)...",
        ),
        (
            "0 16 striped 0 8 %P 0",
            "line 1: striped: Invalid stripe count '0'",
        ),
        (
            "0 16 striped x 8 %P 0",
            "line 1: striped: Invalid stripe count 'x'",
        ),
        (
            "0 16 striped 2 0 %P 0 %P 8",
            "line 1: striped: Invalid chunk_size '0'",
        ),
        (
            "0 15 striped 2 8 %P 0 %P 64",
            "line 1: striped: Target length not divisible by number of stripes: 15 sectors, \
             2 stripes",
        ),
        (
            "0 16 striped 2 16 %P 0 %P 64",
            "line 1: striped: Target length not divisible by chunk size: 8 sectors per stripe, \
             chunk 16 sectors",
        ),
        (
            "0 16 striped 2 8 %P 0",
            "line 1: striped: Not enough destinations specified: 2 stripes need 6 arguments, \
             got 4",
        ),
        (
            "0 16 striped 2 8 %P 0 %P 64 %P",
            "line 1: striped: Not enough destinations specified: 2 stripes need 6 arguments, \
             got 7",
        ),
        (
            "0 16 striped 2 8 %P 0 %P x",
            "line 1: striped: Couldn't parse stripe destination '%P x': invalid offset",
        ),
        (
            "0 16 striped 2 8 %P 0 /nonexistent/disk 0",
            &format!(
                "line 1: striped: Couldn't parse stripe destination '/nonexistent/disk 0': \
                 {MISSING}"
            ),
        ),
        (
            "0 16 striped 2 8 %P 0 %P 121",
            "line 1: striped: '%P' too small for target: start=121, len=8, dev_size=128 \
             (sectors): needs 66048 bytes, has 65536 bytes",
        ),
    ]);
}

#[test]
fn zero_and_error_errors() {
    assert_errors(&[
        ("0 8 zero x", "line 1: zero: No arguments required, got 1"),
        ("0 8 error %P x", "line 1: error: Invalid device sector 'x'"),
        (
            "0 8 error /nonexistent/disk 0",
            &format!("line 1: error: Device lookup failed: {MISSING}"),
        ),
        ("0 8 nosuch 1 2", "line 1: nosuch: unknown target type"),
    ]);
    // Any other number of params is ignored, as by the kernel.
    let t = table(&ctx(), "0 8 error a\n8 8 error a b c");
    assert_eq!(t.table_lines(), vec!["0 8 error ", "8 8 error "]);
    assert!(t.deps().is_empty());
}

#[test]
fn delay_errors() {
    let usage = "(<dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]])";
    assert_errors(&[
        (
            "0 8 delay %P 0",
            &format!("line 1: delay: Requires exactly 3, 6 or 9 arguments {usage}, got 2"),
        ),
        (
            "0 8 delay %P 0 1 %P 0",
            &format!("line 1: delay: Requires exactly 3, 6 or 9 arguments {usage}, got 5"),
        ),
        (
            "0 8 delay %P x 5",
            "line 1: delay: Invalid device sector 'x'",
        ),
        ("0 8 delay %P 0 -1", "line 1: delay: Invalid delay '-1'"),
        (
            "0 8 delay %P 0 1 %P 0 4294967296",
            "line 1: delay: Invalid delay '4294967296'",
        ),
        (
            "0 8 delay %P 0 1 /nonexistent/disk 0 1",
            &format!("line 1: delay: Device lookup failed: {MISSING}"),
        ),
        (
            "0 8 delay %P 0 1 %P 0 1 %P 121 1",
            "line 1: delay: '%P' too small for target: start=121, len=8, dev_size=128 (sectors): \
             needs 66048 bytes, has 65536 bytes",
        ),
    ]);
}

#[test]
fn flakey_errors() {
    let f = |rest: &str| format!("0 8 flakey %P 0 {rest}");
    let e = |msg: &str| format!("line 1: flakey: {msg}");
    let cases: Vec<(String, String)> =
        vec![
        (
            "0 8 flakey %P 0 1".into(),
            e("Invalid argument count: expected at least 4 (<dev_path> <offset> <up interval> \
               <down interval> [<#features> ...]), got 3"),
        ),
        ("0 8 flakey %P x 1 1".into(), e("Invalid device sector 'x'")),
        (f("x 1"), e("Invalid up interval 'x'")),
        (f("1 -1"), e("Invalid down interval '-1'")),
        (f("0 0"), e("Total (up + down) interval is zero")),
        (f("4294967295 1"), e("Interval overflow")),
        (f("1 1 12 a b c d e f g h i j k l"), e("Invalid number of feature args")),
        (f("1 1 2 drop_writes"), e("Invalid number of feature args")),
        (f("1 1 x"), e("Invalid number of feature args")),
        (f("1 1 1 bogus"), e("Unrecognised flakey feature requested: 'bogus'")),
        (f("1 1 2 drop_writes DROP_WRITES"), e("Feature drop_writes duplicated")),
        (f("1 1 2 error_reads error_reads"), e("Feature error_reads duplicated")),
        (f("1 1 2 error_writes error_writes"), e("Feature error_writes duplicated")),
        (
            f("1 1 2 error_writes drop_writes"),
            e("Feature drop_writes conflicts with feature error_writes"),
        ),
        (
            f("1 1 2 drop_writes error_writes"),
            e("Feature error_writes conflicts with feature drop_writes"),
        ),
        (
            f("1 1 4 corrupt_bio_byte 1 r 1"),
            e("Feature corrupt_bio_byte requires 4 parameters"),
        ),
        (f("1 1 5 corrupt_bio_byte 0 r 1 0"), e("Invalid corrupt bio byte")),
        (
            f("1 1 5 corrupt_bio_byte 1 x 1 0"),
            e("Invalid corrupt bio direction (r or w)"),
        ),
        (
            f("1 1 5 corrupt_bio_byte 1 r 256 0"),
            e("Invalid corrupt value to write into bio byte (0-255)"),
        ),
        (f("1 1 5 corrupt_bio_byte 1 r 1 x"), e("Invalid corrupt bio flags mask")),
        (
            f("1 1 10 corrupt_bio_byte 1 r 1 0 corrupt_bio_byte 1 r 1 0"),
            e("Feature corrupt_bio_byte duplicated"),
        ),
        (
            f("1 1 1 random_read_corrupt"),
            e("Feature random_read_corrupt requires a parameter"),
        ),
        (
            f("1 1 2 random_write_corrupt 1000000001"),
            e("Invalid random corrupt argument"),
        ),
        (
            f("1 1 4 random_write_corrupt 1 random_write_corrupt 2"),
            e("Feature random_write_corrupt duplicated"),
        ),
        (
            f("1 1 6 drop_writes corrupt_bio_byte 1 w 0 0"),
            e("drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with \
               the WRITE flag set"),
        ),
        (
            f("1 1 3 error_writes random_write_corrupt 5"),
            e("error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with \
               the WRITE flag set"),
        ),
        (
            f("1 1 6 error_reads corrupt_bio_byte 1 r 0 0"),
            e("error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with \
               the READ flag set"),
        ),
        (
            "0 8 flakey /nonexistent/disk 0 1 1".into(),
            e(&format!("Device lookup failed: {MISSING}")),
        ),
        (
            "0 8 flakey %P 121 1 1".into(),
            e("'%P' too small for target: start=121, len=8, dev_size=128 (sectors): needs 66048 \
               bytes, has 65536 bytes"),
        ),
    ];
    let cases: Vec<(&str, &str)> = cases
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_errors(&cases);
}

#[test]
fn dust_errors() {
    assert_errors(&[
        (
            "0 8 dust %P 0",
            "line 1: dust: Invalid argument count: expected 3 (<dev_path> <offset> <blksz>), \
             got 2",
        ),
        (
            "0 8 dust %P 0 x",
            "line 1: dust: Invalid block size parameter 'x'",
        ),
        (
            "0 8 dust %P 0 0",
            "line 1: dust: Invalid block size parameter '0'",
        ),
        (
            "0 8 dust %P 0 256",
            "line 1: dust: Block size must be at least 512",
        ),
        (
            "0 8 dust %P 0 1536",
            "line 1: dust: Block size must be a power of 2",
        ),
        (
            "0 8 dust %P 0 8192",
            "line 1: dust: Block size is too large: 16 sectors, the row has 8, the largest is \
             2097152",
        ),
        (
            "0 8 dust %P x 512",
            "line 1: dust: Invalid device offset sector 'x'",
        ),
        (
            "0 8 dust /nonexistent/disk 0 512",
            &format!("line 1: dust: Device lookup failed: {MISSING}"),
        ),
        (
            "0 8 dust %P 121 512",
            "line 1: dust: '%P' too small for target: start=121, len=8, dev_size=128 (sectors): \
             needs 66048 bytes, has 65536 bytes",
        ),
    ]);
}

#[test]
fn memory_errors() {
    assert_errors(&[
        (
            "0 8 memory 1",
            "line 1: memory: Invalid number of optional args",
        ),
        (
            "0 8 memory x",
            "line 1: memory: Invalid number of optional args",
        ),
        (
            "0 8 memory 2 bogus 1",
            "line 1: memory: Unrecognised memory option 'bogus'",
        ),
        (
            "0 8 memory 1 chunk_bytes",
            "line 1: memory: Option chunk_bytes requires a parameter",
        ),
        (
            "0 8 memory 2 chunk_bytes x",
            "line 1: memory: Invalid chunk_bytes 'x'",
        ),
        (
            "0 8 memory 2 chunk_bytes 1000",
            "line 1: memory: Invalid chunk_bytes 1000: must be a power of 2 from 4096 to 1048576",
        ),
        (
            "0 8 memory 2 chunk_bytes 2097152",
            "line 1: memory: Invalid chunk_bytes 2097152: must be a power of 2 from 4096 to \
             1048576",
        ),
        (
            "0 8 memory 4 max_allocated_bytes 1 max_allocated_bytes 2",
            "line 1: memory: Option max_allocated_bytes duplicated",
        ),
        (
            "0 8 memory 0 extra",
            "line 1: memory: Too many arguments: unexpected 'extra'",
        ),
        (
            "0 1099511627776 memory",
            "line 1: memory: Target too large: 562949953421312 bytes; with chunk_bytes 65536 a \
             memory row holds at most 281474976710656 bytes",
        ),
    ]);
}

#[test]
fn types_carry_the_kernel_versions() {
    let types: Vec<String> = AnyTarget::types()
        .iter()
        .map(|t| {
            format!(
                "{} v{}.{}.{}",
                t.name, t.version[0], t.version[1], t.version[2]
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![
            "linear v1.4.0",
            "striped v1.6.0",
            "zero v1.2.0",
            "error v1.7.0",
            "delay v1.4.0",
            "flakey v1.5.0",
            "dust v1.0.0",
            "memory v1.0.0",
            "user v1.0.0",
        ]
    );
}

/// Table and status lines, as `dmsetup table` and `dmsetup status` print them on 6.12 (see
/// dmsetup-output-6.12.md), with `%A` and `%B` standing for backing file paths (the kernel would
/// show `7:0` and `7:1` for loop devices).
#[test]
fn table_and_status_lines_match_the_kernel() {
    let a = disk(1 << 20, 0);
    let b = disk(1 << 20, 0);
    let cases: &[(&str, &str, &str)] = &[
        ("0 2048 zero", "0 2048 zero ", "0 2048 zero "),
        ("0 2048 error", "0 2048 error ", "0 2048 error "),
        ("0 1024 linear %A 0", "0 1024 linear %A 0", "0 1024 linear "),
        (
            "0 512 striped 2 128 %A 16 %B 0",
            "0 512 striped 2 128 %A 16 %B 0",
            "0 512 striped 2 %A %B 1 AA",
        ),
        (
            "0 1024 delay %A 0 50",
            "0 1024 delay %A 0 50",
            "0 1024 delay 0 0 0",
        ),
        (
            "0 1024 delay %A 0 50 %B 8 100",
            "0 1024 delay %A 0 50 %B 8 100",
            "0 1024 delay 0 0 0",
        ),
        (
            "0 1024 delay %A 0 50 %B 8 100 %A 16 0",
            "0 1024 delay %A 0 50 %B 8 100 %A 16 0",
            "0 1024 delay 0 0 0",
        ),
        (
            "0 1024 flakey %B 0 5 5",
            "0 1024 flakey %B 0 5 5 2 error_reads error_writes",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 0 5 5 0",
            "0 1024 flakey %B 0 5 5 2 error_reads error_writes",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 0 5 5 1 DROP_WRITES",
            "0 1024 flakey %B 0 5 5 1 drop_writes",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 0 5 5 2 error_writes error_reads",
            "0 1024 flakey %B 0 5 5 2 error_reads error_writes",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 0 1 2 5 corrupt_bio_byte 32 R 1 0",
            "0 1024 flakey %B 0 1 2 5 corrupt_bio_byte 32 r 1 0",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 8 1 2 7 random_write_corrupt 20 corrupt_bio_byte 224 w 0 32",
            "0 1024 flakey %B 8 1 2 7 corrupt_bio_byte 224 w 0 32 random_write_corrupt 20",
            "0 1024 flakey ",
        ),
        (
            "0 1024 flakey %B 0 1 1 5 random_read_corrupt 10 drop_writes random_write_corrupt 0",
            "0 1024 flakey %B 0 1 1 3 drop_writes random_read_corrupt 10",
            "0 1024 flakey ",
        ),
        (
            "0 1024 dust %A 8 4096",
            "0 1024 dust %A 8 4096",
            "0 1024 dust %A bypass verbose",
        ),
        ("0 8 memory", "0 8 memory ", "0 8 memory 0 4096"),
        ("0 8 memory 0", "0 8 memory ", "0 8 memory 0 4096"),
        (
            "0 8 memory 4 max_allocated_bytes 65536 CHUNK_BYTES 4096",
            "0 8 memory 4 chunk_bytes 4096 max_allocated_bytes 65536",
            "0 8 memory 0 4096",
        ),
        (
            "0 8 memory 2 chunk_bytes 65536",
            "0 8 memory ",
            "0 8 memory 0 4096",
        ),
    ];
    for (text, want_table, want_status) in cases {
        let sub = |s: &str| s.replace("%A", &a.path).replace("%B", &b.path);
        let t = table(&ctx(), &sub(text));
        assert_eq!(t.table_lines(), vec![sub(want_table)], "table of {text}");
        assert_eq!(t.status_lines(), vec![sub(want_status)], "status of {text}");
    }
}

#[test]
fn a_huge_memory_row_costs_nothing_until_written() {
    // 1 TiB: a top table of 4096 leaf slots, no leaves, no chunks.
    let t = table(&ctx(), "0 2147483648 memory");
    assert_eq!(
        t.status_lines(),
        vec!["0 2147483648 memory 0 1099511627776"]
    );
}

#[test]
fn deps_name_files_and_their_paths() {
    let a = disk(1 << 20, 0);
    let b = disk(1 << 20, 0);
    let text = format!(
        "0 256 linear {a} 0\n256 256 striped 2 8 {a} 1024 {b} 0\n512 8 delay {b} 0 1 {a} 0 1\n\
         520 8 zero\n528 8 error {b} 0\n536 8 memory",
        a = a.path,
        b = b.path
    );
    let t = table(&ctx(), &text);
    let mut want = vec![
        Dep {
            major: 0,
            minor: 0,
            path: a.path.clone(),
        },
        Dep {
            major: 0,
            minor: 0,
            path: b.path.clone(),
        },
    ];
    want.sort();
    assert_eq!(t.deps(), want);
}

#[test]
fn read_only_tables_open_files_read_only() {
    let a = disk(1 << 20, 0);
    let ro = TargetContext::new().with_read_only(true);
    let t = table(&ro, &format!("0 8 linear {} 0", a.path));
    let rt = userdm_uring::Reactor::new(8).unwrap();
    let client = common::Client { rt: &rt, table: &t };
    assert!(client.read(0, 8).is_ok());
    // The engine refuses writes to a read-only device before they reach a target; if one got
    // through, the O_RDONLY file would refuse it.
    assert_eq!(
        client.write(0, &[1u8; 512]),
        Err(userdm_io::Errno::new(9).into()),
        "EBADF"
    );
}

#[test]
fn user_rows_are_targets_too() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = TargetContext::new().with_user(UserTargetContext::default().with_dir(dir.path()));
    let table = Table::<AnyTarget>::parse(&ctx, "0 8 zero\n8 1024 user 0 1024 ctl0\n").unwrap();
    assert_eq!(table.rows()[1].target.type_name(), "user");
    assert!(
        dir.path().join("ctl0").exists(),
        "the endpoint exists once the table is built"
    );
    let e = Table::<AnyTarget>::parse(&ctx, "0 8 user 0 8\n").unwrap_err();
    assert!(e.to_string().starts_with("line 1: user: "), "{e}");
}

#[test]
fn memory_rows_keep_their_contents_across_a_reload() {
    use std::sync::Arc;
    use userdm_io::{IoFlags, IoHeader, IoOp};
    use userdm_targets::MemoryStores;
    use userdm_uring::Reactor;
    let ctx = TargetContext::new().with_memory_stores(Arc::new(MemoryStores::default()));
    let rt = Reactor::new(8).unwrap();
    let old = Table::<AnyTarget>::parse(&ctx, "0 8 zero\n8 64 memory\n").unwrap();
    let mut data = vec![0x5au8; 4096];
    let write = IoHeader {
        op: IoOp::Write,
        flags: IoFlags::empty(),
        sector: 8,
        len_bytes: 4096,
    };
    rt.block_on(old.io(&rt, write, &mut data)).unwrap();
    // The reload is built while the old table is still live, as `load` does.
    let new = Table::<AnyTarget>::parse(&ctx, "0 8 error\n8 64 memory\n").unwrap();
    drop(old);
    let mut back = vec![0u8; 4096];
    let read = IoHeader {
        op: IoOp::Read,
        ..write
    };
    rt.block_on(new.io(&rt, read, &mut back)).unwrap();
    assert!(
        back == data,
        "the memory row lost its contents across the reload"
    );
    // A row at another place, or of another size, is a new disk.
    let moved = Table::<AnyTarget>::parse(&ctx, "0 16 memory\n16 56 zero\n").unwrap();
    let mut other = vec![1u8; 4096];
    let read0 = IoHeader { sector: 0, ..read };
    rt.block_on(moved.io(&rt, read0, &mut other)).unwrap();
    assert!(other.iter().all(|&b| b == 0));
    // Without a registry, every memory row is fresh.
    let plain = TargetContext::new();
    let a = Table::<AnyTarget>::parse(&plain, "0 64 memory\n").unwrap();
    rt.block_on(a.io(&rt, IoHeader { sector: 0, ..write }, &mut data))
        .unwrap();
    let b = Table::<AnyTarget>::parse(&plain, "0 64 memory\n").unwrap();
    rt.block_on(b.io(&rt, read0, &mut other)).unwrap();
    assert!(other.iter().all(|&b| b == 0));
}
