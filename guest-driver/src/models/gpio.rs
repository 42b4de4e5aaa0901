//! `gpio`: an ACCES PCI-IDIO-16 (16 isolated inputs, 16 FET outputs), register
//! compatible with libvfio-user's `samples/gpio-pci-idio-16.c` (same IDs and BAR) and
//! with the register map Linux's `gpio-pci-idio-16` driver programs.
//!
//! PCI identity: vendor 0x494f (ACCES I/O Products), device 0x0dc8, subsystem
//! 0x494f:0x0dc8, revision 0, conventional PCI (no capabilities), INTx on pin A.
//! Class code 0xff0000 ("unassigned"): what the real card reports could not be
//! established (libvfio-user's sample leaves it 0x000000).
//!
//! BAR 2: 256 bytes of I/O ports, like the real card and libvfio-user's sample;
//! accesses of 1 to 4 bytes, naturally aligned, handled byte by byte in address order.
//! Registers (the rest of the BAR reads 0 and ignores writes):
//!
//! | offset | read | write |
//! |---|---|---|
//! | 0 | FET outputs 0-7 | FET outputs 0-7 |
//! | 1 | isolated inputs 0-7 | clear interrupt: status to 0, INTx de-asserted |
//! | 2 | enable IRQ (reads 0); re-asserts INTx if an interrupt is latched | disable IRQ: INTx de-asserted, status kept |
//! | 3 | activate input filters 0-15 (reads 0) | deactivate input filters |
//! | 4 | FET outputs 8-15 | FET outputs 8-15 |
//! | 5 | isolated inputs 8-15 | unused |
//! | 6 | interrupt status | unused |
//! | 7 | filter status 0-7 (0xff while all filters are active) | filters 0-7 (ignored while all are active) |
//!
//! Interrupt status (offset 6): bit 0 an input of 0-7 changed, bit 1 an input of 8-15
//! changed, bit 2 an interrupt is latched. The Linux driver tests bit 2 (older ones
//! also test that bit 0 or 1 is set). A change of any input while IRQs are enabled
//! latches the interrupt, sets those bits and asserts INTx; status is not cleared by
//! reading, only by a write to offset 1, which is what the driver's ack does. Changes
//! while IRQs are disabled latch nothing.
//!
//! Inputs come from outside the device: [`Gpio::inputs`] hands out a [`GpioInputs`]
//! that sets them from any thread; the serving loop picks the change up through the
//! model's event fd. A reset clears outputs, interrupt state and filters and keeps the
//! input pins as they are.
//!
//! Migration state (`save`/`restore`), 10 bytes: `u8 format (1)`, `u8 flags` (bit 0
//! IRQ enabled, bit 1 filters active), `le16 outputs`, `le16 inputs` (as the device
//! saw them), `le16 pins` (as driven; differing from the inputs: a change the device
//! has not serviced yet), `u8 interrupt status`, `u8 filters`. A restored device
//! drives its pins to the saved value (the inputs migrate with the card) and, if they
//! differ from the inputs, services the change once it runs.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{BarDesc, DeviceContext, DeviceDescription, DeviceModel, Errno};

/// PCI vendor ID of ACCES I/O Products.
pub const VENDOR_ID: u16 = 0x494f;
/// PCI device ID of the PCI-IDIO-16.
pub const DEVICE_ID: u16 = 0x0dc8;
/// Class code presented (unassigned class).
pub const CLASS_CODE: u32 = 0xff_0000;
/// The register BAR.
pub const REG_BAR: u8 = 2;
/// Size of the register BAR.
pub const REG_BAR_SIZE: u64 = 0x100;

