//! Giving freed heap memory back to the kernel, with the system allocator (glibc).
//!
//! glibc keeps what the program frees for its next allocations, and returns pages to the
//! kernel by itself only from the top of a heap. After a burst (many client connections at
//! once, which then close or idle) the agent's resident memory would stay at the burst's
//! peak and count against the DaemonSet's memory limit, though nothing uses it. So a thread
//! of its own reads every 10 s how much the heap holds free (`mallinfo2`) and, past 4 MiB,
//! asks glibc to return the free pages (`malloc_trim`). The trim walks the free memory with
//! each arena's lock held in turn, one `madvise` per free chunk: milliseconds for thousands of
//! chunks, during which the worker threads' allocations wait. So it runs only when the agent
//! was nearly idle over the last period, as after a burst whose connections closed or went
//! idle; under load, freed memory is taken again by the next connections anyway. The jemalloc
//! build has jemalloc's own background thread for this (main.rs).

/// Starts the trimming thread (once per process; with the system allocator on glibc only).
pub fn start_trimming() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    glibc::start();
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
mod glibc {
    use std::time::Duration;

    /// How often the free heap is looked at.
    const PERIOD: Duration = Duration::from_secs(10);
    /// Free heap bytes below which nothing is returned: a few connections' worth, which the
    /// next ones would take again.
    const WORTH_TRIMMING: usize = 4 << 20;
    /// The agent's CPU time over a period below which it counts as nearly idle (2 % of a
    /// core): the trim's stall then meets few requests.
    const QUIET: Duration = Duration::from_millis(200);

    pub fn start() {
        let started = std::thread::Builder::new()
            .name("strait-heap".to_owned())
            .spawn(|| {
                let mut cpu = process_cpu();
                loop {
                    std::thread::sleep(PERIOD);
                    // Unreadable CPU time counts as busy.
                    if let (Some(before), Some(now)) = (cpu, process_cpu())
                        && now.saturating_sub(before) < QUIET
                    {
                        trim_if_worth_it();
                    }
                    cpu = process_cpu();
                }
            });
        if let Err(error) = started {
            tracing::warn!(%error, "freed heap memory will not be returned to the kernel");
        }
    }

    /// The CPU time (user and system) of the whole process so far.
    fn process_cpu() -> Option<Duration> {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes the struct it is given.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: initialised by getrusage (and zeroed before).
        let usage = unsafe { usage.assume_init() };
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Some(time(usage.ru_utime) + time(usage.ru_stime))
    }

    /// Bytes the heap holds free (not in use, not yet returned).
    fn free_bytes() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.fordblks
    }

    fn trim_if_worth_it() {
        let free = free_bytes();
        if free < WORTH_TRIMMING {
            return;
        }
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim takes the allocator's own locks; no memory of ours is touched.
        let returned = unsafe { libc::malloc_trim(0) } == 1;
        tracing::debug!(
            free_before = free,
            free_after = free_bytes(),
            returned,
            took = ?started.elapsed(),
            "freed heap memory returned to the kernel"
        );
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        }

        /// The quiet test reads the process's CPU time: busy work shows in it.
        #[test]
        fn the_process_cpu_time_counts_busy_work() {
            let before = process_cpu().expect("getrusage");
            let spin = std::time::Instant::now();
            let mut x = 0u64;
            while spin.elapsed() < Duration::from_millis(100) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let used = process_cpu().expect("getrusage") - before;
            assert!(
                used >= Duration::from_millis(50),
                "100 ms of spinning counted as {used:?}"
            );
        }

        #[test]
        fn freed_memory_in_the_middle_of_the_heap_goes_back_to_the_kernel() {
            // Many blocks the size of a connection's buffers, every other one kept: what is freed
            // lies between blocks in use, where glibc does not return it by itself. Allocated on
            // this thread's arena, touched so that they are resident.
            let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 8192]).collect();
            let mut kept = Vec::new();
            for (n, block) in blocks.drain(..).enumerate() {
                if n % 2 == 0 {
                    kept.push(block);
                }
            }
            let freed = rss_kib();
            assert!(
                free_bytes() >= WORTH_TRIMMING,
                "the test frees {} KiB; the heap holds {} KiB free",
                2048 * 8,
                free_bytes() / 1024
            );
            trim_if_worth_it();
            let trimmed = rss_kib();
            // Only whole pages between the blocks in use can go back: one of each freed block's
            // two, or less. Without the trim, none would.
            assert!(
                trimmed + 4 * 1024 <= freed,
                "RSS {freed} KiB before the trim, {trimmed} KiB after: 16 MiB were free"
            );
            assert!(free_bytes() > 0 && kept.len() == 2048);
        }
    }
}
