//! DMA and interrupts end to end, with real processes: the `dma-engine` model in a
//! loopback device VM behind the relay copies client memory, on each of its
//! paths:
//! - window: the loopback VMM supports vhost-user SHMEM, the client passes fds; the
//!   device VM reads and writes the client's memory in place;
//! - copy (client fd): the loopback VMM without SHMEM (`--no-shmem`); the relay
//!   copies between the client's memory and the driver's buffers (DIRECT_DATA), or
//!   inside tunnel messages (`--no-direct-data`);
//! - copy (client messages): the client maps without fds; the relay turns the device's
//!   requests into vfio-user DMA_READ / DMA_WRITE to the client.
//!
//! Data is checked byte for byte, with a CRC32C computed here; faults touch nothing;
//! MSI-X vectors reach the client's eventfd, masking holds them pending, de-assignment
//! silences them; a DMA_UNMAP queued behind a running operation takes effect after it.

use std::os::fd::OwnedFd;
use std::time::Duration;

use vfu_proto::client::ClientError;
use vfu_proto::vfio_user::{DmaMap, DmaUnmap, Request};
use vfu_tests::dma_engine::*;
use vfu_tests::Proc;

fn guest_maps_client_memory(guest: &Proc) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", guest.pid()))
        .map(|m| m.contains("memfd:vfu-dma-client"))
        .unwrap_or(false)
}

fn exercise(path: Path, tag: &str) {
    let mut s = setup(tag, path);
    let efault = libc::EFAULT as u32;
    assert_eq!(
        guest_maps_client_memory(&s.guest),
        path == Path::Window,
        "client memory is mapped into the device VM exactly on the window path"
    );
    let mut seq = 0;
    for len in [4096u32, 1 << 20] {
        let pattern: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(7) ^ (i >> 9)) as u8)
            .collect();
        s.memory.write(SRC, &pattern);
        s.memory.write(DST, &vec![0xee; len as usize]);
        let status = run(&mut s.client, SRC, DST, len);
        seq += 1;
        assert_eq!(status & 0xff, 1, "{path:?}: DONE for {len} bytes");
        assert!(
            s.memory.read(DST, len as usize) == pattern,
            "{path:?}: copied byte for byte"
        );
        assert_eq!(completion(&s.memory), [0, crc32c(&pattern), len, seq]);
        assert_eq!(reg_read(&mut s.client, 0x2c), crc32c(&pattern));
        assert!(
            fired(&s.irq, Duration::from_secs(5)),
            "{path:?}: MSI-X vector 0 fired"
        );
        reg_write(&mut s.client, 0x34, 1, 4);
    }

    // A destination in the read-only region: EFAULT, and the source stays as it was.
    let before = s.memory.read(SRC, 4096);
    let status = run(&mut s.client, SRC + 4096, SRC, 4096);
    seq += 1;
    assert_eq!(
        (status & 0xff, status >> 16),
        (2, efault),
        "{path:?}: write to read-only"
    );
    assert_eq!(
        s.memory.read(SRC, 4096),
        before,
        "{path:?}: nothing written"
    );
    assert_eq!(completion(&s.memory)[0], efault);
    assert!(
        fired(&s.irq, Duration::from_secs(5)),
        "an error completes with an interrupt too"
    );
    // A source outside every map, and one running past the end of the last map (the
    // source and destination maps are adjacent; a range may span both).
    assert_eq!(run(&mut s.client, 0x90_0000, DST, 16) >> 16, efault);
    assert_eq!(
        run(&mut s.client, DST + DST_SIZE - 8, DST, 16) >> 16,
        efault
    );
    seq += 2;
    assert!(fired(&s.irq, Duration::from_secs(5)));

    // MSI-X masking: vector 0 masked in the table, the interrupt waits in the PBA and is
    // delivered on unmask.
    reg_write(&mut s.client, 0x800 + 12, 1, 4);
    assert_eq!(run(&mut s.client, SRC, DST, 64) & 0xff, 1);
    seq += 1;
    assert!(
        !fired(&s.irq, Duration::from_millis(200)),
        "masked: no interrupt"
    );
    assert_eq!(reg_read(&mut s.client, 0xc00) & 1, 1, "pending bit set");
    reg_write(&mut s.client, 0x800 + 12, 0, 4);
    assert!(fired(&s.irq, Duration::from_secs(5)), "delivered on unmask");
    assert_eq!(reg_read(&mut s.client, 0xc00) & 1, 0, "pending bit cleared");

    // De-assigned eventfd: silence.
    set_irq(&mut s.client, None);
    assert_eq!(run(&mut s.client, SRC, DST, 64) & 0xff, 1);
    seq += 1;
    assert!(
        !fired(&s.irq, Duration::from_millis(200)),
        "de-assigned: no interrupt"
    );
    assert_eq!(reg_read(&mut s.client, 0x30), seq);

    // A DMA_UNMAP queued behind a running operation takes effect after it: the operation
    // completes on the mapped memory, the next one faults.
    s.memory.write(SRC, &[0x5a; 256]);
    reg_write(&mut s.client, 0x08, SRC, 8);
    reg_write(&mut s.client, 0x10, DST, 8);
    reg_write(&mut s.client, 0x20, 256, 4);
    s.client
        .post(&Request::RegionWrite(vfu_proto::vfio_user::RegionWrite {
            offset: 0x24,
            region: BAR0,
            data: 1u32.to_le_bytes().to_vec(),
        }))
        .unwrap();
    s.client
        .request(&Request::DmaUnmap(DmaUnmap::region(DST, DST_SIZE)), vec![])
        .expect("DMA_UNMAP");
    assert_eq!(
        reg_read(&mut s.client, 0x28) & 0xff,
        1,
        "the queued operation ran first"
    );
    assert_eq!(s.memory.read(DST, 256), vec![0x5a; 256]);
    assert_eq!(
        run(&mut s.client, SRC, DST, 16) >> 16,
        efault,
        "unmapped now"
    );
    if path == Path::Window {
        // The destination's window left the device VM with the unmap; the source's stays.
        assert!(guest_maps_client_memory(&s.guest));
    }
    match s
        .client
        .request(&Request::DmaUnmap(DmaUnmap::region(DST, DST_SIZE)), vec![])
    {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::ENOENT as u32),
        other => panic!("second unmap: {other:?}"),
    }
    s.client
        .request(&Request::DmaUnmap(DmaUnmap::all()), vec![])
        .expect("UNMAP_ALL");
    if path == Path::Window {
        assert!(
            !guest_maps_client_memory(&s.guest),
            "every window gone after UNMAP_ALL"
        );
    }
}

