//! The `user` target: [`UserTarget`] and what the control plane gives it, [`UserTargetContext`].

use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use userdm_io::limits::QUEUE_DEPTH_DEFAULT;
use userdm_io::{Errno, IoHeader, IoOp, IoResult, OpSet};
use userdm_table::{RowSpec, TableError, Target, TargetType};
use userdm_uring::Reactor;

use crate::endpoint::{self, Endpoint, EndpointConfig};
use crate::params::UserParams;
use crate::shared::{Policy, Shared};
use crate::sys;
use crate::wire::DmUserMessage;

/// The operations a `user` row serves: what the Android kernel's dm-user passes to its daemon.
pub const USER_OPS: OpSet = OpSet::STORAGE.with(IoOp::SecureErase);

/// What `user` rows need from the control plane. Table options (`owner=`, `mode=`,
/// `queue_depth=`) override the defaults given here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserTargetContext {
    /// The endpoint directory; `None` uses `$USERDM_DMUSER_DIR`, else `/dev/dm-user`.
    pub dir: Option<PathBuf>,
    /// The endpoints' default owner `(uid, gid)`; `None` is userdm's own user and group.
    pub owner: Option<(u32, u32)>,
    /// The endpoints' default mode (0600 or 0660); `None` is 0600.
    pub mode: Option<u32>,
    /// The default number of requests one endpoint holds; `None` is 128, as dm-user's
    /// `MAX_OUTSTANDING_MESSAGES`.
    pub queue_depth: Option<u16>,
    /// The device the table belongs to. With it, an endpoint used by one device is refused to
    /// another (two devices on one endpoint would send the daemon clashing sectors); rows of the
    /// old and new tables of one device share it across a reload.
    pub device: Option<String>,
}

impl UserTargetContext {
    /// Every default.
    pub fn new() -> UserTargetContext {
        UserTargetContext::default()
    }

    /// Sets the endpoint directory.
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> UserTargetContext {
        self.dir = Some(dir.into());
        self
    }

    /// Sets the default owner.
    pub fn with_owner(mut self, uid: u32, gid: u32) -> UserTargetContext {
        self.owner = Some((uid, gid));
        self
    }

    /// Sets the default mode.
    pub fn with_mode(mut self, mode: u32) -> UserTargetContext {
        self.mode = Some(mode);
        self
    }

    /// Sets the default queue depth.
    pub fn with_queue_depth(mut self, depth: u16) -> UserTargetContext {
        self.queue_depth = Some(depth);
        self
    }

    /// Sets the device name.
    pub fn with_device(mut self, name: impl Into<String>) -> UserTargetContext {
        self.device = Some(name.into());
        self
    }
}

/// A `user` row: its requests go, as dm-user messages, to the daemons connected to its control
/// endpoint.
pub struct UserTarget {
    params: UserParams,
    endpoint: Arc<Endpoint>,
    policy: Policy,
    row_start: u64,
}

impl std::fmt::Debug for UserTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTarget")
            .field("params", &self.params)
            .field("path", &self.endpoint.config.path)
            .finish()
    }
}

static NEXT_TARGET_ID: AtomicU64 = AtomicU64::new(1);

impl UserTarget {
    /// The row's parameters.
    pub fn params(&self) -> &UserParams {
        &self.params
    }

    /// The control endpoint's path.
    pub fn endpoint_path(&self) -> &std::path::Path {
        &self.endpoint.config.path
    }

    /// Daemons connected right now.
    pub fn channels(&self) -> usize {
        self.endpoint.shared.counts().0
    }

    fn shared(&self) -> &Shared {
        &self.endpoint.shared
    }
}

fn target_error(problem: String) -> TableError {
    TableError::Target {
        line: 0,
        target: "user".to_string(),
        problem,
    }
}

impl Target for UserTarget {
    type Context = UserTargetContext;

    fn types() -> &'static [TargetType] {
        &[TargetType {
            name: "user",
            version: [1, 0, 0],
        }]
    }

    fn construct(ctx: &UserTargetContext, row: &RowSpec) -> Result<UserTarget, TableError> {
        if row.target_type != "user" {
            return Err(TableError::UnknownTarget {
                line: 0,
                target: row.target_type.clone(),
            });
        }
        let params = UserParams::parse(&row.args())?;
        let (uid, gid) = params
            .owner
            .or(ctx.owner)
            .unwrap_or_else(sys::effective_ids);
        let mode = params.mode.or(ctx.mode).unwrap_or(0o600);
        let depth = params
            .queue_depth
            .or(ctx.queue_depth)
            .unwrap_or(QUEUE_DEPTH_DEFAULT);
        let dir = endpoint::endpoint_dir(ctx.dir.as_deref());
        let config = EndpointConfig {
            path: endpoint::socket_path(&dir, &params.ctl),
            ctl: params.ctl.clone(),
            uid,
            gid,
            mode,
            depth: usize::from(depth),
            device: ctx.device.clone(),
        };
        let endpoint = endpoint::open(config).map_err(target_error)?;
        let policy = Policy {
            target: NEXT_TARGET_ID.fetch_add(1, Ordering::Relaxed),
            on_close: params.on_close,
            timeout: params.timeout,
        };
        Ok(UserTarget {
            params,
            endpoint,
            policy,
            row_start: row.start,
        })
    }

    fn type_name(&self) -> &'static str {
        "user"
    }

    fn ops(&self) -> OpSet {
        USER_OPS
    }

    fn table_params(&self) -> String {
        self.params.to_table_params()
    }

    fn status(&self) -> String {
        let shared = self.shared();
        let (channels, queued, in_flight) = shared.counts();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} channels={channels} queued={queued} in_flight={in_flight} requeued={} \
             timed_out={} protocol_errors={} refused={}",
            self.params.ctl,
            get(&shared.stats.requeued),
            get(&shared.stats.timed_out),
            get(&shared.stats.protocol_errors),
            get(&shared.stats.refused),
        )
    }

    fn presuspend(&self, noflush: bool) {
        if noflush {
            self.shared().suspend_target(self.policy.target);
        }
    }

    fn resume(&self) {
        self.shared().resume_target(self.policy.target);
    }

    fn io(&self, _rt: &Reactor, io: IoHeader, buf: &mut [u8]) -> impl Future<Output = IoResult> {
        UserIo {
            target: self,
            io,
            buf: buf.as_mut_ptr(),
            buf_len: buf.len(),
            state: State::Start,
            _buf: PhantomData,
        }
    }
}

