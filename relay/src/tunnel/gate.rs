//! Who may be the device VM's VMM: the peer of a frontend connection is checked
//! against the frontend allow-list before anything it sends reaches the relay.
//!
//! The vhost-user library accepts frontend connections itself and keeps the
//! connection to itself, so the relay cannot check the peer before the library starts
//! reading it. Instead:
//!
//! - [`accepted_peer`] finds the connection the library just accepted among the
//!   process's descriptors and reads its peer's credentials (SO_PEERCRED);
//! - a [`Gate`] per connection holds back every callback of the backend that reaches
//!   the relay (guest memory, the backend channel, queue events) until the verdict is
//!   in. A refused peer is shut down having reached nothing but the library's own
//!   message parsing, which any connection reaches.

use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::access::{peer_cred_of, PeerCred};

const PENDING: u8 = 0;
const ALLOWED: u8 = 1;
const REFUSED: u8 = 2;

/// Longest a callback waits for the verdict (it comes microseconds after the accept;
/// this only bounds a bug).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(10);

/// The verdict on one frontend connection, awaited by the backend's callbacks.
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU8,
    lock: Mutex<()>,
    decided: Condvar,
}

impl Gate {
    /// Records the verdict and wakes the callbacks waiting for it.
    pub fn decide(&self, allowed: bool) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.state
            .store(if allowed { ALLOWED } else { REFUSED }, Ordering::Release);
        self.decided.notify_all();
    }

    /// Whether the connection may reach the relay: waits for the verdict (at most
    /// [`VERDICT_TIMEOUT`], then no).
    pub fn passes(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            ALLOWED => return true,
            REFUSED => return false,
            _ => {}
        }
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (_guard, _) = self
            .decided
            .wait_timeout_while(guard, VERDICT_TIMEOUT, |_| {
                self.state.load(Ordering::Acquire) == PENDING
            })
            .unwrap_or_else(|p| p.into_inner());
        self.state.load(Ordering::Acquire) == ALLOWED
    }
}

/// The local address of socket `fd` if it is a UNIX socket bound to a path.
fn local_path(fd: RawFd) -> Option<Vec<u8>> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, owned here (a
    // descriptor that is not a socket, or closed meanwhile, is an error).
    let rc = unsafe {
        libc::getsockname(
            fd,
            &mut addr as *mut libc::sockaddr_un as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let n = (len as usize)
        .saturating_sub(std::mem::size_of::<libc::sa_family_t>())
        .min(addr.sun_path.len());
    let bytes: Vec<u8> = addr.sun_path[..n].iter().map(|&c| c as u8).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| bytes[..end].to_vec())
}

/// Whether socket `fd` listens.
fn is_listening(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, owned here.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && v != 0
}

/// The credentials of the peer of the frontend connection that the vhost-user library
/// accepted on `path` (whose listening socket is `listener`).
///
/// The relay looks among its own descriptors (`/proc/self/fd`) for connected, not
/// listening, UNIX sockets whose local address is `path`: only the connections
/// accepted on the frontend socket have it. The library accepts one connection at a
/// time and keeps it and a duplicate, so every match is that connection. No match, or
/// matches with different peers, is an error (the caller refuses the peer).
pub fn accepted_peer(path: &Path, listener: RawFd) -> std::io::Result<PeerCred> {
    let want = path.as_os_str().as_bytes();
    let mut found: Option<PeerCred> = None;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd == listener || local_path(fd).as_deref() != Some(want) || is_listening(fd) {
            continue;
        }
        let cred = peer_cred_of(fd)?;
        match found {
            Some(f) if f != cred => {
                return Err(std::io::Error::other(format!(
                    "two connections on the frontend socket, from {f} and {cred}"
                )))
            }
            _ => found = Some(cred),
        }
    }
    found.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the accepted connection is not among the relay's descriptors",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Arc;

    /// Callbacks wait for the verdict; once it is in they pass or not at once.
    #[test]
    fn gate_waits_for_the_verdict() {
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.passes());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "passed before the verdict");
        gate.decide(true);
        assert!(waiter.join().unwrap());
        assert!(gate.passes());
        let refused = Gate::default();
        refused.decide(false);
        assert!(!refused.passes());
    }

    /// The connection accepted on a listener is found by its path among the process's
    /// descriptors, with this process as its peer; the listener itself and
    /// connections on other paths are not taken for it; with none accepted, an error.
    #[test]
    fn finds_the_accepted_connection() {
        let dir = std::env::temp_dir().join(format!("vfu-gate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("frontend.sock");
        let other = dir.join("other.sock");
        let l = UnixListener::bind(&path).unwrap();
        let lo = UnixListener::bind(&other).unwrap();
        assert!(accepted_peer(&path, l.as_raw_fd()).is_err());
        let _c = UnixStream::connect(&path).unwrap();
        let _co = UnixStream::connect(&other).unwrap();
        let (_s, _) = l.accept().unwrap();
        let (_so, _) = lo.accept().unwrap();
        let cred = accepted_peer(&path, l.as_raw_fd()).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
