//! A built table: rows with their targets, lookup and splitting.

use userdm_io::limits::DEVICE_SECTORS_MAX;
use userdm_io::{Errno, IoError, IoFlags, IoHeader, IoOp, IoResult, OpSet, SECTOR_SIZE};
use userdm_uring::Reactor;

use crate::{Allocation, Dep, MessageError, RowSpec, TableError, Target, TargetLimits};

/// One row of a built table.
#[derive(Debug)]
pub struct Row<T> {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// The row's target.
    pub target: T,
}

/// A validated table: contiguous rows from sector 0, each with a constructed target.
#[derive(Debug)]
pub struct Table<T> {
    rows: Vec<Row<T>>,
    size_sectors: u64,
}

impl<T: Target> Table<T> {
    /// Checks the rows' layout and constructs their targets.
    ///
    /// An empty `specs` gives an empty table (a device with a live empty table has size 0, as
    /// in the kernel).
    pub fn build(ctx: &T::Context, specs: &[RowSpec]) -> Result<Table<T>, TableError> {
        let mut rows = Vec::with_capacity(specs.len());
        let mut next = 0u64;
        for spec in specs {
            let line = spec.line;
            if spec.len == 0 {
                return Err(TableError::ZeroLength { line });
            }
            if spec.start != next {
                return Err(TableError::Gap {
                    line,
                    start: spec.start,
                    expected: next,
                });
            }
            next = match spec.start.checked_add(spec.len) {
                Some(end) if end <= DEVICE_SECTORS_MAX => end,
                _ => {
                    return Err(TableError::TooLarge {
                        line,
                        max: DEVICE_SECTORS_MAX,
                    })
                }
            };
            let target = T::construct(ctx, spec).map_err(|e| with_line(e, line))?;
            rows.push(Row {
                start: spec.start,
                len: spec.len,
                target,
            });
        }
        Ok(Table {
            rows,
            size_sectors: next,
        })
    }

    /// Parses table text and builds it.
    pub fn parse(ctx: &T::Context, text: &str) -> Result<Table<T>, TableError> {
        Table::build(ctx, &crate::parse_table_text(text)?)
    }

    /// The rows, in order.
    pub fn rows(&self) -> &[Row<T>] {
        &self.rows
    }

    /// The device size the table gives, in sectors.
    pub fn size_sectors(&self) -> u64 {
        self.size_sectors
    }

    /// Operations every row serves. A request for another operation may still succeed if it
    /// touches only rows that serve it.
    pub fn ops(&self) -> OpSet {
        self.rows
            .iter()
            .fold(OpSet::ALL, |acc, r| acc.intersect(r.target.ops()))
    }

    /// The strictest limits of all rows.
    pub fn limits(&self) -> TargetLimits {
        self.rows.iter().fold(TargetLimits::default(), |acc, r| {
            acc.combine(r.target.limits())
        })
    }

    /// Index of the row holding `sector`.
    pub fn find(&self, sector: u64) -> Option<usize> {
        if sector >= self.size_sectors {
            return None;
        }
        // Rows are contiguous, so the row is the last one starting at or before `sector`.
        Some(self.rows.partition_point(|r| r.start <= sector) - 1)
    }

