//! The control protocol: one JSON object per line each way, a request from
//! `vfu-relay ctl` (or any client) and the relay's reply.
//!
//! ```text
//! {"cmd":"add","name":"gpio1","socket":"/run/vfu-relay/gpio1.sock"}
//! {"reply":"added","name":"gpio1","socket":"/run/vfu-relay/gpio1.sock","channel":2}
//! {"cmd":"remove","name":"gpio1"}
//! {"reply":"removed","name":"gpio1"}
//! {"cmd":"list"}
//! {"reply":"devices","device_vm":true,"devices":[{"name":"gpio0",...}]}
//! {"cmd":"remove","name":"nope"}
//! {"reply":"error","error":"unknown-device","name":"nope","message":"no device named \"nope\""}
//! ```
//!
//! Lines are decoded here, at the edge, into [`Request`]; the relay never sees bytes.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::access::{Access, AccessSpec};

/// Longest request line the relay reads (a name is at most 64 bytes, a socket path at
/// most 108).
pub const MAX_REQUEST_LINE: usize = 16 << 10;

/// Longest reply line a client reads (a list of every device fits many times over).
pub const MAX_REPLY_LINE: usize = 4 << 20;

/// A request to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Export a device: listen on `socket`, bring the channel up in the device VM.
    Add {
        /// The name the device VM serves it under.
        name: String,
        /// Absolute path of the vfio-user socket to create.
        socket: String,
        /// Who may connect, over the relay's defaults (left out: the defaults).
        #[serde(default, skip_serializing_if = "AccessSpec::is_empty")]
        access: AccessSpec,
    },
    /// Withdraw a device: its socket goes, its client is disconnected.
    Remove {
        /// The device's name.
        name: String,
    },
    /// The devices exported now.
    List,
}

/// Whether the device VM serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Served {
    /// It serves the device.
    Served,
    /// It answered that it serves no device of this name.
    NotServed,
    /// No device VM, or it has not answered yet.
    Unknown,
}

impl Served {
    /// As `list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Served => "served",
            Served::NotServed => "not served",
            Served::Unknown => "unknown",
        }
    }
}

/// One exported device as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Its vfio-user socket.
    pub socket: String,
    /// Its channel id in the tunnel.
    pub channel: u32,
    /// Whether a client is connected.
    pub client: bool,
    /// Whether the device VM serves it.
    pub device_vm: Served,
    /// Client requests waiting for the device VM now.
    pub in_flight: usize,
    /// Client requests forwarded to the device VM since the device was added.
    pub requests: u64,
    /// Client connections accepted since the device was added.
    pub connections: u64,
    /// Who may connect to its socket (relays before "Who may connect" leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// Why the relay refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum CommandError {
    /// The line is not a request.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The name or socket path breaks the rules (`docs/operating.md`).
    #[error("{reason}")]
    InvalidDevice {
        /// Which rule.
        reason: String,
    },
    /// A device of that name is exported already.
    #[error("a device named {name:?} exists already")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// The socket path is in use by the relay.
    #[error("socket {socket} is in use by the relay already")]
    DuplicateSocket {
        /// The path.
        socket: String,
    },
    /// No device of that name.
    #[error("no device named {name:?}")]
    UnknownDevice {
        /// The name.
        name: String,
    },
    /// The relay exports as many devices as it may.
    #[error("the relay exports {max} devices, its maximum")]
    TooManyDevices {
        /// The maximum.
        max: usize,
    },
    /// Every channel id has been given out once (ids are never reused).
    #[error("channel ids are used up; restart the relay")]
    IdsExhausted,
    /// The device socket could not be created.
    #[error("socket {socket}: {reason}")]
    Socket {
        /// The path.
        socket: String,
        /// The system's error.
        reason: String,
    },
}

/// The relay's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// The device is exported.
    Added {
        /// Its name.
        name: String,
        /// Its socket.
        socket: String,
        /// Its channel id.
        channel: u32,
    },
    /// The device is gone.
    Removed {
        /// Its name.
        name: String,
    },
    /// What `list` asked for.
    Devices {
        /// Whether a device VM is connected (has said HELLO).
        device_vm: bool,
        /// The devices, by channel id.
        devices: Vec<DeviceInfo>,
    },
    /// The request was refused; nothing changed.
    Error {
        /// Why, as data.
        #[serde(flatten)]
        error: CommandError,
        /// Why, in words (for clients that do not decode `error`).
        message: String,
    },
}

impl From<CommandError> for Reply {
    fn from(error: CommandError) -> Self {
        Reply::Error {
            message: error.to_string(),
            error,
        }
    }
}

/// A line that is not a request or a reply.
#[derive(Debug, Error)]
pub enum LineError {
    /// Longer than the limit.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// Not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// Not the JSON expected.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl Request {
    /// Decodes one line (without its newline; a trailing `\r` is allowed).
    pub fn decode(line: &[u8]) -> Result<Self, LineError> {
        decode(line, MAX_REQUEST_LINE)
    }

    /// The request as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

impl Reply {
    /// Decodes one line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, LineError> {
        decode(line, MAX_REPLY_LINE)
    }

