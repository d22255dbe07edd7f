//! How the kernel's scheduler treats the threads that carry proxied traffic.
//!
//! Every proxied request wakes the agent between two pods, and each wake-up waits for a CPU
//! behind whatever ran there. Linux's fair scheduler (EEVDF, 6.6 and later) picks the runnable
//! task with the earliest virtual deadline, a task's deadline is its eligible time plus its
//! slice, and since 6.12 a thread may ask for its own slice through `sched_setattr`'s
//! `sched_runtime` (from 0.1 ms to 100 ms): a shorter slice gives an earlier deadline, so a
//! woken agent thread runs sooner, without taking a larger share of the CPU (its weight, the
//! nice value, is unchanged). The agent's bursts per request are tens of microseconds, well
//! inside the shortest slice. Kernels before 6.12 ignore the field for fair threads.

use std::io;
use std::time::Duration;

/// The shortest slice the kernel grants; shorter requests are raised to it.
pub const SHORTEST_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` of `sched_setattr(2)` (the fields up to `sched_util_max`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// Asks for `slice` as the calling thread's time slice, keeping its policy and nice value.
/// Threads running under another policy than the fair one (an operator's `chrt`) are left
/// as they are.
pub fn request_slice(slice: Duration) -> io::Result<()> {
    let mut attr = current()?;
    if attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH {
        return Ok(());
    }
    attr.size = size_of::<SchedAttr>() as u32;
    attr.sched_flags = 0;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr reads `attr.size` bytes of the struct passed; thread id 0 is the
    // calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's slice as the kernel holds it (its default where none was asked for;
/// zero on kernels before 6.12, which keep none per thread).
pub fn current_slice() -> io::Result<Duration> {
    Ok(Duration::from_nanos(current()?.sched_runtime))
}

fn current() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = size_of::<SchedAttr>() as u32;
    // SAFETY: sched_getattr writes at most `size` bytes into the struct passed; thread id 0 is
    // the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_asks_for_a_short_slice_gets_it_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            let before = current().expect("sched_getattr").sched_nice;
            // SAFETY: nice(2) changes only the calling thread's nice value (Linux keeps it
            // per thread).
            let niced = unsafe { libc::nice(1) };
            assert!(
                niced > before,
                "nice(1) raised the nice value from {before}"
            );
            request_slice(Duration::from_micros(200)).expect("sched_setattr");
            let attr = current().expect("sched_getattr");
            assert_eq!(
                attr.sched_nice, niced,
                "the nice value survives the slice request"
            );
            assert_eq!(
                current_slice().unwrap(),
                Duration::from_micros(200),
                "this test needs Linux 6.12 or later (custom EEVDF slices); uname -r says {}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
            );
        })
        .join()
        .unwrap();
    }
}
