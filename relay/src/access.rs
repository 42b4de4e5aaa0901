//! Who may connect to the relay's sockets, and the identity the relay runs under
//! (`docs/security.md`, "Who may connect").
//!
//! - [`SocketMode`], [`Uid`], [`Gid`], [`User`]: configuration values, parsed and
//!   resolved (user and group names to numbers) when the configuration is read.
//! - [`Access`]: how a listening socket's file is made (mode, group) and whose
//!   connections it accepts ([`Access::allows`], from the peer's [`PeerCred`]).
//! - [`peer_cred`]: SO_PEERCRED of a connection.
//! - [`drop_privileges`]: setgroups, setgid, setuid, and a check that root cannot be
//!   regained.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A configuration value that is not one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccessError {
    /// Not an octal mode of permission bits.
    #[error("socket mode {0:?}: expected octal permission bits such as \"0660\" (0 to 0777)")]
    BadMode(String),
    /// No such user in the user database.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// No such group in the group database.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// An id out of range or empty.
    #[error("{0:?}: not a user or group name, nor an id from 0 to 4294967294")]
    BadId(String),
    /// The user database could not be read.
    #[error("looking up {name:?}: {reason}")]
    Lookup {
        /// What was looked up.
        name: String,
        /// The system's error.
        reason: String,
    },
}

/// Permission bits of a socket file (0 to 0o777). Written as an octal string in the
/// configuration (`"0660"`, `"660"` or `"0o660"`), or as a TOML integer (`0o660`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// Owner read and write only: the default of every socket.
    pub const PRIVATE: SocketMode = SocketMode(0o600);

    /// The mode `bits`, if they are permission bits only.
    pub fn new(bits: u32) -> Result<Self, AccessError> {
        if bits > 0o777 {
            return Err(AccessError::BadMode(format!("{bits:#o}")));
        }
        Ok(Self(bits))
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> Self {
        Self::PRIVATE
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for SocketMode {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, AccessError> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        if digits.is_empty()
            || digits.len() > 4
            || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
        {
            return Err(AccessError::BadMode(s.to_string()));
        }
        let bits =
            u32::from_str_radix(digits, 8).map_err(|_| AccessError::BadMode(s.to_string()))?;
        Self::new(bits).map_err(|_| AccessError::BadMode(s.to_string()))
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NameOrNumber::deserialize(d)? {
            NameOrNumber::Name(s) => s.parse().map_err(serde::de::Error::custom),
            NameOrNumber::Number(n) => u32::try_from(n)
                .map_err(|_| AccessError::BadMode(n.to_string()))
                .and_then(SocketMode::new)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A string or an integer, as users, groups and modes may be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum NameOrNumber {
    Number(i64),
    Name(String),
}

/// A numeric id from a string: decimal digits only, below u32::MAX (-1 means "no
/// change" to chown(2)).
fn parse_id(s: &str) -> Option<Result<u32, AccessError>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match s.parse::<u32>() {
        Ok(n) if n != u32::MAX => Ok(n),
        _ => Err(AccessError::BadId(s.to_string())),
    })
}

fn id_from_number(n: i64) -> Result<u32, AccessError> {
    match u32::try_from(n) {
        Ok(n) if n != u32::MAX => Ok(n),
        _ => Err(AccessError::BadId(n.to_string())),
    }
}

/// A user id: written as a name (looked up in the user database when the
/// configuration is read) or a number (taken as it is, with or without an entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uid(pub u32);

/// A group id, written as a name or a number like [`Uid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gid(pub u32);

impl FromStr for Uid {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, AccessError> {
        match parse_id(s) {
            Some(id) => id.map(Uid),
            None => lookup_user(s)?
                .map(|(uid, _)| Uid(uid))
                .ok_or_else(|| AccessError::UnknownUser(s.to_string())),
        }
    }
}

impl FromStr for Gid {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, AccessError> {
        match parse_id(s) {
            Some(id) => id.map(Gid),
            None => lookup_group(s)?
                .map(Gid)
                .ok_or_else(|| AccessError::UnknownGroup(s.to_string())),
        }
    }
}

macro_rules! id_serde {
    ($t:ident) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u32(self.0)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                match NameOrNumber::deserialize(d)? {
                    NameOrNumber::Name(s) => s.parse().map_err(serde::de::Error::custom),
                    NameOrNumber::Number(n) => {
                        id_from_number(n).map($t).map_err(serde::de::Error::custom)
                    }
                }
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_serde!(Uid);
id_serde!(Gid);

/// The user the relay drops to (`--user`): its id and, when it has an entry in the
/// user database, its primary group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: Uid,
    /// Its primary group (none for a number without a database entry).
    pub primary_gid: Option<Gid>,
    /// As written in the configuration.
    pub name: String,
}

impl FromStr for User {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, AccessError> {
        let (uid, primary_gid) = match parse_id(s) {
            Some(id) => {
                let uid = id?;
                (uid, lookup_uid(uid)?)
            }
            None => {
                let (uid, gid) =
                    lookup_user(s)?.ok_or_else(|| AccessError::UnknownUser(s.to_string()))?;
                (uid, Some(gid))
            }
        };
        Ok(User {
            uid: Uid(uid),
            primary_gid: primary_gid.map(Gid),
            name: s.to_string(),
        })
    }
}

impl<'de> Deserialize<'de> for User {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NameOrNumber::deserialize(d)? {
            NameOrNumber::Name(s) => s.parse().map_err(serde::de::Error::custom),
            NameOrNumber::Number(n) => id_from_number(n)
                .and_then(|id| id.to_string().parse())
                .map_err(serde::de::Error::custom),
        }
    }
}

/// How a listening socket's file is made, and whose connections it accepts.
///
/// A peer may connect if its uid is 0, or the relay's own (effective) uid, or in
/// `allow_uids`, or its primary gid (as SO_PEERCRED reports it) is in `allow_gids`.
/// Root and the relay's own user are always allowed: either can stop or trace the relay
/// anyway, so refusing them would protect nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// The socket file's mode.
    #[serde(default)]
    pub mode: SocketMode,
    /// The socket file's group (none: the relay's group at the time it is made).
    #[serde(default)]
    pub group: Option<Gid>,
    /// Users allowed besides root and the relay's own.
    #[serde(default)]
    pub allow_uids: Vec<Uid>,
    /// Primary groups allowed.
    #[serde(default)]
    pub allow_gids: Vec<Gid>,
}

