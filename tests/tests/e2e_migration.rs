//! Migration end to end (issue 5, "Migration"), with real processes: vfu-relay
//! exporting two devices of the same model, one loopback device VM serving both, and a
//! vfio-user client on each channel. DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE, the
//! DMA logging features) and MIG_DATA_READ / MIG_DATA_WRITE cross the relay and the
//! tunnel; the device API saves the source's state and loads it into the destination.
//! The destination's state is then compared with the source's byte for byte, through
//! the client, as a guest would see it.

use std::time::Duration;

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{pci_region, LoggingRange, MigState, MIGRATION_STOP_COPY};
use vfu_tests::dma_engine::*;
use vfu_tests::{
    connect_served, start_loopback_guest, start_relay, wait_for_socket, Proc, Scratch,
};

const T: Duration = Duration::from_secs(10);
const CONFIG: u32 = pci_region::CONFIG;
const EINVAL: u32 = libc::EINVAL as u32;

/// Two channels, `a` and `b`, of the same model, served by one device VM, with a
/// client on each.
struct Pair {
    a: Client,
    b: Client,
    _relay: Proc,
    _guest: Proc,
    _scratch: Scratch,
}

fn pair(tag: &str, model: &str) -> Pair {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let (sa, sb) = (scratch.join("a.sock"), scratch.join("b.sock"));
    let relay = start_relay(&frontend, &[("a", &sa), ("b", &sb)]);
    assert!(wait_for_socket(&sa, T) && wait_for_socket(&sb, T));
    let guest = start_loopback_guest(&frontend, &[("a", model), ("b", model)]);
    Pair {
        a: connect_served(&sa, T),
        b: connect_served(&sb, T),
        _relay: relay,
        _guest: guest,
        _scratch: scratch,
    }
}

