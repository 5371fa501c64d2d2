//! Safe views of what the kernel reports: feature masks and device information.

use std::fmt;

use userdm_ublk_sys as sys;

/// A set of `UBLK_F_*` flags: what the driver offers (GET_FEATURES) or what a device was created
/// with (its negotiated flags).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(u64);

impl Features {
    /// Wraps raw flag bits.
    pub const fn from_bits(bits: u64) -> Features {
        Features(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `flag` is set.
    pub const fn contains(self, flag: u64) -> bool {
        self.0 & flag == flag
    }

    /// The kernel names of the set flags, in bit order; unknown bits come last as hex.
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> = sys::UBLK_F_NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| (*name).to_string())
            .collect();
        let known = sys::UBLK_F_NAMES
            .iter()
            .fold(0, |acc, (flag, _)| acc | flag);
        let unknown = self.0 & !known;
        if unknown != 0 {
            names.push(format!("{unknown:#x}"));
        }
        names
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x}: {})", self.0, self.names().join("|"))
    }
}

/// One optional feature: its flag, what it does, and the first kernel with it. Used for error
/// messages and for `userdm features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    /// The flag bit.
    pub flag: u64,
    /// The kernel's name.
    pub name: &'static str,
    /// What it does.
    pub what: &'static str,
    /// The first release with it.
    pub since: &'static str,
}

/// What each flag means and since when the kernel has it.
pub const FEATURE_INFO: [FeatureInfo; 20] = [
    fi(
        sys::UBLK_F_SUPPORT_ZERO_COPY,
        "zero copy by buffer registration",
        "6.15",
    ),
    fi(
        sys::UBLK_F_URING_CMD_COMP_IN_TASK,
        "completion in task work",
        "6.0",
    ),
    fi(
        sys::UBLK_F_NEED_GET_DATA,
        "two-step writes (NEED_GET_DATA)",
        "6.0",
    ),
    fi(sys::UBLK_F_USER_RECOVERY, "user recovery", "6.1"),
    fi(
        sys::UBLK_F_USER_RECOVERY_REISSUE,
        "reissue of IO on recovery",
        "6.1",
    ),
    fi(sys::UBLK_F_UNPRIVILEGED_DEV, "unprivileged devices", "6.3"),
    fi(
        sys::UBLK_F_CMD_IOCTL_ENCODE,
        "ioctl-encoded commands",
        "6.4",
    ),
    fi(sys::UBLK_F_USER_COPY, "user copy", "6.5"),
    fi(sys::UBLK_F_ZONED, "zoned devices", "6.6"),
    fi(
        sys::UBLK_F_USER_RECOVERY_FAIL_IO,
        "failing IO while recovering",
        "6.13",
    ),
    fi(sys::UBLK_F_UPDATE_SIZE, "resizing a live device", "6.16"),
    fi(
        sys::UBLK_F_AUTO_BUF_REG,
        "zero copy by automatic buffer registration",
        "6.16",
    ),
    fi(sys::UBLK_F_QUIESCE, "quiescing a live device", "6.16"),
    fi(sys::UBLK_F_PER_IO_DAEMON, "a daemon per IO", "6.16"),
    fi(
        sys::UBLK_F_BUF_REG_OFF_DAEMON,
        "buffer registration off the daemon",
        "6.17",
    ),
    fi(sys::UBLK_F_BATCH_IO, "batched IO commands", "7.0"),
    fi(sys::UBLK_F_INTEGRITY, "integrity metadata", "7.0"),
    fi(
        sys::UBLK_F_SAFE_STOP_DEV,
        "refusing to stop an open device (TRY_STOP_DEV)",
        "7.0",
    ),
    fi(
        sys::UBLK_F_NO_AUTO_PART_SCAN,
        "no partition scan at start",
        "7.0",
    ),
    fi(sys::UBLK_F_SHMEM_ZC, "shared-memory zero copy", "7.1"),
];

const fn fi(flag: u64, what: &'static str, since: &'static str) -> FeatureInfo {
    let mut i = 0;
    let mut name = "?";
    while i < sys::UBLK_F_NAMES.len() {
        if sys::UBLK_F_NAMES[i].0 == flag {
            name = sys::UBLK_F_NAMES[i].1;
        }
        i += 1;
    }
    FeatureInfo {
        flag,
        name,
        what,
        since,
    }
}

/// The description of one flag bit (`flag` must be a single known bit).
pub fn feature_info(flag: u64) -> Option<&'static FeatureInfo> {
    FEATURE_INFO.iter().find(|f| f.flag == flag)
}