impl Access {
    /// Whether `peer` may connect to a socket of this access, the relay running with
    /// effective uid `own_uid`.
    pub fn allows(&self, peer: &PeerCred, own_uid: u32) -> bool {
        peer.uid == 0
            || peer.uid == own_uid
            || self.allow_uids.contains(&Uid(peer.uid))
            || self.allow_gids.contains(&Gid(peer.gid))
    }

    /// [`Access::allows`] for the relay as it runs now.
    pub fn allows_now(&self, peer: &PeerCred) -> bool {
        // SAFETY: geteuid cannot fail.
        self.allows(peer, unsafe { libc::geteuid() })
    }

    /// The allow-list in words, for logs.
    pub fn describe(&self) -> String {
        // SAFETY: geteuid cannot fail.
        let own = unsafe { libc::geteuid() };
        format!(
            "allowed: uid 0, the relay's uid {own}, uids {:?}, gids {:?}",
            self.allow_uids.iter().map(|u| u.0).collect::<Vec<_>>(),
            self.allow_gids.iter().map(|g| g.0).collect::<Vec<_>>()
        )
    }
}

/// Per-device overrides of the configured defaults (device keys in the configuration
/// file, options of `vfu-relay ctl add`); each field left out takes the default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSpec {
    /// The socket file's mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<SocketMode>,
    /// The socket file's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<Gid>,
    /// Users allowed besides root and the relay's own (replaces the default list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_uids: Option<Vec<Uid>>,
    /// Primary groups allowed (replaces the default list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_gids: Option<Vec<Gid>>,
}

impl AccessSpec {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// This spec over `default`.
    pub fn over(&self, default: &Access) -> Access {
        Access {
            mode: self.socket_mode.unwrap_or(default.mode),
            group: self.socket_group.or(default.group),
            allow_uids: self
                .allow_uids
                .clone()
                .unwrap_or_else(|| default.allow_uids.clone()),
            allow_gids: self
                .allow_gids
                .clone()
                .unwrap_or_else(|| default.allow_gids.clone()),
        }
    }
}

/// The credentials of a connection's peer, as the kernel recorded them when it
/// connected (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id (in the relay's pid namespace; 0 if not there).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

impl fmt::Display for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {} pid {}", self.uid, self.gid, self.pid)
    }
}

/// The peer credentials of the connected UNIX socket `sock`.
pub fn peer_cred(sock: &impl AsRawFd) -> std::io::Result<PeerCred> {
    peer_cred_of(sock.as_raw_fd())
}

