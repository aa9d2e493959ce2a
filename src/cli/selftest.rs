//! `zmlx selftest`: every kernel case vs its MLX-op reference on this backend; exit 1 when a case
//! claimed bit-exact here differs or a call fails.
use anyhow::Result;

pub fn run() -> Result<i32> {
    let backend = crate::mlx_env::init()?;
    let results = crate::selftest::run()?;
    let exact = results.iter().filter(|r| r.bit_exact).count();
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    let broken: Vec<_> = results.iter().filter(|r| r.error.is_some() || (r.claims_exact && !r.bit_exact)).collect();
    eprintln!(
        "[selftest] backend {}: {exact}/{} cases bit-exact; {} of the {} cases claimed exact differ or failed",
        backend.name(),
        results.len(),
        broken.len(),
        results.iter().filter(|r| r.claims_exact).count()
    );
    for r in &broken {
        eprintln!("[selftest] FAILED {} {}: {}", r.kernel, r.case, r.error.as_deref().unwrap_or("not bit-exact"));
    }
    Ok(if broken.is_empty() { 0 } else { 1 })
}
