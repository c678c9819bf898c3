//! adjoint-dpm patch 2: a few helper threads that stay awake between jobs, so that one GEMM of a
//! few hundred microseconds, or an elementwise pass over a long tensor, can be split across
//! cores.
//!
//! burn-flex's own threading (its `rayon` feature) hands such a GEMM to rayon, whose idle workers
//! go to sleep within microseconds and are woken through a futex for every call: on P2 of
//! adjoint-dpm's benchmarks (a 64-256-256-64 MLP neural ODE, batch 256, GEMMs of ~100-400 µs
//! separated by short elementwise ops) that made two cores slower than one. Here the helpers
//! spin on an epoch counter for [`SPIN`] after their last job, as OpenMP runtimes do, and only
//! then park; a caller splits its output into contiguous blocks (rows or columns of a GEMM's
//! output, chunks of an elementwise op's), runs block 0 itself and spins until the helpers are
//! done. One caller at a time: a second thread that asks while the team is busy (or a nested
//! call) runs its job alone.
//!
//! The team has `ADJOINT_DPM_THREADS` threads in all (default: the available parallelism,
//! at most [`MAX_THREADS`]); with one, every job runs on the caller. Results do not depend on
//! timing: the split depends only on the job's size and the team's size.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
pub const SPIN: Duration = Duration::from_millis(2);

/// The largest team used by default (more cores than this split small GEMMs too finely).
pub const MAX_THREADS: usize = 8;

/// A job: `parts` calls `f(0)`, …, `f(parts − 1)`, part 0 on the caller.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
}

struct Team {
    /// Set once, right after the helpers are spawned (they need the team's address first).
    helpers: OnceLock<Vec<Thread>>,
    /// Bumped once per job; helpers run a job when they see it change.
    epoch: AtomicUsize,
    /// Written by the caller holding `busy`, before it bumps `epoch`; read by helpers after.
    job: UnsafeCell<Option<Job>>,
    /// Helpers finished with the current job.
    done: AtomicUsize,
    panicked: AtomicBool,
    busy: Mutex<()>,
}

// SAFETY: `job` is written only by the caller holding `busy`, while every helper is idle (the
// previous job's caller waited for all of them), and published by the Release bump of `epoch`
// that helpers Acquire before reading it. The closure behind it is `Sync`.
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

impl Team {
    fn helpers(&self) -> &[Thread] {
        self.helpers.get().map_or(&[], Vec::as_slice)
    }
}

fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let threads = std::env::var("ADJOINT_DPM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or_else(|| {
                thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(MAX_THREADS)
            });
        if threads <= 1 {
            return None;
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: OnceLock::new(),
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: Mutex::new(()),
        }));
        let mut helpers = Vec::with_capacity(threads - 1);
        for index in 1..threads {
            let spawned = thread::Builder::new()
                .name(format!("flex-team-{index}"))
                .spawn(move || helper(team, index));
            match spawned {
                Ok(handle) => helpers.push(handle.thread().clone()),
                Err(_) => break,
            }
        }
        if helpers.is_empty() {
            return None;
        }
        team.helpers.get_or_init(|| helpers);
        Some(team)
    })
}

fn helper(team: &'static Team, index: usize) {
    let mut seen = 0;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let epoch = team.epoch.load(Ordering::Acquire);
            if epoch != seen {
                break epoch;
            }
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 && idle_since.elapsed() > SPIN {
                // A job published after this check unparks us (park returns at once if the
                // unpark came first).
                thread::park();
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        };
        seen = epoch;
        // SAFETY: see `Team`'s Sync impl. A job is always set before the epoch moves; whatever
        // happens, `done` counts this helper, or the caller would wait forever.
        if let Some(job) = unsafe { *team.job.get() }
            && index < job.parts
        {
            // SAFETY: the caller keeps the closure alive until `done` counts every helper.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| f(index))).is_err() {
                team.panicked.store(true, Ordering::Relaxed);
            }
        }
        team.done.fetch_add(1, Ordering::Release);
    }
}

/// The number of threads a job may use (1 without a team).
pub fn threads() -> usize {
    team().map_or(1, |t| t.helpers().len() + 1)
}

/// Runs `f(0)`, …, `f(parts − 1)`, spread over the team (part 0 on this thread), and returns
/// when all are done. `parts` must not exceed [`threads`]; serially if the team is busy.
pub fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let serial = || (0..parts).for_each(f);
    let Some(team) = team() else {
        return serial();
    };
    if parts <= 1 || parts > team.helpers().len() + 1 {
        return serial();
    }
    // A job that panicked on this thread poisons the lock; the team itself is unharmed.
    let _busy = match team.busy.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return serial(),
    };
    // SAFETY: the pointer outlives its use: `Wait` below blocks (even while unwinding) until
    // every helper has finished with it.
    let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    unsafe {
        *team.job.get() = Some(Job {
            f: f_static,
            parts,
        })
    };
    team.done.store(0, Ordering::Relaxed);
    team.panicked.store(false, Ordering::Relaxed);
    team.epoch.fetch_add(1, Ordering::Release);
    for helper in team.helpers() {
        helper.unpark();
    }

    struct Wait(&'static Team);
    impl Drop for Wait {
        fn drop(&mut self) {
            while self.0.done.load(Ordering::Acquire) < self.0.helpers().len() {
                std::hint::spin_loop();
            }
        }
    }
    {
        let _wait = Wait(team);
        f(0);
    }
    if team.panicked.swap(false, Ordering::Relaxed) {
        panic!("a flex team helper panicked");
    }
}

