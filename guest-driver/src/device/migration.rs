//! Migration: the device state machine of Linux VFIO migration v2 as vfio-user carries
//! it (DEVICE_FEATURE MIG_DEVICE_STATE), and the migration data buffers behind
//! MIG_DATA_READ and MIG_DATA_WRITE. The stream format is in [`stream`].
//!
//! States offered: RUNNING, STOP, STOP_COPY, RESUMING, and ERROR (entered never by a
//! request: only reset leaves it, and this library never fails into it). PRE_COPY and
//! the P2P states are not offered (DEVICE_FEATURE MIGRATION states STOP_COPY only), so
//! a request for them is `EINVAL`, as is a request for ERROR and any request made in
//! ERROR.
//!
//! Arcs, each carried out by [`DeviceServer`](super::DeviceServer):
//!
//! | arc | what happens |
//! |---|---|
//! | RUNNING -> STOP | the device stops: the model gets no more calls (BAR accesses, its event fd), interrupts are held |
//! | STOP -> RUNNING | the device runs: held interrupts are delivered, the event fd is polled again |
//! | STOP -> STOP_COPY | the state is saved into the stream MIG_DATA_READ hands out |
//! | STOP_COPY -> STOP | the stream is dropped, read or not |
//! | STOP -> RESUMING | an empty stream is opened for MIG_DATA_WRITE |
//! | RESUMING -> STOP | the stream written is checked and loaded; if it is refused, the SET fails with the stream's errno, the state stays RESUMING and the data written is dropped (a new stream may be written) |
//!
//! Any other request takes the shortest path of these arcs, never through STOP_COPY
//! (the spec's rule for saving states): RUNNING -> STOP_COPY is RUNNING -> STOP ->
//! STOP_COPY, STOP_COPY -> RUNNING is STOP_COPY -> STOP -> RUNNING, and so on. When an
//! arc fails the device stays in the state it had reached. A request for the current
//! state does nothing.

pub mod stream;

use vfu_proto::vfio_user::MigState;

use super::errno::{Errno, EFBIG, EINVAL};

/// Largest migration stream a RESUMING device buffers.
pub const MAX_STREAM: usize = 64 << 20;

/// Whether `state` is offered by this library.
fn offered(state: MigState) -> bool {
    matches!(
        state,
        MigState::Running | MigState::Stop | MigState::StopCopy | MigState::Resuming
    )
}

/// The states a SET of `to` passes through from `from`, in order, `to` last (empty
/// when `to` is the current state). `EINVAL` for a state that is not offered, a
/// request for ERROR, and any request made in ERROR.
pub fn path(from: MigState, to: MigState) -> Result<Vec<MigState>, Errno> {
    if !offered(from) || !offered(to) {
        return Err(EINVAL);
    }
    Ok(if from == to {
        Vec::new()
    } else if from == MigState::Stop || to == MigState::Stop {
        vec![to]
    } else {
        vec![MigState::Stop, to]
    })
}

/// Whether the device is stopped in `state`: the model is not called and interrupts
/// are held.
pub fn is_stopped(state: MigState) -> bool {
    matches!(
        state,
        MigState::Stop | MigState::StopCopy | MigState::Resuming | MigState::Error
    )
}

/// The migration state of one device and its data buffers.
#[derive(Debug)]
pub struct Migration {
    state: MigState,
    /// STOP_COPY: the saved stream and how much of it was read.
    outgoing: Vec<u8>,
    read_at: usize,
    /// RESUMING: the stream written so far.
    incoming: Vec<u8>,
}

impl Default for Migration {
    fn default() -> Self {
        Self::new()
    }
}

impl Migration {
    /// A running device.
    pub fn new() -> Self {
        Self {
            state: MigState::Running,
            outgoing: Vec::new(),
            read_at: 0,
            incoming: Vec::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> MigState {
        self.state
    }

    /// Whether the device is stopped ([`is_stopped`]).
    pub fn stopped(&self) -> bool {
        is_stopped(self.state)
    }

    /// Records that the arc to `state` was carried out. Entering STOP_COPY is done
    /// with [`begin_save`](Self::begin_save); leaving STOP_COPY or RESUMING drops
    /// its buffer.
    pub fn enter(&mut self, state: MigState) {
        if state != MigState::StopCopy {
            self.outgoing = Vec::new();
            self.read_at = 0;
        }
        if state != MigState::Resuming {
            self.incoming = Vec::new();
        }
        self.state = state;
    }

    /// Enters STOP_COPY with the saved `stream`.
    pub fn begin_save(&mut self, stream: Vec<u8>) {
        self.enter(MigState::StopCopy);
        self.outgoing = stream;
    }

    /// The stream written in RESUMING, taken out (the buffer is empty afterwards).
    pub fn take_incoming(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.incoming)
    }

    /// MIG_DATA_READ: up to `size` bytes of the saved stream (fewer at its end; none
    /// once it was read). `EINVAL` outside STOP_COPY.
    pub fn read(&mut self, size: usize) -> Result<Vec<u8>, Errno> {
        if self.state != MigState::StopCopy {
            return Err(EINVAL);
        }
        let end = self.read_at.saturating_add(size).min(self.outgoing.len());
        let data = self.outgoing[self.read_at..end].to_vec();
        self.read_at = end;
        Ok(data)
    }

    /// Bytes of the saved stream not read yet (0 outside STOP_COPY).
    pub fn pending(&self) -> usize {
        self.outgoing.len() - self.read_at
    }

    /// MIG_DATA_WRITE: appends `data` to the stream. `EINVAL` outside RESUMING,
    /// `EFBIG` past [`MAX_STREAM`] bytes (nothing appended).
    pub fn write(&mut self, data: &[u8]) -> Result<(), Errno> {
        if self.state != MigState::Resuming {
            return Err(EINVAL);
        }
        if self.incoming.len().saturating_add(data.len()) > MAX_STREAM {
            return Err(EFBIG);
        }
        self.incoming.extend_from_slice(data);
        Ok(())
    }
}

/// For the models' tests: moving a device's state from one server to another.
#[cfg(test)]
pub(crate) mod test_util {
    use vfu_proto::vfio_user::{
        DeviceFeature, FeatureData, FeatureOp, Header, MigDataRead, MigDataWrite, MigState, Reply,
        Request, FEATURE_MIG_DEVICE_STATE,
    };

