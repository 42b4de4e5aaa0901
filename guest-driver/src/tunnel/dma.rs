//! DMA through the tunnel's copy path: a device model's access to client memory that has
//! no window becomes a DMA_READ or DMA_WRITE request to the relay, answered before the
//! model's call goes on.

use vfu_proto::tunnel::{Body, DmaSegment};

use crate::device::errno::EFAULT;
use crate::device::{DmaRemote, Errno};

/// What the engine offers a channel for DMA: one request, its answer.
pub trait DmaPort {
    /// Sends `body` (DMA_READ or DMA_WRITE) on `channel` and waits for the reply.
    fn exchange(&mut self, channel: u32, body: Body) -> Result<Body, Errno>;
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
            let req = Body::DmaRead {
                segments: vec![DmaSegment {
                    iova: at,
                    len: piece.len() as u64,
                }],
            };
            match self.port.exchange(self.channel, req).map_err(|_| EFAULT)? {
                Body::DmaReadReply { status: 0, data } if data.len() == piece.len() => {
                    piece.copy_from_slice(&data);
                }
                _ => return Err(EFAULT),
            }
        }
        Ok(())
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let chunk = self.port.max_chunk().max(1);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let at = iova + (i * chunk) as u64;
            let req = Body::DmaWrite {
                segments: vec![DmaSegment {
                    iova: at,
                    len: piece.len() as u64,
                }],
                data: piece.to_vec(),
            };
            match self.port.exchange(self.channel, req).map_err(|_| EFAULT)? {
                Body::Status { status: 0, .. } => {}
                _ => return Err(EFAULT),
            }
        }
        Ok(())
    }
}
