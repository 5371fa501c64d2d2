//! Every data-storing target, driven through `Table<AnyTarget>` with random sequences of reads,
//! writes, flushes, discards and zeroing, against a `Vec<u8>` model of the disk.
//!
//! The rule for discards differs by target:
//! - memory frees or zeroes the range, so a discarded range reads as zeros, exactly;
//! - file-backed targets punch a hole, which reads as zeros, but a filesystem that cannot punch
//!   holes keeps the old data (a discard allows either), so each discarded sector may read as
//!   zeros or as before, and is pinned to what it read.
//!
//! Write-zeroes always reads back as zeros.

mod common;

use std::sync::Arc;

use common::{disk, pattern, table, Client, Disk};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use userdm_io::{IoFlags, IoOp};
use userdm_targets::{ManualClock, TargetContext};
use userdm_uring::Reactor;

const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    Read {
        sector: u64,
        sectors: u64,
    },
    Write {
        sector: u64,
        sectors: u64,
        seed: u64,
        fua: bool,
    },
    Flush,
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
        nounmap: bool,
    },
}

fn ops(size_sectors: u64) -> impl Strategy<Value = Vec<Op>> {
    let range = (0..size_sectors).prop_flat_map(move |sector| {
        let max = (size_sectors - sector).min(40);
        (Just(sector), 1..=max)
    });
    let op = prop_oneof![
        4 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        4 => (range.clone(), any::<u64>(), any::<bool>()).prop_map(|((sector, sectors), seed, fua)| {
            Op::Write { sector, sectors, seed, fua }
        }),
        1 => Just(Op::Flush),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), nounmap)| {
            Op::WriteZeroes { sector, sectors, nounmap }
        }),
    ];
    proptest::collection::vec(op, 1..40)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiscardRule {
    Zeros,
    ZerosOrOld,
}

struct Model {
    data: Vec<u8>,
    /// Sectors that may read as zeros or as `data`.
    unsure: Vec<bool>,
    rule: DiscardRule,
}

impl Model {
    fn new(size_sectors: u64, rule: DiscardRule) -> Model {
        Model {
            data: vec![0; size_sectors as usize * SECTOR],
            unsure: vec![false; size_sectors as usize],
            rule,
        }
    }

    fn range(sector: u64, sectors: u64) -> std::ops::Range<usize> {
        sector as usize * SECTOR..(sector + sectors) as usize * SECTOR
    }

    fn write(&mut self, sector: u64, data: &[u8]) {
        self.data[Self::range(sector, data.len() as u64 / 512)].copy_from_slice(data);
        for s in sector..sector + data.len() as u64 / 512 {
            self.unsure[s as usize] = false;
        }
    }

    fn zero(&mut self, sector: u64, sectors: u64) {
        self.write(sector, &vec![0; sectors as usize * SECTOR]);
    }

    fn discard(&mut self, sector: u64, sectors: u64) {
        match self.rule {
            DiscardRule::Zeros => self.zero(sector, sectors),
            DiscardRule::ZerosOrOld => {
                for s in sector..sector + sectors {
                    self.unsure[s as usize] = true;
                }
            }
        }
    }

