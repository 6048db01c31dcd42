//! A call-initiation body and a call event as JSON from arbitrary bytes,
//! through validation and routing: no panic, and what is accepted is
//! well-formed (E.164 destination or an emergency code; emergency numbers
//! always get emergency priority).
#![no_main]

use detour_control_plane::intake::{self, Numbers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let numbers = Numbers::new("IN", ["100", "101", "102", "108", "112"].map(String::from));
    if let Ok(call) = intake::call_request(&body, &numbers) {
        let emergency = numbers.emergency.contains(&call.destination);
        assert!(emergency || call.destination.starts_with('+'), "{call:?}");
        if emergency {
            assert_eq!(call.priority, detour_control_plane::intake::Priority::Emergency);
        }
        assert!(call.metadata.is_object(), "{call:?}");
    }
});