/// The state of a ublk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevState {
    /// No disk: not started yet, or stopped.
    Dead,
    /// Serving.
    Live,
    /// The server is gone and the device waits for recovery; IO is held.
    Quiesced,
    /// The server is gone and the device waits for recovery; IO fails.
    FailIo,
    /// A state this code does not know.
    Unknown(u16),
}

impl DevState {
    /// Converts `UBLK_S_DEV_*`.
    pub const fn from_raw(state: u16) -> DevState {
        match state {
            sys::UBLK_S_DEV_DEAD => DevState::Dead,
            sys::UBLK_S_DEV_LIVE => DevState::Live,
            sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
            other => DevState::Unknown(other),
        }
    }

    /// The name `ublk list` prints.
    pub fn name(self) -> String {
        match self {
            DevState::Dead => "DEAD".into(),
            DevState::Live => "LIVE".into(),
            DevState::Quiesced => "QUIESCED".into(),
            DevState::FailIo => "FAIL_IO".into(),
            DevState::Unknown(s) => format!("UNKNOWN({s})"),
        }
    }
}

/// What the kernel knows about one ublk device (GET_DEV_INFO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevInfo {
    /// The id: N in `/dev/ublkcN` and `/dev/ublkbN`.
    pub id: u32,
    /// Hardware queues.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
    /// State.
    pub state: DevState,
    /// The serving process, if it is alive.
    pub server_pid: Option<i32>,
    /// Negotiated flags.
    pub flags: Features,
    /// Owner uid.
    pub owner_uid: u32,
    /// Owner gid.
    pub owner_gid: u32,
}

impl DevInfo {
    pub(crate) fn from_raw(raw: &sys::ublksrv_ctrl_dev_info) -> DevInfo {
        DevInfo {
            id: raw.dev_id,
            queues: raw.nr_hw_queues,
            depth: raw.queue_depth,
            max_io_bytes: raw.max_io_buf_bytes,
            state: DevState::from_raw(raw.state),
            server_pid: (raw.ublksrv_pid > 0).then_some(raw.ublksrv_pid),
            flags: Features::from_bits(raw.flags),
            owner_uid: raw.owner_uid,
            owner_gid: raw.owner_gid,
        }
    }

    /// Whether the device can outlive its server.
    pub fn recoverable(&self) -> bool {
        self.flags.contains(sys::UBLK_F_USER_RECOVERY)
    }

    /// `/dev/ublkcN`.
    pub fn char_path(&self) -> std::path::PathBuf {
        format!("/dev/ublkc{}", self.id).into()
    }

    /// `/dev/ublkbN`.
    pub fn block_path(&self) -> std::path::PathBuf {
        format!("/dev/ublkb{}", self.id).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_name_their_bits() {
        let f = Features::from_bits(0x1fe);
        assert!(f.contains(sys::UBLK_F_USER_COPY));
        assert!(!f.contains(sys::UBLK_F_SUPPORT_ZERO_COPY));
        let names = f.names();
        assert_eq!(
            names.first().map(String::as_str),
            Some("UBLK_F_URING_CMD_COMP_IN_TASK")
        );
        assert_eq!(names.last().map(String::as_str), Some("UBLK_F_ZONED"));
        assert_eq!(
            Features::from_bits(1 << 40).names(),
            vec!["0x10000000000".to_string()]
        );
    }

    #[test]
    fn feature_table_is_complete() {
        for (i, info) in FEATURE_INFO.iter().enumerate() {
            assert_eq!(info.flag, 1 << i);
            assert_ne!(info.name, "?");
        }
        assert_eq!(
            feature_info(sys::UBLK_F_USER_COPY).map(|f| f.since),
            Some("6.5")
        );
    }

    #[test]
    fn dev_info_conversion() {
        let raw = sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 128,
            state: sys::UBLK_S_DEV_QUIESCED,
            dev_id: 7,
            ublksrv_pid: -1,
            flags: sys::UBLK_F_USER_RECOVERY,
            ..Default::default()
        };
        let info = DevInfo::from_raw(&raw);
        assert_eq!(info.state, DevState::Quiesced);
        assert_eq!(info.server_pid, None);
        assert!(info.recoverable());
        assert_eq!(info.block_path(), std::path::Path::new("/dev/ublkb7"));
        assert_eq!(DevState::from_raw(9).name(), "UNKNOWN(9)");
    }
}
