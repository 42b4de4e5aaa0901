//! Processes of a test whose standard error is kept in a file (their log lines and any
//! panic message), and what a test reads in such a file.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, Proc};

/// `VFU_TEST_LOG` when it is set (the log level the developer asked for), else
/// `default`.
pub fn test_log_level(default: &str) -> String {
    std::env::var("VFU_TEST_LOG").unwrap_or_else(|_| default.to_string())
}

/// Starts workspace binary `bin` (see [`binary`]) with `args`, standard input and output
/// closed, `RUST_LOG` set to `level`, and its standard error appended to `log` (created
/// if need be, so a process started again with the same log adds to it).
pub fn spawn_logged<S: AsRef<OsStr>>(
    name: &str,
    bin: &str,
    args: &[S],
    level: &str,
    log: &Path,
) -> Proc {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("log file {}: {e}", log.display()));
    let mut cmd = Command::new(binary(bin));
    cmd.args(args)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(file);
    Proc::spawn_command(name, cmd)
}

/// A process's standard error, kept in a file.
#[derive(Debug, Clone)]
pub struct Log {
    /// The file.
    pub path: PathBuf,
}

impl Log {
    /// The log in file `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Everything in it so far (nothing when there is no file yet).
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// The number of lines that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits up to `wait` until a line contains `needle`.
    pub fn wait_for(&self, needle: &str, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.count(needle) > 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} has no line with {needle:?} after {wait:?}",
            self.path.display()
        ))
    }

    /// The last `n` lines, for a failure report.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The lines that report a panic (Rust's "thread ... panicked at").
    pub fn panics(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(str::to_string)
            .collect()
    }
}
