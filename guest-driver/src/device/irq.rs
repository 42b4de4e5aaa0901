//! Interrupts: where they go ([`IrqSink`]) and when they may go there.
//!
//! The server keeps, per IRQ index, which vectors the client assigned (DEVICE_SET_IRQS
//! with DATA_EVENTFD), and the state that decides whether a vector raised by the model
//! is delivered now, later, or not at all:
//!
//! - INTx is a level. [`DeviceContext::raise_irq`](super::DeviceContext::raise_irq)
//!   asserts it, [`DeviceContext::lower_intx`](super::DeviceContext::lower_intx)
//!   de-asserts it. It is signalled (one edge toward the client eventfd) when it is
//!   asserted, not masked, not disabled by the command register's INTx disable bit, and
//!   assigned; signalling masks it (AUTOMASKED, like Linux vfio-pci) until the client
//!   unmasks it. A level still asserted when the client unmasks it, clears INTx
//!   disable, or assigns an eventfd is signalled then.
//! - MSI: a vector whose mask bit is set in the MSI capability gets its pending bit
//!   set instead and is signalled when the driver clears the mask bit.
//! - MSI-X: while the function mask is set, raised vectors are remembered and
//!   signalled when it is cleared (the per-vector table masks come with the table
//!   emulation).
//! - ERR and REQ are signalled as raised.
//!
//! The enable bits of the MSI and MSI-X capabilities do not hold vectors back: a
//! vfio-user client turns vectors on with SET_IRQS (as the Linux vfio-pci kernel driver
//! does), and a vector without an eventfd goes nowhere.
//!
//! In direct mode every fd given to DATA_EVENTFD must be an eventfd (checked through
//! `/proc/self/fd` where it is available), and is made non-blocking.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use log::{debug, warn};
use vfu_proto::vfio_user::{
    pci_irq, IrqData, IrqInfo, SetIrqs, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
};

use super::errno::{Errno, EINVAL};
use super::pci_config::{ConfigSpace, WriteEffects};

/// Where interrupts go: the client's eventfds (direct mode, [`EventFdIrqs`]) or the
/// tunnel, which forwards a trigger to the relay that holds the eventfds.
pub trait IrqSink: Send {
    /// DEVICE_SET_IRQS with DATA_EVENTFD: vectors `start..start + count` of `index` get
    /// these eventfds (one per vector, in order) or, with `fds == None`, are
    /// de-assigned. In tunnel mode the transport calls
    /// [`assign_slots`](Self::assign_slots) instead (no fds exist in the device VM).
    fn set_eventfds(&mut self, index: u32, start: u32, count: u32, fds: Option<Vec<OwnedFd>>);
    /// The tunnel form: vectors `start..start + count` are assigned (`true`) or
    /// de-assigned.
    fn assign_slots(&mut self, index: u32, start: u32, count: u32, assigned: bool);
    /// Signals vector `vector` of `index` if it is assigned.
    fn trigger(&mut self, index: u32, vector: u32);
    /// The client went away: drops every assignment (closing the fds).
    fn clear(&mut self);
}

/// [`IrqSink`] for direct mode: keeps the client's eventfds per (index, vector) and
/// writes 1 to the eventfd on a trigger.
#[derive(Debug, Default)]
pub struct EventFdIrqs {
    fds: HashMap<(u32, u32), File>,
}

impl EventFdIrqs {
    /// No eventfds yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether vector `vector` of `index` has an eventfd.
    pub fn is_assigned(&self, index: u32, vector: u32) -> bool {
        self.fds.contains_key(&(index, vector))
    }

    /// Number of eventfds held.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no eventfd is held.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// Whether `fd` is an eventfd, as `/proc/self/fd` tells (`None` when it cannot).
pub(crate) fn is_eventfd(fd: &OwnedFd) -> Option<bool> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    Some(link.as_os_str() == "anon_inode:[eventfd]")
}

