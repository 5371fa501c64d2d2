//! What targets need from the outside when they are built: [`TargetContext`].

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use userdm_dmuser::UserTargetContext;

/// A monotonic clock, as seconds and nanoseconds since an arbitrary start.
///
/// flakey measures its up/down cycle with it (the kernel uses `jiffies`); tests inject a
/// [`ManualClock`] so that a down interval starts exactly when they say.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since the clock's own epoch. Never goes backwards.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock ([`Instant`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        // One epoch for the whole process, so that instants taken by different targets compare.
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that moves only when told to. For tests of time-driven targets.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update with saturation: a clock that wrapped would make flakey go back up.
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}

/// Turns a `userdm:NAME` device path into something that can be opened. The control plane
/// implements it once exports of other userdm devices exist; until then such paths are refused.
pub trait DeviceResolver: Send + Sync + fmt::Debug {
    /// The path to open for the userdm device `name` (the part after `userdm:`), or why there is
    /// none.
    fn resolve(&self, name: &str) -> Result<PathBuf, String>;
}

/// Called when a target raises a table event (striped, when a stripe fails), as the kernel's
/// `dm_table_event`. The device bumps its event number and wakes `dmsetup wait`.
pub type EventHook = Arc<dyn Fn() + Send + Sync>;

/// What targets need from the outside when they are built (the `Context` of
/// [`crate::AnyTarget`]'s `Target` impl).
///
/// Built with [`TargetContext::new`] and the `with_*` methods so that fields can be added without
/// breaking callers.
#[derive(Clone)]
#[non_exhaustive]
pub struct TargetContext {
    /// The table is loaded read-only (`dmsetup load --readonly`): backing files are opened
    /// `O_RDONLY`, as the kernel's `dm_table_get_mode` opens devices without `FMODE_WRITE`.
    pub read_only: bool,
    /// Where `userdm:NAME` paths resolve; `None` refuses them.
    pub resolver: Option<Arc<dyn DeviceResolver>>,
    /// The clock of time-driven targets (flakey).
    pub clock: Arc<dyn Clock>,
    /// Raised when a target wants the device's event number bumped.
    pub event_hook: Option<EventHook>,
    /// Where `user` rows put their endpoints, who owns them, and the device they belong to.
    pub user: UserTargetContext,
    /// The device's `memory` rows, so that a reload keeps their contents; `None` makes every
    /// `memory` row a fresh disk.
    pub memory_stores: Option<Arc<crate::MemoryStores>>,
    /// Where `memory` rows keep their storage, so that it outlives the server (ublk recovery);
    /// `None` keeps it in the server's own memory.
    pub memory_dir: Option<std::path::PathBuf>,
}

impl fmt::Debug for TargetContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetContext")
            .field("read_only", &self.read_only)
            .field("resolver", &self.resolver)
            .field("clock", &self.clock)
            .field("event_hook", &self.event_hook.as_ref().map(|_| "set"))
            .field("user", &self.user)
            .field("memory_stores", &self.memory_stores.is_some())
            .field("memory_dir", &self.memory_dir)
            .finish()
    }
}

impl Default for TargetContext {
    fn default() -> TargetContext {
        TargetContext {
            read_only: false,
            resolver: None,
            clock: Arc::new(MonotonicClock),
            event_hook: None,
            user: UserTargetContext::default(),
            memory_stores: None,
            memory_dir: None,
        }
    }
}

impl TargetContext {
    /// Read-write, no resolver, the monotonic clock, no event hook.
    pub fn new() -> TargetContext {
        TargetContext::default()
    }

    /// Sets whether backing files open read-only.
    pub fn with_read_only(mut self, read_only: bool) -> TargetContext {
        self.read_only = read_only;
        self
    }

    /// Sets the resolver of `userdm:NAME` paths.
    pub fn with_resolver(mut self, resolver: Arc<dyn DeviceResolver>) -> TargetContext {
        self.resolver = Some(resolver);
        self
    }

    /// Sets the clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> TargetContext {
        self.clock = clock;
        self
    }

    /// Sets the device's memory-row registry (one per device, shared by all its table loads).
    pub fn with_memory_stores(mut self, stores: Arc<crate::MemoryStores>) -> TargetContext {
        self.memory_stores = Some(stores);
        self
    }

    /// Keeps `memory` rows' storage in files under `dir` (created if missing), which a server
    /// that takes over the device after a crash opens again.
    pub fn with_memory_dir(mut self, dir: std::path::PathBuf) -> TargetContext {
        self.memory_dir = Some(dir);
        self
    }

    /// Sets the context of `user` rows.
    pub fn with_user(mut self, user: UserTargetContext) -> TargetContext {
        self.user = user;
        self
    }

    /// Sets the event hook.
    pub fn with_event_hook(mut self, hook: EventHook) -> TargetContext {
        self.event_hook = Some(hook);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(Duration::from_secs(3));
        assert_eq!(c.now(), Duration::from_secs(3));
        c.advance(Duration::MAX);
        assert_eq!(c.now(), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let a = MonotonicClock.now();
        let b = MonotonicClock.now();
        assert!(b >= a);
    }
}
