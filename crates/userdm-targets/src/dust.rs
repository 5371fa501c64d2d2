//! `dust <dev> <offset> <blksz>`: a device with a list of bad blocks, driven by messages.
//!
//! As the kernel's dm-dust: blocks are `blksz` bytes of the *backing* device (the offset is added
//! before dividing). While enabled (`enable`), a read touching a bad block fails with EIO; a write
//! to a bad block first fails as many times as the block's write-fail count, then succeeds and
//! removes the block from the list (a rewritten sector is remapped by a real disk). While
//! disabled (the default), IO passes through and the list is left alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use userdm_io::{Errno, IoHeader, IoOp, IoResult, OpSet, SECTOR_SIZE};
use userdm_table::{Dep, MessageError, RowSpec, TableError, TargetLimits};
use userdm_uring::Reactor;

use crate::args::{parse_u32, parse_u64, target_error};
use crate::backing::{Backing, Mapping};
use crate::TargetContext;

const NAME: &str = "dust";

/// The largest block, in sectors (1 GiB), as the kernel's `DUST_MAX_BLKSZ_SECTORS`.
const BLOCK_SECTORS_MAX: u64 = 2_097_152;

/// A dust mapping.
#[derive(Debug)]
pub struct Dust {
    map: Mapping,
    block_bytes: u32,
    /// log2 of sectors per block.
    block_shift: u32,
    /// Bad block → how many more writes to it fail.
    bad_blocks: Mutex<BTreeMap<u64, u8>>,
    /// `enable`d: reads of bad blocks fail, writes rewrite them.
    fail_read_on_bad_block: AtomicBool,
    /// `quiet`: the kernel stops logging block list changes; here only the status shows it.
    quiet: AtomicBool,
}

impl Dust {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<Dust, TableError> {
        let args = row.args();
        let [path, start, block_bytes] = args.as_slice() else {
            return Err(target_error(
                NAME,
                format!(
                    "Invalid argument count: expected 3 (<dev_path> <offset> <blksz>), got {}",
                    args.len()
                ),
            ));
        };
        let block_bytes = parse_u32(block_bytes).filter(|&b| b > 0).ok_or_else(|| {
            target_error(
                NAME,
                format!("Invalid block size parameter '{block_bytes}'"),
            )
        })?;
        if block_bytes < 512 {
            return Err(target_error(NAME, "Block size must be at least 512"));
        }
        if !block_bytes.is_power_of_two() {
            return Err(target_error(NAME, "Block size must be a power of 2"));
        }
        let block_sectors = u64::from(block_bytes) / SECTOR_SIZE;
        if block_sectors > row.len.min(BLOCK_SECTORS_MAX) {
            return Err(target_error(
                NAME,
                format!(
                    "Block size is too large: {block_sectors} sectors, the row has {}, the \
                     largest is {BLOCK_SECTORS_MAX}",
                    row.len
                ),
            ));
        }
        let start = parse_u64(start)
            .ok_or_else(|| target_error(NAME, format!("Invalid device offset sector '{start}'")))?;
        let backing = Backing::open(ctx, path)
            .map_err(|e| target_error(NAME, format!("Device lookup failed: {e}")))?;
        backing
            .check_area(start, row.len)
            .map_err(|e| target_error(NAME, e))?;
        Ok(Dust {
            map: Mapping { backing, start },
            block_bytes,
            block_shift: block_sectors.trailing_zeros(),
            bad_blocks: Mutex::new(BTreeMap::new()),
            fail_read_on_bad_block: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
        })
    }

    pub(crate) fn table_params(&self) -> String {
        format!("{} {}", self.map.table_params(), self.block_bytes)
    }

