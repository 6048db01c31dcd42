//! A call-event body from arbitrary bytes: no panic, and an accepted event's
//! time is never in the far past or the future.
#![no_main]

use libfuzzer_sys::fuzz_target;

const NOW_MS: i64 = 1_764_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok((_, at)) = detour_control_plane::intake::event_request(body, NOW_MS) {
        assert!(
            at >= NOW_MS - 30 * 24 * 3600 * 1000 && at <= NOW_MS + 10 * 60 * 1000,
            "{at}"
        );
    }
});
