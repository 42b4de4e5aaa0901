//! Creating the relay's listening sockets: a socket file left behind by a relay that
//! died is replaced, a live socket or any other kind of file never is.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Makes room for a socket at `path`: nothing there, or a stale socket (nobody
/// accepts on it), which is removed. A live socket or a file of another type is an
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
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on it",
        ));
    }
    std::fs::remove_file(path)
}

/// Listens on `path` (a device socket), non-blocking, replacing a stale socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    clear_stale(path)?;
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Listens on `path` with mode 0600 from the start (the socket is chmod-ed between
/// bind and listen, so nobody else can ever connect), non-blocking, replacing a stale
/// socket.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
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
    // SAFETY: bind(2) on our socket with a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let listen = || -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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
        assert!(bind(&f).is_err());
        assert!(bind_private(&f).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
        assert!(bind_private(&d.join("x".repeat(200))).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
