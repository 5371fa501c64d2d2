//! Checking and preparing the path a file is exported at.

use std::fs::{Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::export::FuseError;

pub(crate) struct Prepared {
    /// The canonical path: what mountinfo shows, and what we unmount.
    pub(crate) path: PathBuf,
    /// Whether we created the file (and so remove it again at stop).
    pub(crate) created: bool,
    /// The underlying file's metadata: its mode, owner and times become the export's.
    pub(crate) meta: Metadata,
}

/// Makes sure `path` is a regular file nothing is mounted on, creating it if it is missing.
pub(crate) fn prepare(path: &Path) -> Result<Prepared, FuseError> {
    let inspect = |source: io::Error| FuseError::Inspect {
        path: path.to_path_buf(),
        source,
    };
    let mut created = false;
    match std::fs::metadata(path) {
        Ok(meta) => check_type(path, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| FuseError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
            created = true;
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(FuseError::StaleMount(path.to_path_buf()));
        }
        Err(e) => return Err(inspect(e)),
    }
    let undo = |e: FuseError| {
        if created {
            let _ = std::fs::remove_file(path);
        }
        e
    };
    let canonical = path.canonicalize().map_err(inspect).map_err(undo)?;
    let meta = std::fs::metadata(&canonical)
        .map_err(inspect)
        .map_err(undo)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(inspect)
        .map_err(undo)?;
    if is_mount_point(&mountinfo, &canonical) {
        return Err(undo(FuseError::AlreadyMounted(canonical)));
    }
    Ok(Prepared {
        path: canonical,
        created,
        meta,
    })
}

fn check_type(path: &Path, meta: &Metadata) -> Result<(), FuseError> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    if ft.is_dir() {
        return Err(FuseError::IsDirectory(path.to_path_buf()));
    }
    let kind = if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(FuseError::NotRegularFile {
        path: path.to_path_buf(),
        kind,
    })
}

/// Whether `path` is the mount point of some line of `/proc/self/mountinfo` (field 5, with
/// spaces, tabs, newlines and backslashes escaped as octal).
pub(crate) fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_matches(field.as_bytes(), want))
}

fn unescape_matches(field: &[u8], want: &[u8]) -> bool {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        let info = "22 1 0:21 / / rw - ext4 /dev/sda rw\n\
                    90 22 0:50 / /tmp/a\\040b rw - fuse.userdm userdm rw\n";
        assert!(is_mount_point(info, Path::new("/tmp/a b")));
        assert!(is_mount_point(info, Path::new("/")));
        assert!(!is_mount_point(info, Path::new("/tmp/a")));
        assert!(!is_mount_point("short line\n", Path::new("/")));
        assert!(!is_mount_point("1 2 3 4 /x\\04", Path::new("/x")));
    }
}