    /// `dmsetup table` lines, without the trailing newline: `start len type params`.
    pub fn table_lines(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.start,
                    r.len,
                    r.target.type_name(),
                    r.target.table_params()
                )
            })
            .collect()
    }

    /// `dmsetup status` lines.
    pub fn status_lines(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.start,
                    r.len,
                    r.target.type_name(),
                    r.target.status()
                )
            })
            .collect()
    }

    /// Every row's dependencies, without duplicates.
    pub fn deps(&self) -> Vec<Dep> {
        let mut deps: Vec<Dep> = self.rows.iter().flat_map(|r| r.target.deps()).collect();
        deps.sort();
        deps.dedup_by(|a, b| (a.major, a.minor, &a.path) == (b.major, b.minor, &b.path));
        deps
    }

    /// Sends a message to the row holding `sector`.
    pub fn message(&self, sector: u64, argv: &[String]) -> Result<Option<String>, MessageError> {
        let index = self.find(sector).ok_or(MessageError::NoTarget(sector))?;
        self.rows[index].target.message(argv)
    }

    /// Tells every row that the device is about to suspend.
    pub fn presuspend(&self, noflush: bool) {
        for r in &self.rows {
            r.target.presuspend(noflush);
        }
    }

    /// Tells every row that the table is live.
    pub fn resume(&self) {
        for r in &self.rows {
            r.target.resume();
        }
    }

    /// Serves one request against the table: checks it, splits it at row boundaries and
    /// completes the parts as one (the first failure is the result).
    ///
    /// `io.sector` is device-relative here; each row sees its own relative sector.
    pub async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        self.check(&io, buf.len())?;
        if io.op == IoOp::Flush {
            return self.flush_all(rt, io.flags).await;
        }
        if io.flags.contains(IoFlags::PREFLUSH) {
            self.flush_all(rt, IoFlags::empty()).await?;
        }
        let io = IoHeader {
            flags: io.flags.without(IoFlags::PREFLUSH),
            ..io
        };
        let end = io.sector + io.len_bytes / SECTOR_SIZE;
        let mut sector = io.sector;
        let mut index = self.find(sector).ok_or(IoError::Failed(Errno::EINVAL))?;
        let carries_data = io.op.carries_write_data() || io.op.returns_data();
        let mut buf_offset = 0usize;
        // A bounded walk over the rows the range touches; no recursion.
        while sector < end {
            let row = &self.rows[index];
            let row_end = row.start + row.len;
            let part_sectors = end.min(row_end) - sector;
            let part_bytes = part_sectors * SECTOR_SIZE;
            if !row.target.ops().contains(io.op) {
                return Err(Errno::EOPNOTSUPP.into());
            }
            let part = IoHeader {
                sector: sector - row.start,
                len_bytes: part_bytes,
                ..io
            };
            let part_buf: &mut [u8] = if carries_data {
                let len = part_bytes as usize;
                &mut buf[buf_offset..buf_offset + len]
            } else {
                &mut []
            };
            row.target.io(rt, part, part_buf).await?;
            if carries_data {
                buf_offset += part_bytes as usize;
            }
            sector += part_sectors;
            index += 1;
        }
        Ok(())
    }

    /// The allocation state of the run starting at device-relative byte `offset_bytes`, at most
    /// `max_len_bytes` long and never past the end of the row holding it (the next row may
    /// differ, so the caller asks again there). `None` when the offset is past the end, not
    /// sector-aligned, or the length is zero.
    ///
    /// A target's answer is clipped to what was asked and made at least one sector long, so a
    /// caller's walk always moves forward.
    pub fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Option<Allocation> {
        if offset_bytes % SECTOR_SIZE != 0 || max_len_bytes == 0 {
            return None;
        }
        let sector = offset_bytes / SECTOR_SIZE;
        let row = &self.rows[self.find(sector)?];
        let row_end_bytes = (row.start + row.len) * SECTOR_SIZE;
        let len = max_len_bytes.min(row_end_bytes - offset_bytes);
        let within = offset_bytes - row.start * SECTOR_SIZE;
        let answer = row.target.allocation(within, len);
        let clipped = answer.len_bytes.min(len);
        let len = if clipped == 0 {
            len.min(SECTOR_SIZE)
        } else {
            clipped
        };
        Some(answer.with_len(len))
    }

    async fn flush_all(&self, rt: &Reactor, flags: IoFlags) -> IoResult {
        let flush = IoHeader {
            op: IoOp::Flush,
            flags,
            sector: 0,
            len_bytes: 0,
        };
        for row in &self.rows {
            if row.target.ops().contains(IoOp::Flush) {
                row.target.io(rt, flush, &mut []).await?;
            }
        }
        Ok(())
    }

    /// Refuses requests that no row could serve correctly: out of range, misaligned, or with a
    /// buffer that does not match. These are bugs or hostile clients, never target failures.
    fn check(&self, io: &IoHeader, buf_len: usize) -> IoResult {
        if io.op == IoOp::Flush {
            return Ok(());
        }
        if !io.op.has_range() {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if io.len_bytes == 0 || io.len_bytes % SECTOR_SIZE != 0 {
            return Err(Errno::EINVAL.into());
        }
        let end = io
            .sector
            .checked_add(io.len_bytes / SECTOR_SIZE)
            .ok_or(Errno::EOVERFLOW)?;
        if end > self.size_sectors {
            return Err(Errno::EOVERFLOW.into());
        }
        let carries_data = io.op.carries_write_data() || io.op.returns_data();
        let want = if carries_data { io.len_bytes } else { 0 };
        if buf_len as u64 != want {
            return Err(Errno::EINVAL.into());
        }
        Ok(())
    }
}

