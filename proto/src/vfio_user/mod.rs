//! The vfio-user protocol (QEMU `docs/interop/vfio-user.rst`).
//!
//! Every command is a [`Request`] and a [`Reply`]; [`Request::decode`] and
//! [`Reply::decode`] turn a payload (the bytes after the [`Header`]) and the number of
//! file descriptors that came with it into a typed value, checking every length, count
//! and flag on the way. [`encode_request`], [`encode_reply`] and [`encode_error_reply`]
//! build whole messages.
//!
//! Where implementations disagree with the spec, the decoders accept what the known
//! peers send and the encoders send what the spec says; each such place is documented
//! on the type concerned (DMA_READ/DMA_WRITE count width, DMA_UNMAP flags, the
//! GET_REGION_IO_FDS entry size).

mod device;
mod dma;
mod error;
mod feature;
mod header;
mod message;
mod migration;
mod region;
mod region_info;
mod version;

pub use device::*;
pub use dma::*;
pub use error::DecodeError;
pub use feature::*;
pub use header::{Header, MessageType, HEADER_SIZE};
pub use message::{encode_error_reply, encode_reply, encode_request, Reply, Request};
pub use migration::*;
pub use region::*;
pub use region_info::*;
pub use version::*;

/// Default `max_msg_fds` when a peer does not state it.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_data_xfer_size` when a peer does not state it.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes`: 4 KiB pages only.
pub const DEFAULT_PGSIZES: u64 = 4096;

/// PCI region indexes (`VFIO_PCI_*_REGION_INDEX`).
pub mod pci_region {
    /// BAR 0; BARs 1 to 5 follow.
    pub const BAR0: u32 = 0;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Configuration space.
    pub const CONFIG: u32 = 7;
    /// Legacy VGA.
    pub const VGA: u32 = 8;
    /// Number of standard PCI regions.
    pub const COUNT: u32 = 9;
}

/// PCI interrupt indexes (`VFIO_PCI_*_IRQ_INDEX`).
pub mod pci_irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error reporting.
    pub const ERR: u32 = 3;
    /// Device request.
    pub const REQ: u32 = 4;
    /// Number of PCI interrupt indexes.
    pub const COUNT: u32 = 5;
}

/// vfio-user command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// VFIO_USER_VERSION
    Version = 1,
    /// VFIO_USER_DMA_MAP
    DmaMap = 2,
    /// VFIO_USER_DMA_UNMAP
    DmaUnmap = 3,
    /// VFIO_USER_DEVICE_GET_INFO
    DeviceGetInfo = 4,
    /// VFIO_USER_DEVICE_GET_REGION_INFO
    DeviceGetRegionInfo = 5,
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS
    DeviceGetRegionIoFds = 6,
    /// VFIO_USER_DEVICE_GET_IRQ_INFO
    DeviceGetIrqInfo = 7,
    /// VFIO_USER_DEVICE_SET_IRQS
    DeviceSetIrqs = 8,
    /// VFIO_USER_REGION_READ
    RegionRead = 9,
    /// VFIO_USER_REGION_WRITE
    RegionWrite = 10,
    /// VFIO_USER_DMA_READ (server to client)
    DmaRead = 11,
    /// VFIO_USER_DMA_WRITE (server to client)
    DmaWrite = 12,
    /// VFIO_USER_DEVICE_RESET
    DeviceReset = 13,
    /// VFIO_USER_REGION_WRITE_MULTI
    RegionWriteMulti = 15,
    /// VFIO_USER_DEVICE_FEATURE
    DeviceFeature = 16,
    /// VFIO_USER_MIG_DATA_READ
    MigDataRead = 17,
    /// VFIO_USER_MIG_DATA_WRITE
    MigDataWrite = 18,
}

/// Whether a client's request with command number `command` may come with fds
/// (DMA_MAP: the memory; DEVICE_SET_IRQS: eventfds). A transport that must tell which
/// of several messages some fds came with asks this
/// ([`crate::transport::MessageReader::buffered`]).
pub fn request_may_carry_fds(command: u16) -> bool {
    command == Command::DmaMap as u16 || command == Command::DeviceSetIrqs as u16
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 17] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    /// Whether the server sends this command to the client (DMA_READ / DMA_WRITE).
    pub fn is_server_to_client(self) -> bool {
        matches!(self, Command::DmaRead | Command::DmaWrite)
    }

    /// The spec's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VERSION",
            Command::DmaMap => "DMA_MAP",
            Command::DmaUnmap => "DMA_UNMAP",
            Command::DeviceGetInfo => "DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "DEVICE_SET_IRQS",
            Command::RegionRead => "REGION_READ",
            Command::RegionWrite => "REGION_WRITE",
            Command::DmaRead => "DMA_READ",
            Command::DmaWrite => "DMA_WRITE",
            Command::DeviceReset => "DEVICE_RESET",
            Command::RegionWriteMulti => "REGION_WRITE_MULTI",
            Command::DeviceFeature => "DEVICE_FEATURE",
            Command::MigDataRead => "MIG_DATA_READ",
            Command::MigDataWrite => "MIG_DATA_WRITE",
        }
    }
}

impl TryFrom<u16> for Command {
    type Error = DecodeError;

    fn try_from(v: u16) -> Result<Self, DecodeError> {
        Command::ALL
            .iter()
            .copied()
            .find(|c| *c as u16 == v)
            .ok_or(DecodeError::UnknownCommand { command: v })
    }
}

/// Checks that nothing follows the last field.
pub(crate) fn expect_end(r: &crate::wire::Reader<'_>) -> Result<(), DecodeError> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(DecodeError::TrailingBytes { extra }),
    }
}

/// An `argsz` below the fixed size the spec requires.
pub(crate) fn check_argsz(field: &'static str, argsz: u32, min: u32) -> Result<(), DecodeError> {
    if argsz < min {
        return Err(DecodeError::InvalidField {
            field,
            value: argsz.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
