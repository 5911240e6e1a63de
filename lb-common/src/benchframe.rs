//! The benchmark wrapper's frame (`cargo xtask bench --xdp`): not part of
//! the balancer's contract, and not in lbd's dependency graph.

/// Longest frame the benchmark wrapper restores (a multiple of 8).
pub const BENCH_FRAME_MAX: usize = 96;

/// `BENCH_FRAME[0]`: the frame `bench_restore` puts back before every run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// Frame length, a multiple of 8, at most [`BENCH_FRAME_MAX`].
    pub len: u32,
    /// When non-zero, a per-CPU sequence number is written as 4 bytes at this
    /// offset (inside the source address) so every run is a new flow.
    pub vary_offset: u32,
    pub bytes: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data without padding.
unsafe impl aya::Pod for BenchFrame {}