/// [`peer_cred`] of a raw descriptor (which need not be a socket: then an error).
pub fn peer_cred_of(fd: RawFd) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred owned here,
    // and stores the length written in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(std::io::Error::other("SO_PEERCRED: short answer"));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// An answer of the user database: `Ok(None)` for "no such entry", which some C
/// libraries say with an errno.
fn found<T>(name: &str, answer: nix::Result<Option<T>>) -> Result<Option<T>, AccessError> {
    use nix::errno::Errno;
    match answer {
        Ok(entry) => Ok(entry),
        Err(Errno::ENOENT | Errno::ESRCH | Errno::EBADF | Errno::EPERM) => Ok(None),
        Err(e) => Err(AccessError::Lookup {
            name: name.to_string(),
            reason: e.desc().to_string(),
        }),
    }
}

/// The uid and primary gid of user `name`, if it exists.
pub fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, AccessError> {
    if name.contains('\0') {
        return Err(AccessError::UnknownUser(name.to_string()));
    }
    let user = found(name, nix::unistd::User::from_name(name))?;
    Ok(user.map(|u| (u.uid.as_raw(), u.gid.as_raw())))
}

/// The primary gid of user `uid`, if it has an entry.
pub fn lookup_uid(uid: u32) -> Result<Option<u32>, AccessError> {
    let user = found(
        &uid.to_string(),
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
    )?;
    Ok(user.map(|u| u.gid.as_raw()))
}

/// The gid of group `name`, if it exists.
pub fn lookup_group(name: &str) -> Result<Option<u32>, AccessError> {
    if name.contains('\0') {
        return Err(AccessError::UnknownGroup(name.to_string()));
    }
    let group = found(name, nix::unistd::Group::from_name(name))?;
    Ok(group.map(|g| g.gid.as_raw()))
}

/// The name of user `uid`, for messages.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Why dropping privileges failed.
#[derive(Debug, Error)]
pub enum DropError {
    /// Not root, and asked to become someone else.
    #[error(
        "dropping privileges to uid {uid} gid {gid} needs root (the relay runs as uid {euid})"
    )]
    NotRoot {
        /// The target uid.
        uid: u32,
        /// The target gid.
        gid: u32,
        /// The relay's effective uid.
        euid: u32,
    },
    /// A call failed.
    #[error("{call}: {source}")]
    Call {
        /// Which.
        call: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// The result is not what was asked, or root could be regained.
    #[error("after dropping privileges: {0}")]
    Check(String),
}

fn call<T>(call: &'static str, result: nix::Result<T>) -> Result<T, DropError> {
    result.map_err(|e| DropError::Call {
        call,
        source: std::io::Error::from(e),
    })
}

