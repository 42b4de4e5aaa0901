//! `vfu-probe SOCKET [TIMEOUT_MS]`: one vfio-user client attempt, for the tests of who
//! may connect (`tests/tests/e2e_access.rs`), which run it as another user.
//!
//! Connects to SOCKET, negotiates VERSION, writes a byte to BAR 2 of the device (the
//! gpio model's scratch register at offset 4) and reads it back, then prints one word
//! and exits with:
//!
//! | status | word | meaning |
//! |---|---|---|
//! | 0 | `served` | the device answered, the byte came back |
//! | 2 | `closed` | the connection was closed without an answer (refused) |
//! | 3 | `denied` | connect(2) itself failed with EACCES (the socket file's mode) |
//! | 4 | `error` | anything else: an error reply, a timeout, no socket (the message follows) |

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vfu_proto::client::{Client, ClientError};
use vfu_proto::transport::TransportError;
use vfu_proto::vfio_user::Capabilities;

fn closed(e: &ClientError) -> bool {
    match e {
        ClientError::Transport(
            TransportError::Closed | TransportError::ClosedMidMessage { .. },
        ) => true,
        ClientError::Transport(TransportError::Io(io)) | ClientError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next().map(PathBuf::from) else {
        eprintln!("usage: vfu-probe SOCKET [TIMEOUT_MS]");
        return ExitCode::from(64);
    };
    let timeout = Duration::from_millis(args.next().and_then(|t| t.parse().ok()).unwrap_or(5000));
    let mut c = match Client::connect(&socket, timeout) {
        Ok(c) => c,
        Err(ClientError::Io(e)) if e.kind() == ErrorKind::PermissionDenied => {
            println!("denied");
            return ExitCode::from(3);
        }
        Err(e) => {
            println!("error connect: {e}");
            return ExitCode::from(4);
        }
    };
    let result = c
        .negotiate(Capabilities::default())
        .and_then(|_| c.region_write(2, 4, &[0x5a]))
        .and_then(|()| c.region_read(2, 4, 1));
    match result {
        Ok(v) if v == [0x5a] => {
            println!("served");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("error read back {v:?}");
            ExitCode::from(4)
        }
        Err(e) if closed(&e) => {
            println!("closed");
            ExitCode::from(2)
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::from(4)
        }
    }
}