/// Moves the state of `src` into `dst` as a VMM does it: `src` to STOP_COPY (RUNNING
/// -> STOP -> STOP_COPY), its stream read until a short read, back to STOP; `dst` to
/// RESUMING, the stream written in pieces, to RUNNING (RESUMING -> STOP -> RUNNING,
/// where the stream is loaded). The source stays stopped.
fn migrate(src: &mut Client, dst: &mut Client) -> Vec<u8> {
    assert_eq!(src.migration_flags().unwrap(), MIGRATION_STOP_COPY);
    assert_eq!(src.mig_state().unwrap(), MigState::Running);
    assert_eq!(
        src.set_mig_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    assert_eq!(src.mig_state().unwrap(), MigState::StopCopy);
    let stream = src.mig_data_read_all(1000).unwrap();
    assert_eq!(&stream[..4], b"VFUM", "a stream of the device API");
    src.set_mig_state(MigState::Stop).unwrap();
    dst.set_mig_state(MigState::Resuming).unwrap();
    for piece in stream.chunks(777) {
        dst.mig_data_write(piece).unwrap();
    }
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(dst.mig_state().unwrap(), MigState::Running);
    stream
}

fn errno<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
    match r {
        Err(ClientError::Errno(e)) => e,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// gpio registers that read without side effects: outputs, inputs, interrupt status,
/// filters.
fn gpio_registers(c: &mut Client) -> Vec<u8> {
    [0u64, 1, 4, 5, 6, 7]
        .iter()
        .map(|&r| c.region_read(2, r, 1).unwrap()[0])
        .collect()
}

/// Proves that the state of a running `gpio` moves from one channel to another
/// through the relay and the tunnel: afterwards the destination's config space (all
/// of it: command register, BAR 2's address, interrupt line) and registers (outputs,
/// filters, global filter state) are byte for byte the source's, its own earlier state
/// overwritten. The stopped source refuses register accesses (EINVAL, through the
/// relay) but still answers config space, and runs again when told to.
#[test]
fn gpio_state_moves_between_channels() {
    let mut p = pair("mig-gpio", "gpio");
    let (a, b) = (&mut p.a, &mut p.b);
    a.region_write(CONFIG, 4, &[0x01, 0x00]).unwrap();
    a.region_write(CONFIG, 0x18, &0xc000u32.to_le_bytes())
        .unwrap();
    a.region_write(CONFIG, 0x3c, &[10]).unwrap();
    a.region_write(2, 0, &[0xa5]).unwrap();
    a.region_write(2, 4, &[0x3c]).unwrap();
    a.region_write(2, 7, &[0x0f]).unwrap();
    a.region_read(2, 3, 1).unwrap(); // all filters on
    a.region_read(2, 2, 1).unwrap(); // IRQ enabled
    b.region_write(2, 0, &[0x11]).unwrap();
    let config_a = a.region_read(CONFIG, 0, 256).unwrap();
    let regs_a = gpio_registers(a);
    assert_eq!(regs_a, [0xa5, 0, 0x3c, 0, 0, 0xff]);
    assert_ne!(b.region_read(CONFIG, 0, 256).unwrap(), config_a);

    migrate(a, b);
    assert_eq!(
        b.region_read(CONFIG, 0, 256).unwrap(),
        config_a,
        "config space"
    );
    assert_eq!(gpio_registers(b), regs_a, "registers");
    b.region_write(2, 3, &[0]).unwrap();
    assert_eq!(
        b.region_read(2, 7, 1).unwrap(),
        [0x0f],
        "individual filters too"
    );

    assert_eq!(
        errno(a.region_read(2, 0, 1)),
        EINVAL,
        "the source is stopped"
    );
    assert_eq!(
        a.region_read(CONFIG, 0, 4).unwrap(),
        [0x4f, 0x49, 0xc8, 0x0d]
    );
    a.set_mig_state(MigState::Running).unwrap();
    assert_eq!(a.region_read(2, 0, 1).unwrap(), [0xa5]);
}

/// BAR 0 of the dma-engine as the client sees it: registers 0x00..0x48, the MSI-X table
/// (0x800..0x820) and the PBA (0xc00), in 8-byte reads.
fn dma_engine_bar(c: &mut Client) -> Vec<u8> {
    (0..0x48)
        .step_by(8)
        .chain((0x800..0x820).step_by(8))
        .chain([0xc00])
        .flat_map(|o| c.region_read(BAR0, o, 8).unwrap())
        .collect()
}

/// Proves that a running `dma-engine` that has done DMA moves to another channel
/// whole: afterwards the destination's config space (all 4096 bytes: command with bus
/// master, BAR 0's address, MSI-X enabled), registers (IOVAs, LEN, STATUS, CRC32C, SEQ,
/// INTR_STATUS, timings), MSI-X table and the pending bit of a masked vector are byte
/// for byte the source's. The destination then delivers that pending interrupt to its
/// own client's eventfd when the vector is unmasked, and carries on from the source's
/// state: its next operation copies the client's memory and completes as SEQ 3. The
/// source, stopped meanwhile, runs again unchanged.
#[test]
fn dma_engine_state_moves_between_channels() {
    let mut p = pair("mig-dma", "dma-engine");
    let mem = memfd(2 * MIB + 4096);
    for c in [&mut p.a, &mut p.b] {
        map(c, SRC, MIB, 0, false, Some(&mem));
        map(c, DST, DST_SIZE, MIB, true, Some(&mem));
        enable(c);
    }
    let (a, b) = (&mut p.a, &mut p.b);
    a.region_write(CONFIG, 0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    reg_write(a, 0x800, 0xfee0_0000, 4);
    reg_write(a, 0x808, 0x4041, 4);
    let irq_a = eventfd();
    set_irq(a, Some(irq_a.try_clone().unwrap()));
    let pattern: Vec<u8> = (0..16384u32).map(|i| ((i * 31) >> 4) as u8).collect();
    let file = Memory::File(mem.try_clone().unwrap());
    file.write(SRC, &pattern);
    assert_eq!(run(a, SRC, DST, 8192) & 0xff, 1);
    assert!(fired(&irq_a, T), "the source's interrupt");
    reg_write(a, 0x80c, 1, 4); // mask vector 0: the next completion stays pending
    assert_eq!(run(a, SRC + 4096, DST + 8192, 100) & 0xff, 1);
    assert!(!fired(&irq_a, Duration::from_millis(200)));
    let config_a = a.region_read(CONFIG, 0, 4096).unwrap();
    let bar_a = dma_engine_bar(a);
    assert_eq!(bar_a[0x48 + 0x20] & 1, 1, "pending bit of vector 0");
    let irq_b = eventfd();
    set_irq(b, Some(irq_b.try_clone().unwrap()));

    migrate(a, b);
    assert_eq!(
        b.region_read(CONFIG, 0, 4096).unwrap(),
        config_a,
        "config space"
    );
    assert_eq!(dma_engine_bar(b), bar_a, "registers, MSI-X table and PBA");
    assert!(!fired(&irq_b, Duration::from_millis(200)), "still masked");
    reg_write(b, 0x80c, 0, 4);
    assert!(
        fired(&irq_b, T),
        "the pending interrupt, at the destination's client"
    );
    assert_eq!(reg_read(b, 0xc00) & 1, 0);
    reg_write(b, 0x34, 1, 4);
    assert_eq!(run(b, SRC, DST + 16384, 64) & 0xff, 1);
    assert_eq!(reg_read(b, 0x30), 3, "SEQ carries on");
    assert_eq!(file.read(DST + 16384, 64), pattern[..64]);
    assert!(fired(&irq_b, T));
    assert!(
        !fired(&irq_a, Duration::from_millis(100)),
        "nothing at the source's"
    );
    assert_eq!(
        errno(a.region_read(BAR0, 0, 4)),
        EINVAL,
        "the source is stopped"
    );
    a.set_mig_state(MigState::Running).unwrap();
    assert_eq!(
        dma_engine_bar(a),
        bar_a,
        "saving changed nothing at the source"
    );
}

/// Proves that the pages the device writes by DMA are logged whichever path its
/// writes take to the client's memory (a window, the relay's copy through the
/// client's fd with and without DIRECT_DATA, DMA_WRITE messages to the client):
/// DMA_LOGGING_START over the first MiB of the destination region, one operation, and
/// DMA_LOGGING_REPORT gives exactly the pages of its destination bytes (not the
/// completion record's page, outside the logged range, nor the source's, which was
/// only read); a second report is empty (reported pages are cleared); logging
/// everything, a report in 64 KiB pages ORs the 4 KiB ones and includes the record;
/// after DMA_LOGGING_STOP a report is refused.
#[test]
fn dirty_pages_on_every_path() {
    const P: u64 = 4096;
    for path in Path::ALL {
        let mut s = setup(&format!("mig-dirty-{path:?}"), path);
        let c = &mut s.client;
        let logged = LoggingRange {
            iova: DST,
            length: MIB,
        };
        assert_eq!(c.dma_logging_start(P, &[logged]).unwrap(), P);
        // 12288 bytes at DST + 8292: pages 2 to 5 of the region.
        assert_eq!(run(c, SRC, DST + 2 * P + 100, 3 * P as u32) & 0xff, 1);
        let mut want = vec![0u64; 5];
        want[0] = 0b11_1100;
        assert_eq!(
            c.dma_logging_report(DST, DST_SIZE, P).unwrap(),
            want,
            "{path:?}"
        );
        assert_eq!(
            c.dma_logging_report(DST, DST_SIZE, P).unwrap(),
            vec![0; 5],
            "{path:?}"
        );
        assert_eq!(
            c.dma_logging_report(SRC, MIB, P).unwrap(),
            vec![0; 4],
            "{path:?}"
        );
        c.dma_logging_stop().unwrap();

        assert_eq!(c.dma_logging_start(P, &[]).unwrap(), P);
        assert_eq!(run(c, SRC, DST + 2 * P + 100, 3 * P as u32) & 0xff, 1);
        let pages_64k = c.dma_logging_report(DST, DST_SIZE, 16 * P).unwrap();
        assert_eq!(pages_64k, vec![1 | 1 << 16], "{path:?}: data and record");
        c.dma_logging_stop().unwrap();
        assert_eq!(errno(c.dma_logging_report(DST, DST_SIZE, P)), EINVAL);
        let _ = &s.memory;
    }
}
