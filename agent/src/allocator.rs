//! Gives the system back the memory the allocator keeps after a burst.
//!
//! glibc's malloc returns freed memory to the system only from the top of
//! each arena, so after a burst (a control-plane restart piles up hundreds of
//! requests at once) pages freed below a live allocation stay resident, and
//! where the next burst lands decides the footprint: the hour-long soak saw
//! RSS ratchet from burst to burst. `malloc_trim(0)` releases every whole free
//! page of every arena; live allocations are untouched.

use std::time::Duration;

use tokio::sync::watch;

/// How often the agent trims. A trim walks and briefly locks each arena
/// (well under a millisecond for the agent's few MiB), on a blocking thread.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Returns free pages to the system; whether glibc gave anything back.
/// Elsewhere (musl) it does nothing: that allocator returns memory itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and touches only glibc's own
    // free lists, which it locks while it runs; it is safe to call from any
    // thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Trims every [`TRIM_EVERY`] until `shutdown` turns true.
pub async fn trim_loop(mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    /// Freed memory below a live allocation comes back to the system.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_memory_freed_below_a_live_allocation() {
        // Many mid-sized blocks (below the mmap threshold, so on the heap),
        // then one kept at the top, then the rest freed: glibc cannot shrink
        // the heap past the live block, so only a trim gives the pages back.
        let mut blocks: Vec<Vec<u8>> = (0..2000).map(|i| vec![i as u8; 16 * 1024]).collect();
        let keep = vec![7u8; 1024];
        blocks.clear();
        blocks.shrink_to_fit();
        assert!(super::release_free_memory(), "nothing was given back");
        assert_eq!(keep[0], 7);
    }
}
