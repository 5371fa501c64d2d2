//! `flakey <dev> <offset> <up_s> <down_s> [<#features> <feature>...]`: a device that works for
//! `up_s` seconds, then misbehaves for `down_s` seconds, in a cycle that starts when the table is
//! loaded.
//!
//! Features, as the kernel's dm-flakey v1.5.0 (6.12): `error_reads`, `drop_writes`,
//! `error_writes`, `corrupt_bio_byte <nth> <r|w> <value> <flags>`, `random_read_corrupt <p>`,
//! `random_write_corrupt <p>` (`p` in billionths). With no feature that says otherwise, a down
//! device fails every read and write (the kernel sets `error_reads error_writes` then, and shows
//! them in the table).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use userdm_io::{Errno, IoFlags, IoHeader, IoOp, IoResult, OpSet};
use userdm_table::{Dep, RowSpec, TableError, TargetLimits};
use userdm_uring::Reactor;

use crate::args::{parse_u32, ArgSet};
use crate::backing::Mapping;
use crate::context::Clock;
use crate::linear::open_mapping;
use crate::TargetContext;

const NAME: &str = "flakey";

/// Random corruption probabilities are out of this many.
const PROBABILITY_BASE: u32 = 1_000_000_000;

/// Which requests `corrupt_bio_byte` corrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// `corrupt_bio_byte <nth> <r|w> <value> <flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CorruptByte {
    /// 1-based index of the byte in the request.
    nth: u32,
    direction: Direction,
    value: u8,
    /// Kernel `REQ_*` bits (and op code bits) that must all be set in the request.
    flags: u32,
}

/// The features, parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Features {
    error_reads: bool,
    drop_writes: bool,
    error_writes: bool,
    corrupt: Option<CorruptByte>,
    random_read_corrupt: u32,
    random_write_corrupt: u32,
}

/// A flakey mapping.
#[derive(Debug)]
pub struct Flakey {
    map: Mapping,
    up_s: u32,
    down_s: u32,
    features: Features,
    clock: Arc<dyn Clock>,
    /// The clock's reading at construction: the cycle starts there, as the kernel's `jiffies`.
    start: Duration,
    /// State of the random source for the random corruptions.
    random: AtomicU64,
}

impl Flakey {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<Flakey, TableError> {
        let start = ctx.clock.now();
        let words = row.args();
        if words.len() < 4 {
            return Err(bad(format!(
                "Invalid argument count: expected at least 4 \
                 (<dev_path> <offset> <up interval> <down interval> [<#features> ...]), got {}",
                words.len()
            )));
        }
        // The offset is checked first, as by the kernel, so that messages come in its order;
        // `open_mapping` parses it again below.
        if crate::args::parse_u64(&words[1]).is_none() {
            return Err(bad(format!("Invalid device sector '{}'", words[1])));
        }
        let mut args = ArgSet::new(&words[2..]);
        let up_s = args
            .read_u32(0, u32::MAX)
            .ok_or_else(|| bad(format!("Invalid up interval '{}'", words[2])))?;
        let down_s = args
            .read_u32(0, u32::MAX)
            .ok_or_else(|| bad(format!("Invalid down interval '{}'", words[3])))?;
        match up_s.checked_add(down_s) {
            Some(0) => return Err(bad("Total (up + down) interval is zero")),
            None => return Err(bad("Interval overflow")),
            Some(_) => {}
        }
        let features = parse_features(&mut args)?;
        // Words after the feature group are ignored, as by the kernel.
        let map = open_mapping(NAME, ctx, &words[0], &words[1], row.len)?;
        Ok(Flakey {
            map,
            up_s,
            down_s,
            features,
            clock: ctx.clock.clone(),
            start,
            random: AtomicU64::new(RandomState::new().build_hasher().finish()),
        })
    }