/// The window path: zero copy through vhost-user SHMEM windows.
#[test]
fn dma_engine_on_the_window_path() {
    exercise(Path::Window, "dma-window");
}

/// The copy path, served by the relay reading and writing the client's fds.
#[test]
fn dma_engine_on_the_copy_path() {
    exercise(Path::CopyFd, "dma-copy");
}

/// The copy path with a driver that does not take DIRECT_DATA: requests and data
/// travel as tunnel messages both ways.
#[test]
fn dma_engine_on_the_copy_path_in_messages() {
    exercise(Path::CopyFdInMessages, "dma-copy-msg");
}

/// The copy path for memory mapped without fds: DMA_READ / DMA_WRITE to the client.
#[test]
fn dma_engine_through_client_messages() {
    exercise(Path::CopyMessages, "dma-messages");
}

/// Overlapping maps are refused (EEXIST), as are maps that are not page aligned
/// (EINVAL) and maps past the end of the client's file (EINVAL); the relay answers them
/// before the device VM sees them. Posted unmaps pipeline with maps of the same range.
#[test]
fn dma_map_rules() {
    let mut s = setup("dma-rules", Path::Window);
    let f = memfd(8192);
    let overlap = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: SRC + 4096,
        size: 4096,
    });
    match s
        .client
        .request(&overlap, vec![OwnedFd::from(f.try_clone().unwrap())])
    {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EEXIST as u32),
        other => panic!("overlap: {other:?}"),
    }
    let odd = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x900_0001,
        size: 4096,
    });
    match s.client.request(&odd, vec![]) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EINVAL as u32),
        other => panic!("misaligned: {other:?}"),
    }
    // A range beyond the end of the client's memfd: refused, where mapping it would
    // have raised SIGBUS in the relay or the device VM on the first access.
    let short = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x900_0000,
        size: 16384,
    });
    match s
        .client
        .request(&short, vec![OwnedFd::from(f.try_clone().unwrap())])
    {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EINVAL as u32),
        other => panic!("map past the end of the file: {other:?}"),
    }
    // A posted (NO_REPLY) unmap pipelined with a new map of the same range: the relay
    // frees the range when it forwards the unmap, so the map is accepted, and both
    // reach the device in order.
    let extra = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x900_0000,
        size: 8192,
    });
    let unmap_extra = Request::DmaUnmap(DmaUnmap {
        argsz: DmaUnmap::SIZE,
        address: 0x900_0000,
        size: 8192,
        all: false,
    });
    for _ in 0..3 {
        s.client
            .request(&extra, vec![OwnedFd::from(f.try_clone().unwrap())])
            .expect("map");
        s.client.post(&unmap_extra).expect("posted unmap");
    }
    s.client
        .request(&extra, vec![OwnedFd::from(f.try_clone().unwrap())])
        .expect("map after posted unmaps");
    s.client.request(&unmap_extra, vec![]).expect("unmap");
    match s.client.request(&unmap_extra, vec![]) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::ENOENT as u32),
        other => panic!("second unmap: {other:?}"),
    }
    assert_eq!(
        reg_read(&mut s.client, 0),
        u32::from_le_bytes(*b"DMAE"),
        "relay still serves"
    );
    let _ = &s.memory;
}