/// Makes writes to `fd` non-blocking, so that a signal never stalls the server (an
/// eventfd whose counter a client drove to the maximum would block a write).
fn set_nonblocking(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own have no memory effects.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

impl IrqSink for EventFdIrqs {
    fn set_eventfds(&mut self, index: u32, start: u32, count: u32, fds: Option<Vec<OwnedFd>>) {
        match fds {
            Some(fds) => {
                for (v, fd) in (start..start.saturating_add(count)).zip(fds) {
                    set_nonblocking(&fd);
                    self.fds.insert((index, v), File::from(fd));
                }
            }
            None => {
                for v in start..start.saturating_add(count) {
                    self.fds.remove(&(index, v));
                }
            }
        }
    }

    fn assign_slots(&mut self, index: u32, start: u32, count: u32, assigned: bool) {
        // Slots without fds have nowhere to go in direct mode; only de-assignment means
        // something here.
        if !assigned {
            self.set_eventfds(index, start, count, None);
        } else {
            warn!("irq {index}: slot assignment without eventfds ignored in direct mode");
        }
    }

    fn trigger(&mut self, index: u32, vector: u32) {
        if let Some(f) = self.fds.get_mut(&(index, vector)) {
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                warn!("irq {index}.{vector}: eventfd write failed: {e}");
            }
        }
    }

    fn clear(&mut self) {
        self.fds.clear();
    }
}

/// The fds that came with a SET_IRQS: real eventfds (direct mode) or, in tunnel mode,
/// the number of eventfd slots the relay kept on its side.
#[derive(Debug)]
pub(crate) enum IrqFds {
    /// Eventfds received with the message.
    Direct(Vec<OwnedFd>),
    /// Number of eventfds the relay holds for this message.
    Slots(usize),
}

impl IrqFds {
    pub(crate) fn count(&self) -> usize {
        match self {
            IrqFds::Direct(v) => v.len(),
            IrqFds::Slots(n) => *n,
        }
    }
}

/// Interrupt state of one device: counts, assignments, masks and pending vectors.
pub(crate) struct IrqState {
    sink: Box<dyn IrqSink>,
    counts: [u32; pci_irq::COUNT as usize],
    assigned: [Vec<bool>; pci_irq::COUNT as usize],
    intx_masked: bool,
    msix_pending: Vec<bool>,
}

impl IrqState {
    /// `counts`: vectors per index (INTx, MSI, MSI-X, ERR, REQ).
    pub(crate) fn new(sink: Box<dyn IrqSink>, counts: [u32; pci_irq::COUNT as usize]) -> Self {
        Self {
            sink,
            counts,
            assigned: counts.map(|n| vec![false; n as usize]),
            intx_masked: false,
            msix_pending: vec![false; counts[pci_irq::MSIX as usize] as usize],
        }
    }

    /// Vectors of `index` (0 for an index out of range).
    pub(crate) fn count(&self, index: u32) -> u32 {
        self.counts.get(index as usize).copied().unwrap_or(0)
    }

    /// DEVICE_GET_IRQ_INFO for `index`, as Linux vfio-pci answers it.
    pub(crate) fn info(&self, index: u32) -> Option<IrqInfo> {
        let flags = match index {
            pci_irq::INTX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            pci_irq::MSI | pci_irq::MSIX | pci_irq::ERR => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            pci_irq::REQ => IRQ_INFO_EVENTFD,
            _ => return None,
        };
        Some(IrqInfo {
            argsz: IrqInfo::SIZE,
            flags,
            index,
            count: self.count(index),
        })
    }

    /// Whether vector `vector` of `index` is assigned.
    pub(crate) fn is_assigned(&self, index: u32, vector: u32) -> bool {
        self.assigned
            .get(index as usize)
            .and_then(|v| v.get(vector as usize))
            .copied()
            .unwrap_or(false)
    }

    /// The model raises vector `vector` of `index`.
    pub(crate) fn raise(&mut self, cfg: &mut ConfigSpace, index: u32, vector: u32) {
        if vector >= self.count(index) {
            warn!("model raised irq {index}.{vector}, which does not exist; ignored");
            return;
        }
        match index {
            pci_irq::INTX => {
                cfg.set_intx_level(true);
                self.deliver_intx(cfg);
            }
            pci_irq::MSI => {
                if cfg.msi_mask() & (1 << vector) != 0 {
                    cfg.set_msi_pending(vector, true);
                } else {
                    self.sink.trigger(index, vector);
                }
            }
            pci_irq::MSIX => {
                if cfg.msix_function_masked() {
                    if let Some(p) = self.msix_pending.get_mut(vector as usize) {
                        *p = true;
                    }
                } else {
                    self.sink.trigger(index, vector);
                }
            }
            _ => self.sink.trigger(index, vector),
        }
    }

    /// The model de-asserts INTx.
    pub(crate) fn lower_intx(&mut self, cfg: &mut ConfigSpace) {
        cfg.set_intx_level(false);
    }