    pub(crate) fn table_params(&self) -> String {
        let f = &self.features;
        let count = u32::from(f.error_reads)
            + u32::from(f.drop_writes)
            + u32::from(f.error_writes)
            + if f.corrupt.is_some() { 5 } else { 0 }
            + if f.random_read_corrupt > 0 { 2 } else { 0 }
            + if f.random_write_corrupt > 0 { 2 } else { 0 };
        let mut s = format!(
            "{} {} {} {count}",
            self.map.table_params(),
            self.up_s,
            self.down_s
        );
        if f.error_reads {
            s.push_str(" error_reads");
        }
        if f.drop_writes {
            s.push_str(" drop_writes");
        } else if f.error_writes {
            s.push_str(" error_writes");
        }
        if let Some(c) = f.corrupt {
            let dir = match c.direction {
                Direction::Read => 'r',
                Direction::Write => 'w',
            };
            s.push_str(&format!(
                " corrupt_bio_byte {} {dir} {} {}",
                c.nth, c.value, c.flags
            ));
        }
        if f.random_read_corrupt > 0 {
            s.push_str(&format!(" random_read_corrupt {}", f.random_read_corrupt));
        }
        if f.random_write_corrupt > 0 {
            s.push_str(&format!(" random_write_corrupt {}", f.random_write_corrupt));
        }
        s
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    pub(crate) fn deps(&self) -> Vec<Dep> {
        vec![self.map.backing.dep()]
    }

    pub(crate) fn limits(&self) -> TargetLimits {
        self.map.backing.limits()
    }

    /// Whether the device is in a down interval now.
    fn is_down(&self) -> bool {
        let elapsed_s = self.clock.now().saturating_sub(self.start).as_secs();
        let cycle = u64::from(self.up_s) + u64::from(self.down_s);
        elapsed_s % cycle >= u64::from(self.up_s)
    }

    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        if !self.is_down() {
            return self.map.io(rt, io, buf).await;
        }
        let f = &self.features;
        if io.op == IoOp::Read {
            if f.error_reads {
                return Err(Errno::EIO.into());
            }
            self.map.io(rt, io, buf).await?;
            if let Some(c) = f.corrupt.filter(|c| c.direction == Direction::Read) {
                if flags_match(&io, c.flags) {
                    corrupt_byte(buf, c.nth as usize - 1, c.value);
                }
            }
            if self.chance(f.random_read_corrupt) {
                self.corrupt_random(buf);
            }
            return Ok(());
        }
        // Everything else goes to the device as a write does (the kernel's `bio_data_dir` of a
        // flush, discard or zeroing is WRITE), so drop_writes and error_writes cover them too.
        if f.drop_writes {
            return Ok(());
        }
        if f.error_writes {
            return Err(Errno::EIO.into());
        }
        if io.op == IoOp::Write {
            return self.write_corrupted(rt, io, buf).await;
        }
        self.map.io(rt, io, buf).await
    }

    /// A write while down, corrupted on the way if a feature says so. The caller's buffer is
    /// never changed (it may be the page cache), so corruption happens in a copy, as the kernel
    /// clones the bio's pages.
    async fn write_corrupted(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        let f = &self.features;
        let fixed = f
            .corrupt
            .filter(|c| c.direction == Direction::Write && flags_match(&io, c.flags));
        let random = self.chance(f.random_write_corrupt);
        if fixed.is_none() && !random {
            return self.map.io(rt, io, buf).await;
        }
        let mut copy = Vec::new();
        if copy.try_reserve_exact(buf.len()).is_err() {
            // As the kernel when it cannot clone: the write goes through uncorrupted.
            return self.map.io(rt, io, buf).await;
        }
        copy.extend_from_slice(buf);
        if let Some(c) = fixed {
            corrupt_byte(&mut copy, c.nth as usize - 1, c.value);
        }
        if random {
            self.corrupt_random(&mut copy);
        }
        self.map.io(rt, io, &mut copy).await
    }