    /// Checks what a read returned, pinning unsure sectors to what they read.
    fn check_read(&mut self, sector: u64, got: &[u8]) -> Result<(), String> {
        for (i, chunk) in got.chunks(SECTOR).enumerate() {
            let s = sector as usize + i;
            let want = &self.data[s * SECTOR..(s + 1) * SECTOR];
            if self.unsure[s] {
                if chunk != want && chunk.iter().any(|&b| b != 0) {
                    return Err(format!("sector {s}: neither zeros nor the old data"));
                }
                self.data[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(chunk);
                self.unsure[s] = false;
            } else if chunk != want {
                let at = chunk
                    .iter()
                    .zip(want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!("sector {s}: differs from the model at byte {at}"));
            }
        }
        Ok(())
    }
}

fn run(client: &Client<'_>, model: &mut Model, ops: &[Op]) -> Result<(), TestCaseError> {
    for op in ops {
        match *op {
            Op::Read { sector, sectors } => {
                let got = client
                    .read(sector, sectors)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                model
                    .check_read(sector, &got)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
            }
            Op::Write {
                sector,
                sectors,
                seed,
                fua,
            } => {
                let data = pattern(seed, sectors as usize * SECTOR);
                let flags = if fua { IoFlags::FUA } else { IoFlags::empty() };
                client
                    .write_flags(sector, &data, flags)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                model.write(sector, &data);
            }
            Op::Flush => client
                .flush()
                .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?,
            Op::Discard { sector, sectors } => {
                client
                    .op(IoOp::Discard, sector, sectors, IoFlags::empty())
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                model.discard(sector, sectors);
            }
            Op::WriteZeroes {
                sector,
                sectors,
                nounmap,
            } => {
                let flags = if nounmap {
                    IoFlags::NOUNMAP
                } else {
                    IoFlags::empty()
                };
                client
                    .op(IoOp::WriteZeroes, sector, sectors, flags)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                model.zero(sector, sectors);
            }
        }
    }
    // Finally the whole device must match.
    let size = model.unsure.len() as u64;
    let got = client
        .read(0, size)
        .map_err(|e| TestCaseError::fail(format!("final read: {e}")))?;
    model
        .check_read(0, &got)
        .map_err(|e| TestCaseError::fail(format!("final read: {e}")))?;
    Ok(())
}

/// Makes the table text and any messages to send, from fresh backing files, for one case.
type Setup = fn(&[Disk]) -> (String, Vec<&'static str>);

/// Runs `cases` random sequences against a table made by `setup` over `files` fresh 1 MiB
/// backing files each time.
fn check(name: &str, size_sectors: u64, files: usize, rule: DiscardRule, setup: Setup) {
    let rt = Reactor::new(64).expect("reactor");
    let clock = Arc::new(ManualClock::new());
    let ctx = TargetContext::new().with_clock(clock);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&ops(size_sectors), |ops| {
        let disks: Vec<Disk> = (0..files).map(|_| disk(1 << 20, 0)).collect();
        let (text, messages) = setup(&disks);
        let t = table(&ctx, &text);
        let client = Client { rt: &rt, table: &t };
        for m in messages {
            client
                .message(m)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        // The device starts full of data, so that a discard or a misdirected read that
        // wrongly returned zeros would be caught.
        let mut model = Model::new(size_sectors, rule);
        let initial = pattern(size_sectors, size_sectors as usize * SECTOR);
        client
            .write(0, &initial)
            .map_err(|e| TestCaseError::fail(format!("initial write: {e}")))?;
        model.write(0, &initial);
        run(&client, &mut model, &ops)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn linear_over_a_file() {
    check("linear", 192, 1, DiscardRule::ZerosOrOld, |d| {
        (format!("0 192 linear {} 24", d[0].path), vec![])
    });
}

#[test]
fn striped_over_three_files() {
    // 3 stripes of 8-sector chunks, with a non-zero offset on one of them.
    check("striped", 192, 3, DiscardRule::ZerosOrOld, |d| {
        (
            format!(
                "0 192 striped 3 8 {} 0 {} 16 {} 0",
                d[0].path, d[1].path, d[2].path
            ),
            vec![],
        )
    });
}

#[test]
fn striped_with_an_odd_chunk_size() {
    check("striped-odd", 180, 2, DiscardRule::ZerosOrOld, |d| {
        (
            format!("0 180 striped 2 9 {} 0 {} 0", d[0].path, d[1].path),
            vec![],
        )
    });
}

#[test]
fn memory_with_small_chunks() {
    // 4 KiB chunks, so that requests cross chunk boundaries often.
    check("memory", 192, 0, DiscardRule::Zeros, |_| {
        ("0 192 memory 2 chunk_bytes 4096".to_string(), vec![])
    });
}

#[test]
fn delay_with_zero_delays() {
    check("delay", 160, 1, DiscardRule::ZerosOrOld, |d| {
        (
            format!("0 160 delay {p} 8 0 {p} 8 0 {p} 8 0", p = d[0].path),
            vec![],
        )
    });
}

#[test]
fn flakey_while_up() {
    // The injected clock never moves, so the device stays in its first up interval.
    check("flakey", 160, 1, DiscardRule::ZerosOrOld, |d| {
        (format!("0 160 flakey {} 0 60 60", d[0].path), vec![])
    });
}

#[test]
fn dust_with_no_bad_blocks() {
    check("dust", 160, 1, DiscardRule::ZerosOrOld, |d| {
        (format!("0 160 dust {} 8 4096", d[0].path), vec!["enable"])
    });
}

#[test]
fn a_table_of_several_targets() {
    // Requests that cross rows are split by the table; each part must land in its target.
    check("mixed", 176, 3, DiscardRule::ZerosOrOld, |d| {
        (
            format!(
                "0 48 linear {a} 0\n48 64 memory 2 chunk_bytes 4096\n112 32 striped 2 8 {b} 0 {c} 0\n\
                 144 32 dust {a} 64 512",
                a = d[0].path,
                b = d[1].path,
                c = d[2].path
            ),
            vec![],
        )
    });
}
