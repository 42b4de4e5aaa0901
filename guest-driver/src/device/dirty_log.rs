//! DMA dirty page logging: DEVICE_FEATURE DMA_LOGGING_START, DMA_LOGGING_STOP and
//! DMA_LOGGING_REPORT (Linux VFIO's device DMA logging, inline in vfio-user).
//!
//! The pages come from [`Dma`](super::Dma), which records every page a model writes,
//! whichever path the write takes (local mapping, tunnel window, copy path, DMA_WRITE
//! to the client), per DMA region, at 4 KiB. The log adds what the client asked for:
//!
//! - START: `page_size` is a hint; it must be a power of two; the page size chosen
//!   (and returned) is the hint, or 4 KiB for a hint below it. Ranges (none: all of
//!   the IOVA space) must be non-empty, must not wrap or overlap, and must be aligned
//!   to the chosen page size; else `EINVAL`. Pages written before START are
//!   forgotten. START while logging runs is `EBUSY` (STOP first).
//! - STOP: ends logging (also when none runs).
//! - REPORT: the pages written since START or the previous REPORT that overlap
//!   `iova..iova + length` and a logged range, one bit per `page_size` (a power of two,
//!   at least 4 KiB, that `iova` is aligned to; else `EINVAL`): bit `k % 64` of u64
//!   word `k / 64` is the page at `iova + k * page_size`; bits past `length` are 0.
//!   Reported 4 KiB pages that lie entirely inside the range are cleared (Linux's
//!   "during querying the log is cleared for the IOVA range"); a page the range only
//!   partly covers stays for the next report. Without logging: `EINVAL`. A bitmap
//!   larger than the largest data transfer is `E2BIG`.
//!
//! Pages of a region unmapped while logging runs are kept (the client may unmap
//! memory the device wrote before it asks for the report). The log belongs to the
//! client: it ends when the client disconnects.

use std::collections::BTreeSet;

use vfu_proto::vfio_user::LoggingRange;

use super::dma::{DmaTable, DMA_PAGE_SIZE};
use super::errno::{Errno, EINVAL};

/// A running DMA log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLog {
    page_size: u64,
    /// Logged ranges as `(first, last)` byte IOVAs, sorted; empty: everything.
    ranges: Vec<(u64, u64)>,
    /// Dirty 4 KiB pages of regions unmapped while logging.
    unmapped: BTreeSet<u64>,
}