    /// A uniformly random 64-bit number (splitmix64 over an atomic counter: lock-free, and good
    /// enough to pick bytes to corrupt).
    fn next_random(&self) -> u64 {
        let mut z = self
            .random
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `billionths / 10^9`.
    fn chance(&self, billionths: u32) -> bool {
        billionths > 0 && self.next_random() % u64::from(PROBABILITY_BASE) < u64::from(billionths)
    }

    fn corrupt_random(&self, buf: &mut [u8]) {
        if buf.is_empty() {
            return;
        }
        let r = self.next_random();
        let index = (r % buf.len() as u64) as usize;
        corrupt_byte(buf, index, (r >> 56) as u8);
    }
}

#[cold]
fn bad(problem: impl Into<String>) -> TableError {
    crate::args::target_error(NAME, problem)
}

fn corrupt_byte(buf: &mut [u8], index: usize, value: u8) {
    if let Some(b) = buf.get_mut(index) {
        *b = value;
    }
}

/// The request as the kernel's `bi_opf` would have it: the op code in the low 8 bits and the
/// `REQ_*` flags above, for `corrupt_bio_byte`'s flags mask. Only the flag bits that have not
/// moved between kernel versions (8 to 21) are mapped.
fn kernel_opf(io: &IoHeader) -> u32 {
    let op = match io.op {
        IoOp::Read => 0,
        IoOp::Write => 1,
        IoOp::Flush => 2,
        IoOp::Discard => 3,
        IoOp::SecureErase => 5,
        IoOp::WriteZeroes => 9,
        _ => 0xff,
    };
    const BITS: [(IoFlags, u32); 14] = [
        (IoFlags::FAILFAST_DEV, 8),
        (IoFlags::FAILFAST_TRANSPORT, 9),
        (IoFlags::FAILFAST_DRIVER, 10),
        (IoFlags::SYNC, 11),
        (IoFlags::META, 12),
        (IoFlags::PRIO, 13),
        (IoFlags::NOMERGE, 14),
        (IoFlags::IDLE, 15),
        (IoFlags::INTEGRITY, 16),
        (IoFlags::FUA, 17),
        (IoFlags::PREFLUSH, 18),
        (IoFlags::RAHEAD, 19),
        (IoFlags::BACKGROUND, 20),
        (IoFlags::NOWAIT, 21),
    ];
    BITS.iter()
        .filter(|(flag, _)| io.flags.contains(*flag))
        .fold(op, |acc, (_, bit)| acc | 1 << bit)
}

fn flags_match(io: &IoHeader, mask: u32) -> bool {
    kernel_opf(io) & mask == mask
}

/// The feature group, with the kernel's checks and messages.
fn parse_features(args: &mut ArgSet<'_>) -> Result<Features, TableError> {
    let mut f = Features::default();
    let mut count = 0u32;
    if args.remaining() > 0 {
        count = args
            .read_group(0, 11)
            .ok_or_else(|| bad("Invalid number of feature args"))?;
    }
    if count == 0 {
        f.error_reads = true;
        f.error_writes = true;
        return Ok(f);
    }
    // Bounded by `count`, at most 11.
    while count > 0 {
        let name = args
            .shift()
            .ok_or_else(|| bad("Insufficient feature arguments"))?;
        count -= 1;
        let is = |feature: &str| name.eq_ignore_ascii_case(feature);
        if is("error_reads") {
            if std::mem::replace(&mut f.error_reads, true) {
                return Err(bad("Feature error_reads duplicated"));
            }
        } else if is("drop_writes") {
            if std::mem::replace(&mut f.drop_writes, true) {
                return Err(bad("Feature drop_writes duplicated"));
            }
            if f.error_writes {
                return Err(bad(
                    "Feature drop_writes conflicts with feature error_writes",
                ));
            }
        } else if is("error_writes") {
            if std::mem::replace(&mut f.error_writes, true) {
                return Err(bad("Feature error_writes duplicated"));
            }
            if f.drop_writes {
                return Err(bad(
                    "Feature error_writes conflicts with feature drop_writes",
                ));
            }
        } else if is("corrupt_bio_byte") {
            if f.corrupt.is_some() {
                return Err(bad("Feature corrupt_bio_byte duplicated"));
            }
            if count < 4 {
                return Err(bad("Feature corrupt_bio_byte requires 4 parameters"));
            }
            f.corrupt = Some(parse_corrupt_byte(args)?);
            count -= 4;
        } else if is("random_read_corrupt") || is("random_write_corrupt") {
            let (slot, feature) = if is("random_read_corrupt") {
                (&mut f.random_read_corrupt, "random_read_corrupt")
            } else {
                (&mut f.random_write_corrupt, "random_write_corrupt")
            };
            if *slot > 0 {
                return Err(bad(format!("Feature {feature} duplicated")));
            }
            if count == 0 {
                return Err(bad(format!("Feature {feature} requires a parameter")));
            }
            *slot = args
                .read_u32(0, PROBABILITY_BASE)
                .ok_or_else(|| bad("Invalid random corrupt argument"))?;
            count -= 1;
        } else {
            return Err(bad(format!(
                "Unrecognised flakey feature requested: '{name}'"
            )));
        }
    }
    check_conflicts(&f)?;
    if !f.error_reads
        && !f.drop_writes
        && !f.error_writes
        && f.corrupt.is_none()
        && f.random_read_corrupt == 0
        && f.random_write_corrupt == 0
    {
        f.error_reads = true;
        f.error_writes = true;
    }
    Ok(f)
}

fn parse_corrupt_byte(args: &mut ArgSet<'_>) -> Result<CorruptByte, TableError> {
    let nth = args
        .read_u32(1, u32::MAX)
        .ok_or_else(|| bad("Invalid corrupt bio byte"))?;
    let direction = match args.shift() {
        Some(d) if d.eq_ignore_ascii_case("w") => Direction::Write,
        Some(d) if d.eq_ignore_ascii_case("r") => Direction::Read,
        _ => return Err(bad("Invalid corrupt bio direction (r or w)")),
    };
    let value = args
        .read_u32(0, 255)
        .ok_or_else(|| bad("Invalid corrupt value to write into bio byte (0-255)"))?;
    let flags = args
        .shift()
        .and_then(parse_u32)
        .ok_or_else(|| bad("Invalid corrupt bio flags mask"))?;
    Ok(CorruptByte {
        nth,
        direction,
        value: value as u8,
        flags,
    })
}

fn check_conflicts(f: &Features) -> Result<(), TableError> {
    let corrupts = |d: Direction| f.corrupt.is_some_and(|c| c.direction == d);
    if f.drop_writes && (corrupts(Direction::Write) || f.random_write_corrupt > 0) {
        return Err(bad(
            "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with \
             the WRITE flag set",
        ));
    }
    if f.error_writes && (corrupts(Direction::Write) || f.random_write_corrupt > 0) {
        return Err(bad(
            "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with \
             the WRITE flag set",
        ));
    }
    if f.error_reads && (corrupts(Direction::Read) || f.random_read_corrupt > 0) {
        return Err(bad(
            "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with \
             the READ flag set",
        ));
    }
    Ok(())
}
