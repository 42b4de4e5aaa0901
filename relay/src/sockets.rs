//! Creating the relay's listening sockets: with their mode, owner and group set before
//! they listen; a socket file left behind by a relay that died is replaced, a live
//! socket or any other kind of file never is.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Makes room for a socket at `path`: nothing there, or a stale socket (connecting to
/// it is refused: nobody listens), which is removed. A live socket or a file of another type is an
/// error that says so.
fn clear_stale(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way (not replaced)",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on it",
        )),
        // Nobody listens: stale.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        // Not allowed to connect (a socket of another user), or anything else: it may
        // be live, so it stays.
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("a socket is in the way and cannot be told live or stale: {e}"),
        )),
    }
}

/// How a listening socket's file is made: its mode, and optionally its owner and
/// group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permission bits.
    pub mode: u32,
    /// Owner to give the file (none: whoever the relay runs as).
    pub owner: Option<u32>,
    /// Group to give the file (none: the relay's, or the directory's if it is setgid).
    pub group: Option<u32>,
}

impl Perms {
    /// Mode 0600, the relay's owner and group.
    pub const PRIVATE: Perms = Perms {
        mode: 0o600,
        owner: None,
        group: None,
    };
}

/// Serializes the umask changes of [`bind_with`] (threads binding at once, in tests).
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// The process umask, set for the life of a guard and put back on drop.
struct Umask {
    old: libc::mode_t,
    _lock: MutexGuard<'static, ()>,
}

impl Umask {
    fn set(mask: libc::mode_t) -> Self {
        let lock = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask(2) cannot fail.
        let old = unsafe { libc::umask(mask) };
        Umask { old, _lock: lock }
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.old) };
    }
}

/// Listens on `path` with mode 0600 from the start, non-blocking, replacing a stale
/// socket.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    bind_with(path, Perms::PRIVATE)
}

/// Listens on `path`, non-blocking, replacing a stale socket; the socket file gets
/// `perms` before the socket listens, so nobody can ever connect to it under other
/// permissions: bind(2) creates the file with the mode already (the umask is set to
/// its complement around the call), then the owner and group are set (lchown: a link
/// put in its place is not followed), then listen(2). Until listen a connect(2) is
/// refused.
///
/// The umask is process-wide: the relay's other threads create no files.
pub fn bind_with(path: &Path, perms: Perms) -> std::io::Result<UnixListener> {
    if perms.mode > 0o777 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("mode {:#o} is more than permission bits", perms.mode),
        ));
    }
    clear_stale(path)?;
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "path must be 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let umask = Umask::set(!perms.mode & 0o777);
    // SAFETY: bind(2) on our socket with a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    let bind_error = std::io::Error::last_os_error();
    drop(umask);
    if rc != 0 {
        return Err(bind_error);
    }
    let listen = || -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if perms.owner.is_some() || perms.group.is_some() {
            std::os::unix::fs::lchown(path, perms.owner, perms.group).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give it owner {} group {}: {e}",
                        perms.owner.map_or("(unchanged)".into(), |u| u.to_string()),
                        perms.group.map_or("(unchanged)".into(), |g| g.to_string())
                    ),
                )
            })?;
        }
        let mode = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
        if mode != perms.mode {
            return Err(std::io::Error::other(format!(
                "made with mode {mode:04o} instead of {:04o}",
                perms.mode
            )));
        }
        // SAFETY: listen(2) on our bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = listen() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vfu-sockets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The private socket is mode 0600 and accepts connections; a second bind on the
    /// live path is refused; once the listener is gone (stale file) the path is taken
    /// over; a regular file in the way is never removed.
    #[test]
    fn private_socket_mode_stale_and_live() {
        let d = dir("private");
        let p = d.join("ctl");
        let l = bind_private(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(UnixStream::connect(&p).is_ok());
        let e = bind_private(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        drop(l);
        assert!(p.exists(), "the stale socket file is left behind");
        let _l = bind_private(&p).unwrap();
        assert!(UnixStream::connect(&p).is_ok());
        let f = d.join("file");
        std::fs::write(&f, b"keep me").unwrap();
        assert!(bind_private(&f).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
        assert!(bind_private(&d.join("x".repeat(200))).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The socket file has the asked mode before anyone can connect, whatever the
    /// umask; the group is set when asked; a mode beyond the permission bits or a
    /// group the process may not give is refused and leaves no file.
    #[test]
    fn modes_and_groups() {
        let d = dir("modes");
        for mode in [0o600, 0o660, 0o666, 0o640, 0o700] {
            let p = d.join(format!("s{mode:o}"));
            let _l = bind_with(
                &p,
                Perms {
                    mode,
                    owner: None,
                    group: None,
                },
            )
            .unwrap();
            let got = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode);
        }
        // SAFETY: getters cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let p = d.join("own");
        let _l = bind_with(
            &p,
            Perms {
                mode: 0o660,
                owner: Some(uid),
                group: Some(gid),
            },
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid));
        assert!(bind_with(
            &d.join("bad"),
            Perms {
                mode: 0o4755,
                owner: None,
                group: None
            }
        )
        .is_err());
        if uid != 0 {
            // Not root: a group the process is not in cannot be given.
            let p = d.join("other-group");
            let e = bind_with(
                &p,
                Perms {
                    mode: 0o660,
                    owner: None,
                    group: Some(gid.wrapping_add(12345)),
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("cannot give it"), "{e}");
            assert!(!p.exists());
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
