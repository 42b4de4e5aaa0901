//! An lspci-like rendering of a device from what a client sees: the configuration
//! space bytes (read through REGION_READ), the region information and the IRQ
//! information.
//!
//! The bytes are not trusted: every read is bounds-checked (missing bytes read as 0)
//! and the capability walk stops at a bad pointer or after 48 entries.

use std::fmt::Write;

use vfu_proto::vfio_user::{
    IrqInfo, RegionInfo, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
};

fn b(c: &[u8], off: usize) -> u8 {
    c.get(off).copied().unwrap_or(0)
}

fn w(c: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b(c, off), b(c, off + 1)])
}

fn d(c: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b(c, off), b(c, off + 1), b(c, off + 2), b(c, off + 3)])
}

fn flag(v: bool) -> char {
    if v {
        '+'
    } else {
        '-'
    }
}

/// Human size: 256, 4K, 16M, 8G.
fn size_str(size: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, name) in UNITS {
        if size >= unit && size % unit == 0 {
            return format!("{}{name}", size / unit);
        }
    }
    size.to_string()
}

fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0000 => "Non-VGA unclassified device",
        0x0100 => "SCSI storage controller",
        0x0106 => "SATA controller",
        0x0108 => "Non-Volatile memory controller",
        0x0200 => "Ethernet controller",
        0x0300 => "VGA compatible controller",
        0x0403 => "Audio device",
        0x0580 => "Memory controller",
        0x0680 => "Bridge",
        0x0700 => "Serial controller",
        0x0780 => "Communication controller",
        0x0880 => "System peripheral",
        0x0c03 => "USB controller",
        0x1180 => "Signal processing controller",
        0x1200 => "Processing accelerators",
        _ if class >> 16 == 0xff => "Unassigned class",
        _ => "Device",
    }
}

fn irq_name(index: u32) -> &'static str {
    match index {
        0 => "INTx",
        1 => "MSI",
        2 => "MSI-X",
        3 => "ERR",
        4 => "REQ",
        _ => "?",
    }
}

/// Renders `config` (the configuration space as read), the `regions` (region info by
/// index) and the `irqs` (IRQ info by index) as text resembling `lspci -vv`.
pub fn render(config: &[u8], regions: &[RegionInfo], irqs: &[IrqInfo]) -> String {
    let c = config;
    let mut out = String::new();
    let class = d(c, 8) >> 8;
    let _ = writeln!(
        out,
        "{} [{:06x}]: Device {:04x}:{:04x} (rev {:02x})",
        class_name(class),
        class,
        w(c, 0),
        w(c, 2),
        b(c, 8)
    );
    let _ = writeln!(
        out,
        "\tSubsystem: Device {:04x}:{:04x}",
        w(c, 0x2c),
        w(c, 0x2e)
    );
    let cmd = w(c, 4);
    let _ = writeln!(
        out,
        "\tControl: I/O{} Mem{} BusMaster{} ParErr{} SERR{} DisINTx{}",
        flag(cmd & 1 != 0),
        flag(cmd & 2 != 0),
        flag(cmd & 4 != 0),
        flag(cmd & 0x40 != 0),
        flag(cmd & 0x100 != 0),
        flag(cmd & 0x400 != 0)
    );
    let status = w(c, 6);
    let _ = writeln!(
        out,
        "\tStatus: Cap{} INTx{}",
        flag(status & 0x10 != 0),
        flag(status & 0x08 != 0)
    );
    let pin = b(c, 0x3d);
    if (1..=4).contains(&pin) {
        let _ = writeln!(
            out,
            "\tInterrupt: pin {} routed to line {}",
            char::from(b'A' + pin - 1),
            b(c, 0x3c)
        );
    }
    render_bars(c, regions, &mut out);
    if let Some(r) = regions.iter().find(|r| r.index == 7) {
        let _ = writeln!(out, "\tConfig space: {} bytes", r.size);
    }
    if status & 0x10 != 0 {
        render_caps(c, &mut out);
    }
    for i in irqs {
        if i.count == 0 {
            continue;
        }
        let mut f = Vec::new();
        for (bit, name) in [
            (IRQ_INFO_EVENTFD, "eventfd"),
            (IRQ_INFO_MASKABLE, "maskable"),
            (IRQ_INFO_AUTOMASKED, "automasked"),
            (IRQ_INFO_NORESIZE, "noresize"),
        ] {
            if i.flags & bit != 0 {
                f.push(name);
            }
        }
        let _ = writeln!(
            out,
            "\tIRQ {}: {} vector{} [{}]",
            irq_name(i.index),
            i.count,
            if i.count == 1 { "" } else { "s" },
            f.join(" ")
        );
    }
    out
}

fn render_bars(c: &[u8], regions: &[RegionInfo], out: &mut String) {
    let mut i = 0usize;
    while i < 6 {
        let reg = d(c, 0x10 + 4 * i);
        let size = regions
            .iter()
            .find(|r| r.index as usize == i)
            .map_or(0, |r| r.size);
        if size == 0 {
            i += 1;
            continue;
        }
        if reg & 1 == 1 {
            let _ = writeln!(
                out,
                "\tRegion {i}: I/O ports at {:04x} [size={}]",
                reg & !3,
                size_str(size)
            );
            i += 1;
            continue;
        }
        let is64 = (reg >> 1) & 3 == 2;
        let mut addr = u64::from(reg & !0xf);
        if is64 {
            addr |= u64::from(d(c, 0x10 + 4 * (i + 1))) << 32;
        }
        let _ = writeln!(
            out,
            "\tRegion {i}: Memory at {addr:x} ({}-bit, {}) [size={}]",
            if is64 { 64 } else { 32 },
            if reg & 8 != 0 {
                "prefetchable"
            } else {
                "non-prefetchable"
            },
            size_str(size)
        );
        i += if is64 { 2 } else { 1 };
    }
}

