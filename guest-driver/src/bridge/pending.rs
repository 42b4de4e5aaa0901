//! Requests sent to the server and not answered yet, by the message ID the bridge gave
//! them (the bridge numbers its requests itself: its own requests and the client's
//! share one sequence, and a reply maps back to the client's ID).

use std::collections::HashMap;

use vfu_proto::vfio_user::Header;

/// What to do with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The bridge's own request: the reply is kept for the caller waiting on it.
    Bridge,
    /// The client's request: the reply goes to the client under its header's ID,
    /// after `fix`.
    Client { header: Header, fix: Fix },
}

/// How a reply is adjusted before the client sees it ([`super::replies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// As it is (its fds, if the server sent any, are closed).
    None,
    /// DEVICE_GET_REGION_INFO: mmap flags and capabilities go; cut to the client's
    /// `argsz`.
    RegionInfo { argsz: u32 },
}

/// The table of requests in flight.
#[derive(Debug, Default)]
pub struct Pending {
    next_id: u16,
    waiting: HashMap<u16, Waiting>,
}

impl Pending {
    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A message ID not in flight.
    pub fn next_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.waiting.contains_key(&id) {
                return id;
            }
        }
    }

    /// Records request `id` as waiting for its reply.
    pub fn insert(&mut self, id: u16, w: Waiting) {
        self.waiting.insert(id, w);
    }

    /// The request a reply with `id` answers, if one is in flight.
    pub fn take(&mut self, id: u16) -> Option<Waiting> {
        self.waiting.remove(&id)
    }

    /// Every request in flight, forgotten (the server went away).
    pub fn drain(&mut self) -> Vec<Waiting> {
        self.waiting.drain().map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IDs in flight are never handed out again, across the wrap of the sequence.
    #[test]
    fn ids_skip_those_in_flight() {
        let mut p = Pending {
            next_id: u16::MAX,
            ..Default::default()
        };
        p.insert(0, Waiting::Bridge);
        assert_eq!(p.next_id(), u16::MAX);
        assert_eq!(p.next_id(), 1, "0 is in flight");
        assert_eq!(p.take(0), Some(Waiting::Bridge));
        assert_eq!(p.take(0), None);
        assert!(p.is_empty());
    }
}
