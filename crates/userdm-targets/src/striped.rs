//! `striped <#stripes> <chunk_sectors> (<dev> <offset>){#stripes}`: RAID-0 over several devices.
//!
//! Chunk `c` of the row lives on stripe `c % #stripes`, at chunk `c / #stripes` of that stripe,
//! as in the kernel's dm-stripe. The chunk size need not be a power of two (the kernel has
//! accepted any size since 2.6.35; it only uses shifts when it is one).

use std::sync::atomic::{AtomicU32, Ordering};

use userdm_io::{Errno, IoError, IoFlags, IoHeader, IoOp, IoResult, OpSet, SECTOR_SIZE};
use userdm_table::{Allocation, Dep, RowSpec, TableError, TargetLimits};
use userdm_uring::Reactor;

use crate::args::{parse_u32, parse_u64, target_error};
use crate::backing::{Backing, Mapping};
use crate::context::EventHook;
use crate::TargetContext;

const NAME: &str = "striped";

/// After this many errors on a stripe the kernel stops raising events for it.
const IO_ERROR_EVENT_THRESHOLD: u32 = 15;

#[derive(Debug)]
struct Stripe {
    map: Mapping,
    /// The backing's table name, to find every stripe on a failed device.
    name: String,
    /// IO errors seen on this stripe's device; non-zero shows as `D` in the status.
    errors: AtomicU32,
}

/// A striped mapping.
pub struct Striped {
    stripes: Vec<Stripe>,
    /// Sectors per chunk.
    chunk: u64,
    event_hook: Option<EventHook>,
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Striped")
            .field("stripes", &self.stripes)
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl Striped {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<Striped, TableError> {
        let args = row.args();
        if args.len() < 2 {
            return Err(target_error(
                NAME,
                "Not enough arguments: expected <#stripes> <chunk_sectors> (<dev> <offset>)...",
            ));
        }
        let count = parse_u32(&args[0])
            .filter(|&n| n > 0)
            .ok_or_else(|| target_error(NAME, format!("Invalid stripe count '{}'", args[0])))?;
        let chunk = parse_u32(&args[1])
            .filter(|&n| n > 0)
            .ok_or_else(|| target_error(NAME, format!("Invalid chunk_size '{}'", args[1])))?;
        let (count, chunk) = (u64::from(count), u64::from(chunk));
        if row.len % count != 0 {
            return Err(target_error(
                NAME,
                format!(
                    "Target length not divisible by number of stripes: {} sectors, {count} stripes",
                    row.len
                ),
            ));
        }
        let width = row.len / count;
        if width % chunk != 0 {
            return Err(target_error(
                NAME,
                format!(
                    "Target length not divisible by chunk size: {width} sectors per stripe, \
                     chunk {chunk} sectors"
                ),
            ));
        }
        let want = 2 + 2 * count;
        if args.len() as u64 != want {
            return Err(target_error(
                NAME,
                format!(
                    "Not enough destinations specified: {count} stripes need {want} arguments, \
                     got {}",
                    args.len()
                ),
            ));
        }
        let mut stripes = Vec::with_capacity(args.len() / 2);
        for pair in args[2..].chunks_exact(2) {
            let map = open_stripe(ctx, &pair[0], &pair[1], width)?;
            let name = map.backing.name();
            stripes.push(Stripe {
                map,
                name,
                errors: AtomicU32::new(0),
            });
        }
        Ok(Striped {
            stripes,
            chunk,
            event_hook: ctx.event_hook.clone(),
        })
    }

    pub(crate) fn table_params(&self) -> String {
        let mut s = format!("{} {}", self.stripes.len(), self.chunk);
        for stripe in &self.stripes {
            s.push(' ');
            s.push_str(&stripe.map.table_params());
        }
        s
    }

    pub(crate) fn status(&self) -> String {
        let mut s = format!("{} ", self.stripes.len());
        for stripe in &self.stripes {
            s.push_str(&stripe.name);
            s.push(' ');
        }
        s.push_str("1 ");
        for stripe in &self.stripes {
            let dead = stripe.errors.load(Ordering::Relaxed) > 0;
            s.push(if dead { 'D' } else { 'A' });
        }
        s
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    pub(crate) fn deps(&self) -> Vec<Dep> {
        self.stripes.iter().map(|s| s.map.backing.dep()).collect()
    }

    pub(crate) fn limits(&self) -> TargetLimits {
        self.stripes.iter().fold(TargetLimits::default(), |acc, s| {
            acc.combine(s.map.backing.limits())
        })
    }

    fn map_sector(&self, sector: u64) -> (usize, u64) {
        map_sector(self.stripes.len() as u64, self.chunk, sector)
    }

    fn map_range_sector(&self, sector: u64, target: usize) -> u64 {
        map_range_sector(self.stripes.len() as u64, self.chunk, sector, target)
    }

    /// The state of the chunk holding `offset_bytes`, on its stripe, cut at the chunk's end.
    pub(crate) fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        let sector = offset_bytes / SECTOR_SIZE;
        let (stripe, within) = self.map_sector(sector);
        let chunk_left =
            (self.chunk - sector % self.chunk) * SECTOR_SIZE - offset_bytes % SECTOR_SIZE;
        let len = max_len_bytes.min(chunk_left);
        self.stripes[stripe]
            .map
            .allocation(within * SECTOR_SIZE + offset_bytes % SECTOR_SIZE, len)
    }

    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        match io.op {
            IoOp::Read | IoOp::Write => self.io_data(rt, io, buf).await,
            IoOp::Flush => self.io_flush(rt, io).await,
            IoOp::Discard | IoOp::WriteZeroes => self.io_range(rt, io).await,
            _ => Err(Errno::EOPNOTSUPP.into()),
        }
    }

