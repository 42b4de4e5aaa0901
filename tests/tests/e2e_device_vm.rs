//! The product where users run it (issue 6): vfu-relay on the host, a real device VM
//! (QEMU under TCG, booted from the image `scripts/device-vm/build-image.sh` makes)
//! whose vfu-guest drives the tunnel device over virtio-pci in compatibility mode
//! (`vhost-user-fs-pci`), serving `gpio` and `dma-engine`; and a host vfio-user client.
//! The same scenario runs with the tunnel device on each kernel driver vfu-guest knows:
//! uio_pci_generic (INTx) and vfio-pci in no-IOMMU mode (an MSI-X vector per queue).
//!
//! Needs the image: `scripts/test.sh` builds it and sets `VFU_DEVICE_VM_IMAGE` when QEMU
//! can be installed; without it the tests say so loudly and do nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vfu_proto::vfio_user::pci_region;
use vfu_tests::device_vm::{image, DeviceVm, BOOT};
use vfu_tests::dma_engine::{self as de, Memory, DST, MIB, SRC};
use vfu_tests::{connect_served, start_relay_with, wait_for_socket, Scratch};

/// One TCG device VM at a time: two would share the machine's two cores with the
/// relays and the client.
static ONE_VM: Mutex<()> = Mutex::new(());

/// gpio round trips timed to tell interrupts from the engine's 200 ms wait timeout.
const TIMED_READS: u32 = 20;

/// The `interrupts=N timeouts=M naps=P by-queue=Q:N,...` words of a `VFU-GUEST WAKEUPS`
/// line.
struct Wakeups {
    interrupts: u64,
    queues: Vec<u16>,
}

fn parse_wakeups(line: &str) -> Wakeups {
    let word = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    let queues = word("by-queue=")
        .split(',')
        .filter_map(|q| q.split_once(':')?.0.parse().ok())
        .collect();
    Wakeups {
        interrupts: word("interrupts=").parse().expect("interrupts=N"),
        queues,
    }
}

