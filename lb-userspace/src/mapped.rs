//! Shared mappings of `BPF_F_MMAPABLE` array maps' values: rings are
//! written and read with plain (atomic) loads and stores instead of one
//! syscall per element.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;

/// Bytes `[start, start + len)` of a map's value area, mapped shared; the
/// pages around them are mapped too (mappings start and end on pages) and
/// unmapped on drop. Only a BPF map can be mapped (a file could shrink
/// under the mapping), and a read-only mapping offers loads alone.
pub(crate) struct MappedValues {
    base: *mut libc::c_void,
    mapped_len: usize,
    /// Where `start` is in the mapping.
    skip: usize,
    len: usize,
    writable: bool,
}

impl MappedValues {
    /// `what` names the map in errors. The kernel refuses (`EINVAL`) a map
    /// without `BPF_F_MMAPABLE` and a range past its value area rounded up
    /// to a page; within that page, staying inside the values is the
    /// caller's check.
    pub(crate) fn map(
        map: &MapData,
        start: usize,
        len: usize,
        writable: bool,
        what: &str,
    ) -> Result<Self> {
        if len == 0 {
            bail!("mapping an empty range of {what}");
        }
        let fd = map.fd().as_fd();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let offset = start / page * page;
        let skip = start - offset;
        let mapped_len = (skip + len).div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's value area at a
        // page-aligned offset; the kernel checks the range against the area.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {len} bytes of {what} at byte {start}"));
        }
        Ok(MappedValues {
            base,
            mapped_len,
            skip,
            len,
            writable,
        })
    }

    /// The range as `u32` words to store to, atomically: the data plane
    /// reads and writes the same memory concurrently. Writable mappings
    /// only.
    pub(crate) fn u32s(&self) -> Result<&[AtomicU32]> {
        self.writable_words::<AtomicU32>()
    }

    pub(crate) fn u64s(&self) -> Result<&[AtomicU64]> {
        self.writable_words::<AtomicU64>()
    }

    /// The range's `u32` words, each read with a relaxed atomic load (which
    /// read-only memory allows; a store or a stronger load would not be).
    pub(crate) fn load_u32s(&self) -> Result<impl Iterator<Item = u32> + '_> {
        Ok(self
            .words::<AtomicU32>()?
            .iter()
            .map(|w| w.load(Ordering::Relaxed)))
    }

    fn writable_words<T>(&self) -> Result<&[T]> {
        if !self.writable {
            bail!("storing through a read-only mapping");
        }
        self.words::<T>()
    }

    fn words<T>(&self) -> Result<&[T]> {
        let size = std::mem::size_of::<T>();
        // SAFETY: inside the mapping made in `map`.
        let at = unsafe { self.base.cast::<u8>().add(self.skip) };
        if !self.len.is_multiple_of(size) || !(at as usize).is_multiple_of(size) {
            bail!(
                "a mapped range of {} bytes at byte {} is not whole {size}-byte words",
                self.len,
                self.skip
            );
        }
        // SAFETY: `len` bytes from `at` lie in the live mapping (it lives as
        // long as `self`), aligned for T; T is an atomic integer, which has
        // the integer's layout and any bit pattern is valid.
        Ok(unsafe { std::slice::from_raw_parts(at.cast::<T>(), self.len / size) })
    }
}

impl Drop for MappedValues {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base, self.mapped_len) };
    }
}