impl DirtyLog {
    /// DMA_LOGGING_START with the client's page size hint and ranges.
    pub fn start(page_size: u64, ranges: &[LoggingRange]) -> Result<Self, Errno> {
        if !page_size.is_power_of_two() {
            return Err(EINVAL);
        }
        let page_size = page_size.max(DMA_PAGE_SIZE);
        let mut logged = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.length == 0 || r.iova % page_size != 0 || r.length % page_size != 0 {
                return Err(EINVAL);
            }
            let last = r.iova.checked_add(r.length - 1).ok_or(EINVAL)?;
            logged.push((r.iova, last));
        }
        logged.sort_unstable();
        if logged.windows(2).any(|w| w[1].0 <= w[0].1) {
            return Err(EINVAL);
        }
        Ok(Self {
            page_size,
            ranges: logged,
            unmapped: BTreeSet::new(),
        })
    }

    /// The page size chosen at START.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Whether the 4 KiB page at `page` overlaps a logged range.
    fn covers(&self, page: u64) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        let last = page.saturating_add(DMA_PAGE_SIZE - 1);
        let i = self.ranges.partition_point(|r| r.1 < page);
        self.ranges.get(i).is_some_and(|r| r.0 <= last)
    }

    /// Keeps the dirty pages of a region that goes away while logging runs.
    pub fn keep(&mut self, pages: impl IntoIterator<Item = u64>) {
        let logged: Vec<u64> = pages.into_iter().filter(|&p| self.covers(p)).collect();
        self.unmapped.extend(logged);
    }

    /// DMA_LOGGING_REPORT of `length` bytes at `iova` in pages of `page_size`: the
    /// bitmap as little-endian u64 words. Checks the arguments first (module
    /// documentation); `max_bitmap` bounds the bitmap's bytes (`E2BIG`).
    pub fn report(
        &mut self,
        table: &mut DmaTable,
        iova: u64,
        length: u64,
        page_size: u64,
        max_bitmap: u64,
    ) -> Result<Vec<u8>, Errno> {
        let bytes = Self::bitmap_len(iova, length, page_size, max_bitmap)?;
        let end = iova + length; // checked by bitmap_len
        let mut words = vec![0u64; bytes / 8];
        let mut mark = |page: u64| {
            let k = (page.max(iova) - iova) / page_size;
            words[(k / 64) as usize] |= 1 << (k % 64);
        };
        table.visit_dirty(iova, end, |page| {
            if !self.covers(page) {
                return false;
            }
            mark(page);
            page.saturating_add(DMA_PAGE_SIZE) <= end
        });
        let first = iova - iova % DMA_PAGE_SIZE;
        let kept: Vec<u64> = self.unmapped.range(first..end).copied().collect();
        for page in kept {
            mark(page);
            if page.saturating_add(DMA_PAGE_SIZE) <= end {
                self.unmapped.remove(&page);
            }
        }
        Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Checks REPORT arguments and returns the bitmap's size in bytes.
    pub fn bitmap_len(
        iova: u64,
        length: u64,
        page_size: u64,
        max_bitmap: u64,
    ) -> Result<usize, Errno> {
        if !page_size.is_power_of_two() || page_size < DMA_PAGE_SIZE || iova % page_size != 0 {
            return Err(EINVAL);
        }
        if length == 0 || iova.checked_add(length).is_none() {
            return Err(EINVAL);
        }
        let bytes = vfu_proto::vfio_user::logging_bitmap_len(length, page_size).ok_or(EINVAL)?;
        if bytes > max_bitmap {
            return Err(super::errno::E2BIG);
        }
        usize::try_from(bytes).map_err(|_| super::errno::E2BIG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::tests::memfd;
    use crate::device::dma::Dma;
    use crate::device::errno::E2BIG;
    use crate::device::NoRemote;
    use vfu_proto::vfio_user::{DmaMap, DmaUnmap};

    const P: u64 = DMA_PAGE_SIZE;

    fn range(iova: u64, length: u64) -> LoggingRange {
        LoggingRange { iova, length }
    }

    /// A table with one 64-page local region at 0x100000.
    fn table() -> DmaTable {
        let mut t = DmaTable::new(8);
        let m = DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: 0x10_0000,
            size: 64 * P,
        };
        t.map(&m, Some(memfd(64 * P))).unwrap();
        t
    }

    fn write(t: &mut DmaTable, iova: u64, len: usize) {
        Dma::new(t, &mut NoRemote)
            .write(iova, &vec![1; len])
            .unwrap();
    }

    fn words(b: &[u8]) -> Vec<u64> {
        b.chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    }

    /// START: the page size chosen (hint, at least 4 KiB), and the ranges refused:
    /// empty, wrapping, misaligned, overlapping; a page size that is no power of two.
    #[test]
    fn start_arguments() {
        assert_eq!(DirtyLog::start(4096, &[]).unwrap().page_size(), 4096);
        assert_eq!(DirtyLog::start(512, &[]).unwrap().page_size(), 4096);
        assert_eq!(DirtyLog::start(1 << 21, &[]).unwrap().page_size(), 1 << 21);
        assert_eq!(DirtyLog::start(0, &[]), Err(EINVAL));
        assert_eq!(DirtyLog::start(3 << 12, &[]), Err(EINVAL));
        let ok = [range(0x2000, 0x1000), range(0, 0x2000)];
        assert!(DirtyLog::start(4096, &ok).is_ok(), "unsorted is fine");
        for bad in [
            vec![range(0, 0)],
            vec![range(u64::MAX - 0xfff, 0x2000)],
            vec![range(0x800, 0x1000)],
            vec![range(0x1000, 0x800)],
            vec![range(0, 0x2000), range(0x1000, 0x1000)],
        ] {
            assert_eq!(DirtyLog::start(4096, &bad), Err(EINVAL), "{bad:?}");
        }
    }

    /// REPORT at 4 KiB: one bit per page written, at its offset from `iova`; what was
    /// reported is cleared (a second report is empty); a write across a page boundary
    /// dirties both; pages outside the asked range are neither reported nor cleared.
    #[test]
    fn report_and_clear() {
        let mut t = table();
        let mut log = DirtyLog::start(4096, &[]).unwrap();
        write(&mut t, 0x10_0000, 1);
        write(&mut t, 0x10_0000 + 5 * P - 2, 4);
        write(&mut t, 0x10_0000 + 63 * P, 8);
        let b = log.report(&mut t, 0x10_0000, 32 * P, P, 1 << 20).unwrap();
        assert_eq!(words(&b), vec![0b11_0001]);
        let b = log.report(&mut t, 0x10_0000, 32 * P, P, 1 << 20).unwrap();
        assert_eq!(words(&b), vec![0], "cleared by the report");
        let b = log.report(&mut t, 0x10_0000, 64 * P, P, 1 << 20).unwrap();
        assert_eq!(
            words(&b),
            vec![1 << 63],
            "page 63 was outside the first range"
        );
    }

    /// Coarser report pages OR the 4 KiB pages they hold; a range that ends inside a
    /// 4 KiB page reports it but keeps it; logged ranges filter what is reported.
    #[test]
    fn granularity_partial_pages_and_ranges() {
        let mut t = table();
        let mut log = DirtyLog::start(4096, &[]).unwrap();
        write(&mut t, 0x10_0000 + 17 * P, 1);
        write(&mut t, 0x10_0000 + 18 * P, 1);
        write(&mut t, 0x10_0000 + 40 * P, 1);
        let b = log
            .report(&mut t, 0x10_0000, 64 * P, 16 * P, 1 << 20)
            .unwrap();
        assert_eq!(
            words(&b),
            vec![0b0110],
            "pages 1 (17, 18) and 2 (40) of 64 KiB"
        );
        write(&mut t, 0x10_0000 + 2 * P, 1);
        let b = log
            .report(&mut t, 0x10_0000, 2 * P + 1, P, 1 << 20)
            .unwrap();
        assert_eq!(words(&b), vec![0b100], "a partial last page is reported");
        let b = log.report(&mut t, 0x10_0000, 3 * P, P, 1 << 20).unwrap();
        assert_eq!(
            words(&b),
            vec![0b100],
            "and kept until a report covers it all"
        );
        let mut log = DirtyLog::start(4096, &[range(0x10_0000 + 8 * P, 8 * P)]).unwrap();
        write(&mut t, 0x10_0000, 64 * P as usize);
        let b = log.report(&mut t, 0x10_0000, 64 * P, P, 1 << 20).unwrap();
        assert_eq!(words(&b), vec![0xff00], "only the logged range");
    }

    /// REPORT arguments: page size below 4 KiB or not a power of two, an unaligned
    /// iova, an empty or wrapping range are EINVAL; a bitmap over the bound E2BIG.
    #[test]
    fn report_arguments() {
        let mut t = table();
        let mut log = DirtyLog::start(4096, &[]).unwrap();
        for (iova, length, ps) in [
            (0, P, 2048),
            (0, P, 3 * P),
            (0x800, P, P),
            (0, 0, P),
            (u64::MAX - P + 1, 2 * P, P),
        ] {
            assert_eq!(log.report(&mut t, iova, length, ps, 1 << 20), Err(EINVAL));
        }
        assert_eq!(log.report(&mut t, 0, 64 * 8 * P + 1, P, 64), Err(E2BIG));
        assert_eq!(log.report(&mut t, 0, 64 * 8 * P, P, 64).unwrap().len(), 64);
    }

    /// Pages of a region unmapped while logging are still reported (once); kept pages
    /// outside the logged ranges are not.
    #[test]
    fn unmapped_regions_keep_their_pages() {
        let mut t = table();
        let mut log = DirtyLog::start(4096, &[range(0x10_0000, 32 * P)]).unwrap();
        write(&mut t, 0x10_0000 + 3 * P, 1);
        write(&mut t, 0x10_0000 + 40 * P, 1);
        let pages: Vec<u64> = t.iter().flat_map(|r| r.dirty_pages()).collect();
        log.keep(pages);
        t.unmap(&DmaUnmap::region(0x10_0000, 64 * P)).unwrap();
        let b = log.report(&mut t, 0x10_0000, 64 * P, P, 1 << 20).unwrap();
        assert_eq!(words(&b), vec![1 << 3]);
        let b = log.report(&mut t, 0x10_0000, 64 * P, P, 1 << 20).unwrap();
        assert_eq!(words(&b), vec![0]);
    }
}
