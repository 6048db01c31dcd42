//! Phone-number normalisation on arbitrary text: never a panic (the parser
//! has panicked on odd input before), and a result is always E.164.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let region = detour_control_plane::intake::region("IN").unwrap();
    if let Ok(e164) = detour_control_plane::intake::normalise(raw, region) {
        assert!(
            e164.starts_with('+') && e164[1..].bytes().all(|b| b.is_ascii_digit()),
            "{e164}"
        );
        assert!(e164.len() <= 16, "{e164}");
    }
});
