//! The FUSE kernel ABI this export speaks, hand-written from `include/uapi/linux/fuse.h`
//! (protocol 7.38, Linux 6.1, plus the flags2 bits of later kernels that we negotiate).
//!
//! Every wire struct is `#[repr(C)]` with its size and every field offset asserted at compile
//! time, and is converted to and from bytes field by field (native endian, as the kernel writes
//! them) with [`Wire::decode`] and [`Wire::encode`]: no `transmute`, no pointer casts, and a
//! short slice is a `None`, never a panic.
#![allow(missing_docs)] // The names are the kernel's; their documentation is fuse.h.

/// The protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version we implement. The kernel uses the smaller of its own and ours.
pub const KERNEL_MINOR_VERSION: u32 = 38;
/// The oldest minor version we accept: 7.12 (Linux 2.6.29) fixed the sizes of every struct we
/// read, so older kernels would need compat layouts that no supported kernel sends.
pub const KERNEL_MINOR_MIN: u32 = 12;
/// The root node; for a single-file filesystem, the file itself.
pub const ROOT_ID: u64 = 1;
/// A read of `/dev/fuse` must offer at least this many bytes.
pub const MIN_READ_BUFFER: usize = 8192;

/// Opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `FUSE_INIT` flags; bits 32 and up travel in `flags2`.
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `fuse_setattr_in.valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
}

/// `fuse_write_in.write_flags`.
pub mod write_flags {
    /// The write comes from the page cache (writeback), not from a `write(2)` call.
    pub const CACHE: u32 = 1 << 0;
}

/// `fallocate(2)` modes (`linux/falloc.h`).
pub mod falloc {
    pub const KEEP_SIZE: u32 = 0x01;
    pub const PUNCH_HOLE: u32 = 0x02;
    pub const NO_HIDE_STALE: u32 = 0x04;
    pub const COLLAPSE_RANGE: u32 = 0x08;
    pub const ZERO_RANGE: u32 = 0x10;
    pub const INSERT_RANGE: u32 = 0x20;
    pub const UNSHARE_RANGE: u32 = 0x40;
}

/// One field of a wire struct: a fixed number of native-endian bytes.
pub trait Field: Sized + Copy {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Reads the field from exactly `SIZE` bytes.
    fn get(bytes: &[u8]) -> Self;
    /// Writes the field to exactly `SIZE` bytes.
    fn put(self, bytes: &mut [u8]);
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(bytes: &[u8]) -> $t {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_ne_bytes(raw)
            }
            fn put(self, bytes: &mut [u8]) {
                bytes.copy_from_slice(&self.to_ne_bytes());
            }
        }
    )*};
}
int_field!(u16, u32, i32, u64);

impl<T: Field + Default, const N: usize> Field for [T; N] {
    const SIZE: usize = T::SIZE * N;
    fn get(bytes: &[u8]) -> [T; N] {
        let mut out = [T::default(); N];
        for (i, item) in out.iter_mut().enumerate() {
            *item = T::get(&bytes[i * T::SIZE..(i + 1) * T::SIZE]);
        }
        out
    }
    fn put(self, bytes: &mut [u8]) {
        for (i, item) in self.into_iter().enumerate() {
            item.put(&mut bytes[i * T::SIZE..(i + 1) * T::SIZE]);
        }
    }
}

/// A struct that crosses `/dev/fuse`.
pub trait Wire: Sized {
    /// Encoded size, equal to `size_of::<Self>()` (asserted per struct).
    const SIZE: usize;
    /// Reads the struct from the front of `bytes`; `None` if `bytes` is too short.
    fn decode(bytes: &[u8]) -> Option<Self>;
    /// Writes the struct to the front of `out`; `None` if `out` is too short.
    fn encode(&self, out: &mut [u8]) -> Option<()>;
}

/// Declares a `#[repr(C)]` wire struct, asserts its size and every field's offset, and
/// implements [`Wire`] by reading each field at its `offset_of!` position, so the byte layout
/// and the Rust layout cannot drift apart.
macro_rules! wire {
    ($(#[$m:meta])* $name:ident = $size:expr; { $($field:ident: $t:ty = $off:expr),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $(pub $field: $t),* }

        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        $(const _: () = assert!(std::mem::offset_of!($name, $field) == $off);)*
        $(const _: () = assert!(<$t as Field>::SIZE == std::mem::size_of::<$t>());)*

        impl Wire for $name {
            const SIZE: usize = $size;
            fn decode(bytes: &[u8]) -> Option<$name> {
                let bytes = bytes.get(..$size)?;
                Some($name { $($field: <$t as Field>::get(
                    &bytes[$off..$off + <$t as Field>::SIZE])),* })
            }
            fn encode(&self, out: &mut [u8]) -> Option<()> {
                let out = out.get_mut(..$size)?;
                $(self.$field.put(&mut out[$off..$off + <$t as Field>::SIZE]);)*
                Some(())
            }
        }
    };
}

wire!(InHeader = 40; {
    len: u32 = 0, opcode: u32 = 4, unique: u64 = 8, nodeid: u64 = 16, uid: u32 = 24,
    gid: u32 = 28, pid: u32 = 32, total_extlen: u16 = 36, padding: u16 = 38,
});
wire!(OutHeader = 16; { len: u32 = 0, error: i32 = 4, unique: u64 = 8 });
wire!(
    /// The first 16 bytes of `fuse_init_in`, all that kernels before 7.36 send.
    InitInCompat = 16; { major: u32 = 0, minor: u32 = 4, max_readahead: u32 = 8, flags: u32 = 12 }
);
wire!(InitIn = 64; {
    major: u32 = 0, minor: u32 = 4, max_readahead: u32 = 8, flags: u32 = 12, flags2: u32 = 16,
    unused: [u32; 11] = 20,
});
wire!(InitOut = 64; {
    major: u32 = 0, minor: u32 = 4, max_readahead: u32 = 8, flags: u32 = 12,
    max_background: u16 = 16, congestion_threshold: u16 = 18, max_write: u32 = 20,
    time_gran: u32 = 24, max_pages: u16 = 28, map_alignment: u16 = 30, flags2: u32 = 32,
    unused: [u32; 7] = 36,
});
wire!(Attr = 88; {
    ino: u64 = 0, size: u64 = 8, blocks: u64 = 16, atime: u64 = 24, mtime: u64 = 32,
    ctime: u64 = 40, atimensec: u32 = 48, mtimensec: u32 = 52, ctimensec: u32 = 56,
    mode: u32 = 60, nlink: u32 = 64, uid: u32 = 68, gid: u32 = 72, rdev: u32 = 76,
    blksize: u32 = 80, flags: u32 = 84,
});
wire!(GetattrIn = 16; { getattr_flags: u32 = 0, dummy: u32 = 4, fh: u64 = 8 });
wire!(SetattrIn = 88; {
    valid: u32 = 0, padding: u32 = 4, fh: u64 = 8, size: u64 = 16, lock_owner: u64 = 24,
    atime: u64 = 32, mtime: u64 = 40, ctime: u64 = 48, atimensec: u32 = 56,
    mtimensec: u32 = 60, ctimensec: u32 = 64, mode: u32 = 68, unused4: u32 = 72, uid: u32 = 76,
    gid: u32 = 80, unused5: u32 = 84,
});
wire!(OpenIn = 8; { flags: u32 = 0, open_flags: u32 = 4 });
wire!(OpenOut = 16; { fh: u64 = 0, open_flags: u32 = 8, padding: u32 = 12 });
wire!(ReleaseIn = 24; { fh: u64 = 0, flags: u32 = 8, release_flags: u32 = 12, lock_owner: u64 = 16 });
wire!(FlushIn = 24; { fh: u64 = 0, unused: u32 = 8, padding: u32 = 12, lock_owner: u64 = 16 });
wire!(ReadIn = 40; {
    fh: u64 = 0, offset: u64 = 8, size: u32 = 16, read_flags: u32 = 20, lock_owner: u64 = 24,
    flags: u32 = 32, padding: u32 = 36,
});
wire!(WriteIn = 40; {
    fh: u64 = 0, offset: u64 = 8, size: u32 = 16, write_flags: u32 = 20, lock_owner: u64 = 24,
    flags: u32 = 32, padding: u32 = 36,
});
wire!(WriteOut = 8; { size: u32 = 0, padding: u32 = 4 });
wire!(Kstatfs = 80; {
    blocks: u64 = 0, bfree: u64 = 8, bavail: u64 = 16, files: u64 = 24, ffree: u64 = 32,
    bsize: u32 = 40, namelen: u32 = 44, frsize: u32 = 48, padding: u32 = 52,
    spare: [u32; 6] = 56,
});
wire!(AttrOut = 104; {
    attr_valid: u64 = 0, attr_valid_nsec: u32 = 8, dummy: u32 = 12, attr: AttrField = 16,
});
wire!(FsyncIn = 16; { fh: u64 = 0, fsync_flags: u32 = 8, padding: u32 = 12 });
wire!(AccessIn = 8; { mask: u32 = 0, padding: u32 = 4 });
wire!(InterruptIn = 8; { unique: u64 = 0 });
wire!(ForgetIn = 8; { nlookup: u64 = 0 });
wire!(BatchForgetIn = 8; { count: u32 = 0, dummy: u32 = 4 });
wire!(ForgetOne = 16; { nodeid: u64 = 0, nlookup: u64 = 8 });
wire!(FallocateIn = 32; { fh: u64 = 0, offset: u64 = 8, length: u64 = 16, mode: u32 = 24, padding: u32 = 28 });
wire!(LseekIn = 24; { fh: u64 = 0, offset: u64 = 8, whence: u32 = 16, padding: u32 = 20 });
wire!(LseekOut = 8; { offset: u64 = 0 });

/// [`Attr`] as a field of [`AttrOut`]: a newtype so that it can implement [`Field`].
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttrField(pub Attr);

impl Field for AttrField {
    const SIZE: usize = Attr::SIZE;
    fn get(bytes: &[u8]) -> AttrField {
        // `bytes` is exactly SIZE long (the macro slices it), so decode cannot fail; the
        // default is unreachable but keeps this function panic-free.
        AttrField(Attr::decode(bytes).unwrap_or_default())
    }
    fn put(self, bytes: &mut [u8]) {
        let _ = self.0.encode(bytes);
    }
}

/// `fuse_statfs_out` is a bare `fuse_kstatfs`.
pub type StatfsOut = Kstatfs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let h = InHeader {
            len: 80,
            opcode: opcode::WRITE,
            unique: 0x1122334455667788,
            nodeid: 1,
            uid: 7,
            gid: 8,
            pid: 9,
            total_extlen: 0,
            padding: 0,
        };
        let mut buf = [0u8; 40];
        h.encode(&mut buf).unwrap();
        assert_eq!(InHeader::decode(&buf), Some(h));
        assert_eq!(u32::from_ne_bytes(buf[4..8].try_into().unwrap()), 16);
        assert_eq!(InHeader::decode(&buf[..39]), None);
        assert_eq!(h.encode(&mut [0u8; 39]), None);
    }

    #[test]
    fn nested_attr_and_arrays() {
        let out = AttrOut {
            attr_valid: 1,
            attr: AttrField(Attr {
                size: 4096,
                mode: 0o100600,
                blksize: 4096,
                ..Attr::default()
            }),
            ..AttrOut::default()
        };
        let mut buf = [0u8; 104];
        out.encode(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf[24..32].try_into().unwrap()), 4096);
        assert_eq!(AttrOut::decode(&buf), Some(out));
        let init = InitOut {
            unused: [3; 7],
            ..InitOut::default()
        };
        let mut buf = [0u8; 64];
        init.encode(&mut buf).unwrap();
        assert_eq!(InitOut::decode(&buf).unwrap().unused, [3; 7]);
    }
}