impl Drop for UserTarget {
    fn drop(&mut self) {
        self.shared().resume_target(self.policy.target);
    }
}

enum State {
    Start,
    Acquiring(Pin<Box<dyn Future<Output = Result<u32, Errno>> + Send>>),
    Submitted(u32),
    Finished,
}

/// One request on its way to a daemon. Dropping it before it finishes cancels the request: a
/// queued request is taken back, one a daemon holds is answered into nothing, and the caller's
/// buffer is never touched after the drop returns.
struct UserIo<'a> {
    target: &'a UserTarget,
    io: IoHeader,
    buf: *mut u8,
    buf_len: usize,
    state: State,
    _buf: PhantomData<&'a mut [u8]>,
}

impl UserIo<'_> {
    fn message(&self) -> Result<DmUserMessage, Errno> {
        let kind = self.io.op.to_dm_user().ok_or(Errno::EOPNOTSUPP)?;
        if !USER_OPS.contains(self.io.op) {
            return Err(Errno::EOPNOTSUPP);
        }
        let data = self.io.op.carries_write_data() || self.io.op.returns_data();
        let want = if data { self.io.len_bytes } else { 0 };
        if self.buf_len as u64 != want {
            return Err(Errno::EINVAL);
        }
        // dm-user reports device-relative sectors; FLUSH has no range and reports 0.
        let sector = if self.io.op.has_range() {
            self.target
                .row_start
                .checked_add(self.io.sector)
                .ok_or(Errno::EOVERFLOW)?
        } else {
            0
        };
        Ok(DmUserMessage {
            seq: 0,
            kind,
            flags: self.io.flags.bits(),
            sector,
            len: self.io.len_bytes,
        })
    }
}

impl Future for UserIo<'_> {
    type Output = IoResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult> {
        // UserIo is Unpin: it holds no self-references.
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Start => {
                    if let Err(e) = this.message() {
                        this.state = State::Finished;
                        return Poll::Ready(Err(e.into()));
                    }
                    let shared = Arc::clone(&this.target.endpoint.shared);
                    // Only reached when every slot is taken; the common case returns at once
                    // below without keeping the box.
                    if let Some(slot) = shared.try_acquire() {
                        if let Some(done) = this.submit(slot, cx) {
                            return Poll::Ready(done);
                        }
                        continue;
                    }
                    this.state = State::Acquiring(Box::pin(async move { shared.acquire().await }));
                }
                State::Acquiring(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        this.state = State::Finished;
                        return Poll::Ready(Err(e.into()));
                    }
                    Poll::Ready(Ok(slot)) => {
                        if let Some(done) = this.submit(slot, cx) {
                            return Poll::Ready(done);
                        }
                    }
                },
                State::Submitted(slot) => {
                    let slot = *slot;
                    let res = this.target.shared().poll(slot, cx);
                    if res.is_ready() {
                        this.state = State::Finished;
                    }
                    return res;
                }
                State::Finished => return Poll::Ready(Err(Errno::EIO.into())),
            }
        }
    }
}

impl UserIo<'_> {
    /// Queues the request in `slot`; returns the result if it ended at once.
    fn submit(&mut self, slot: u32, cx: &mut Context<'_>) -> Option<IoResult> {
        let msg = match self.message() {
            Ok(m) => m,
            Err(e) => {
                self.target.shared().release_unused(slot);
                self.state = State::Finished;
                return Some(Err(e.into()));
            }
        };
        let res = self.target.shared().submit(
            slot,
            msg,
            self.buf,
            self.buf_len,
            self.target.policy,
            cx.waker(),
        );
        match res {
            Ok(()) => {
                self.state = State::Submitted(slot);
                None
            }
            Err(e) => {
                self.state = State::Finished;
                Some(Err(e))
            }
        }
    }
}

impl Drop for UserIo<'_> {
    fn drop(&mut self) {
        if let State::Submitted(slot) = self.state {
            self.target.shared().cancel(slot);
        }
    }
}