/// Client memory that can shrink (a memfd without `F_SEAL_SHRINK`) gets no window by
/// default: the device VM never maps it, so a client truncating it cannot make the
/// device VM fault. DMA to it still works, through the relay's copy path; the sealed
/// regions of the same client keep their windows.
#[test]
fn unsealed_memory_goes_through_the_copy_path() {
    let mut s = setup("dma-unsealed", Path::Window);
    const EXTRA: u64 = 0x80_0000;
    let f = memfd_named(c"vfu-dma-unsealed", 65536, 0);
    map(&mut s.client, EXTRA, 65536, 0, true, Some(&f));
    let pattern: Vec<u8> = (0..65536u32).map(|i| ((i * 13) >> 3) as u8).collect();
    s.memory.write(SRC, &pattern);
    let status = run(&mut s.client, SRC, EXTRA, 65536);
    assert_eq!(status & 0xff, 1, "DONE");
    let mut out = vec![0u8; 65536];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut out, 0).unwrap();
    assert!(
        out == pattern,
        "copied byte for byte into the unsealed memory"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.guest.pid())).unwrap();
    assert!(
        maps.contains("memfd:vfu-dma-client"),
        "sealed memory has its window"
    );
    assert!(
        !maps.contains("memfd:vfu-dma-unsealed"),
        "unsealed memory is never mapped into the device VM"
    );
    // Nor into the relay: it serves unsealed memory with pread/pwrite, and copies
    // sealed memory through its own mapping.
    let relay_maps = std::fs::read_to_string(format!("/proc/{}/maps", s.relay.pid())).unwrap();
    assert!(
        relay_maps.contains("memfd:vfu-dma-client"),
        "the relay maps sealed client memory"
    );
    assert!(
        !relay_maps.contains("memfd:vfu-dma-unsealed"),
        "the relay never maps memory that can shrink"
    );
    // Shrinking it now only makes DMA from it fail (a write would grow the file back;
    // neither can fault anything).
    f.set_len(0).unwrap();
    assert_eq!(
        run(&mut s.client, EXTRA, DST, 4096) >> 16,
        libc::EFAULT as u32
    );
    assert_eq!(reg_read(&mut s.client, 0), u32::from_le_bytes(*b"DMAE"));
}

/// With `--unsealed-windows` the operator trusts clients with windows onto memory that
/// can shrink: the same unsealed memfd is mapped into the device VM.
#[test]
fn unsealed_windows_option() {
    let mut s = setup_with(
        None,
        "dma-unsealed-opt",
        Path::Window,
        &["--unsealed-windows"],
    );
    let f = memfd_named(c"vfu-dma-unsealed", 65536, 0);
    map(&mut s.client, 0x80_0000, 65536, 0, true, Some(&f));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.guest.pid())).unwrap();
    assert!(
        maps.contains("memfd:vfu-dma-unsealed"),
        "window onto unsealed memory"
    );
}