    /// Signals INTx if it is asserted and nothing holds it back; automasks.
    fn deliver_intx(&mut self, cfg: &mut ConfigSpace) {
        if cfg.intx_level()
            && !self.intx_masked
            && !cfg.intx_disabled()
            && self.is_assigned(pci_irq::INTX, 0)
        {
            debug!("INTx signalled");
            self.sink.trigger(pci_irq::INTX, 0);
            self.intx_masked = true;
        }
    }

    /// Whether INTx is masked by the client (or automasked).
    pub(crate) fn intx_masked(&self) -> bool {
        self.intx_masked
    }

    /// Delivers what a configuration write unblocked.
    pub(crate) fn after_config_write(&mut self, cfg: &mut ConfigSpace, fx: WriteEffects) {
        if fx.intx_unblocked {
            self.deliver_intx(cfg);
        }
        let pending = cfg.msi_pending() & fx.msi_unmasked;
        for v in 0..32u32 {
            if pending & (1 << v) != 0 {
                cfg.set_msi_pending(v, false);
                self.sink.trigger(pci_irq::MSI, v);
            }
        }
        if fx.msix_unmasked && !cfg.msix_function_masked() {
            for (v, p) in self.msix_pending.iter_mut().enumerate() {
                if std::mem::take(p) {
                    self.sink.trigger(pci_irq::MSIX, v as u32);
                }
            }
        }
    }

    /// Device reset: nothing asserted or pending; the client's assignments stay.
    pub(crate) fn device_reset(&mut self, cfg: &mut ConfigSpace) {
        cfg.set_intx_level(false);
        self.intx_masked = false;
        self.msix_pending.fill(false);
    }

    /// The client went away: every assignment is dropped; device state (INTx level,
    /// pending bits) stays.
    pub(crate) fn client_gone(&mut self) {
        self.sink.clear();
        for a in &mut self.assigned {
            a.fill(false);
        }
        self.intx_masked = false;
    }

    fn set_assigned(&mut self, index: u32, start: u32, count: u32, value: bool) {
        if let Some(a) = self.assigned.get_mut(index as usize) {
            for v in start..start.saturating_add(count) {
                if let Some(slot) = a.get_mut(v as usize) {
                    *slot = value;
                }
            }
        }
    }

    /// DEVICE_SET_IRQS, validated against this device as Linux vfio-pci and
    /// libvfio-user do.
    pub(crate) fn set_irqs(
        &mut self,
        cfg: &mut ConfigSpace,
        req: &SetIrqs,
        fds: IrqFds,
    ) -> Result<(), Errno> {
        let index = req.index;
        if index >= pci_irq::COUNT {
            return Err(EINVAL);
        }
        let max = self.count(index);
        let end = req.start.checked_add(req.count).ok_or(EINVAL)?;
        if req.start >= max || end > max {
            return Err(EINVAL);
        }
        let eventfd_assign = matches!(req.data, IrqData::EventFd { assign: true });
        if !eventfd_assign && fds.count() != 0 {
            return Err(EINVAL);
        }
        if req.count == 0 {
            // DATA_NONE | TRIGGER, start 0, count 0: disable the whole index.
            if req.action != IRQ_SET_ACTION_TRIGGER || !matches!(req.data, IrqData::None) {
                return Err(EINVAL);
            }
            self.deassign(index, 0, max, &fds);
            if index == pci_irq::INTX {
                self.intx_masked = false;
            }
            if index == pci_irq::MSIX {
                self.msix_pending.fill(false);
            }
            return Ok(());
        }
        // ERR and REQ only trigger.
        if matches!(index, pci_irq::ERR | pci_irq::REQ) && req.action != IRQ_SET_ACTION_TRIGGER {
            return Err(EINVAL);
        }
        match (&req.data, req.action) {
            (IrqData::EventFd { assign }, IRQ_SET_ACTION_TRIGGER) => {
                if *assign {
                    if fds.count() != req.count as usize {
                        return Err(EINVAL);
                    }
                    if let IrqFds::Direct(v) = &fds {
                        if v.iter().any(|f| is_eventfd(f) == Some(false)) {
                            warn!("irq {index}: SET_IRQS with an fd that is not an eventfd");
                            return Err(EINVAL);
                        }
                    }
                    match fds {
                        IrqFds::Direct(v) => {
                            self.sink.set_eventfds(index, req.start, req.count, Some(v))
                        }
                        IrqFds::Slots(_) => {
                            self.sink.assign_slots(index, req.start, req.count, true)
                        }
                    }
                    self.set_assigned(index, req.start, req.count, true);
                    if index == pci_irq::INTX {
                        // A fresh trigger starts unmasked; a level already asserted
                        // fires now.
                        self.intx_masked = false;
                        self.deliver_intx(cfg);
                    }
                } else {
                    self.deassign(index, req.start, req.count, &fds);
                }
                Ok(())
            }
            // Unmask/mask eventfds (irqfd resampling) are not supported; clients fall
            // back to explicit UNMASK messages.
            (IrqData::EventFd { .. }, _) => Err(EINVAL),
            (data, action) => {
                let selected = |i: u32| match data {
                    IrqData::Bool(b) => b.get(i as usize).is_some_and(|x| *x != 0),
                    _ => true,
                };
                match action {
                    IRQ_SET_ACTION_TRIGGER => {
                        for i in 0..req.count {
                            if selected(i) {
                                self.sink.trigger(index, req.start + i);
                            }
                        }
                        Ok(())
                    }
                    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK if index == pci_irq::INTX => {
                        if selected(0) {
                            if action == IRQ_SET_ACTION_MASK {
                                self.intx_masked = true;
                            } else {
                                self.intx_masked = false;
                                self.deliver_intx(cfg);
                            }
                        }
                        Ok(())
                    }
                    _ => Err(EINVAL),
                }
            }
        }
    }

