//! pread/pwrite of a memfd against memcpy from a mapping of it: why the relay maps
//! client memfds that are sealed against shrinking.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use vfu_proto::mem::map_fd;
use vfu_tests::dma_engine::try_memfd;

const MIB: usize = 1 << 20;

/// Bytes per second of `n` calls of `f`, each moving `size` bytes, in GB/s.
fn rate(n: usize, size: usize, f: &mut dyn FnMut() -> std::io::Result<()>) -> Result<f64, String> {
    let t = Instant::now();
    for _ in 0..n {
        f().map_err(|e| e.to_string())?;
    }
    Ok((n * size) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

pub fn run() -> Result<(), String> {
    let f = try_memfd(MIB as u64).map_err(|e| format!("memfd: {e}"))?;
    let fd = std::os::fd::AsFd::as_fd(&f);
    let map = map_fd(fd, 0, MIB as u64, true, true).map_err(|e| e.to_string())?;
    // SAFETY: a fresh 1 MiB read-write mapping of a memfd sealed against shrinking;
    // nothing else uses it while this slice lives.
    let mapped = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), MIB) };
    mapped.fill(1);
    let mut buf = vec![0u8; MIB];
    println!("\nmemfd access, 64 MiB per size, one thread (GB/s)\n");
    println!("| size | pread | pwrite | memcpy from a mapping | memcpy to a mapping |");
    println!("|---|---:|---:|---:|---:|");
    let mut result = Ok(());
    for size in [4096usize, 16384, 65536, 262144, MIB] {
        let n = (64 * MIB) / size;
        let row = (|| -> Result<_, String> {
            let pread = rate(n, size, &mut || f.read_exact_at(&mut buf[..size], 0))
                .map_err(|e| format!("pread: {e}"))?;
            let pwrite = rate(n, size, &mut || f.write_all_at(&buf[..size], 0))
                .map_err(|e| format!("pwrite: {e}"))?;
            let from = rate(n, size, &mut || {
                buf[..size].copy_from_slice(&mapped[..size]);
                std::hint::black_box(&buf);
                Ok(())
            })?;
            let to = rate(n, size, &mut || {
                mapped[..size].copy_from_slice(&buf[..size]);
                std::hint::black_box(&*mapped);
                Ok(())
            })?;
            Ok((pread, pwrite, from, to))
        })();
        match row {
            Ok((pread, pwrite, from, to)) => println!(
                "| {} KiB | {pread:.2} | {pwrite:.2} | {from:.2} | {to:.2} |",
                size >> 10
            ),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // SAFETY: the mapping made above, unmapped once; `mapped` is not used again.
    unsafe { libc::munmap(map.as_ptr().cast(), MIB) };
    result
}
