//! Interrupts of the bridged server: the client's eventfds cannot cross the tunnel
//! (they are EVENTFD slots), so the bridge makes an eventfd of its own for each vector
//! the client assigns, hands it to the server, and turns each signal into an IRQ
//! message toward the relay, which signals the client's eventfd.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use log::warn;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::tunnel::Outlet;

/// Epoll data of a vector's eventfd: the IRQ index in the high half, the vector in the
/// low half (the socket's token, `u64::MAX`, is never one of these: indexes are < 2^31).
pub fn token(index: u32, vector: u32) -> u64 {
    u64::from(index) << 32 | u64::from(vector)
}

/// The eventfds handed to the server, by (IRQ index, vector).
#[derive(Debug, Default)]
pub struct Irqs {
    assigned: BTreeMap<(u32, u32), EventFd>,
}

impl Irqs {
    /// `count` new eventfds (non-blocking).
    pub fn create(count: u32) -> std::io::Result<Vec<EventFd>> {
        (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect()
    }

    /// Duplicates of `fds`, to send (the writer closes what it sent).
    pub fn dup_all<'a>(
        fds: impl IntoIterator<Item = &'a EventFd>,
    ) -> std::io::Result<Vec<OwnedFd>> {
        fds.into_iter()
            .map(|e| {
                let c = e.try_clone()?;
                // SAFETY: `into_raw_fd` hands over the new descriptor; nothing else owns it.
                Ok(unsafe { OwnedFd::from_raw_fd(c.into_raw_fd()) })
            })
            .collect()
    }

    /// The server took `fds` for vectors `start..` of `index`: watches them, replacing
    /// (and closing) what those vectors had.
    pub fn assign(&mut self, epoll: &Epoll, index: u32, start: u32, fds: Vec<EventFd>) {
        for (i, fd) in fds.into_iter().enumerate() {
            let vector = start + i as u32;
            self.remove(epoll, index, vector);
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token(index, vector)),
            ) {
                warn!("interrupt {index}/{vector}: cannot watch its eventfd: {e}");
                continue;
            }
            self.assigned.insert((index, vector), fd);
        }
    }

    /// Vectors `start..start + count` of `index` are de-assigned.
    pub fn unassign(&mut self, epoll: &Epoll, index: u32, start: u32, count: u32) {
        for v in start..start.saturating_add(count) {
            self.remove(epoll, index, v);
        }
    }

    /// Every vector of `index` is de-assigned.
    pub fn unassign_index(&mut self, epoll: &Epoll, index: u32) {
        let vectors: Vec<u32> = self
            .assigned
            .range((index, 0)..=(index, u32::MAX))
            .map(|(&(_, v), _)| v)
            .collect();
        for v in vectors {
            self.remove(epoll, index, v);
        }
    }

    fn remove(&mut self, epoll: &Epoll, index: u32, vector: u32) {
        if let Some(fd) = self.assigned.remove(&(index, vector)) {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Everything de-assigned, the eventfds closed.
    pub fn clear(&mut self, epoll: &Epoll) {
        let keys: Vec<(u32, u32)> = self.assigned.keys().copied().collect();
        for (index, vector) in keys {
            self.remove(epoll, index, vector);
        }
    }

    /// The IRQ indexes with an assigned vector.
    pub fn indexes(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.assigned.keys().map(|&(i, _)| i).collect();
        out.dedup();
        out
    }

    /// The assignments, for handing them to a new connection: runs of consecutive
    /// vectors as (index, start, eventfds).
    pub fn runs(&self) -> Vec<(u32, u32, Vec<&EventFd>)> {
        let mut out: Vec<(u32, u32, Vec<&EventFd>)> = Vec::new();
        for (&(index, vector), fd) in &self.assigned {
            match out.last_mut() {
                Some((i, s, fds)) if *i == index && *s + fds.len() as u32 == vector => fds.push(fd),
                _ => out.push((index, vector, vec![fd])),
            }
        }
        out
    }

    /// The eventfd of `token` fired: consumes the signal and queues the interrupt.
    pub fn fired(&self, token: u64, out: &mut Outlet) {
        let (index, vector) = ((token >> 32) as u32, token as u32);
        if let Some(fd) = self.assigned.get(&(index, vector)) {
            // Several signals since the last look are one interrupt, as on an eventfd.
            if fd.read().is_ok() {
                out.irq(index, vector, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::tunnel::Body;

    /// A signalled eventfd becomes one IRQ message for its vector; de-assigned vectors
    /// stay silent; runs group consecutive vectors for replay.
    #[test]
    fn signals_become_irq_messages() {
        let epoll = Epoll::new().unwrap();
        let mut irqs = Irqs::default();
        let fds = Irqs::create(3).unwrap();
        let sender: Vec<EventFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        irqs.assign(&epoll, 2, 4, fds);
        assert_eq!(irqs.indexes(), vec![2]);
        let runs = irqs.runs();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].0, runs[0].1, runs[0].2.len()), (2, 4, 3));

        sender[1].write(1).unwrap();
        sender[1].write(1).unwrap();
        let mut events = vec![EpollEvent::default(); 4];
        let n = epoll.wait(100, &mut events).unwrap();
        assert_eq!(n, 1);
        assert_eq!(events[0].data(), token(2, 5));
        let mut out = Outlet::new(9, 4096);
        irqs.fired(events[0].data(), &mut out);
        irqs.fired(events[0].data(), &mut out); // nothing left to read
        let msgs = out.take();
        assert_eq!(msgs.len(), 1);
        assert!(matches!(msgs[0].body, Body::Irq(t) if (t.index, t.start, t.count) == (2, 5, 1)));

        irqs.unassign(&epoll, 2, 5, 1);
        sender[1].write(1).unwrap();
        assert_eq!(epoll.wait(50, &mut events).unwrap(), 0, "de-assigned");
        assert_eq!(irqs.runs().len(), 2, "a hole splits the run");
        irqs.unassign_index(&epoll, 2);
        assert!(irqs.indexes().is_empty());
    }
}