/// Register offsets in BAR 2.
pub mod reg {
    /// FET outputs 0-7.
    pub const OUT0_7: u64 = 0;
    /// Read: isolated inputs 0-7. Write: clear interrupt.
    pub const IN0_7: u64 = 1;
    /// Read: enable IRQ. Write: disable IRQ.
    pub const IRQ_CTL: u64 = 2;
    /// Read: activate input filters. Write: deactivate them.
    pub const FILTER_CTL: u64 = 3;
    /// FET outputs 8-15.
    pub const OUT8_15: u64 = 4;
    /// Isolated inputs 8-15.
    pub const IN8_15: u64 = 5;
    /// Interrupt status.
    pub const IRQ_STATUS: u64 = 6;
    /// Individual filters of inputs 0-7.
    pub const FILTER0_7: u64 = 7;
}

/// Format of the migration state.
const STATE_FORMAT: u8 = 1;
/// Size of the migration state.
const STATE_LEN: usize = 10;
/// Migration state flag: IRQ enabled.
const STATE_IRQ_ENABLED: u8 = 1 << 0;
/// Migration state flag: filters active.
const STATE_FILTERS_ACTIVE: u8 = 1 << 1;

/// Interrupt status bits.
pub mod status {
    /// An input of 0-7 changed.
    pub const IN0_7: u8 = 1 << 0;
    /// An input of 8-15 changed.
    pub const IN8_15: u8 = 1 << 1;
    /// An interrupt is latched.
    pub const IRQ: u8 = 1 << 2;
}

#[derive(Debug)]
struct Shared {
    pins: Mutex<u16>,
    event: Option<EventFd>,
}

/// Sets the input pins of a [`Gpio`] from outside the serving loop.
#[derive(Debug, Clone)]
pub struct GpioInputs {
    shared: Arc<Shared>,
}

impl GpioInputs {
    /// Drives the 16 input pins to `value` (bit n = input n energized); the device sees
    /// the change when the serving loop services it.
    pub fn set(&self, value: u16) {
        *self.shared.pins.lock().unwrap_or_else(|p| p.into_inner()) = value;
        if let Some(e) = &self.shared.event {
            if let Err(err) = e.write(1) {
                warn!("gpio: cannot signal the input change: {err}");
            }
        }
    }

