//! The operator's files in `deploy/` (docs/operating.md, "Walk-through") do what the
//! walk-through says: the relay started from `deploy/vfu-relay.toml`, and the device VM
//! started by the very command line of `deploy/systemd/vfu-device-vm.service` with the
//! values of `deploy/device-vm.env`, serve the configured devices to a host client.
//!
//! Only paths are changed (`/run/vfu-relay` and `/var/lib/vfu-relay/device-vm` become
//! the test's folders), and `-accel kvm` is dropped so that QEMU uses TCG straight away,
//! as the unit does wherever KVM is missing (KVM on the project's machines is too slow
//! for a stock kernel). Needs the device-VM image, like e2e_device_vm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use vfu_proto::vfio_user::pci_region;
use vfu_tests::device_vm::{image, DeviceVm, BOOT};
use vfu_tests::{connect_served, wait_for_socket, Proc, Scratch};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// `KEY=VALUE` lines of an EnvironmentFile; `#` starts a comment line.
fn environment_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The words of the unit's `ExecStart=`, continuation lines joined, `${VAR}` expanded
/// from `env`, double quotes grouping words, as systemd reads them (the unit uses no
/// other quoting).
fn exec_start(unit: &str, env: &HashMap<String, String>) -> Vec<String> {
    let mut line = String::new();
    let mut lines = unit.lines().skip_while(|l| !l.starts_with("ExecStart="));
    for l in lines.by_ref() {
        match l.strip_suffix('\\') {
            Some(head) => line.push_str(head),
            None => {
                line.push_str(l);
                break;
            }
        }
        line.push(' ');
    }
    let mut line = line
        .strip_prefix("ExecStart=")
        .expect("no ExecStart=")
        .to_string();
    while let Some(start) = line.find("${") {
        let end = start + line[start..].find('}').expect("unterminated ${");
        let name = &line[start + 2..end];
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("${{{name}}} is not in the environment file"));
        line.replace_range(start..=end, value);
    }
    assert!(!line.contains('\''), "single quotes are not handled here");
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in ExecStart=");
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Proves the walk-through's files work together: the relay from the example
/// configuration and QEMU from the unit's command line bring up a device VM that
/// serves both configured devices (`gpio0` with `gpio`, `dma0` with `dma-engine`), whose
/// config spaces a host client reads through the relay.
#[test]
fn deploy_files_bring_up_a_serving_device_vm() {
    let Some(image) = image() else {
        eprintln!(
            "!!! SKIPPED deploy_files_bring_up_a_serving_device_vm: no device-VM image \
             (VFU_DEVICE_VM_IMAGE unset; scripts/test.sh builds it where QEMU can be installed)"
        );
        return;
    };
    let scratch = Scratch::new("deploy");
    let run = scratch.join("run");
    std::fs::create_dir(&run).unwrap();
    let relocate = |s: &str| {
        s.replace("/run/vfu-relay", &run.display().to_string())
            .replace("/var/lib/vfu-relay/device-vm", &image.display().to_string())
    };

    let config = scratch.join("vfu-relay.toml");
    std::fs::write(
        &config,
        relocate(&std::fs::read_to_string(deploy("vfu-relay.toml")).unwrap()),
    )
    .unwrap();
    let _relay = Proc::spawn(
        "vfu-relay",
        &vfu_tests::binary("vfu-relay"),
        &["--config", config.to_str().unwrap()],
    );
    let frontend = run.join("frontend.sock");
    assert!(wait_for_socket(&frontend, BOOT), "the relay did not listen");

    let env = environment_file(&std::fs::read_to_string(deploy("device-vm.env")).unwrap());
    let unit = std::fs::read_to_string(deploy("systemd/vfu-device-vm.service")).unwrap();
    let mut words: Vec<String> = exec_start(&unit, &env)
        .iter()
        .map(|w| relocate(w))
        .collect();
    let kvm = words
        .windows(2)
        .position(|w| w[0] == "-accel" && w[1] == "kvm")
        .expect("the unit asks for KVM first");
    words.drain(kvm..kvm + 2);
    let console = scratch.join("console.log");
    let mut qemu = Command::new(&words[0]);
    qemu.args(&words[1..])
        .stdout(std::fs::File::create(&console).unwrap());
    let _vm = DeviceVm::spawn(qemu, &console);

    // The names the device VM serves are those of the example configuration.
    for (name, vendor, device) in [("gpio0", 0x494f, 0x0dc8), ("dma0", 0x1234, 0x11f0)] {
        let mut c = connect_served(&run.join(format!("{name}.sock")), BOOT);
        let ids = c.region_read(pci_region::CONFIG, 0, 4).unwrap();
        assert_eq!(
            (
                u16::from_le_bytes([ids[0], ids[1]]),
                u16::from_le_bytes([ids[2], ids[3]])
            ),
            (vendor, device),
            "{name}: PCI ids through the device VM"
        );
    }
}
