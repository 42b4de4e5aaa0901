//! The byte format of the targets' inputs: little-endian fields read one after the
//! other, zeros once the input runs out (so every input is a valid program), and the
//! writer the seed generator uses to produce the same layout.

/// Reads a fuzz input field by field.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }
}

/// Writes inputs in the layout [`Input`] reads.
#[derive(Debug, Default, Clone)]
pub struct Script(pub Vec<u8>);

impl Script {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Bytes as they are.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        let n = u16::try_from(b.len()).expect("blob of at most 64 KiB");
        self.u16(n).bytes(&b[..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer writes, the reader reads back; past the end, fields read 0.
    #[test]
    fn round_trip_and_zeros_after_the_end() {
        let mut s = Script::default();
        s.u8(1).u16(0x0203).u32(0x0405_0607).u64(8).blob(b"abc");
        let mut i = Input::new(&s.0);
        assert_eq!(
            (i.u8(), i.u16(), i.u32(), i.u64()),
            (1, 0x0203, 0x0405_0607, 8)
        );
        assert_eq!(i.blob(), b"abc");
        assert!(i.is_empty());
        assert_eq!((i.u8(), i.u64()), (0, 0));
        let mut short = Input::new(&[1, 2, 3]);
        assert_eq!(short.u32(), 0x0003_0201);
    }
}
