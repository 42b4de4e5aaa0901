//! MIG_DATA_READ (17) and MIG_DATA_WRITE (18): the migration data stream.

use super::{check_argsz, DecodeError};
use crate::wire::{Reader, Writer};

/// MIG_DATA_READ request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigDataRead {
    /// Maximum reply payload size (>= 8 + size).
    pub argsz: u32,
    /// Bytes of migration data wanted.
    pub size: u32,
}

/// MIG_DATA_READ reply. Fewer bytes than asked for means the stream has no more data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDataReadReply {
    /// 8 + data length.
    pub argsz: u32,
    /// The migration data.
    pub data: Vec<u8>,
}

/// MIG_DATA_WRITE request. The reply has no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDataWrite {
    /// As sent (libvfio-user requires >= 8 + data length).
    pub argsz: u32,
    /// The migration data.
    pub data: Vec<u8>,
}

const FIXED: u32 = 8;

impl MigDataRead {
    /// A request for up to `size` bytes, with the smallest `argsz` that holds them.
    pub fn new(size: u32) -> Self {
        Self {
            argsz: FIXED.saturating_add(size),
            size,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let size = r.u32()?;
        check_argsz("MIG_DATA_READ argsz", argsz, FIXED.saturating_add(size))?;
        Ok(Self { argsz, size })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(self.size);
    }
}

impl MigDataReadReply {
    /// libvfio-user pads the payload to the size asked for; `size` tells how much of it is
    /// data.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let size = r.u32()?;
        if size as usize > r.remaining() {
            return Err(DecodeError::LengthMismatch {
                field: "MIG_DATA_READ size",
                value: size.into(),
                actual: r.remaining() as u64,
            });
        }
        let data = r.bytes(size as usize)?.to_vec();
        let padding = r.rest();
        if padding.iter().any(|&b| b != 0) {
            return Err(DecodeError::TrailingBytes {
                extra: padding.len(),
            });
        }
        Ok(Self { argsz, data })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(self.data.len() as u32);
        out.put_bytes(&self.data);
    }
}

impl MigDataWrite {
    /// A request carrying `data`, with `argsz` = 8 + its length (what libvfio-user
    /// requires), saturating.
    pub fn new(data: Vec<u8>) -> Self {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        Self {
            argsz: FIXED.saturating_add(len),
            data,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let size = r.u32()?;
        if size as usize != r.remaining() {
            return Err(DecodeError::LengthMismatch {
                field: "MIG_DATA_WRITE size",
                value: size.into(),
                actual: r.remaining() as u64,
            });
        }
        check_argsz("MIG_DATA_WRITE argsz", argsz, FIXED.saturating_add(size))?;
        Ok(Self {
            argsz,
            data: r.rest().to_vec(),
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(self.data.len() as u32);
        out.put_bytes(&self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constructors state the argsz the decoders (and libvfio-user) require, and
    /// the messages decode back to themselves; an argsz too small is refused.
    #[test]
    fn constructors_round_trip() {
        let r = MigDataRead::new(100);
        assert_eq!(r.argsz, 108);
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(MigDataRead::decode(&mut Reader::new(&out)).unwrap(), r);
        let w = MigDataWrite::new(vec![1, 2, 3]);
        assert_eq!(w.argsz, 11);
        let mut out = Vec::new();
        w.encode(&mut out);
        assert_eq!(MigDataWrite::decode(&mut Reader::new(&out)).unwrap(), w);
        out[0] = 10;
        assert!(MigDataWrite::decode(&mut Reader::new(&out)).is_err());
        assert_eq!(MigDataRead::new(u32::MAX).argsz, u32::MAX);
    }
}
