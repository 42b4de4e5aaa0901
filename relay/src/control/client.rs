//! The client end of the control socket, for `vfu-relay ctl` and the SIGHUP reload:
//! one request, one reply.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::protocol::{LineError, Reply, Request, MAX_REPLY_LINE};

/// How long a request may take (the relay answers at once; this only guards against
/// a relay that hangs).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no reply.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing listens on the control socket.
    #[error("no relay listens on {}: {source} (is vfu-relay running, with this control socket?)", path.display())]
    NotRunning {
        /// The control socket.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The connection failed midway.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The relay closed the connection without a reply.
    #[error("the relay closed the control connection without a reply")]
    NoReply,
    /// The reply is not one.
    #[error("the relay's reply is not understood: {0}")]
    BadReply(#[from] LineError),
}

/// Sends `request` to the relay listening on `path` and returns its reply.
pub fn request(path: &Path, request: &Request) -> Result<Reply, ClientError> {
    let mut sock = UnixStream::connect(path).map_err(|source| {
        let not_running = matches!(
            source.kind(),
            ErrorKind::NotFound | ErrorKind::ConnectionRefused
        );
        if not_running {
            ClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            }
        } else {
            ClientError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    sock.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    sock.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    sock.write_all(&request.encode()).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new(sock.take(MAX_REPLY_LINE as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    match line.pop() {
        Some(b'\n') => Ok(Reply::decode(&line)?),
        Some(_) if line.len() >= MAX_REPLY_LINE => Err(ClientError::BadReply(LineError::TooLong {
            limit: MAX_REPLY_LINE,
        })),
        _ => Err(ClientError::NoReply),
    }
}
