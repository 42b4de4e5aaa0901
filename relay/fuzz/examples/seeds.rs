//! Writes the seed inputs of both targets into `corpus/TARGET/seed-NAME` (run from
//! `relay/fuzz`: `cargo run --example seeds`); `scripts/fuzz.sh` fuzzes from there, and
//! `cargo fuzz cmin` keeps what adds coverage.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("g2h_rings", vfu_relay_fuzz::rings::seeds()),
        ("tunnel_control", vfu_relay_fuzz::control::seeds()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