fn with_line(e: TableError, line: usize) -> TableError {
    match e {
        TableError::Target {
            target, problem, ..
        } => TableError::Target {
            line,
            target,
            problem,
        },
        TableError::UnknownTarget { target, .. } => TableError::UnknownTarget { line, target },
        TableError::Syntax { problem, .. } => TableError::Syntax { line, problem },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every part it is handed, and fills reads with its row id.
    #[derive(Debug)]
    struct Probe {
        id: u8,
        ops: OpSet,
        seen: Mutex<Vec<IoHeader>>,
    }

    impl Target for Probe {
        type Context = ();
        fn types() -> &'static [crate::TargetType] {
            &[crate::TargetType {
                name: "probe",
                version: [1, 0, 0],
            }]
        }
        fn construct(_: &(), row: &RowSpec) -> Result<Probe, TableError> {
            match row.target_type.as_str() {
                "probe" => {}
                other => {
                    return Err(TableError::UnknownTarget {
                        line: 0,
                        target: other.into(),
                    })
                }
            }
            let id = row.params.parse().map_err(|_| TableError::Target {
                line: 0,
                target: "probe".into(),
                problem: format!("invalid id '{}'", row.params),
            })?;
            Ok(Probe {
                id,
                ops: OpSet::STORAGE,
                seen: Mutex::new(Vec::new()),
            })
        }
        fn type_name(&self) -> &'static str {
            "probe"
        }
        fn ops(&self) -> OpSet {
            self.ops
        }
        fn table_params(&self) -> String {
            self.id.to_string()
        }
        async fn io(&self, _rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
            self.seen.lock().unwrap().push(io);
            if io.op == IoOp::Read {
                buf.fill(self.id);
            }
            Ok(())
        }
    }

    /// Reports rows with an even id as holes, in runs of `id` sectors; odd ids use the default.
    #[derive(Debug)]
    struct Holes(u64);

    impl Target for Holes {
        type Context = ();
        fn types() -> &'static [crate::TargetType] {
            &[]
        }
        fn construct(_: &(), row: &RowSpec) -> Result<Holes, TableError> {
            Ok(Holes(row.params.parse().unwrap_or(1)))
        }
        fn type_name(&self) -> &'static str {
            "holes"
        }
        fn ops(&self) -> OpSet {
            OpSet::STORAGE
        }
        fn table_params(&self) -> String {
            self.0.to_string()
        }
        fn allocation(&self, _offset_bytes: u64, max_len_bytes: u64) -> Allocation {
            if self.0 % 2 == 1 {
                return Allocation::data(max_len_bytes);
            }
            // Deliberately too long or zero: the table must clip either.
            match self.0 {
                0 => Allocation::hole(0),
                n => Allocation::hole(n * 512 + max_len_bytes),
            }
        }
        async fn io(&self, _rt: &Reactor, _io: IoHeader, _buf: &mut [u8]) -> IoResult {
            Ok(())
        }
    }

    #[test]
    fn allocation_is_clipped_at_rows_and_requests() {
        let t: Table<Holes> =
            Table::parse(&(), "0 8 holes 1\n8 8 holes 2\n16 8 holes 0\n").unwrap();
        // The default answer (data), cut at the row's end.
        assert_eq!(t.allocation(0, 1 << 20), Some(Allocation::data(8 * 512)));
        assert_eq!(t.allocation(1024, 512), Some(Allocation::data(512)));
        // A target that answers too long is cut at its row's end and at the request.
        assert_eq!(
            t.allocation(8 * 512, 1 << 20),
            Some(Allocation::hole(8 * 512))
        );
        assert_eq!(t.allocation(9 * 512, 1024), Some(Allocation::hole(1024)));
        // A zero-length answer still moves the caller forward by one sector.
        assert_eq!(t.allocation(16 * 512, 4096), Some(Allocation::hole(512)));
        // Out of range, misaligned or empty.
        assert_eq!(t.allocation(24 * 512, 512), None);
        assert_eq!(t.allocation(100, 512), None);
        assert_eq!(t.allocation(0, 0), None);
        let empty: Table<Holes> = Table::build(&(), &[]).unwrap();
        assert_eq!(empty.allocation(0, 512), None);
    }

    fn table(text: &str) -> Table<Probe> {
        Table::parse(&(), text).unwrap()
    }

    #[test]
    fn layout_errors_name_the_line() {
        let e = Table::<Probe>::parse(&(), "0 8 probe 1\n9 8 probe 2\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: gap in table: row starts at sector 9, expected 8"
        );
        let e = Table::<Probe>::parse(&(), "0 0 probe 1\n").unwrap_err();
        assert_eq!(e.to_string(), "line 1: zero-length row");
        let e = Table::<Probe>::parse(&(), "# x\n0 8 nosuch\n").unwrap_err();
        assert_eq!(e.to_string(), "line 2: nosuch: unknown target type");
        let e = Table::<Probe>::parse(&(), "0 8 probe x\n").unwrap_err();
        assert_eq!(e.to_string(), "line 1: probe: invalid id 'x'");
        let e = Table::<Probe>::parse(&(), &format!("0 {} probe 1\n", u64::MAX)).unwrap_err();
        assert!(matches!(e, TableError::TooLarge { .. }));
    }

    #[test]
    fn spanning_read_is_split_and_reassembled() {
        let t = table("0 8 probe 1\n8 8 probe 2\n16 8 probe 3\n");
        let rt = Reactor::new(8).unwrap();
        let mut buf = vec![0u8; 20 * 512];
        let io = IoHeader {
            op: IoOp::Read,
            flags: IoFlags::empty(),
            sector: 2,
            len_bytes: 20 * 512,
        };
        rt.block_on(t.io(&rt, io, &mut buf)).unwrap();
        assert!(buf[..6 * 512].iter().all(|&b| b == 1));
        assert!(buf[6 * 512..14 * 512].iter().all(|&b| b == 2));
        assert!(buf[14 * 512..].iter().all(|&b| b == 3));
        let seen = t.rows()[2].target.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![IoHeader {
                sector: 0,
                len_bytes: 6 * 512,
                ..io
            }]
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let t = table("0 8 probe 1\n");
        let rt = Reactor::new(8).unwrap();
        let read = |sector, len| IoHeader {
            op: IoOp::Read,
            flags: IoFlags::empty(),
            sector,
            len_bytes: len,
        };
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            rt.block_on(t.io(&rt, read(4, 4096), &mut buf)),
            Err(Errno::EOVERFLOW.into())
        );
        assert_eq!(
            rt.block_on(t.io(&rt, read(0, 100), &mut buf[..100])),
            Err(Errno::EINVAL.into())
        );
        assert_eq!(
            rt.block_on(t.io(&rt, read(0, 512), &mut buf)),
            Err(Errno::EINVAL.into())
        );
        let erase = IoHeader {
            op: IoOp::SecureErase,
            ..read(0, 512)
        };
        assert_eq!(
            rt.block_on(t.io(&rt, erase, &mut [])),
            Err(Errno::EOPNOTSUPP.into())
        );
        assert!(t.rows()[0].target.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn flush_and_preflush_reach_every_row() {
        let t = table("0 8 probe 1\n8 8 probe 2\n");
        let rt = Reactor::new(8).unwrap();
        let mut buf = vec![0u8; 512];
        let w = IoHeader {
            op: IoOp::Write,
            flags: IoFlags::PREFLUSH | IoFlags::FUA,
            sector: 9,
            len_bytes: 512,
        };
        rt.block_on(t.io(&rt, w, &mut buf)).unwrap();
        let first: Vec<IoOp> = t.rows()[0]
            .target
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.op)
            .collect();
        assert_eq!(first, vec![IoOp::Flush]);
        let second = t.rows()[1].target.seen.lock().unwrap().clone();
        assert_eq!(second[0].op, IoOp::Flush);
        assert_eq!(
            second[1],
            IoHeader {
                op: IoOp::Write,
                flags: IoFlags::FUA,
                sector: 1,
                len_bytes: 512
            }
        );
    }

    #[test]
    fn text_output() {
        let t = table("0 8 probe 1\n8 8 probe 2\n");
        assert_eq!(t.table_lines(), vec!["0 8 probe 1", "8 8 probe 2"]);
        assert_eq!(t.status_lines(), vec!["0 8 probe ", "8 8 probe "]);
        assert_eq!(t.find(7), Some(0));
        assert_eq!(t.find(8), Some(1));
        assert_eq!(t.find(16), None);
        assert_eq!(t.message(3, &[]), Err(MessageError::Unsupported));
        assert_eq!(t.message(99, &[]), Err(MessageError::NoTarget(99)));
    }

    proptest::proptest! {
        /// Splitting covers every sector of the request exactly once, in order.
        #[test]
        fn split_covers_exactly(lens in proptest::collection::vec(1u64..64, 1..8), start_frac in 0.0f64..1.0, len_frac in 0.0f64..1.0) {
            let mut text = String::new();
            let mut at = 0;
            for (i, l) in lens.iter().enumerate() {
                text += &format!("{at} {l} probe {i}\n");
                at += l;
            }
            let t = table(&text);
            let size = t.size_sectors();
            let start = ((size as f64 * start_frac) as u64).min(size - 1);
            let len = 1 + ((size - start - 1) as f64 * len_frac) as u64;
            let rt = Reactor::new(8).unwrap();
            let mut buf = vec![0xffu8; (len * 512) as usize];
            let io = IoHeader { op: IoOp::Read, flags: IoFlags::empty(), sector: start, len_bytes: len * 512 };
            rt.block_on(t.io(&rt, io, &mut buf)).unwrap();
            for s in 0..len {
                let want = t.find(start + s).unwrap() as u8;
                let got = &buf[(s * 512) as usize..((s + 1) * 512) as usize];
                proptest::prop_assert!(got.iter().all(|&b| b == want));
            }
            let parts: u64 = t.rows().iter().map(|r| r.target.seen.lock().unwrap().iter().map(|h| h.len_bytes / 512).sum::<u64>()).sum();
            proptest::prop_assert_eq!(parts, len);
        }
    }
}
