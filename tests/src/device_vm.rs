//! A real device VM for tests and benchmarks: `scripts/device-vm/boot.sh` with the image
//! `scripts/device-vm/build-image.sh` made (`VFU_DEVICE_VM_IMAGE`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Booting under TCG and starting vfu-guest takes ~5 s here; CI machines may be slower.
pub const BOOT: Duration = Duration::from_secs(120);

/// The image folder named by `VFU_DEVICE_VM_IMAGE`, if it holds an image.
pub fn image() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("VFU_DEVICE_VM_IMAGE")?);
    path.join("vmlinuz").exists().then_some(path)
}

/// A device VM (`scripts/device-vm/boot.sh`, or QEMU started directly) in its own
/// process group: dropping it kills the group (the shell, `timeout` and QEMU).
pub struct DeviceVm {
    child: Child,
    log: PathBuf,
}

impl DeviceVm {
    /// Boots the image connected to the relay's frontend `socket`, serving `serve`
    /// (`NAME=MODEL,...`) through /init's default PCI driver; the console goes to
    /// `log`.
    pub fn boot(image: &Path, socket: &Path, log: &Path, serve: &str) -> Self {
        Self::boot_with_driver(image, socket, log, serve, None)
    }

    /// [`DeviceVm::boot`] with the tunnel device bound to `driver` (`uio_pci_generic`
    /// or `vfio-pci`, /init's `vfu.driver=`).
    pub fn boot_with_driver(
        image: &Path,
        socket: &Path,
        log: &Path,
        serve: &str,
        driver: Option<&str>,
    ) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device-vm/boot.sh");
        let mut cmd = Command::new(script);
        if let Some(d) = driver {
            cmd.args(["--driver", d]);
        }
        cmd.args(["--image", &image.display().to_string()])
            .args(["--socket", &socket.display().to_string()])
            .args(["--serve", serve, "--timeout", "600", "--quiet"])
            .args(["--log", &log.display().to_string()])
            .stdout(Stdio::null());
        Self::spawn(cmd, log)
    }

    /// Starts `cmd` (boot.sh, or QEMU itself) as a device VM whose console ends up in
    /// `log`, in its own process group; stdin and stderr are closed, stdout is the
    /// caller's choice.
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// What the VM printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The console lines that start with `prefix` (markers such as
    /// `VFU-GUEST TRANSPORT`), without their line endings.
    pub fn markers(&self, prefix: &str) -> Vec<String> {
        self.console()
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// Waits up to `timeout` for the `n`th console line starting with `prefix`.
    pub fn wait_for_marker(&self, prefix: &str, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.markers(prefix).into_iter().nth(n - 1) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DeviceVm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for the child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("device VM console:\n{}", self.console());
        }
    }
}