    /// Reads and writes go chunk by chunk, each piece to its stripe.
    async fn io_data(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        let mut sector = io.sector;
        let end = io.sector + io.len_bytes / SECTOR_SIZE;
        let mut done = 0usize;
        // Bounded: each turn advances by at least one sector, and the engine bounded the range.
        while sector < end {
            let (index, stripe_sector) = self.map_sector(sector);
            let sectors = (self.chunk - sector % self.chunk).min(end - sector);
            let bytes = (sectors * SECTOR_SIZE) as usize;
            let piece = IoHeader {
                sector: stripe_sector,
                len_bytes: sectors * SECTOR_SIZE,
                ..io
            };
            let part = buf.get_mut(done..done + bytes).ok_or(Errno::EINVAL)?;
            let result = self.stripes[index].map.io(rt, piece, part).await;
            self.check(index, result, io.flags)?;
            sector += sectors;
            done += bytes;
        }
        Ok(())
    }

    async fn io_flush(&self, rt: &Reactor, io: IoHeader) -> IoResult {
        let mut first_error = Ok(());
        for index in 0..self.stripes.len() {
            let result = self.stripes[index].map.io(rt, io, &mut []).await;
            if let Err(e) = self.check(index, result, io.flags) {
                first_error = first_error.and(Err(e));
            }
        }
        first_error
    }

    /// Discards and zeroing go to each stripe once, as one range: its share of the request.
    async fn io_range(&self, rt: &Reactor, io: IoHeader) -> IoResult {
        let end = io.sector + io.len_bytes / SECTOR_SIZE;
        let mut first_error = Ok(());
        for index in 0..self.stripes.len() {
            let begin = self.map_range_sector(io.sector, index);
            let stop = self.map_range_sector(end, index);
            if begin >= stop {
                continue;
            }
            let piece = IoHeader {
                sector: begin,
                len_bytes: (stop - begin) * SECTOR_SIZE,
                ..io
            };
            let result = self.stripes[index].map.io(rt, piece, &mut []).await;
            if let Err(e) = self.check(index, result, io.flags) {
                first_error = first_error.and(Err(e));
            }
        }
        first_error
    }

