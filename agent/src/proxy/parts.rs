//! One task polling the parts of one connection, each part with a waker of its own.
//!
//! A client's HTTP connection task drives two parts: the connection itself (hyper's server
//! connection with the requests it is answering, `proxy::http`) and the upstream connections
//! those requests are sent on (`proxy::http::pool::Local`). They wake each other all the
//! time: a request handed to an upstream connection wakes that connection, its answer wakes
//! the request. With the task's own waker, every such wake-up, though the other part is then
//! polled in the same poll of the task, scheduled the task once more, and that poll walked
//! both parts to find nothing to do: a client connection's task was polled about twice as
//! often as its requests and their answers needed (docs/benchmarks.md, "Fewer polls of a
//! connection's task: less CPU, not more throughput").
//!
//! [`Parts::poll`] polls a part only when it was woken, and a wake-up that arrives while the
//! task is polling its parts marks the part instead of waking the task: the part is polled
//! again before the task's poll ends, in order, so a part woken by one polled after it is
//! polled in the same pass. A part woken after its last chance in that poll wakes the task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Wake, Waker};

use futures::task::AtomicWaker;

/// Passes over the parts in one poll of the task. A part that keeps waking itself (a
/// connection that yields, a budget spent) is polled this many times at most before the task
/// lets the runtime run others.
const MAX_PASSES: usize = 4;

/// The wakers of `N` parts of one task (`N` at most 32), and which of them were woken.
pub struct Parts<const N: usize> {
    shared: Arc<Shared>,
    wakers: [Waker; N],
}

struct Shared {
    /// One bit per part: woken since it was last polled.
    woken: AtomicU32,
    /// Whether the task is polling its parts just now (a wake-up then needs no task wake-up).
    polling: AtomicBool,
    /// The task's own waker, for a wake-up while it is not polling.
    task: AtomicWaker,
}

struct PartWaker {
    shared: Arc<Shared>,
    bit: u32,
}

impl Wake for PartWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Sequentially consistent, with the same in `Parts::poll`: either this load sees the
        // task still polling, and then its load of `woken` after it stops sees this bit, or
        // this load sees it stopped and wakes it. A wake-up is never lost between the two.
        self.shared.woken.fetch_or(self.bit, Ordering::SeqCst);
        if !self.shared.polling.load(Ordering::SeqCst) {
            self.shared.task.wake();
        }
    }
}

impl<const N: usize> Default for Parts<N> {
    fn default() -> Self {
        const { assert!(N >= 1 && N <= 32, "one bit per part in a u32") };
        let shared = Arc::new(Shared {
            // Every part is polled in the task's first poll, which gives each its waker.
            woken: AtomicU32::new(u32::MAX >> (32 - N)),
            polling: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let wakers = std::array::from_fn(|part| {
            Waker::from(Arc::new(PartWaker {
                shared: shared.clone(),
                bit: 1 << part,
            }))
        });
        Parts { shared, wakers }
    }
}

impl<const N: usize> Parts<N> {
    /// Has part `part` polled at the next [`Parts::poll`], for a change its own wakers do
    /// not report (call it from the task's poll, just before `Parts::poll`).
    pub fn mark_woken(&self, part: usize) {
        self.shared.woken.fetch_or(1 << part, Ordering::SeqCst);
    }

    /// Polls each woken part, in the order of their numbers, with its own waker (through
    /// `poll_part(part, cx)`), and again while any is woken, for at most [`MAX_PASSES`]
    /// passes; `cx` is the task's. A part still woken after the last pass wakes the task.
    pub fn poll(&self, cx: &Context<'_>, mut poll_part: impl FnMut(usize, &mut Context<'_>)) {
        self.shared.task.register(cx.waker());
        self.shared.polling.store(true, Ordering::SeqCst);
        for _ in 0..MAX_PASSES {
            for (part, waker) in self.wakers.iter().enumerate() {
                let bit = 1 << part;
                // Cleared before the part is polled: a wake-up during its poll is kept.
                if self.shared.woken.fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
                    poll_part(part, &mut Context::from_waker(waker));
                }
            }
            if self.shared.woken.load(Ordering::SeqCst) == 0 {
                break;
            }
        }
        self.shared.polling.store(false, Ordering::SeqCst);
        if self.shared.woken.load(Ordering::SeqCst) != 0 {
            cx.waker().wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Wake, Waker};

    use super::*;

    /// A task's waker that counts its wake-ups.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Counting>, Waker) {
        let counting = Arc::new(Counting::default());
        (counting.clone(), Waker::from(counting))
    }