fn render_caps(c: &[u8], out: &mut String) {
    let mut at = usize::from(b(c, 0x34) & !3);
    let mut seen = 0;
    while at >= 0x40 && seen < 48 {
        seen += 1;
        let id = b(c, at);
        let _ = write!(out, "\tCapabilities: [{at:02x}] ");
        match id {
            0x01 => {
                let pmc = w(c, at + 2);
                let pmcsr = w(c, at + 4);
                let _ = writeln!(out, "Power Management version {}", pmc & 7);
                let _ = writeln!(
                    out,
                    "\t\tStatus: D{} NoSoftRst{} PME-Enable{}",
                    pmcsr & 3,
                    flag(pmcsr & 8 != 0),
                    flag(pmcsr & 0x100 != 0)
                );
            }
            0x05 => {
                let ctrl = w(c, at + 2);
                let is64 = ctrl & 0x80 != 0;
                let _ = writeln!(
                    out,
                    "MSI: Enable{} Count={}/{} Maskable{} 64bit{}",
                    flag(ctrl & 1 != 0),
                    1u32 << ((ctrl >> 4) & 7),
                    1u32 << ((ctrl >> 1) & 7),
                    flag(ctrl & 0x100 != 0),
                    flag(is64)
                );
                if ctrl & 0x100 != 0 {
                    let base = if is64 { at + 16 } else { at + 12 };
                    let _ = writeln!(
                        out,
                        "\t\tMasking: {:08x}  Pending: {:08x}",
                        d(c, base),
                        d(c, base + 4)
                    );
                }
            }
            0x09 => {
                let len = b(c, at + 2);
                let _ = writeln!(out, "Vendor Specific Information: Len={len:02x}");
            }
            0x10 => {
                let caps = w(c, at + 2);
                let kind = match (caps >> 4) & 0xf {
                    0 => "Endpoint",
                    1 => "Legacy Endpoint",
                    4 => "Root Port",
                    9 => "Root Complex Integrated Endpoint",
                    _ => "Other",
                };
                let _ = writeln!(out, "Express (v{}) {kind}", caps & 0xf);
                let devcap = d(c, at + 4);
                let lnkcap = d(c, at + 12);
                let lnksta = w(c, at + 18);
                let _ = writeln!(
                    out,
                    "\t\tDevCap: MaxPayload {} bytes, FLReset{}",
                    128u32 << (devcap & 7),
                    flag(devcap & (1 << 28) != 0)
                );
                let _ = writeln!(
                    out,
                    "\t\tLnkCap: Speed {}, Width x{}; LnkSta: Speed {}, Width x{}",
                    link_speed(lnkcap & 0xf),
                    (lnkcap >> 4) & 0x3f,
                    link_speed(u32::from(lnksta & 0xf)),
                    (lnksta >> 4) & 0x3f
                );
            }
            0x11 => {
                let ctrl = w(c, at + 2);
                let table = d(c, at + 4);
                let pba = d(c, at + 8);
                let _ = writeln!(
                    out,
                    "MSI-X: Enable{} Count={} Masked{}",
                    flag(ctrl & 0x8000 != 0),
                    (ctrl & 0x7ff) + 1,
                    flag(ctrl & 0x4000 != 0)
                );
                let _ = writeln!(
                    out,
                    "\t\tVector table: BAR={} offset={:08x}",
                    table & 7,
                    table & !7
                );
                let _ = writeln!(out, "\t\tPBA: BAR={} offset={:08x}", pba & 7, pba & !7);
            }
            other => {
                let _ = writeln!(out, "Capability {other:#04x}");
            }
        }
        at = usize::from(b(c, at + 1) & !3);
    }
}

fn link_speed(code: u32) -> &'static str {
    match code {
        1 => "2.5GT/s",
        2 => "5GT/s",
        3 => "8GT/s",
        4 => "16GT/s",
        5 => "32GT/s",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Garbage, truncated and looping configuration bytes render without panicking,
    /// and a capability loop is cut off.
    #[test]
    fn hostile_bytes_render() {
        assert!(render(&[], &[], &[]).contains("Device 0000:0000"));
        let mut c = vec![0u8; 256];
        c[6] = 0x10; // capability list
        c[0x34] = 0x40;
        c[0x40] = 0x05;
        c[0x41] = 0x40; // points at itself
        let text = render(&c, &[], &[]);
        assert_eq!(text.matches("Capabilities:").count(), 48);
        let mut c = vec![0xffu8; 300];
        c[0x34] = 0xfc;
        let _ = render(&c, &[RegionInfo::new(0, 3, 1 << 40)], &[]);
    }

    /// Sizes print like lspci's.
    #[test]
    fn sizes() {
        assert_eq!(size_str(256), "256");
        assert_eq!(size_str(0x4000), "16K");
        assert_eq!(size_str(1 << 33), "8G");
        assert_eq!(size_str(0x1800), "6K");
        assert_eq!(size_str(100), "100");
    }
}
