//! DMA through the tunnel's copy path: a device model's access to client memory that has
//! no window becomes a DMA_READ or DMA_WRITE request to the relay, answered before the
//! model's call goes on.

use crate::device::errno::EFAULT;
use crate::device::{DmaRemote, Errno};

/// What the engine offers a channel for DMA: one request, its answer. How the request
/// travels (a buffer the relay fills in place, or messages both ways) is the engine's
/// choice.
pub trait DmaPort {
    /// Reads `buf.len()` bytes (at most [`DmaPort::max_chunk`]) of client memory at
    /// `iova`, for the device of `channel`.
    fn read(&mut self, channel: u32, iova: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Writes `data` (at most [`DmaPort::max_chunk`] bytes) to client memory at `iova`.
    fn write(&mut self, channel: u32, iova: u64, data: &[u8]) -> Result<(), Errno>;
    /// Largest data payload of one request.
    fn max_chunk(&self) -> usize;
}

/// The copy path of one channel, as the device API sees it. Whatever goes wrong on the
/// way (the relay refuses the range, the client does not answer) is `EFAULT` to the
/// model, as the [`DmaRemote`] contract says.
pub struct TunnelDma<'a> {
    /// The engine.
    pub port: &'a mut dyn DmaPort,
    /// The channel the requests are for.
    pub channel: u32,
}

impl DmaRemote for TunnelDma<'_> {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let chunk = self.port.max_chunk().max(1);
        for (i, piece) in buf.chunks_mut(chunk).enumerate() {
            let at = iova + (i * chunk) as u64;
            self.port
                .read(self.channel, at, piece)
                .map_err(|_| EFAULT)?;
        }
        Ok(())
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let chunk = self.port.max_chunk().max(1);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let at = iova + (i * chunk) as u64;
            self.port
                .write(self.channel, at, piece)
                .map_err(|_| EFAULT)?;
        }
        Ok(())
    }
}