/// Proves that a real device VM serves devices to a host client through the relay, with
/// the tunnel device bound to `driver`: config space identity, BAR reads and writes of
/// `gpio`, and `dma-engine` copying client memory (read from it and written back, 64
/// KiB and 1 MiB, byte for byte with its CRC and completion record: the copy path, as
/// QEMU 10.0 has no shared memory for windows) with MSI-X interrupts reaching the
/// client's eventfd. And that vfu-guest was woken by the tunnel device's interrupts of
/// the kind `interrupts` names (`VFU-GUEST TRANSPORT`), not by its wait timeout: the
/// `VFU-GUEST WAKEUPS` counts printed when the clients leave show at least one
/// interrupt per round trip, on `min_queues` distinct queues' fds at least.
fn serves_gpio_and_dma_engine(test: &str, driver: &str, interrupts: &str, min_queues: usize) {
    let Some(image) = image() else {
        eprintln!(
            "!!! SKIPPED {test}: no device-VM image (VFU_DEVICE_VM_IMAGE unset; \
             scripts/test.sh builds it where QEMU can be installed)"
        );
        return;
    };
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new(test);
    let frontend = scratch.join("frontend.sock");
    let gpio_sock = scratch.join("gpio0.sock");
    let dma_sock = scratch.join("dma0.sock");
    let _relay = start_relay_with(
        None,
        &frontend,
        &[("gpio0", &gpio_sock), ("dma0", &dma_sock)],
        &["--shm-size-mib", "0"],
    );
    assert!(wait_for_socket(&frontend, BOOT));
    let vm = DeviceVm::boot_with_driver(
        &image,
        &frontend,
        &scratch.join("console.log"),
        "gpio0=gpio,dma0=dma-engine",
        Some(driver),
    );

    // gpio: identity and BAR 2 (its I/O ports) through the real device VM.
    let mut gpio = connect_served(&gpio_sock, BOOT);
    let transport = vm
        .wait_for_marker("VFU-GUEST TRANSPORT", 1, BOOT)
        .expect("vfu-guest printed its transport");
    let want = format!("driver={driver} interrupts={interrupts}");
    assert!(
        transport.contains(&want),
        "{transport:?} should say {want:?}"
    );
    let id = gpio.region_read(pci_region::CONFIG, 0, 4).unwrap();
    assert_eq!(id, [0x4f, 0x49, 0xc8, 0x0d], "ACCES PCI-IDIO-16: 494f:0dc8");
    for v in [0x5au8, 0xa5, 0x00] {
        gpio.region_write(2, 4, &[v]).unwrap();
        assert_eq!(gpio.region_read(2, 4, 1).unwrap(), [v], "BAR 2 round trip");
    }
    // Round trips to count in the wake-ups below (their time is printed, not judged:
    // tests check behaviour, figures are in `vfu-bench device-vm`).
    let t = Instant::now();
    for _ in 0..TIMED_READS {
        gpio.region_read(2, 4, 1).unwrap();
    }
    let per_read = t.elapsed() / TIMED_READS;

    // dma-engine: client memory in a sealed memfd, copy path.
    let mut dma = connect_served(&dma_sock, BOOT);
    dma.set_timeout(Duration::from_secs(60)).unwrap();
    let file = de::memfd(2 * MIB + 4096);
    de::map(&mut dma, SRC, MIB, 0, false, Some(&file));
    de::map(&mut dma, DST, de::DST_SIZE, MIB, true, Some(&file));
    de::enable(&mut dma);
    let irq = de::eventfd();
    de::set_irq(&mut dma, Some(irq.try_clone().unwrap()));
    let memory = Memory::File(file);
    for (seq, len) in [(1u32, 64usize << 10), (2, 1 << 20)] {
        let pattern: Vec<u8> = (0..len)
            .map(|i| (i * 7 + (i >> 10) + seq as usize) as u8)
            .collect();
        memory.write(SRC, &pattern);
        memory.write(DST, &vec![0xee; len]);
        let status = de::run(&mut dma, SRC, DST, len as u32);
        assert_eq!(
            status & 0xff,
            1,
            "DONE for {len} bytes; console:\n{}",
            vm.console()
        );
        assert!(
            memory.read(DST, len) == pattern,
            "{len} bytes copied byte for byte"
        );
        assert_eq!(
            de::completion(&memory),
            [0, de::crc32c(&pattern), len as u32, seq]
        );
        assert!(
            de::fired(&irq, Duration::from_secs(30)),
            "MSI-X vector 0 reached the client"
        );
    }

    // The clients leave: each session's end makes vfu-guest print its wake-up counts.
    drop(gpio);
    drop(dma);
    let line = vm
        .wait_for_marker("VFU-GUEST WAKEUPS", 2, Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "no second VFU-GUEST WAKEUPS line; console:\n{}",
                vm.console()
            )
        });
    eprintln!("{test}: {transport}; {per_read:?} per gpio round trip; {line}");
    let wakeups = parse_wakeups(&line);
    assert!(
        wakeups.interrupts >= u64::from(TIMED_READS),
        "{line:?}: fewer interrupts than the {TIMED_READS} timed round trips alone"
    );
    assert!(
        wakeups.queues.len() >= min_queues,
        "{line:?}: interrupts on fewer than {min_queues} queue fds"
    );
}

/// The scenario over uio_pci_generic: one INTx shared by every queue.
#[test]
fn a_real_device_vm_serves_gpio_and_dma_engine_over_uio() {
    serves_gpio_and_dma_engine(
        "a_real_device_vm_serves_gpio_and_dma_engine_over_uio",
        "uio_pci_generic",
        "intx",
        1,
    );
}

/// The scenario over vfio-pci in no-IOMMU mode: an MSI-X vector, and eventfd, per
/// queue; both queues' vectors fire.
#[test]
fn a_real_device_vm_serves_gpio_and_dma_engine_over_vfio() {
    serves_gpio_and_dma_engine(
        "a_real_device_vm_serves_gpio_and_dma_engine_over_vfio",
        "vfio-pci",
        "msix",
        2,
    );
}
