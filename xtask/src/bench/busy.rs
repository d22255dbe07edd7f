//! A node whose CPUs other pods keep busy: one spinning process per CPU beside the fixed-rate
//! runs of the busy-node scenarios (`xtask bench spin`, internal). On a real node the agent's
//! wake-ups compete with pods' work for the cores; on an otherwise idle testbed they never
//! wait behind anything, which flatters every latency figure, the direct baseline's too.
//!
//! The spinners are the bench's own children at the default nice value, in the bench's
//! cgroup: they compete for the CPUs as a busy pod would, without its network traffic.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

#[derive(Debug, Clone, clap::Args)]
pub struct SpinArgs {
    /// Spin for this long, then exit (the bench stops it sooner when the runs end).
    #[arg(long)]
    seconds: u64,
}

/// `xtask bench spin`: keeps one CPU busy for `--seconds`.
pub fn spin(args: &SpinArgs) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut x = 0u64;
    while Instant::now() < until {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
    Ok(())
}

/// Spinning neighbours, one per CPU; stopped (killed and reaped) when dropped, so an error in
/// the runs beside them leaves none behind.
pub struct Neighbours {
    spinners: Vec<Child>,
}

impl Neighbours {
    /// Starts one spinner per CPU of this machine, each for at most `longest`.
    pub fn start(xtask: &Path, longest: Duration) -> anyhow::Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mut neighbours = Self {
            spinners: Vec::with_capacity(cpus),
        };
        for _ in 0..cpus {
            let child = Command::new(xtask)
                .args(["bench", "spin", "--seconds"])
                .arg(longest.as_secs().max(1).to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {} bench spin", xtask.display()))?;
            neighbours.spinners.push(child);
        }
        Ok(neighbours)
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        for child in &mut self.spinners {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
