//! A real device VM for tests and benchmarks: `scripts/device-vm/boot.sh` with the image
//! `scripts/device-vm/build-image.sh` made (`VFU_DEVICE_VM_IMAGE`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Booting under TCG and starting vfu-guest takes ~5 s here; CI machines may be slower.
pub const BOOT: Duration = Duration::from_secs(120);

/// The image folder named by `VFU_DEVICE_VM_IMAGE`, if it holds an image.
pub fn image() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("VFU_DEVICE_VM_IMAGE")?);
    path.join("vmlinuz").exists().then_some(path)
}

/// `scripts/device-vm/boot.sh` in its own process group: dropping it kills the group
/// (the shell, `timeout` and QEMU).
pub struct DeviceVm {
    child: Child,
    log: PathBuf,
}

impl DeviceVm {
    /// Boots the image connected to the relay's frontend `socket`, serving `serve`
    /// (`NAME=MODEL,...`); the console goes to `log`.
    pub fn boot(image: &Path, socket: &Path, log: &Path, serve: &str) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device-vm/boot.sh");
        let child = Command::new(script)
            .args(["--image", &image.display().to_string()])
            .args(["--socket", &socket.display().to_string()])
            .args(["--serve", serve, "--timeout", "600", "--quiet"])
            .args(["--log", &log.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start boot.sh");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// What the VM printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
