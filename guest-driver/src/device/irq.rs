//! Interrupts: where they go ([`IrqSink`]) and when they may go there.
//!
//! The server keeps, per IRQ index, which vectors the client assigned (DEVICE_SET_IRQS
//! with DATA_EVENTFD), and the state that decides whether a vector raised by the model
//! is delivered now, later, or not at all ([`IrqDelivery`]):
//!
//! - INTx is a level. [`DeviceContext::raise_irq`](super::DeviceContext::raise_irq)
//!   asserts it, [`DeviceContext::lower_intx`](super::DeviceContext::lower_intx)
//!   de-asserts it. It is signalled (one edge toward the client eventfd) when it is
//!   asserted, not masked, not disabled by the command register's INTx disable bit, and
//!   assigned; signalling masks it (AUTOMASKED, like Linux vfio-pci) until the client
//!   unmasks it. A level still asserted when the client unmasks it, clears INTx
//!   disable, or assigns an eventfd is signalled then.
//! - MSI: a vector is dropped unless MSI is enabled in the capability and the vector is
//!   among those the driver enabled (Multiple Message Enable). A vector whose mask bit
//!   is set in the capability, or that the client masked with SET_IRQS, gets its
//!   pending bit set instead and is signalled when nothing masks it any more.
//! - MSI-X: a vector is dropped unless MSI-X is enabled in the capability. While the
//!   function mask, the vector's mask bit in the MSI-X table ([`super::msix`]) or a
//!   SET_IRQS mask holds it, its PBA bit is set; it is signalled, and the bit cleared,
//!   when the last of those is cleared.
//! - ERR and REQ are signalled as raised.
//!
//! DEVICE_SET_IRQS: DATA_EVENTFD with TRIGGER assigns eventfds (fd -1 / `assign:
//! false` de-assigns); MASK and UNMASK (DATA_NONE or DATA_BOOL) work on INTx, MSI and
//! MSI-X vectors; TRIGGER with DATA_NONE or DATA_BOOL signals the selected vectors
//! as is; count 0 with DATA_NONE | TRIGGER disables the index: every vector
//! de-assigned, client masks and pending bits of the index cleared.
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

use super::description::MsixDesc;
use super::errno::{Errno, EINVAL};
use super::msix::{MsixEntry, MsixTable};
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

/// What became of an interrupt a model raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqDelivery {
    /// Handed to the [`IrqSink`]: it reaches the client if the client assigned an
    /// eventfd (or tunnel slot) to the vector.
    Signalled,
    /// Held back and remembered: INTx asserted while masked, disabled or unassigned;
    /// an MSI or MSI-X vector masked (its pending bit is set). It is delivered when
    /// what holds it back goes away.
    Pending,
    /// Dropped: MSI or MSI-X is not enabled in its capability (for MSI, or the vector
    /// is beyond the vectors the driver enabled). A model may fall back to INTx
    /// ([`DeviceContext::raise_interrupt`](super::DeviceContext::raise_interrupt)
    /// does).
    Disabled,
    /// Dropped: the device has no such vector.
    Invalid,
}

/// Interrupt state of one device: counts, assignments, masks and pending vectors.
pub(crate) struct IrqState {
    sink: Box<dyn IrqSink>,
    counts: [u32; pci_irq::COUNT as usize],
    assigned: [Vec<bool>; pci_irq::COUNT as usize],
    intx_masked: bool,
    /// MSI vectors the client masked with SET_IRQS.
    msi_client_masked: Vec<bool>,
    /// MSI-X vectors the client masked with SET_IRQS.
    msix_client_masked: Vec<bool>,
    msix: Option<MsixTable>,
    /// The device is stopped (migration): nothing is signalled, interrupts are held
    /// pending until [`release`](Self::release).
    held: bool,
}

impl IrqState {
    /// `counts`: vectors per index (INTx, MSI, MSI-X, ERR, REQ); `msix`: where the MSI-X
    /// table and PBA are (the MSI-X count must be its vector count).
    pub(crate) fn new(
        sink: Box<dyn IrqSink>,
        counts: [u32; pci_irq::COUNT as usize],
        msix: Option<MsixDesc>,
    ) -> Self {
        Self {
            sink,
            counts,
            assigned: counts.map(|n| vec![false; n as usize]),
            intx_masked: false,
            msi_client_masked: vec![false; counts[pci_irq::MSI as usize] as usize],
            msix_client_masked: vec![false; counts[pci_irq::MSIX as usize] as usize],
            msix: msix.map(MsixTable::new),
            held: false,
        }
    }

    /// The device stops: from now on nothing the device raises or a configuration
    /// change releases is signalled; INTx stays asserted, MSI and MSI-X vectors get
    /// their pending bits.
    pub(crate) fn hold(&mut self) {
        self.held = true;
    }

    /// The device runs again: what was held (an asserted INTx, pending MSI and MSI-X
    /// vectors that nothing masks) is delivered.
    pub(crate) fn release(&mut self, cfg: &mut ConfigSpace) {
        self.held = false;
        self.deliver_intx(cfg);
        self.flush(cfg);
    }

