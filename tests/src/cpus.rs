//! Splits this machine's CPUs between a PoP and the services that live in
//! another datacentre in production.
//!
//! A bench that runs a PoP's work (the agent, the call handler writing its
//! files) beside stand-ins for the cloud (the control plane, the object
//! store) measures, on two shared cores, how those stand-ins compete with
//! the PoP for CPU: on a real fleet they run on other machines. With the
//! PoP's threads on one CPU and the cloud's on another, what the PoP's
//! numbers show is the PoP's own work.

use rustix::thread::{CpuSet, Pid, sched_getaffinity, sched_setaffinity};

/// One CPU for the PoP, another for the cloud.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub pop: usize,
    pub cloud: usize,
}

/// The first two CPUs this process may run on, or `None` on one CPU.
pub fn split() -> Option<Split> {
    let allowed = sched_getaffinity(None).ok()?;
    let mut cpus = (0..CpuSet::MAX_CPU).filter(|&c| allowed.is_set(c));
    Some(Split {
        pop: cpus.next()?,
        cloud: cpus.next()?,
    })
}

fn only(cpu: usize) -> CpuSet {
    let mut set = CpuSet::new();
    set.set(cpu);
    set
}

/// Keeps the calling thread (and the threads it starts) on `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    sched_setaffinity(None, &only(cpu)).map_err(std::io::Error::from)
}

/// Every thread of this process kept on `cpu` (threads started later
/// inherit it from their creator) until the guard is dropped, which gives
/// every thread back the CPUs the process had.
pub fn pin_process(cpu: usize) -> std::io::Result<Pinned> {
    let before = sched_getaffinity(None).map_err(std::io::Error::from)?;
    set_every_thread(&only(cpu))?;
    Ok(Pinned { before })
}

pub struct Pinned {
    before: CpuSet,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(e) = set_every_thread(&self.before) {
            tracing::warn!("cannot give the process its CPUs back: {e}");
        }
    }
}

fn set_every_thread(set: &CpuSet) -> std::io::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let Some(pid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        // A thread may end between the listing and this call.
        match sched_setaffinity(Some(pid), set) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