    pub(crate) fn status(&self) -> String {
        let mode = if self.fail_read_on_bad_block.load(Ordering::Acquire) {
            "fail_read_on_bad_block"
        } else {
            "bypass"
        };
        let verbosity = if self.quiet.load(Ordering::Acquire) {
            "quiet"
        } else {
            "verbose"
        };
        format!("{} {mode} {verbosity}", self.map.backing.name())
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

    fn blocks(&self) -> MutexGuard<'_, BTreeMap<u64, u8>> {
        // The map stays consistent whatever a panicking holder did: every update is one call.
        self.bad_blocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The bad block numbers, in order.
    pub fn bad_blocks(&self) -> Vec<u64> {
        self.blocks().keys().copied().collect()
    }

    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        if io.op == IoOp::Flush
            || !self.fail_read_on_bad_block.load(Ordering::Acquire)
            || self.blocks().is_empty()
        {
            return self.map.io(rt, io, buf).await;
        }
        if io.op == IoOp::Read {
            self.check_read(io)?;
            return self.map.io(rt, io, buf).await;
        }
        self.write_pieces(rt, io, buf).await
    }

    /// The kernel splits requests at block boundaries of the row (its `max_io_len`) and looks
    /// at the block of each piece's first sector; this walks the same pieces.
    fn pieces(&self, io: IoHeader) -> impl Iterator<Item = (u64, u64)> + '_ {
        let block_sectors = 1u64 << self.block_shift;
        let end = io.sector + io.len_bytes / SECTOR_SIZE;
        let mut sector = io.sector;
        std::iter::from_fn(move || {
            if sector >= end {
                return None;
            }
            let len = (block_sectors - sector % block_sectors).min(end - sector);
            let piece = (sector, len);
            sector += len;
            Some(piece)
        })
    }

    /// The backing-device block holding row sector `sector`.
    fn block_of(&self, sector: u64) -> u64 {
        self.map.start.saturating_add(sector) >> self.block_shift
    }

    fn check_read(&self, io: IoHeader) -> IoResult {
        let blocks = self.blocks();
        for (sector, _) in self.pieces(io) {
            if blocks.contains_key(&self.block_of(sector)) {
                return Err(Errno::EIO.into());
            }
        }
        Ok(())
    }

    /// Writes, discards and zeroing, piece by piece: a piece on a bad block with writes left to
    /// fail fails (and counts one down); a piece on any other bad block goes through and heals
    /// it. Every piece is tried, as every split bio is in the kernel; the first failure is the
    /// result.
    async fn write_pieces(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        let mut result = Ok(());
        let carries_data = io.op.carries_write_data();
        for (sector, len) in self.pieces(io) {
            let fails = {
                let mut blocks = self.blocks();
                let block = self.block_of(sector);
                match blocks.get_mut(&block) {
                    Some(left) if *left > 0 => {
                        *left -= 1;
                        true
                    }
                    Some(_) => {
                        blocks.remove(&block);
                        false
                    }
                    None => false,
                }
            };
            if fails {
                result = result.and(Err(Errno::EIO.into()));
                continue;
            }
            let piece = IoHeader {
                sector,
                len_bytes: len * SECTOR_SIZE,
                ..io
            };
            let part: &mut [u8] = if carries_data {
                let from = ((sector - io.sector) * SECTOR_SIZE) as usize;
                let to = from + (len * SECTOR_SIZE) as usize;
                buf.get_mut(from..to).ok_or(Errno::EINVAL)?
            } else {
                &mut []
            };
            if let Err(e) = self.map.io(rt, piece, part).await {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// `dmsetup message`, with the kernel's replies and errors word for word.
    pub(crate) fn message(&self, argv: &[String]) -> Result<Option<String>, MessageError> {
        let invalid = |s: String| Err(MessageError::Invalid(s));
        let unrecognized = |name: &str| invalid(format!("unrecognized message '{name}' received"));
        match argv {
            [name] => {
                let is = |m: &str| name.eq_ignore_ascii_case(m);
                if is("addbadblock") || is("removebadblock") || is("queryblock") {
                    invalid(format!("{name} requires an additional argument"))
                } else if is("disable") {
                    self.fail_read_on_bad_block.store(false, Ordering::Release);
                    Ok(None)
                } else if is("enable") {
                    self.fail_read_on_bad_block.store(true, Ordering::Release);
                    Ok(None)
                } else if is("countbadblocks") {
                    let n = self.blocks().len();
                    Ok(Some(format!("countbadblocks: {n} badblock(s) found")))
                } else if is("clearbadblocks") {
                    let cleared = std::mem::take(&mut *self.blocks());
                    Ok(Some(if cleared.is_empty() {
                        "dust_clear_badblocks: no badblocks found".to_string()
                    } else {
                        "dust_clear_badblocks: badblocks cleared".to_string()
                    }))
                } else if is("quiet") {
                    self.quiet.fetch_xor(true, Ordering::AcqRel);
                    Ok(None)
                } else if is("listbadblocks") {
                    Ok(Some(self.list_bad_blocks()))
                } else {
                    unrecognized(name)
                }
            }
            [name, block] => {
                let block = self.parse_block(block)?;
                let is = |m: &str| name.eq_ignore_ascii_case(m);
                if is("addbadblock") {
                    self.add_block(block, 0)
                } else if is("removebadblock") {
                    match self.blocks().remove(&block) {
                        Some(_) => Ok(None),
                        None => invalid(format!(
                            "dust_remove_block: block {block} not found in badblocklist"
                        )),
                    }
                } else if is("queryblock") {
                    let found = if self.blocks().contains_key(&block) {
                        "found"
                    } else {
                        "not found"
                    };
                    Ok(Some(format!(
                        "dust_query_block: block {block} {found} in badblocklist"
                    )))
                } else {
                    unrecognized(name)
                }
            }
            [name, block, write_fails] => {
                let block = parse_u64(block)
                    .ok_or_else(|| MessageError::Invalid(format!("invalid block '{block}'")))?;
                let write_fails = parse_u32(write_fails).ok_or_else(|| {
                    MessageError::Invalid(format!("invalid write fail count '{write_fails}'"))
                })?;
                let Ok(write_fails) = u8::try_from(write_fails) else {
                    return invalid("selected write fail count out of range".to_string());
                };
                let block = self.check_block(block)?;
                if name.eq_ignore_ascii_case("addbadblock") {
                    self.add_block(block, write_fails)
                } else {
                    unrecognized(name)
                }
            }
            _ => invalid(format!("invalid number of arguments '{}'", argv.len())),
        }
    }

    fn list_bad_blocks(&self) -> String {
        let blocks = self.blocks();
        if blocks.is_empty() {
            return "No blocks in badblocklist".to_string();
        }
        let mut out = String::with_capacity(blocks.len() * 8);
        for block in blocks.keys() {
            let _ = writeln!(out, "{block}");
        }
        out
    }

    fn parse_block(&self, word: &str) -> Result<u64, MessageError> {
        let block = parse_u64(word)
            .ok_or_else(|| MessageError::Invalid(format!("invalid block '{word}'")))?;
        self.check_block(block)
    }

    /// Blocks up to the backing device's size in blocks are accepted: `>` as in the kernel, so
    /// the block just past the end is too.
    fn check_block(&self, block: u64) -> Result<u64, MessageError> {
        let device_blocks = (self.map.backing.size_bytes() / SECTOR_SIZE) >> self.block_shift;
        if block > device_blocks {
            return Err(MessageError::Invalid(
                "selected block value out of range".to_string(),
            ));
        }
        Ok(block)
    }

    fn add_block(&self, block: u64, write_fails: u8) -> Result<Option<String>, MessageError> {
        let mut blocks = self.blocks();
        if blocks.contains_key(&block) {
            return Err(MessageError::Invalid(format!(
                "dust_add_block: block {block} already in badblocklist"
            )));
        }
        blocks.insert(block, write_fails);
        Ok(None)
    }
}