    use crate::device::{DeviceServer, Errno, NoRemote, Response};

    fn call(s: &mut DeviceServer, req: Request) -> Result<Reply, Errno> {
        let h = Header::command(7, req.command() as u16, 0);
        match s.handle(&h, req, Vec::new(), &mut NoRemote) {
            Response::Reply { reply, .. } => Ok(reply),
            Response::Error(e) => Err(e),
            Response::NoReply => panic!("reply expected"),
        }
    }

    /// MIG_DEVICE_STATE SET.
    pub(crate) fn set_state(s: &mut DeviceServer, state: MigState) -> Result<(), Errno> {
        let f = DeviceFeature::request(
            FEATURE_MIG_DEVICE_STATE,
            FeatureOp::Set,
            FeatureData::MigState { state, data_fd: -1 },
        );
        call(s, Request::DeviceFeature(f)).map(|_| ())
    }

    /// Stops `s` and reads its whole stream (it stays in STOP).
    pub(crate) fn save(s: &mut DeviceServer) -> Vec<u8> {
        set_state(s, MigState::StopCopy).unwrap();
        let Reply::MigDataRead(r) =
            call(s, Request::MigDataRead(MigDataRead::new(1 << 20))).unwrap()
        else {
            panic!("not a MIG_DATA_READ reply");
        };
        set_state(s, MigState::Stop).unwrap();
        r.data
    }

    /// Loads `stream` into `s` and runs it; the result of leaving RESUMING.
    pub(crate) fn load(s: &mut DeviceServer, stream: &[u8]) -> Result<(), Errno> {
        set_state(s, MigState::Resuming).unwrap();
        call(s, Request::MigDataWrite(MigDataWrite::new(stream.to_vec()))).unwrap();
        set_state(s, MigState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    /// Every pair of states: the offered ones reach each other by the shortest path
    /// of direct arcs that never passes through STOP_COPY or RESUMING; ERROR,
    /// PRE_COPY and the P2P states are refused as source and as target.
    #[test]
    fn paths_between_every_pair() {
        let arcs = [
            (Running, Stop),
            (Stop, Running),
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
        ];
        for from in MigState::ALL {
            for to in MigState::ALL {
                let p = path(from, to);
                if !offered(from) || !offered(to) {
                    assert_eq!(p, Err(EINVAL), "{from} -> {to}");
                    continue;
                }
                let p = p.unwrap();
                let mut at = from;
                for (i, &next) in p.iter().enumerate() {
                    assert!(arcs.contains(&(at, next)), "{from} -> {to}: {at} -> {next}");
                    if i + 1 < p.len() {
                        assert_eq!(next, Stop, "{from} -> {to}: interior state");
                    }
                    at = next;
                }
                assert_eq!(at, to, "{from} -> {to} ends there");
                let direct = arcs.contains(&(from, to));
                let want = if from == to {
                    0
                } else if direct {
                    1
                } else {
                    2
                };
                assert_eq!(p.len(), want, "{from} -> {to}: {p:?}");
            }
        }
        assert_eq!(path(Running, StopCopy), Ok(vec![Stop, StopCopy]));
        assert_eq!(path(Resuming, Running), Ok(vec![Stop, Running]));
        assert_eq!(path(StopCopy, PreCopy), Err(EINVAL));
    }

    /// Stopped states: everything but RUNNING (and the states not offered, which are
    /// never entered).
    #[test]
    fn stopped_states() {
        assert!(!is_stopped(Running));
        for s in [Stop, StopCopy, Resuming, Error] {
            assert!(is_stopped(s), "{s}");
        }
    }

    /// The data buffers: reads only in STOP_COPY, in order, short at the end, empty
    /// after it; writes only in RESUMING, bounded; leaving a state drops its buffer.
    #[test]
    fn data_buffers() {
        let mut m = Migration::new();
        assert_eq!(m.read(4), Err(EINVAL));
        assert_eq!(m.write(b"x"), Err(EINVAL));
        m.enter(Stop);
        m.begin_save(b"0123456789".to_vec());
        assert_eq!(m.write(b"x"), Err(EINVAL));
        assert_eq!(m.read(4).unwrap(), b"0123");
        assert_eq!(m.pending(), 6);
        assert_eq!(m.read(4).unwrap(), b"4567");
        assert_eq!(m.read(4).unwrap(), b"89");
        assert_eq!(m.read(4).unwrap(), b"");
        m.enter(Stop);
        assert_eq!(m.pending(), 0);
        assert_eq!(m.read(1), Err(EINVAL));
        m.enter(Resuming);
        m.write(b"ab").unwrap();
        m.write(b"cd").unwrap();
        assert_eq!(m.write(&vec![0; MAX_STREAM]), Err(EFBIG));
        assert_eq!(m.take_incoming(), b"abcd");
        assert!(m.take_incoming().is_empty());
        m.write(b"e").unwrap();
        m.enter(Stop);
        m.enter(Resuming);
        assert!(m.take_incoming().is_empty(), "dropped on leaving RESUMING");
    }
}