    /// Every part is polled in the first poll; later, only the woken ones.
    #[test]
    fn the_first_poll_polls_every_part_and_later_ones_only_the_woken() {
        let parts = Parts::<3>::default();
        let (_, waker) = task();
        let cx = Context::from_waker(&waker);
        let mut polled = Vec::new();
        parts.poll(&cx, |part, _| polled.push(part));
        assert_eq!(polled, [0, 1, 2]);
        polled.clear();
        parts.poll(&cx, |part, _| polled.push(part));
        assert!(
            polled.is_empty(),
            "nothing woken, nothing polled: {polled:?}"
        );
        parts.wakers[2].wake_by_ref();
        parts.poll(&cx, |part, _| polled.push(part));
        assert_eq!(polled, [2]);
    }

    /// A part woken by another during the task's poll is polled in that poll, and the task is
    /// not woken for it: the hand-over from a client connection to its upstream connection
    /// and the answer coming back.
    #[test]
    fn a_part_woken_by_another_in_the_tasks_poll_does_not_wake_the_task() {
        let parts = Parts::<2>::default();
        let (woken, waker) = task();
        let cx = Context::from_waker(&waker);
        parts.poll(&cx, |_, _| {});
        // Part 1 (the client's connection) is woken by its client and wakes part 0 (the
        // upstream connection), numbered before it: polled in the next pass of the same poll.
        let handed_over: Mutex<Option<Waker>> = Mutex::new(None);
        let mut polled = Vec::new();
        parts.wakers[1].wake_by_ref();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "woken from outside");
        parts.poll(&cx, |part, part_cx| {
            polled.push(part);
            if part == 1 {
                *handed_over.lock().unwrap() = Some(part_cx.waker().clone());
                parts.wakers[0].wake_by_ref();
            }
        });
        assert_eq!(polled, [1, 0]);
        // Part 0 wakes part 1 (the answer), numbered after it: the same pass.
        polled.clear();
        parts.wakers[0].wake_by_ref();
        parts.poll(&cx, |part, _| {
            polled.push(part);
            if part == 0 {
                handed_over.lock().unwrap().as_ref().unwrap().wake_by_ref();
            }
        });
        assert_eq!(polled, [0, 1]);
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            2,
            "only the two wake-ups from outside woke the task"
        );
    }

    /// A part that wakes itself on every poll is polled a bounded number of times, and the
    /// task is woken to poll it again later: it goes to the back of the runtime's queue.
    #[test]
    fn a_part_that_keeps_waking_itself_is_polled_a_bounded_number_of_times() {
        let parts = Parts::<2>::default();
        let (woken, waker) = task();
        let cx = Context::from_waker(&waker);
        let mut polled = 0;
        parts.poll(&cx, |part, part_cx| {
            if part == 1 {
                polled += 1;
                part_cx.waker().wake_by_ref();
            }
        });
        assert_eq!(polled, MAX_PASSES);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the task polls it again");
    }

    /// A wake-up from another thread is never lost, whether it comes while the task polls or
    /// after: each one is followed by a poll of its part.
    #[test]
    fn wake_ups_from_another_thread_are_never_lost() {
        let parts = Arc::new(Parts::<2>::default());
        let (woken, waker) = task();
        let cx = Context::from_waker(&waker);
        parts.poll(&cx, |_, _| {});
        let sent = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let waking = {
            let (parts, sent) = (parts.clone(), sent.clone());
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    sent.fetch_add(1, Ordering::SeqCst);
                    parts.wakers[1].wake_by_ref();
                }
            })
        };
        // The task polls whenever it was woken, like a runtime would, until the thread ends
        // and every wake-up it sent has been seen by a poll after it.
        for _ in 0..10_000_000 {
            let finished = waking.is_finished();
            let before = sent.load(Ordering::SeqCst);
            if woken.0.swap(0, Ordering::SeqCst) > 0 {
                parts.poll(&cx, |part, _| {
                    if part == 1 {
                        seen.store(before, Ordering::SeqCst);
                    }
                });
            }
            if finished && seen.load(Ordering::SeqCst) == 20_000 {
                break;
            }
            std::thread::yield_now();
        }
        waking.join().unwrap();
        assert_eq!(
            seen.load(Ordering::SeqCst),
            20_000,
            "the last wake-up was polled"
        );
    }
}
