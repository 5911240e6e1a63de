//! What the fuzz targets share: a byte reader that turns fuzz input into
//! choices, a frame description decoded from bytes, and the policy harness
//! (model state and packets from bytes, checked as they run). A library so
//! that `examples/seeds.rs`, which writes the seed corpora, decodes inputs
//! exactly as the targets do.

pub mod frames;
pub mod policy;

/// Fuzz input read as a stream of choices. Past the end every read is 0,
/// so any input, even an empty one, decodes to something: libFuzzer's
/// mutations never make an input unusable, only a different case.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// One byte's worth of choice among `n` (1..=256).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!((1..=256).contains(&n));
        self.u8() as usize % n
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0; N];
        a.iter_mut().for_each(|b| *b = self.u8());
        a
    }

    /// Up to `max` bytes: a length byte, then that many.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u8() as usize).min(max);
        (0..n).map(|_| self.u8()).collect()
    }
}