    fn deassign(&mut self, index: u32, start: u32, count: u32, fds: &IrqFds) {
        match fds {
            IrqFds::Direct(_) => self.sink.set_eventfds(index, start, count, None),
            IrqFds::Slots(_) => self.sink.assign_slots(index, start, count, false),
        }
        self.set_assigned(index, start, count, false);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A duplicate of `efd` as an owned fd.
    fn dup(efd: &EventFd) -> OwnedFd {
        let e = efd.try_clone().unwrap();
        // SAFETY: `into_raw_fd` gives up the only owner of the fresh duplicate.
        unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
    }

    /// What a [`RecordingIrqs`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum IrqEvent {
        Assign(u32, u32, u32, usize),
        Deassign(u32, u32, u32),
        Slots(u32, u32, u32, bool),
        Trigger(u32, u32),
        Clear,
    }

    /// An [`IrqSink`] that records calls, shared with the test.
    #[derive(Clone, Default)]
    pub(crate) struct RecordingIrqs(pub Arc<Mutex<Vec<IrqEvent>>>);

    impl RecordingIrqs {
        pub(crate) fn take(&self) -> Vec<IrqEvent> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl IrqSink for RecordingIrqs {
        fn set_eventfds(&mut self, i: u32, s: u32, c: u32, fds: Option<Vec<OwnedFd>>) {
            let ev = match fds {
                Some(f) => IrqEvent::Assign(i, s, c, f.len()),
                None => IrqEvent::Deassign(i, s, c),
            };
            self.0.lock().unwrap().push(ev);
        }
        fn assign_slots(&mut self, i: u32, s: u32, c: u32, a: bool) {
            self.0.lock().unwrap().push(IrqEvent::Slots(i, s, c, a));
        }
        fn trigger(&mut self, i: u32, v: u32) {
            self.0.lock().unwrap().push(IrqEvent::Trigger(i, v));
        }
        fn clear(&mut self) {
            self.0.lock().unwrap().push(IrqEvent::Clear);
        }
    }

    /// EventFdIrqs writes to the eventfd of an assigned vector only, de-assigns and
    /// clears.
    #[test]
    fn eventfd_sink() {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = dup(&efd);
        let mut s = EventFdIrqs::new();
        s.set_eventfds(pci_irq::MSI, 2, 1, Some(vec![fd]));
        assert!(s.is_assigned(pci_irq::MSI, 2));
        s.trigger(pci_irq::MSI, 1);
        assert!(efd.read().is_err(), "vector 1 has no eventfd");
        s.trigger(pci_irq::MSI, 2);
        s.trigger(pci_irq::MSI, 2);
        assert_eq!(efd.read().unwrap(), 2);
        s.set_eventfds(pci_irq::MSI, 0, 4, None);
        assert!(s.is_empty());
        s.trigger(pci_irq::MSI, 2);
        assert!(efd.read().is_err());
        let fd = dup(&efd);
        s.set_eventfds(pci_irq::INTX, 0, 1, Some(vec![fd]));
        assert_eq!(s.len(), 1);
        s.clear();
        assert!(s.is_empty());
    }
}
