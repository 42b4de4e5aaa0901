//! The harness of the relay's fuzz targets (`fuzz_targets/`): a relay built in-process
//! from its library, driven the way its switch thread and its vhost-user backend drive
//! it, with the device VM's side and the clients' side played by the input.
//!
//! - [`rings`]: target `g2h_rings`, what the device VM writes into the virtqueues.
//! - [`control`]: target `tunnel_control`, the tunnel's control messages and the
//!   clients, channels and device-VM connections around them.
//! - [`env`]: what both share: the relay, its backend and vrings, guest memory, the
//!   driver's `h2g` side, clients on socket pairs, and their checks.
//! - [`input`]: the inputs' byte layout.
//!
//! `cargo run --example seeds` writes the seed inputs into `corpus/` (see
//! `scripts/fuzz.sh`).

pub mod control;
pub mod env;
pub mod input;
pub mod rings;

/// Whether `VFU_FUZZ_TRACE` is set: the targets then print each step (to replay a
/// finding: `VFU_FUZZ_TRACE=1 target/.../TARGET artifacts/TARGET/crash-...`).
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VFU_FUZZ_TRACE").is_some())
}

/// The input of seed `name` of `seeds` (a target's `seeds()`).
#[cfg(test)]
fn seed(seeds: Vec<(String, Vec<u8>)>, name: &str) -> Vec<u8> {
    seeds
        .into_iter()
        .find(|(n, _)| n == name)
        .expect("seed")
        .1
}

/// Runs every seed through a target's `run`, naming each first (a finding names its
/// seed).
#[cfg(test)]
fn run_seeds(seeds: Vec<(String, Vec<u8>)>, run: fn(&[u8])) {
    for (name, input) in seeds {
        eprintln!("seed {name}");
        run(&input);
    }
}
