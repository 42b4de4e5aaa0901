//! The device API: what libvfio-user is for C, in Rust.
//!
//! A device author implements [`DeviceModel`]: a static [`DeviceDescription`] (PCI
//! identity, BARs, interrupts, capabilities), BAR accesses and reset. The library does
//! the rest: [`DeviceServer`] answers every vfio-user request for the model — the
//! version handshake, device/region/IRQ information, the PCI configuration space
//! ([`pci_config`]), region dispatch with bounds, width and alignment checks, interrupt
//! assignment and masking ([`irq`]), MSI-X table and PBA emulation ([`msix`]), the DMA
//! map table and DMA access ([`dma`]) and reset. The same server runs behind a plain
//! vfio-user socket ([`crate::direct`]) or behind the tunnel (where fds are replaced by
//! slots: [`DeviceServer::handle_tunnel`]).
//!
//! A model talks back through the [`DeviceContext`] it is handed on every call: to
//! raise an interrupt ([`DeviceContext::raise_interrupt`]), or to read and write the
//! client's memory ([`DeviceContext::dma`]).
//!
//! A model that implements [`DeviceModel::save`] and [`DeviceModel::restore`]
//! migrates: the library runs the migration state machine ([`migration`]), saves and
//! loads its own part of the state (config space, interrupt state, MSI-X table) around
//! the model's, and logs the pages the model's DMA writes ([`dirty_log`]).

pub mod description;
pub mod dirty_log;
pub mod dma;
pub mod errno;
pub mod irq;
pub mod lspci;
pub mod migration;
pub mod msix;
pub mod pci_config;
pub mod server;

use std::os::fd::BorrowedFd;

pub use description::{
    BarDesc, BarKind, Capability, DescriptionError, DeviceDescription, MsixDesc, PcieDeviceType,
};
pub use dma::{Dma, DmaBacking, DmaRegion, DmaRemote, DmaTable, NoRemote};
pub use errno::Errno;
pub use irq::{EventFdIrqs, IrqDelivery, IrqSink};
pub use msix::MsixEntry;
pub use server::{DeviceServer, Response};

use irq::IrqState;
use pci_config::ConfigSpace;
use vfu_proto::vfio_user::pci_irq;

/// A device model: what a device author implements.
///
/// Every method gets a [`DeviceContext`] to signal interrupts, reach the client's
/// memory by DMA and look at the state the library keeps (command register, MSI
/// enables). Errors are positive errnos
/// ([`errno`]); the server answers the client with them.
pub trait DeviceModel: Send {
    /// Static description: PCI identity, BARs, capabilities, IRQ counts. Called once,
    /// when the server is built.
    fn describe(&self) -> DeviceDescription;

    /// Reads `data.len()` bytes at `offset` of BAR `bar` (0..=5). Width, alignment and
    /// bounds have been checked against the [`BarDesc`]. Accesses to the MSI-X table and
    /// PBA are answered by the library and never come here.
    fn bar_read(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), Errno>;

    /// Writes `data` at `offset` of BAR `bar` (0..=5), checked like
    /// [`bar_read`](Self::bar_read).
    fn bar_write(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno>;

    /// Device reset (DEVICE_RESET, or a function level reset written to the PCI Express
    /// capability): back to the power-on state. The configuration space and the
    /// interrupt state are already reset when this is called.
    fn reset(&mut self, ctx: &mut DeviceContext<'_>);

    /// Reads configuration space bytes the library does not emulate: those after the
    /// 64-byte header that no capability covers (device-specific registers), and the
    /// extended space of a PCI Express device. `offset` is where `data` starts; the run
    /// never covers an emulated byte. Default: reads 0.
    fn config_read(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        offset: u16,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        let _ = (ctx, offset);
        data.fill(0);
        Ok(())
    }

    /// Writes configuration space bytes the library does not emulate (see
    /// [`config_read`](Self::config_read)). Default: ignored.
    fn config_write(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        offset: u16,
        data: &[u8],
    ) -> Result<(), Errno> {
        let _ = (ctx, offset, data);
        Ok(())
    }

    /// An fd that becomes readable when the model has work to do outside a request
    /// (an input changed, a timer expired). The serving loop polls it and then calls
    /// [`service`](Self::service), which must consume what made it readable.
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Does the work announced by [`event_fd`](Self::event_fd).
    fn service(&mut self, ctx: &mut DeviceContext<'_>) {
        let _ = ctx;
    }

    /// Migration: the model's state (registers, work in progress, anything a copy of
    /// the model needs to carry on as this one would), in a format of the model's
    /// choosing. Called when the device enters STOP_COPY, while it is stopped (no
    /// other call comes in between), and once when the server is built, to learn
    /// whether the model migrates at all. Default: `None`, the model does not migrate
    /// (the server then answers the migration features with `EOPNOTSUPP`).
    fn save(&self) -> Option<Vec<u8>> {
        None
    }

    /// Migration: loads what [`save`](Self::save) returned on another instance of the
    /// same model, when the device leaves RESUMING (stopped; the configuration space
    /// and interrupt state are loaded by the library right after). The bytes come from
    /// the client: check them, and on an error leave the model as it was; the errno
    /// fails the client's state change. Default: `EOPNOTSUPP`.
    fn restore(&mut self, state: &[u8]) -> Result<(), Errno> {
        let _ = state;
        Err(errno::EOPNOTSUPP)
    }
}

/// The handle the library gives a model on every call.
pub struct DeviceContext<'a> {
    config: &'a mut ConfigSpace,
    irqs: &'a mut IrqState,
    dma: &'a mut DmaTable,
    remote: &'a mut dyn DmaRemote,
}

impl<'a> DeviceContext<'a> {
    pub(crate) fn new(
        config: &'a mut ConfigSpace,
        irqs: &'a mut IrqState,
        dma: &'a mut DmaTable,
        remote: &'a mut dyn DmaRemote,
    ) -> Self {
        Self {
            config,
            irqs,
            dma,
            remote,
        }
    }