    /// Counts an IO error against every stripe on the failed device, as the kernel's
    /// `stripe_end_io`: read-ahead failures and "not supported" do not make a device dead.
    fn check(&self, index: usize, result: IoResult, flags: IoFlags) -> IoResult {
        let Err(IoError::Failed(errno)) = result else {
            return result;
        };
        if flags.contains(IoFlags::RAHEAD) || errno == Errno::EOPNOTSUPP {
            return result;
        }
        let name = &self.stripes[index].name;
        let mut raise = false;
        for stripe in self.stripes.iter().filter(|s| &s.name == name) {
            let errors = stripe
                .errors
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            raise |= errors < IO_ERROR_EVENT_THRESHOLD;
        }
        if raise {
            if let Some(hook) = &self.event_hook {
                hook();
            }
        }
        result
    }
}

/// Row sector → (stripe index, sector within the stripe's area), for `count` stripes of `chunk`
/// sectors.
fn map_sector(count: u64, chunk: u64, sector: u64) -> (usize, u64) {
    let (chunk_index, offset) = (sector / chunk, sector % chunk);
    let stripe = (chunk_index % count) as usize;
    (stripe, (chunk_index / count) * chunk + offset)
}

/// Where row sector `sector` falls in stripe `target`'s area, rounded to that stripe's next
/// chunk boundary if the sector lies on another stripe: the bounds of a range's share of
/// `target` (the kernel's `stripe_map_range_sector`).
fn map_range_sector(count: u64, chunk: u64, sector: u64, target: usize) -> u64 {
    let (stripe, result) = map_sector(count, chunk, sector);
    if stripe == target {
        return result;
    }
    let rounded = result - result % chunk;
    if target < stripe {
        rounded + chunk
    } else {
        rounded
    }
}

fn open_stripe(
    ctx: &TargetContext,
    path: &str,
    start: &str,
    width: u64,
) -> Result<Mapping, TableError> {
    let bad = |detail: String| {
        target_error(
            NAME,
            format!("Couldn't parse stripe destination '{path} {start}': {detail}"),
        )
    };
    let start = parse_u64(start).ok_or_else(|| bad("invalid offset".to_string()))?;
    let backing = Backing::open(ctx, path).map_err(bad)?;
    backing
        .check_area(start, width)
        .map_err(|e| target_error(NAME, e))?;
    Ok(Mapping { backing, start })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each stripe's share of a range, as one range, must be exactly the sectors a
    /// chunk-by-chunk walk sends to it.
    #[test]
    fn range_split_matches_the_chunk_walk() {
        for (count, chunk) in [(1u64, 8u64), (2, 8), (3, 8), (4, 3), (3, 1)] {
            let total = count * chunk * 4;
            for start in 0..total {
                for end in start + 1..=total {
                    for target in 0..count as usize {
                        let walked: Vec<u64> = (start..end)
                            .map(|s| map_sector(count, chunk, s))
                            .filter(|(stripe, _)| *stripe == target)
                            .map(|(_, x)| x)
                            .collect();
                        let begin = map_range_sector(count, chunk, start, target);
                        let stop = map_range_sector(count, chunk, end, target);
                        let expect: Vec<u64> = (begin..stop.max(begin)).collect();
                        assert_eq!(walked, expect, "{count}x{chunk} {start}..{end} #{target}");
                    }
                }
            }
        }
    }

    #[test]
    fn sectors_map_like_the_kernel() {
        // 2 stripes of 128 sectors: chunk 0 on stripe 0, chunk 1 on stripe 1, chunk 2 back on
        // stripe 0 at its second chunk.
        assert_eq!(map_sector(2, 128, 0), (0, 0));
        assert_eq!(map_sector(2, 128, 127), (0, 127));
        assert_eq!(map_sector(2, 128, 128), (1, 0));
        assert_eq!(map_sector(2, 128, 256 + 5), (0, 128 + 5));
        assert_eq!(map_sector(3, 10, 35), (0, 15));
    }
}