/// Splits `0..len` into `parts` contiguous ranges, each a multiple of `align` long except the
/// last, and returns range `i`.
pub fn block(len: usize, parts: usize, align: usize, i: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(align);
    let per = units / parts;
    let extra = units % parts;
    let start = (i * per + i.min(extra)) * align;
    let end = ((i + 1) * per + (i + 1).min(extra)) * align;
    start.min(len)..end.min(len)
}

/// The smallest elementwise job split across the team (elements): below it the hand-off costs
/// more than the work saved.
pub const ELEMENTWISE_MIN: usize = 32 * 1024;

/// The number of parts an elementwise job of `len` elements is split into.
fn elementwise_parts(len: usize) -> usize {
    if len < ELEMENTWISE_MIN {
        1
    } else {
        threads().min(len / (ELEMENTWISE_MIN / 2))
    }
}

/// Runs `f(chunk, offset)` on consecutive chunks of `data` (64-element aligned), spread over the
/// team when `data` is long enough.
pub fn for_chunks_mut<E: Send>(data: &mut [E], f: impl Fn(&mut [E], usize) + Sync) {
    let len = data.len();
    let parts = elementwise_parts(len);
    if parts <= 1 {
        return f(data, 0);
    }
    let base = data.as_mut_ptr() as usize;
    run(parts, &|i| {
        let range = block(len, parts, 64, i);
        // SAFETY: the blocks are disjoint and lie within `data`, which `run` outlives.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut((base as *mut E).add(range.start), range.len())
        };
        f(chunk, range.start);
    });
}

/// `src.iter().map(f)` collected, computed by the team when `src` is long.
pub fn map<A: Sync + Copy, E: Send>(src: &[A], f: impl Fn(A) -> E + Sync) -> Vec<E> {
    map_chunks(src, |src, out| {
        for (slot, &x) in out.iter_mut().zip(src) {
            slot.write(f(x));
        }
    })
}

/// A new vector of `src.len()` elements, filled by `fill(src_chunk, out_chunk)` over
/// consecutive chunks of equal length (by the team when `src` is long); `fill` must write
/// every element of its `out_chunk`.
pub fn map_chunks<A: Sync, E: Send>(
    src: &[A],
    fill: impl Fn(&[A], &mut [std::mem::MaybeUninit<E>]) + Sync,
) -> Vec<E> {
    let len = src.len();
    let mut out = Vec::with_capacity(len);
    for_chunks_mut(&mut out.spare_capacity_mut()[..len], |chunk, offset| {
        fill(&src[offset..offset + chunk.len()], chunk)
    });
    // SAFETY: `fill` wrote every element of `0..len`.
    unsafe { out.set_len(len) };
    out
}

/// `a.iter().zip(b).map(f)` collected (`a` and `b` of one length), computed by the team when
/// they are long.
pub fn zip_map<A: Sync + Copy, E: Send>(a: &[A], b: &[A], f: impl Fn(A, A) -> E + Sync) -> Vec<E> {
    let len = a.len().min(b.len());
    let mut out = Vec::with_capacity(len);
    for_chunks_mut(&mut out.spare_capacity_mut()[..len], |chunk, offset| {
        for ((slot, &x), &y) in chunk.iter_mut().zip(&a[offset..]).zip(&b[offset..]) {
            slot.write(f(x, y));
        }
    });
    // SAFETY: every element of `0..len` was written above.
    unsafe { out.set_len(len) };
    out
}

/// adjoint-dpm patch 5: the least multiply-adds worth splitting a convolution for (as for a
/// GEMM, 64³).
pub const SPLIT_MIN_WORK: usize = 64 * 64 * 64;

/// Runs `item(0)`, …, `item(items − 1)`, independent jobs of about equal size, in contiguous
/// runs spread over the team when their total `work` (multiply-adds) is at least
/// [`SPLIT_MIN_WORK`]; in order on this thread otherwise.
pub fn split(items: usize, work: usize, item: &(dyn Fn(usize) + Sync)) {
    let parts = threads().min(items);
    if parts <= 1 || work < SPLIT_MIN_WORK {
        return (0..items).for_each(item);
    }
    run(parts, &|i| block(items, parts, 1, i).for_each(item));
}