/// Becomes user `uid` and group `gid` for good: `setgroups([])`, `setgid`, `setuid`, in
/// that order, then checks that real, effective and saved ids are the new ones, that no
/// supplementary group is left, and (for a uid other than 0) that `setuid(0)` fails.
///
/// glibc applies these calls to every thread of the process; the relay calls this
/// before it starts any thread all the same. A relay that is not root may only "drop"
/// to the ids it has (nothing to do).
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), DropError> {
    use nix::unistd::{self, Gid, Uid};
    let (euid, egid) = (unistd::geteuid().as_raw(), unistd::getegid().as_raw());
    if euid != 0 {
        let (ruid, rgid) = (unistd::getuid().as_raw(), unistd::getgid().as_raw());
        if (euid, ruid, egid, rgid) == (uid, uid, gid, gid) {
            return Ok(());
        }
        return Err(DropError::NotRoot { uid, gid, euid });
    }
    call("setgroups([])", unistd::setgroups(&[]))?;
    call("setgid", unistd::setgid(Gid::from_raw(gid)))?;
    call("setuid", unistd::setuid(Uid::from_raw(uid)))?;
    let ids = call("getresuid", unistd::getresuid())?;
    let (r, e, s) = (
        ids.real.as_raw(),
        ids.effective.as_raw(),
        ids.saved.as_raw(),
    );
    if (r, e, s) != (uid, uid, uid) {
        return Err(DropError::Check(format!("uids are {r}/{e}/{s}, not {uid}")));
    }
    let ids = call("getresgid", unistd::getresgid())?;
    let (r, e, s) = (
        ids.real.as_raw(),
        ids.effective.as_raw(),
        ids.saved.as_raw(),
    );
    if (r, e, s) != (gid, gid, gid) {
        return Err(DropError::Check(format!("gids are {r}/{e}/{s}, not {gid}")));
    }
    let groups = call("getgroups", unistd::getgroups())?;
    if !groups.is_empty() {
        return Err(DropError::Check(format!(
            "{} supplementary groups are left",
            groups.len()
        )));
    }
    if uid != 0 {
        if unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(DropError::Check(
                "setuid(0) succeeded: root can be regained".into(),
            ));
        }
        if gid != 0 && unistd::setgid(Gid::from_raw(0)).is_ok() {
            return Err(DropError::Check("setgid(0) succeeded".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Modes parse from octal strings with or without a leading 0 or 0o and print with
    /// four digits; anything beyond the permission bits, or not octal, is refused.
    #[test]
    fn socket_modes() {
        assert_eq!("0660".parse::<SocketMode>().unwrap().bits(), 0o660);
        assert_eq!("600".parse::<SocketMode>().unwrap().bits(), 0o600);
        assert_eq!("0o777".parse::<SocketMode>().unwrap().bits(), 0o777);
        assert_eq!("0".parse::<SocketMode>().unwrap().bits(), 0);
        assert_eq!(SocketMode::new(0o660).unwrap().to_string(), "0660");
        for bad in [
            "", "0o", "8", "0669", "1777", "4755", "07777", "rw", "-1", " 660",
        ] {
            assert!(bad.parse::<SocketMode>().is_err(), "{bad:?} parsed");
        }
        assert!(SocketMode::new(0o1000).is_err());
        assert_eq!(SocketMode::default(), SocketMode::PRIVATE);
    }

    /// Ids are numbers or names; root and its group exist everywhere; unknown names,
    /// ids beyond u32 and -1 are errors that name what was written.
    #[test]
    fn ids_and_names() {
        assert_eq!("0".parse::<Uid>().unwrap(), Uid(0));
        assert_eq!("root".parse::<Uid>().unwrap(), Uid(0));
        assert_eq!("root".parse::<Gid>().unwrap(), Gid(0));
        assert_eq!("107".parse::<Gid>().unwrap(), Gid(107));
        assert_eq!(
            "no-such-user-vfu".parse::<Uid>().unwrap_err(),
            AccessError::UnknownUser("no-such-user-vfu".into())
        );
        assert_eq!(
            "no-such-group-vfu".parse::<Gid>().unwrap_err(),
            AccessError::UnknownGroup("no-such-group-vfu".into())
        );
        assert!("4294967295".parse::<Uid>().is_err());
        assert!("99999999999".parse::<Uid>().is_err());
        assert!("a\0b".parse::<Uid>().is_err());
        let root: User = "root".parse().unwrap();
        assert_eq!((root.uid, root.primary_gid), (Uid(0), Some(Gid(0))));
        let numeric: User = "4000000000".parse().unwrap();
        assert_eq!(numeric.uid, Uid(4_000_000_000));
        assert!("no-such-user-vfu".parse::<User>().is_err());
    }

    /// Root and the relay's own uid always pass; others only by uid or primary gid.
    #[test]
    fn allow_list() {
        let peer = |uid, gid| PeerCred { pid: 1, uid, gid };
        let none = Access::default();
        assert!(none.allows(&peer(0, 5), 1000));
        assert!(none.allows(&peer(1000, 5), 1000));
        assert!(!none.allows(&peer(1001, 5), 1000));
        let some = Access {
            allow_uids: vec![Uid(1001)],
            allow_gids: vec![Gid(36)],
            ..Access::default()
        };
        assert!(some.allows(&peer(1001, 5), 1000));
        assert!(some.allows(&peer(1002, 36), 1000));
        assert!(!some.allows(&peer(1002, 37), 1000));
    }

    /// A spec overrides field by field; what it leaves out comes from the default.
    #[test]
    fn specs_over_defaults() {
        let default = Access {
            mode: SocketMode::new(0o660).unwrap(),
            group: Some(Gid(36)),
            allow_uids: vec![Uid(107)],
            allow_gids: vec![],
        };
        assert_eq!(AccessSpec::default().over(&default), default);
        let spec = AccessSpec {
            allow_uids: Some(vec![]),
            ..AccessSpec::default()
        };
        let a = spec.over(&default);
        assert!(a.allow_uids.is_empty());
        assert_eq!(a.mode, default.mode);
        assert_eq!(a.group, default.group);
    }

    /// SO_PEERCRED of a socket pair names this process; a non-socket is an error.
    #[test]
    fn peer_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = peer_cred(&a).unwrap();
        assert_eq!(c.pid as u32, std::process::id());
        // SAFETY: getters cannot fail.
        assert_eq!(c.uid, unsafe { libc::geteuid() });
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_cred(&f).is_err());
    }
}
