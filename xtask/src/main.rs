//! `cargo xtask`: set-up, builds, tests, demo and benchmarks for strait. (Skeleton.)
fn main() -> anyhow::Result<()> {
    Ok(())
}
