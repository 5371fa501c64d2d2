//! Steady-state IO through a device allocates nothing: a counting allocator watches a loop of
//! requests that go through the gate, the table, a target and the ring.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::io::Write;

use userdm_device::Device;
use userdm_io::{IoFlags, IoHeader, IoOp, IoResult, OpSet};
use userdm_table::{RowSpec, Table, TableError, Target, TargetType};
use userdm_uring::Reactor;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: defers to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: thread-locals may be gone during thread teardown.
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                ALLOCATIONS.with(|a| a.set(a.get() + 1));
            }
        });
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Reads and writes a backing file through the ring, like `linear`.
struct FileRow(File);

impl Target for FileRow {
    type Context = File;
    fn types() -> &'static [TargetType] {
        &[TargetType {
            name: "file",
            version: [1, 0, 0],
        }]
    }
    fn construct(ctx: &File, _row: &RowSpec) -> Result<FileRow, TableError> {
        Ok(FileRow(ctx.try_clone().map_err(|e| {
            TableError::Target {
                line: 0,
                target: "file".into(),
                problem: e.to_string(),
            }
        })?))
    }
    fn type_name(&self) -> &'static str {
        "file"
    }
    fn ops(&self) -> OpSet {
        OpSet::RW_FLUSH
    }
    fn table_params(&self) -> String {
        String::new()
    }
    async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        match io.op {
            IoOp::Read => rt.read_exact_at(&self.0, buf, io.sector * 512).await?,
            IoOp::Write => rt.write_all_at(&self.0, buf, io.sector * 512).await?,
            _ => rt.fsync(&self.0, true).await?,
        }
        Ok(())
    }
}

#[test]
fn steady_state_io_allocates_nothing() {
    let path = std::env::temp_dir().join(format!("userdm-noalloc-{}", std::process::id()));
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    std::fs::remove_file(&path).unwrap();
    let d: Device<FileRow> = Device::new("noalloc", None, false).unwrap();
    d.load(Table::parse(&f, "0 1024 file\n1024 1024 file\n").unwrap());
    d.resume().unwrap();
    let rt = Reactor::new(32).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let run = |count: u64, buf: &mut [u8]| {
        rt.block_on(async {
            for i in 0..count {
                let op = [IoOp::Write, IoOp::Read, IoOp::Flush][(i % 3) as usize];
                // Straddles the row boundary at sector 1024 every other time.
                let sector = if i % 2 == 0 { 1000 } else { (i * 8) % 1900 };
                let (h, b) = if op == IoOp::Flush {
                    (
                        IoHeader {
                            op,
                            flags: IoFlags::empty(),
                            sector: 0,
                            len_bytes: 0,
                        },
                        &mut buf[..0],
                    )
                } else {
                    (
                        IoHeader {
                            op,
                            flags: IoFlags::empty(),
                            sector,
                            len_bytes: 64 * 1024,
                        },
                        &mut buf[..],
                    )
                };
                d.io(&rt, h, b).await.unwrap();
            }
        })
    };
    run(30, &mut buf); // warm up: first use of every slot and lock
    COUNTING.with(|c| c.set(true));
    run(300, &mut buf);
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCATIONS.with(Cell::get), 0, "the data path allocated");
}