    /// The reply as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(line: &[u8], limit: usize) -> Result<T, LineError> {
    if line.len() > limit {
        return Err(LineError::TooLong { limit });
    }
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    Ok(serde_json::from_str(text.trim_end_matches('\r'))?)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // These types hold strings, numbers and booleans only: serializing cannot fail.
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| {
        br#"{"reply":"error","error":"bad-request","reason":"unencodable","message":"unencodable"}"#
            .to_vec()
    });
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(line: &str) -> Result<Request, String> {
        Request::decode(line.as_bytes()).map_err(|e| e.to_string())
    }

    /// The three commands decode from their documented form.
    #[test]
    fn requests_decode() {
        assert_eq!(
            req(r#"{"cmd":"add","name":"b","socket":"/tmp/b.sock"}"#).unwrap(),
            Request::Add {
                name: "b".into(),
                socket: "/tmp/b.sock".into(),
                access: AccessSpec::default(),
            }
        );
        assert_eq!(
            req(r#"{"cmd":"remove","name":"b"}"#).unwrap(),
            Request::Remove { name: "b".into() }
        );
        assert_eq!(req("{\"cmd\":\"list\"}\r").unwrap(), Request::List);
        assert_eq!(
            req(r#" { "name":"b", "cmd":"remove" } "#).unwrap(),
            Request::Remove { name: "b".into() }
        );
        let Request::Add { access, .. } = req(
            r#"{"cmd":"add","name":"b","socket":"/b","access":{"socket_mode":"0660","socket_group":"root","allow_uids":["root",107],"allow_gids":[]}}"#,
        )
        .unwrap() else {
            panic!("not an add");
        };
        assert_eq!(access.socket_mode.map(|m| m.bits()), Some(0o660));
        assert_eq!(access.socket_group, Some(crate::access::Gid(0)));
        assert_eq!(
            access.allow_uids,
            Some(vec![crate::access::Uid(0), crate::access::Uid(107)])
        );
        assert!(
            req(r#"{"cmd":"add","name":"b","socket":"/b","access":{"socket_mode":"9"}}"#)
                .unwrap_err()
                .contains("socket mode")
        );
        assert!(req(
            r#"{"cmd":"add","name":"b","socket":"/b","access":{"allow_uids":["no-such-user-vfu"]}}"#
        )
        .unwrap_err()
        .contains("unknown user"));
        assert!(req(r#"{"cmd":"add","name":"b","socket":"/b","access":{"mode":"0600"}}"#).is_err());
    }

    /// Unknown commands, missing or unknown fields, wrong types, non-JSON, non-UTF-8
    /// and overlong lines are errors that say what is wrong, never panics.
    #[test]
    fn bad_requests_are_errors() {
        assert!(req(r#"{"cmd":"frobnicate"}"#)
            .unwrap_err()
            .contains("frobnicate"));
        assert!(req(r#"{"cmd":"add","name":"b"}"#)
            .unwrap_err()
            .contains("socket"));
        assert!(req(r#"{"cmd":"remove","name":"b","force":true}"#)
            .unwrap_err()
            .contains("force"));
        assert!(req(r#"{"cmd":"remove","name":7}"#).is_err());
        assert!(req(r#"{"name":"b"}"#).unwrap_err().contains("cmd"));
        assert!(req("list").is_err());
        assert!(req("").is_err());
        assert!(req(r#"{"cmd":"list"} {"cmd":"list"}"#).is_err());
        assert!(matches!(
            Request::decode(b"{\"cmd\":\"remove\",\"name\":\"\xff\"}"),
            Err(LineError::NotUtf8)
        ));
        let long = format!(
            r#"{{"cmd":"remove","name":"{}"}}"#,
            "x".repeat(MAX_REQUEST_LINE)
        );
        assert!(matches!(
            Request::decode(long.as_bytes()),
            Err(LineError::TooLong { .. })
        ));
    }

    /// Requests and replies survive a round trip through their line form, which ends
    /// in one newline and holds no other.
    #[test]
    fn round_trips() {
        let requests = [
            Request::Add {
                name: "a\nb".into(),
                socket: "/tmp/x".into(),
                access: AccessSpec::default(),
            },
            Request::Add {
                name: "a".into(),
                socket: "/tmp/x".into(),
                access: AccessSpec {
                    socket_mode: Some(crate::access::SocketMode::new(0o660).unwrap()),
                    socket_group: Some(crate::access::Gid(36)),
                    allow_uids: Some(vec![crate::access::Uid(107)]),
                    allow_gids: Some(vec![]),
                },
            },
            Request::Remove { name: "a".into() },
            Request::List,
        ];
        for r in requests {
            let line = r.encode();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(Request::decode(&line[..line.len() - 1]).unwrap(), r);
        }
        let replies = [
            Reply::Added {
                name: "a".into(),
                socket: "/tmp/a".into(),
                channel: 3,
            },
            Reply::Removed { name: "a".into() },
            Reply::Devices {
                device_vm: true,
                devices: vec![DeviceInfo {
                    name: "a".into(),
                    socket: "/tmp/a".into(),
                    channel: 1,
                    client: true,
                    device_vm: Served::NotServed,
                    in_flight: 2,
                    requests: 10,
                    connections: 1,
                    access: Some(Access::default()),
                }],
            },
            CommandError::UnknownDevice { name: "x".into() }.into(),
            CommandError::TooManyDevices { max: 256 }.into(),
            CommandError::IdsExhausted.into(),
            CommandError::Socket {
                socket: "/x".into(),
                reason: "denied".into(),
            }
            .into(),
        ];
        for r in replies {
            let line = r.encode();
            assert_eq!(Reply::decode(&line[..line.len() - 1]).unwrap(), r);
        }
    }

    /// An error reply carries its kind, its fields and its message side by side, as
    /// the module documentation shows.
    #[test]
    fn error_reply_shape() {
        let line = Reply::from(CommandError::UnknownDevice {
            name: "nope".into(),
        })
        .encode();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["reply"], "error");
        assert_eq!(v["error"], "unknown-device");
        assert_eq!(v["name"], "nope");
        assert_eq!(v["message"], "no device named \"nope\"");
    }
}