    /// Access to the client's memory: DMA reads and writes at IOVAs the client mapped
    /// ([`Dma`]). Regions mapped in this process are copied directly (volatile), the
    /// others through the transport (a round trip to the client or the relay); the
    /// model does not need to know which.
    pub fn dma(&mut self) -> Dma<'_> {
        Dma::new(self.dma, self.remote)
    }

    /// Raises vector `vector` of IRQ index `index` (`pci_irq::INTX` vector 0,
    /// `pci_irq::MSI`, `pci_irq::MSIX`, ...) and tells what became of it.
    ///
    /// INTx is a level: this asserts it until [`lower_intx`](Self::lower_intx); it
    /// reaches the client as one edge when it is not masked, not disabled by the
    /// command register's INTx disable bit and has an eventfd, and is held pending
    /// otherwise. An MSI or MSI-X vector is [`Disabled`](IrqDelivery::Disabled) (dropped)
    /// while its capability is not enabled; masked (capability or MSI-X table mask
    /// bit, MSI-X function mask, or the client's SET_IRQS mask) it is held pending
    /// until unmasked. Vectors that do not exist are [`Invalid`](IrqDelivery::Invalid)
    /// (logged).
    pub fn raise_irq(&mut self, index: u32, vector: u32) -> IrqDelivery {
        self.irqs.raise(self.config, index, vector)
    }

    /// Raises interrupt `vector` the way the driver set the device up: MSI-X vector
    /// `vector` if MSI-X is enabled, else MSI vector `vector` if MSI is enabled, else
    /// INTx (asserted whatever `vector` is; lower it with
    /// [`lower_intx`](Self::lower_intx) when the driver acknowledges).
    /// [`Disabled`](IrqDelivery::Disabled) for a device without INTx and with neither
    /// enabled.
    pub fn raise_interrupt(&mut self, vector: u32) -> IrqDelivery {
        if self.config.msix_enabled() {
            self.raise_irq(pci_irq::MSIX, vector)
        } else if self.config.msi_enabled() {
            self.raise_irq(pci_irq::MSI, vector)
        } else if self.irqs.count(pci_irq::INTX) > 0 {
            self.raise_irq(pci_irq::INTX, 0)
        } else {
            IrqDelivery::Disabled
        }
    }

    /// De-asserts INTx.
    pub fn lower_intx(&mut self) {
        self.irqs.lower_intx(self.config);
    }

    /// Whether the device asserts INTx.
    pub fn intx_asserted(&self) -> bool {
        self.config.intx_level()
    }

    /// Whether the client masked INTx (or it was automasked after a signal).
    pub fn intx_masked(&self) -> bool {
        self.irqs.intx_masked()
    }

    /// Whether the client assigned an eventfd (or tunnel slot) to the vector.
    pub fn irq_assigned(&self, index: u32, vector: u32) -> bool {
        self.irqs.is_assigned(index, vector)
    }

    /// Whether something masks the vector (see [`raise_irq`](Self::raise_irq)).
    pub fn irq_masked(&self, index: u32, vector: u32) -> bool {
        self.irqs.masked(self.config, index, vector)
    }

    /// Whether the vector is pending: INTx asserted and not signalled yet, or the MSI /
    /// MSI-X pending bit set.
    pub fn irq_pending(&self, index: u32, vector: u32) -> bool {
        self.irqs.pending(self.config, index, vector)
    }

    /// Entry `vector` of the MSI-X table (message address and data as the driver
    /// programmed them, mask bit).
    pub fn msix_entry(&self, vector: u32) -> Option<MsixEntry> {
        self.irqs.msix_entry(vector)
    }

    /// The PCI command register (memory/IO enable, bus master, INTx disable).
    pub fn command(&self) -> u16 {
        self.config.command()
    }

    /// Whether the driver enabled MSI in the MSI capability.
    pub fn msi_enabled(&self) -> bool {
        self.config.msi_enabled()
    }

    /// Whether the driver enabled MSI-X in the MSI-X capability.
    pub fn msix_enabled(&self) -> bool {
        self.config.msix_enabled()
    }

    /// Number of vectors of IRQ index `index`.
    pub fn irq_count(&self, index: u32) -> u32 {
        self.irqs.count(index)
    }

    /// Shorthand for raising INTx.
    pub fn raise_intx(&mut self) -> IrqDelivery {
        self.raise_irq(pci_irq::INTX, 0)
    }
}
