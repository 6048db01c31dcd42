//! The recorder's share of the CPU.
//!
//! Hashing, reading and sending recordings must not raise call-control
//! latency, and must not stop on a busy machine either. The recorder's
//! threads run in Linux's `SCHED_IDLE` class while it keeps up: they get
//! only CPU nothing else wants, and a call-control thread that wakes takes
//! the CPU from them at once. At nice +10 the scheduler may first let them
//! finish their slice, which showed as +2.3 and +4.6 ms of call-control p99
//! beside four busy uploads on one core, against +0.7 and -0.2 ms in
//! `SCHED_IDLE` (docs/benchmarks.md, "Recordings"). But on a machine with no
//! idle CPU, `SCHED_IDLE` threads hardly run at all; so once a recording has
//! waited longer than [`PROMOTE_AFTER`], the threads move to nice +10, a
//! small share that is still theirs, and back to `SCHED_IDLE` when nothing
//! has waited that long.
//!
//! Leaving `SCHED_IDLE` for nice +10 needs `CAP_SYS_NICE` or an
//! `RLIMIT_NICE` of at least 10 (systemd's `LimitNICE=+10`, which the
//! packaged unit sets). Without either, the recorder stays at nice +10
//! throughout rather than risk being stuck in `SCHED_IDLE`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rustix::process::Pid;

/// How long a recording may wait before the recorder takes CPU at nice +10
/// instead of only idle CPU. Far above what a recording waits on a machine
/// with idle CPU (under a second for 1 MB, a few for 50 MB behind others).
pub const PROMOTE_AFTER: Duration = Duration::from_secs(10);

/// The nice value of the recorder's threads outside `SCHED_IDLE`.
const NICE: i32 = 10;

/// The recorder's threads and the class they are in.
pub struct Class {
    /// Whether `SCHED_IDLE` is used at all (we can leave it again).
    idle_allowed: bool,
    /// Thread ids of the recorder's runtime: workers and blocking pool.
    threads: Mutex<Vec<Pid>>,
    /// When the oldest pending recording was first seen (ms since the
    /// epoch); 0 when nothing is pending. Written by the recorder.
    oldest_ms: AtomicI64,
    /// Whether the threads are at nice +10 now (else `SCHED_IDLE`).
    promoted: AtomicBool,
}

impl Class {
    pub fn new() -> Class {
        let idle_allowed = can_leave_idle();
        if !idle_allowed {
            tracing::info!(
                "recordings: the recorder runs at nice +{NICE}: leaving SCHED_IDLE again would need CAP_SYS_NICE or LimitNICE=+{NICE}"
            );
        }
        Class {
            idle_allowed,
            threads: Mutex::new(Vec::new()),
            oldest_ms: AtomicI64::new(0),
            promoted: AtomicBool::new(!idle_allowed),
        }
    }

    /// The calling thread joins the recorder: it takes the current class.
    pub fn join(&self) {
        let tid = rustix::thread::gettid();
        // Under the lock, so that a `check` cannot change the class between
        // this thread's registration and its first setting.
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.push(tid);
        if let Err(e) = set(tid, self.promoted.load(Ordering::Relaxed)) {
            // A seccomp filter, say: nice +10 at least, as nice only rises.
            tracing::debug!(error = %e, "recordings: cannot set the recorder's CPU class; nice +{NICE}");
            let _ = rustix::process::setpriority_process(Some(tid), NICE);
        }
    }

