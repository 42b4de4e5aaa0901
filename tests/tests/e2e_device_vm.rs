//! The product where users run it (issue 6): vfu-relay on the host, a real device VM
//! (QEMU under TCG, booted from the image `scripts/device-vm/build-image.sh` makes)
//! whose vfu-guest drives the tunnel device over virtio-pci and uio_pci_generic, in
//! compatibility mode (`vhost-user-fs-pci`), serving `gpio` and `dma-engine`; and a
//! host vfio-user client.
//!
//! Needs the image: `scripts/test.sh` builds it and sets `VFU_DEVICE_VM_IMAGE` when QEMU
//! can be installed; without it the test says so loudly and does nothing.

use std::time::Duration;

use vfu_proto::vfio_user::pci_region;
use vfu_tests::device_vm::{image, DeviceVm, BOOT};
use vfu_tests::dma_engine::{self as de, Memory, DST, MIB, SRC};
use vfu_tests::{connect_served, start_relay_with, wait_for_socket, Scratch};

/// Proves that a real device VM serves devices to a host client through the relay:
/// config space identity, BAR reads and writes of `gpio`, and `dma-engine` copying
/// client memory (read from it and written back, 64 KiB and 1 MiB, byte for byte with
/// its CRC and completion record: the copy path, as QEMU 10.0 has no shared memory for
/// windows) with MSI-X interrupts reaching the client's eventfd.
#[test]
fn a_real_device_vm_serves_gpio_and_dma_engine() {
    let Some(image) = image() else {
        eprintln!(
            "!!! SKIPPED a_real_device_vm_serves_gpio_and_dma_engine: no device-VM image \
             (VFU_DEVICE_VM_IMAGE unset; scripts/test.sh builds it where QEMU can be installed)"
        );
        return;
    };
    let scratch = Scratch::new("device-vm");
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
    let vm = DeviceVm::boot(
        &image,
        &frontend,
        &scratch.join("console.log"),
        "gpio0=gpio,dma0=dma-engine",
    );

    // gpio: identity and BAR 2 (its I/O ports) through the real device VM.
    let mut gpio = connect_served(&gpio_sock, BOOT);
    let id = gpio.region_read(pci_region::CONFIG, 0, 4).unwrap();
    assert_eq!(id, [0x4f, 0x49, 0xc8, 0x0d], "ACCES PCI-IDIO-16: 494f:0dc8");
    for v in [0x5au8, 0xa5, 0x00] {
        gpio.region_write(2, 4, &[v]).unwrap();
        assert_eq!(gpio.region_read(2, 4, 1).unwrap(), [v], "BAR 2 round trip");
    }

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
}