    /// The MSI-X table and PBA, for a migration stream (`None` without MSI-X).
    pub(crate) fn msix_table(&self) -> Option<&MsixTable> {
        self.msix.as_ref()
    }

    /// Checks a saved MSI-X state of `vectors` vectors against this device.
    pub(crate) fn check_msix_state(
        &self,
        vectors: u16,
        table: &[u8],
        pending: &[u64],
    ) -> Result<(), String> {
        let own = self.count(pci_irq::MSIX);
        if u32::from(vectors) != own {
            return Err(format!("{vectors} MSI-X vectors; this device has {own}"));
        }
        match &self.msix {
            Some(t) => t.check_state(table, pending),
            None => Ok(()),
        }
    }

    /// Loads a checked MSI-X state.
    pub(crate) fn set_msix_state(&mut self, table: &[u8], pending: &[u64]) {
        if let Some(t) = &mut self.msix {
            t.set_state(table, pending);
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

    /// Whether the client masked vector `vector` of MSI or MSI-X with SET_IRQS.
    fn client_masked(&self, index: u32, vector: u32) -> bool {
        let v = match index {
            pci_irq::MSI => &self.msi_client_masked,
            pci_irq::MSIX => &self.msix_client_masked,
            _ => return false,
        };
        v.get(vector as usize).copied().unwrap_or(false)
    }

    /// Whether anything masks vector `vector` of `index`: for INTx the client's mask
    /// (or automask); for MSI the capability's mask bit or the client's; for MSI-X the
    /// function mask, the vector's mask bit or the client's.
    pub(crate) fn masked(&self, cfg: &ConfigSpace, index: u32, vector: u32) -> bool {
        match index {
            pci_irq::INTX => self.intx_masked,
            pci_irq::MSI => {
                vector < 32 && cfg.msi_mask() & (1 << vector) != 0
                    || self.client_masked(index, vector)
            }
            pci_irq::MSIX => {
                cfg.msix_function_masked()
                    || self.msix.as_ref().is_some_and(|t| t.masked(vector))
                    || self.client_masked(index, vector)
            }
            _ => false,
        }
    }

    /// Whether vector `vector` of `index` is pending: INTx asserted and not yet
    /// signalled, or the MSI / MSI-X pending bit.
    pub(crate) fn pending(&self, cfg: &ConfigSpace, index: u32, vector: u32) -> bool {
        match index {
            pci_irq::INTX => vector == 0 && cfg.intx_level() && !self.intx_masked,
            pci_irq::MSI => vector < 32 && cfg.msi_pending() & (1 << vector) != 0,
            pci_irq::MSIX => self.msix.as_ref().is_some_and(|t| t.pending(vector)),
            _ => false,
        }
    }

    /// The model raises vector `vector` of `index`.
    pub(crate) fn raise(&mut self, cfg: &mut ConfigSpace, index: u32, vector: u32) -> IrqDelivery {
        if vector >= self.count(index) {
            warn!("model raised irq {index}.{vector}, which does not exist; ignored");
            return IrqDelivery::Invalid;
        }
        match index {
            pci_irq::INTX => {
                cfg.set_intx_level(true);
                if self.deliver_intx(cfg) {
                    IrqDelivery::Signalled
                } else {
                    IrqDelivery::Pending
                }
            }
            pci_irq::MSI => {
                if !cfg.msi_enabled() || vector >= cfg.msi_enabled_vectors() {
                    debug!("MSI vector {vector} raised while not enabled; dropped");
                    return IrqDelivery::Disabled;
                }
                if self.held || self.masked(cfg, index, vector) {
                    cfg.set_msi_pending(vector, true);
                    IrqDelivery::Pending
                } else {
                    self.sink.trigger(index, vector);
                    IrqDelivery::Signalled
                }
            }
            pci_irq::MSIX => {
                if !cfg.msix_enabled() {
                    debug!("MSI-X vector {vector} raised while not enabled; dropped");
                    return IrqDelivery::Disabled;
                }
                if self.held || self.masked(cfg, index, vector) {
                    if let Some(t) = &mut self.msix {
                        t.set_pending(vector, true);
                    }
                    IrqDelivery::Pending
                } else {
                    self.sink.trigger(index, vector);
                    IrqDelivery::Signalled
                }
            }
            _ => {
                self.sink.trigger(index, vector);
                IrqDelivery::Signalled
            }
        }
    }

    /// The model de-asserts INTx.
    pub(crate) fn lower_intx(&mut self, cfg: &mut ConfigSpace) {
        cfg.set_intx_level(false);
    }

    /// Signals INTx if it is asserted and nothing holds it back; automasks. Returns
    /// whether it signalled.
    fn deliver_intx(&mut self, cfg: &mut ConfigSpace) -> bool {
        if cfg.intx_level()
            && !self.held
            && !self.intx_masked
            && !cfg.intx_disabled()
            && self.is_assigned(pci_irq::INTX, 0)
        {
            debug!("INTx signalled");
            self.sink.trigger(pci_irq::INTX, 0);
            self.intx_masked = true;
            return true;
        }
        false
    }

    /// Whether INTx is masked by the client (or automasked).
    pub(crate) fn intx_masked(&self) -> bool {
        self.intx_masked
    }

    /// Delivers every pending MSI and MSI-X vector that nothing holds back any more,
    /// clearing its pending bit.
    fn flush(&mut self, cfg: &mut ConfigSpace) {
        if self.held {
            return;
        }
        if cfg.msi_enabled() {
            let enabled = cfg.msi_enabled_vectors().min(self.count(pci_irq::MSI));
            for v in 0..enabled.min(32) {
                if self.pending(cfg, pci_irq::MSI, v) && !self.masked(cfg, pci_irq::MSI, v) {
                    cfg.set_msi_pending(v, false);
                    self.sink.trigger(pci_irq::MSI, v);
                }
            }
        }
        if cfg.msix_enabled() && !cfg.msix_function_masked() {
            for v in 0..self.count(pci_irq::MSIX) {
                if self.pending(cfg, pci_irq::MSIX, v) && !self.masked(cfg, pci_irq::MSIX, v) {
                    if let Some(t) = &mut self.msix {
                        t.set_pending(v, false);
                    }
                    self.sink.trigger(pci_irq::MSIX, v);
                }
            }
        }
    }

    /// Delivers what a configuration write unblocked (INTx disable cleared, MSI or
    /// MSI-X enabled or unmasked).
    pub(crate) fn after_config_write(&mut self, cfg: &mut ConfigSpace, fx: WriteEffects) {
        if fx.intx_unblocked {
            self.deliver_intx(cfg);
        }
        self.flush(cfg);
    }

    /// The byte ranges of BAR `bar` that the MSI-X emulation owns.
    pub(crate) fn msix_ranges(&self, bar: u8) -> Vec<(u64, u64)> {
        self.msix.as_ref().map_or_else(Vec::new, |t| t.ranges(bar))
    }

    /// Reads the MSI-X table or PBA.
    pub(crate) fn msix_read(&self, bar: u8, offset: u64, out: &mut [u8]) {
        match &self.msix {
            Some(t) => t.read(bar, offset, out),
            None => out.fill(0),
        }
    }

    /// Writes the MSI-X table (the PBA is read-only), then delivers what an unmask
    /// released.
    pub(crate) fn msix_write(&mut self, cfg: &mut ConfigSpace, bar: u8, offset: u64, data: &[u8]) {
        if let Some(t) = &mut self.msix {
            t.write(bar, offset, data);
        }
        self.flush(cfg);
    }

    /// The MSI-X table entry of `vector`.
    pub(crate) fn msix_entry(&self, vector: u32) -> Option<MsixEntry> {
        self.msix.as_ref().and_then(|t| t.entry(vector))
    }

    /// Device reset: nothing asserted or pending, the MSI-X table at its reset values;
    /// the client's assignments and masks stay.
    pub(crate) fn device_reset(&mut self, cfg: &mut ConfigSpace) {
        self.held = false;
        cfg.set_intx_level(false);
        self.intx_masked = false;
        if let Some(t) = &mut self.msix {
            t.reset();
        }
    }

    /// The client went away: every assignment and client mask is dropped; device state
    /// (INTx level, pending bits, the MSI-X table) stays.
    pub(crate) fn client_gone(&mut self) {
        self.sink.clear();
        for a in &mut self.assigned {
            a.fill(false);
        }
        self.intx_masked = false;
        self.msi_client_masked.fill(false);
        self.msix_client_masked.fill(false);
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
            match index {
                pci_irq::INTX => self.intx_masked = false,
                pci_irq::MSI => {
                    self.msi_client_masked.fill(false);
                    for v in 0..max.min(32) {
                        cfg.set_msi_pending(v, false);
                    }
                }
                pci_irq::MSIX => {
                    self.msix_client_masked.fill(false);
                    if let Some(t) = &mut self.msix {
                        t.clear_pending();
                    }
                }
                _ => {}
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
                    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK => {
                        let mask = action == IRQ_SET_ACTION_MASK;
                        match index {
                            pci_irq::INTX => {
                                if selected(0) {
                                    self.intx_masked = mask;
                                    if !mask {
                                        self.deliver_intx(cfg);
                                    }
                                }
                            }
                            pci_irq::MSI | pci_irq::MSIX => {
                                let masks = if index == pci_irq::MSI {
                                    &mut self.msi_client_masked
                                } else {
                                    &mut self.msix_client_masked
                                };
                                for i in 0..req.count {
                                    if selected(i) {
                                        if let Some(m) = masks.get_mut((req.start + i) as usize) {
                                            *m = mask;
                                        }
                                    }
                                }
                                if !mask {
                                    self.flush(cfg);
                                }
                            }
                            _ => return Err(EINVAL),
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