    /// The calling thread is ending.
    pub fn leave(&self) {
        let tid = rustix::thread::gettid();
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| *t != tid);
    }

    /// The recorder's backlog: when its oldest pending recording was first
    /// seen (ms since the epoch), or `None`.
    pub fn note_oldest(&self, oldest_ms: Option<i64>) {
        self.oldest_ms.store(oldest_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Moves every thread to the class the backlog at `now_ms` calls for.
    /// Returns whether the threads are promoted (at nice +10) afterwards.
    pub fn check(&self, now_ms: i64) -> bool {
        if !self.idle_allowed {
            return true;
        }
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let promote = oldest != 0 && now_ms - oldest > PROMOTE_AFTER.as_millis() as i64;
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if self.promoted.swap(promote, Ordering::Relaxed) != promote {
            if promote {
                tracing::info!(
                    waited_s = (now_ms - oldest) / 1000,
                    "recordings: a recording has waited longer than {PROMOTE_AFTER:?} for idle CPU; the recorder now runs at nice +{NICE}"
                );
            } else {
                tracing::info!("recordings: the backlog has caught up; the recorder runs on idle CPU again");
            }
            for tid in threads.iter() {
                if let Err(e) = set(*tid, promote) {
                    tracing::warn!(error = %e, "recordings: cannot change a recorder thread's CPU class");
                }
            }
        }
        promote
    }
}

/// Puts the calling thread in `SCHED_IDLE` for good (the lab's stand-ins
/// for services in another datacentre use it).
pub fn idle_priority() -> std::io::Result<()> {
    scheduler(rustix::thread::gettid(), libc::SCHED_IDLE)
}

/// Whether this process may move a thread from `SCHED_IDLE` to nice +10.
fn can_leave_idle() -> bool {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nice);
    // RLIMIT_NICE n allows nice values down to 20 - n.
    let by_limit = limit.current.is_none_or(|n| 20 - n as i64 <= i64::from(NICE));
    by_limit || rustix::process::geteuid().is_root()
}

/// Puts thread `tid` at nice +10 (`promoted`) or in `SCHED_IDLE`.
fn set(tid: Pid, promoted: bool) -> std::io::Result<()> {
    if promoted {
        // The nice value first: SCHED_IDLE may only be left at a nice value
        // the limit allows.
        rustix::process::setpriority_process(Some(tid), NICE)?;
        scheduler(tid, libc::SCHED_OTHER)
    } else {
        scheduler(tid, libc::SCHED_IDLE)
    }
}

#[allow(unsafe_code)]
fn scheduler(tid: Pid, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, and
    // both policies take priority 0.
    if unsafe { libc::sched_setscheduler(tid.as_raw_nonzero().get(), policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's policy and nice value.
    #[allow(unsafe_code)]
    fn mine() -> (libc::c_int, i32) {
        // SAFETY: no pointers; 0 is the calling thread.
        let policy = unsafe { libc::sched_getscheduler(0) };
        (policy, rustix::process::getpriority_process(None).unwrap_or(0))
    }

    /// A recorder thread runs in SCHED_IDLE, moves to nice +10 once a
    /// recording has waited longer than PROMOTE_AFTER, and back when the
    /// backlog is gone.
    #[test]
    fn the_recorder_leaves_idle_cpu_only_when_a_recording_waits_too_long() {
        let class = std::sync::Arc::new(Class::new());
        if !class.idle_allowed {
            // Neither root nor LimitNICE: the class is nice +10 throughout.
            assert!(class.check(1));
            return;
        }
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, told) = std::sync::mpsc::channel();
        let c = class.clone();
        let thread = std::thread::spawn(move || {
            c.join();
            while asked.recv().is_ok() {
                tell.send(mine()).unwrap();
            }
            c.leave();
        });
        let look = || {
            ask.send(()).unwrap();
            told.recv().unwrap()
        };
        assert_eq!(look().0, libc::SCHED_IDLE);
        let now = 1_000_000_000;
        class.note_oldest(Some(now - 9_000));
        assert!(!class.check(now), "9 s is not too long");
        assert_eq!(look().0, libc::SCHED_IDLE);
        class.note_oldest(Some(now - 11_000));
        assert!(class.check(now));
        assert_eq!(look(), (libc::SCHED_OTHER, NICE));
        class.note_oldest(None);
        assert!(!class.check(now));
        assert_eq!(look().0, libc::SCHED_IDLE);
        drop(ask);
        thread.join().unwrap();
        assert!(class.threads.lock().unwrap().is_empty());
    }
}
