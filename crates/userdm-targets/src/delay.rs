//! `delay <dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]]`: holds each
//! request for a while before passing it on.
//!
//! As the kernel's dm-delay: reads use the first triple; writes, discards and zeroing the second
//! (the first if absent); flushes the third (the second, else the first). A delay of 0 passes
//! requests straight through. The status counts the requests being held now. Suspending lets
//! every held request go at once and stops delaying until resume.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use userdm_io::{IoHeader, IoOp, IoResult, OpSet};
use userdm_table::{Allocation, Dep, RowSpec, TableError, TargetLimits};
use userdm_uring::sync::Notify;
use userdm_uring::Reactor;

use crate::args::{parse_u32, parse_u64, target_error};
use crate::backing::{Backing, Mapping};
use crate::TargetContext;

const NAME: &str = "delay";

/// One class of requests: where they go and how long they wait.
#[derive(Debug)]
struct Class {
    map: Mapping,
    delay_ms: u32,
    /// Requests of this class being held now.
    held: AtomicU32,
}

/// A delay mapping.
pub struct Delay {
    read: Class,
    write: Class,
    flush: Class,
    /// How many params the table gave (3, 6 or 9): the table output repeats that form.
    argc: usize,
    /// Cleared by presuspend, set by resume: while clear, nothing is held.
    may_delay: AtomicBool,
    /// Bumped by presuspend to wake every held request.
    release: Notify,
}

impl std::fmt::Debug for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delay")
            .field("read", &self.read)
            .field("write", &self.write)
            .field("flush", &self.flush)
            .field("may_delay", &self.may_delay)
            .finish_non_exhaustive()
    }
}

/// Decrements a class's held count when a delayed request stops waiting, even if its future is
/// dropped mid-sleep.
struct Held<'a>(&'a AtomicU32);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Delay {
    pub(crate) fn construct(ctx: &TargetContext, row: &RowSpec) -> Result<Delay, TableError> {
        let args = row.args();
        if !matches!(args.len(), 3 | 6 | 9) {
            return Err(target_error(
                NAME,
                format!(
                    "Requires exactly 3, 6 or 9 arguments \
                     (<dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]]), \
                     got {}",
                    args.len()
                ),
            ));
        }
        // Devices named twice are opened once, as the kernel shares a `dm_dev`.
        let mut opened: Vec<Arc<Backing>> = Vec::with_capacity(3);
        let mut make = |triple: &[String]| class(ctx, row.len, triple, &mut opened);
        let read = make(&args[0..3])?;
        let write = make(&args[args.len().min(6) - 3..args.len().min(6)])?;
        let flush = make(&args[args.len() - 3..])?;
        Ok(Delay {
            read,
            write,
            flush,
            argc: args.len(),
            may_delay: AtomicBool::new(true),
            release: Notify::default(),
        })
    }

    pub(crate) fn table_params(&self) -> String {
        let class = |c: &Class| format!("{} {}", c.map.table_params(), c.delay_ms);
        let mut s = class(&self.read);
        if self.argc >= 6 {
            s.push(' ');
            s.push_str(&class(&self.write));
        }
        if self.argc >= 9 {
            s.push(' ');
            s.push_str(&class(&self.flush));
        }
        s
    }

    pub(crate) fn status(&self) -> String {
        let held = |c: &Class| c.held.load(Ordering::Acquire);
        format!(
            "{} {} {}",
            held(&self.read),
            held(&self.write),
            held(&self.flush)
        )
    }

    pub(crate) fn ops(&self) -> OpSet {
        OpSet::STORAGE
    }

    pub(crate) fn deps(&self) -> Vec<Dep> {
        [&self.read, &self.write, &self.flush]
            .iter()
            .map(|c| c.map.backing.dep())
            .collect()
    }

    pub(crate) fn limits(&self) -> TargetLimits {
        [&self.read, &self.write, &self.flush]
            .iter()
            .fold(TargetLimits::default(), |acc, c| {
                acc.combine(c.map.backing.limits())
            })
    }

    pub(crate) fn presuspend(&self) {
        // Order matters: a request that reads `may_delay` after this store does not wait; one
        // that read it before took its generation earlier still, so the bump below wakes it.
        self.may_delay.store(false, Ordering::SeqCst);
        self.release.notify_all();
    }

    pub(crate) fn resume(&self) {
        self.may_delay.store(true, Ordering::SeqCst);
    }

    /// What reads see: the read class's device. Not delayed: allocation is metadata, no IO.
    pub(crate) fn allocation(&self, offset_bytes: u64, max_len_bytes: u64) -> Allocation {
        self.read.map.allocation(offset_bytes, max_len_bytes)
    }

    pub(crate) async fn io(&self, rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> IoResult {
        let class = match io.op {
            IoOp::Read => &self.read,
            IoOp::Flush => &self.flush,
            _ => &self.write,
        };
        if class.delay_ms > 0 && self.may_delay.load(Ordering::SeqCst) {
            class.held.fetch_add(1, Ordering::AcqRel);
            let _held = Held(&class.held);
            let seen = self.release.generation();
            if self.may_delay.load(Ordering::SeqCst) {
                let delay = Duration::from_millis(u64::from(class.delay_ms));
                sleep_unless_released(rt.sleep(delay), &self.release, seen).await;
            }
        }
        class.map.io(rt, io, buf).await
    }
}

/// Waits for `sleep`, or until `release` moves past generation `seen`, whichever is first.
async fn sleep_unless_released(sleep: impl Future<Output = ()>, release: &Notify, seen: u64) {
    let mut sleep = pin!(sleep);
    let mut released = pin!(release.wait(seen));
    poll_fn(|cx| {
        if released.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        sleep.as_mut().poll(cx)
    })
    .await;
}

fn class(
    ctx: &TargetContext,
    len: u64,
    triple: &[String],
    opened: &mut Vec<Arc<Backing>>,
) -> Result<Class, TableError> {
    let [path, start, delay] = triple else {
        return Err(target_error(NAME, "Requires exactly 3, 6 or 9 arguments"));
    };
    let start = parse_u64(start)
        .ok_or_else(|| target_error(NAME, format!("Invalid device sector '{start}'")))?;
    let delay_ms =
        parse_u32(delay).ok_or_else(|| target_error(NAME, format!("Invalid delay '{delay}'")))?;
    let backing = match opened.iter().find(|b| b.dep().path == *path) {
        Some(b) => b.clone(),
        None => {
            let b = Backing::open(ctx, path)
                .map_err(|e| target_error(NAME, format!("Device lookup failed: {e}")))?;
            opened.push(b.clone());
            b
        }
    };
    backing
        .check_area(start, len)
        .map_err(|e| target_error(NAME, e))?;
    Ok(Class {
        map: Mapping { backing, start },
        delay_ms,
        held: AtomicU32::new(0),
    })
}