    /// The value the pins are driven to.
    pub fn get(&self) -> u16 {
        *self.shared.pins.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The PCI-IDIO-16 model.
#[derive(Debug)]
pub struct Gpio {
    outputs: u16,
    inputs: u16,
    irq_enabled: bool,
    status: u8,
    filters_active: bool,
    filters: u8,
    shared: Arc<Shared>,
}

impl Default for Gpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Gpio {
    /// A card at power-on, all inputs de-energized.
    pub fn new() -> Self {
        let event = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| warn!("gpio: no eventfd for input changes: {e}"))
            .ok();
        Self {
            outputs: 0,
            inputs: 0,
            irq_enabled: false,
            status: 0,
            filters_active: false,
            filters: 0,
            shared: Arc::new(Shared {
                pins: Mutex::new(0),
                event,
            }),
        }
    }

    /// A handle to drive the input pins from elsewhere.
    pub fn inputs(&self) -> GpioInputs {
        GpioInputs {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The output latch (bit n = output n).
    pub fn outputs(&self) -> u16 {
        self.outputs
    }

    /// The input state the device has seen.
    pub fn input_state(&self) -> u16 {
        self.inputs
    }

    /// The interrupt status register.
    pub fn irq_status(&self) -> u8 {
        self.status
    }

    /// Inputs change to `value`: with IRQs enabled, a change latches an interrupt and
    /// asserts INTx.
    pub fn set_inputs(&mut self, ctx: &mut DeviceContext<'_>, value: u16) {
        let changed = self.inputs ^ value;
        self.inputs = value;
        if changed == 0 || !self.irq_enabled {
            return;
        }
        self.status |= status::IRQ;
        if changed & 0x00ff != 0 {
            self.status |= status::IN0_7;
        }
        if changed & 0xff00 != 0 {
            self.status |= status::IN8_15;
        }
        ctx.raise_intx();
    }

    fn read_reg(&mut self, ctx: &mut DeviceContext<'_>, offset: u64) -> u8 {
        match offset {
            reg::OUT0_7 => self.outputs as u8,
            reg::IN0_7 => self.inputs as u8,
            reg::IRQ_CTL => {
                self.irq_enabled = true;
                if self.status & status::IRQ != 0 {
                    ctx.raise_intx();
                }
                0
            }
            reg::FILTER_CTL => {
                self.filters_active = true;
                0
            }
            reg::OUT8_15 => (self.outputs >> 8) as u8,
            reg::IN8_15 => (self.inputs >> 8) as u8,
            reg::IRQ_STATUS => self.status,
            reg::FILTER0_7 => {
                if self.filters_active {
                    0xff
                } else {
                    self.filters
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, ctx: &mut DeviceContext<'_>, offset: u64, value: u8) {
        match offset {
            reg::OUT0_7 => self.outputs = (self.outputs & 0xff00) | u16::from(value),
            reg::IN0_7 => {
                self.status = 0;
                ctx.lower_intx();
            }
            reg::IRQ_CTL => {
                self.irq_enabled = false;
                ctx.lower_intx();
            }
            reg::FILTER_CTL => self.filters_active = false,
            reg::OUT8_15 => self.outputs = (self.outputs & 0x00ff) | u16::from(value) << 8,
            reg::FILTER0_7 if !self.filters_active => self.filters = value,
            _ => {}
        }
    }
}

impl DeviceModel for Gpio {
    fn describe(&self) -> DeviceDescription {
        let mut d = DeviceDescription::new(VENDOR_ID, DEVICE_ID, CLASS_CODE);
        d.subsystem_vendor_id = VENDOR_ID;
        d.subsystem_id = DEVICE_ID;
        d.bars[usize::from(REG_BAR)] = Some(BarDesc::io(REG_BAR_SIZE));
        d.intx = true;
        d
    }

    fn bar_read(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        if bar != REG_BAR {
            return Err(crate::device::errno::EINVAL);
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(ctx, offset.saturating_add(i as u64));
        }
        Ok(())
    }

    fn bar_write(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        if bar != REG_BAR {
            return Err(crate::device::errno::EINVAL);
        }
        for (i, b) in data.iter().enumerate() {
            self.write_reg(ctx, offset.saturating_add(i as u64), *b);
        }
        Ok(())
    }

    fn reset(&mut self, ctx: &mut DeviceContext<'_>) {
        self.outputs = 0;
        self.irq_enabled = false;
        self.status = 0;
        self.filters_active = false;
        self.filters = 0;
        ctx.lower_intx();
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.shared.event.as_ref().map(|e| {
            // SAFETY: the fd belongs to the EventFd inside `self.shared`, which lives at
            // least as long as `&self`, so it stays open for the borrow's lifetime.
            unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
        })
    }

    fn service(&mut self, ctx: &mut DeviceContext<'_>) {
        if let Some(e) = &self.shared.event {
            // Drain the notification; EAGAIN just means nothing was pending.
            let _ = e.read();
        }
        let pins = *self.shared.pins.lock().unwrap_or_else(|p| p.into_inner());
        self.set_inputs(ctx, pins);
    }

    fn save(&self) -> Option<Vec<u8>> {
        let pins = *self.shared.pins.lock().unwrap_or_else(|p| p.into_inner());
        let mut flags = 0;
        if self.irq_enabled {
            flags |= STATE_IRQ_ENABLED;
        }
        if self.filters_active {
            flags |= STATE_FILTERS_ACTIVE;
        }
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(&[STATE_FORMAT, flags]);
        for v in [self.outputs, self.inputs, pins] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[self.status, self.filters]);
        Some(out)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), Errno> {
        let einval = crate::device::errno::EINVAL;
        if state.len() != STATE_LEN || state[0] != STATE_FORMAT {
            warn!(
                "gpio: migration state of {} bytes, format {:?}; refused",
                state.len(),
                state.first()
            );
            return Err(einval);
        }
        let flags = state[1];
        let status = state[8];
        if flags & !(STATE_IRQ_ENABLED | STATE_FILTERS_ACTIVE) != 0
            || status & !(status::IN0_7 | status::IN8_15 | status::IRQ) != 0
        {
            warn!("gpio: migration state with unknown flag {flags:#x} or status {status:#x} bits; refused");
            return Err(einval);
        }
        let word = |at: usize| u16::from_le_bytes([state[at], state[at + 1]]);
        self.irq_enabled = flags & STATE_IRQ_ENABLED != 0;
        self.filters_active = flags & STATE_FILTERS_ACTIVE != 0;
        self.outputs = word(2);
        self.inputs = word(4);
        let pins = word(6);
        self.status = status;
        self.filters = state[9];
        *self.shared.pins.lock().unwrap_or_else(|p| p.into_inner()) = pins;
        if pins != self.inputs {
            if let Some(e) = &self.shared.event {
                if let Err(err) = e.write(1) {
                    warn!("gpio: cannot signal the pending input change: {err}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::irq::tests::{IrqEvent, RecordingIrqs};
    use crate::device::{DeviceServer, NoRemote};
    use vfu_proto::vfio_user::{
        pci_irq, IrqData, SetIrqs, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    };

    const BAR: u32 = REG_BAR as u32;

    fn server() -> (DeviceServer, GpioInputs, RecordingIrqs) {
        let gpio = Gpio::new();
        let inputs = gpio.inputs();
        let rec = RecordingIrqs::default();
        let mut s = DeviceServer::new(Box::new(gpio), Box::new(rec.clone()));
        // Assign the INTx "eventfd" through the tunnel form (no fds needed here).
        let req = SetIrqs {
            action: IRQ_SET_ACTION_TRIGGER,
            index: pci_irq::INTX,
            start: 0,
            count: 1,
            data: IrqData::EventFd { assign: true },
        };
        let h = vfu_proto::vfio_user::Header::command(1, 8, 20);
        assert!(matches!(
            s.handle_tunnel(
                &h,
                vfu_proto::vfio_user::Request::DeviceSetIrqs(req),
                &[vfu_proto::tunnel::Slot::eventfd()],
                &mut NoRemote
            ),
            crate::device::Response::Reply { .. }
        ));
        rec.take();
        (s, inputs, rec)
    }

    fn rd(s: &mut DeviceServer, off: u64) -> u8 {
        s.region_read(BAR, off, 1).unwrap()[0]
    }

    fn wr(s: &mut DeviceServer, off: u64, v: u8) {
        s.region_write(BAR, off, &[v]).unwrap();
    }

    fn unmask(s: &mut DeviceServer) {
        let req = SetIrqs {
            action: IRQ_SET_ACTION_UNMASK,
            index: pci_irq::INTX,
            start: 0,
            count: 1,
            data: IrqData::None,
        };
        let h = vfu_proto::vfio_user::Header::command(2, 8, 20);
        s.handle(
            &h,
            vfu_proto::vfio_user::Request::DeviceSetIrqs(req),
            Vec::new(),
            &mut NoRemote,
        );
    }

    /// Outputs read back per byte and as a 16-bit pair of registers; wider accesses
    /// and the unused part of the BAR behave; other BARs do not exist.
    #[test]
    fn outputs_read_back() {
        let (mut s, _, _) = server();
        wr(&mut s, reg::OUT0_7, 0xa5);
        wr(&mut s, reg::OUT8_15, 0x3c);
        assert_eq!(rd(&mut s, reg::OUT0_7), 0xa5);
        assert_eq!(rd(&mut s, reg::OUT8_15), 0x3c);
        s.region_write(BAR, 4, &[0x11, 0, 0, 0]).unwrap();
        assert_eq!(s.region_read(BAR, 4, 4).unwrap(), vec![0x11, 0, 0, 0]);
        assert_eq!(rd(&mut s, 0x80), 0);
        wr(&mut s, 0xff, 0x12);
        assert_eq!(
            s.region_read(BAR, 0x10, 8),
            Err(crate::device::errno::EINVAL)
        );
        assert_eq!(s.region_read(0, 0, 1), Err(crate::device::errno::EINVAL));
    }

    /// An input change with IRQs enabled latches status bits 2 and 0/1 and raises INTx
    /// once (automasked); the driver's ack (write offset 1) clears status and the
    /// level; with IRQs disabled a change latches nothing.
    #[test]
    fn input_change_interrupts() {
        let (mut s, inputs, rec) = server();
        inputs.set(0x0001);
        s.service(&mut NoRemote);
        assert_eq!(rd(&mut s, reg::IN0_7), 0x01);
        assert_eq!(rd(&mut s, reg::IRQ_STATUS), 0, "IRQs were disabled");
        assert!(rec.take().is_empty());
        assert_eq!(rd(&mut s, reg::IRQ_CTL), 0, "enable IRQ");
        inputs.set(0x0101);
        s.service(&mut NoRemote);
        assert_eq!(rd(&mut s, reg::IN8_15), 0x01);
        assert_eq!(rd(&mut s, reg::IRQ_STATUS), status::IRQ | status::IN8_15);
        assert_eq!(rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
        // Config status shows INTx asserted.
        let st = s.region_read(7, 6, 2).unwrap();
        assert_ne!(st[0] & 0x08, 0);
        // Another change while automasked: latched, no new edge.
        inputs.set(0x0100);
        s.service(&mut NoRemote);
        assert_eq!(
            rd(&mut s, reg::IRQ_STATUS),
            status::IRQ | status::IN0_7 | status::IN8_15
        );
        assert!(rec.take().is_empty());
        // Ack, then unmask: the level is gone, nothing fires.
        wr(&mut s, reg::IN0_7, 0);
        assert_eq!(rd(&mut s, reg::IRQ_STATUS), 0);
        unmask(&mut s);
        assert!(rec.take().is_empty());
        let st = s.region_read(7, 6, 2).unwrap();
        assert_eq!(st[0] & 0x08, 0);
        // Unmask while still asserted re-signals (level semantics).
        inputs.set(0x0000);
        s.service(&mut NoRemote);
        assert_eq!(rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
        unmask(&mut s);
        assert_eq!(rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
        // Disable IRQ drops the line; enabling again with the latch set re-asserts.
        wr(&mut s, reg::IRQ_CTL, 0);
        unmask(&mut s);
        assert!(rec.take().is_empty());
        rd(&mut s, reg::IRQ_CTL);
        assert_eq!(rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
    }

    /// Filters: reading offset 3 activates all, writing deactivates; individual
    /// filters 0-7 are writable only while the global filter is off.
    #[test]
    fn filters() {
        let (mut s, _, _) = server();
        wr(&mut s, reg::FILTER0_7, 0x0f);
        assert_eq!(rd(&mut s, reg::FILTER0_7), 0x0f);
        rd(&mut s, reg::FILTER_CTL);
        assert_eq!(rd(&mut s, reg::FILTER0_7), 0xff);
        wr(&mut s, reg::FILTER0_7, 0x01);
        wr(&mut s, reg::FILTER_CTL, 0);
        assert_eq!(rd(&mut s, reg::FILTER0_7), 0x0f);
    }

    /// DEVICE_RESET clears outputs, status and IRQ enable but keeps the input pins.
    #[test]
    fn reset_keeps_inputs() {
        let (mut s, inputs, _) = server();
        rd(&mut s, reg::IRQ_CTL);
        wr(&mut s, reg::OUT0_7, 0xff);
        inputs.set(0x8000);
        s.service(&mut NoRemote);
        assert_ne!(rd(&mut s, reg::IRQ_STATUS), 0);
        s.reset();
        assert_eq!(rd(&mut s, reg::OUT0_7), 0);
        assert_eq!(rd(&mut s, reg::IRQ_STATUS), 0);
        assert_eq!(rd(&mut s, reg::IN8_15), 0x80);
        inputs.set(0);
        s.service(&mut NoRemote);
        assert_eq!(rd(&mut s, reg::IRQ_STATUS), 0, "IRQs disabled after reset");
    }

    /// Registers that read without side effects.
    fn plain_registers(s: &mut DeviceServer) -> Vec<u8> {
        [
            reg::OUT0_7,
            reg::IN0_7,
            reg::OUT8_15,
            reg::IN8_15,
            reg::IRQ_STATUS,
            reg::FILTER0_7,
        ]
        .iter()
        .map(|&r| rd(s, r))
        .collect()
    }

    /// Migration: every register (outputs, inputs, IRQ enable, latched status, both
    /// filter settings) and the asserted INTx arrive on a fresh card; an input change
    /// the stopped card had not serviced is serviced by the new one when it runs.
    #[test]
    fn migrates() {
        use crate::device::migration::test_util::{load, save};
        let (mut a, inputs, _) = server();
        wr(&mut a, reg::OUT0_7, 0x5a);
        wr(&mut a, reg::OUT8_15, 0xc3);
        wr(&mut a, reg::FILTER0_7, 0x0f);
        rd(&mut a, reg::FILTER_CTL);
        rd(&mut a, reg::IRQ_CTL);
        inputs.set(0x0102);
        a.service(&mut NoRemote);
        let before = plain_registers(&mut a);
        assert_eq!(before, vec![0x5a, 0x02, 0xc3, 0x01, 0x07, 0xff]);
        // Stopped, the card does not see the inputs change.
        crate::device::migration::test_util::set_state(
            &mut a,
            vfu_proto::vfio_user::MigState::Stop,
        )
        .unwrap();
        inputs.set(0x8102);
        a.service(&mut NoRemote);
        let stream = save(&mut a);

        let (mut b, b_inputs, rec) = server();
        load(&mut b, &stream).unwrap();
        assert_eq!(plain_registers(&mut b), before);
        assert_eq!(b_inputs.get(), 0x8102, "the pins migrate");
        assert_eq!(
            rec.take(),
            vec![IrqEvent::Trigger(pci_irq::INTX, 0)],
            "INTx asserted"
        );
        assert!(b.event_fd().is_some(), "the pending change is announced");
        b.service(&mut NoRemote);
        assert_eq!(rd(&mut b, reg::IN8_15), 0x81);
        // Filters deactivated again show the individual filters that migrated.
        wr(&mut b, reg::FILTER_CTL, 0);
        assert_eq!(rd(&mut b, reg::FILTER0_7), 0x0f);
    }

    /// The model refuses a state of another length, format, or with unknown bits,
    /// and keeps its own.
    #[test]
    fn refuses_bad_state() {
        let mut g = Gpio::new();
        let good = g.save().unwrap();
        assert_eq!(good.len(), STATE_LEN);
        let einval = crate::device::errno::EINVAL;
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(g.restore(&bad), Err(einval));
        for (at, v) in [(0, 2), (1, 0x04), (8, 0x08)] {
            let mut bad = good.clone();
            bad[at] = v;
            assert_eq!(g.restore(&bad), Err(einval), "byte {at} = {v:#x}");
        }
        assert_eq!(g.save().unwrap(), good);
        g.restore(&good).unwrap();
    }

    /// The description matches the sample: IDs, I/O BAR 2 of 256 bytes, INTx, no
    /// capabilities.
    #[test]
    fn identity() {
        let d = Gpio::new().describe();
        assert_eq!((d.vendor_id, d.device_id), (0x494f, 0x0dc8));
        assert_eq!(d.bars[2], Some(BarDesc::io(0x100)));
        assert!(d.intx);
        assert!(d.validate().is_empty());
        assert_eq!(d.config_size(), 256);
    }
}
