//! Intake: turns a `POST /v1/calls` body into a validated call request, with
//! numbers normalised to E.164 and the emergency workflow decided.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use phonenumber::country;

mod e164;
use serde::Serialize;
use serde_json::Value;

/// Call priority. Emergency calls use reserved capacity and are never shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Normal,
    Emergency,
}

impl Priority {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Emergency => "emergency",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "normal" => Some(Priority::Normal),
            "emergency" => Some(Priority::Emergency),
            _ => None,
        }
    }
}

/// One rejected field and why, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A call request after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    /// E.164 caller; for emergency calls whatever was sent (or nothing) when
    /// it is not a valid number.
    pub caller: Option<String>,
    /// E.164 destination, or the emergency short code as dialled.
    pub destination: String,
    pub call_type: String,
    pub priority: Priority,
    /// Free-form JSON object stored with the call.
    pub metadata: Value,
}

/// Numbers and the emergency list from config.
#[derive(Debug, Clone)]
pub struct Numbers {
    pub region: country::Id,
    pub emergency: HashSet<String>,
}

impl Numbers {
    /// From config values (validated at load; an unknown region falls back to IN).
    pub fn new(region: &str, emergency: impl IntoIterator<Item = String>) -> Self {
        Self {
            region: self::region(region).unwrap_or(country::Id::IN),
            emergency: emergency.into_iter().collect(),
        }
    }

    /// The emergency short code a dialled string is, if it is one.
    pub fn emergency_code(&self, raw: &str) -> Option<String> {
        let digits: String = raw
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
            .collect();
        self.emergency.contains(&digits).then_some(digits)
    }
}

/// Parses an ISO 3166 region code such as `IN`.
pub fn region(code: &str) -> Option<country::Id> {
    code.trim().to_ascii_uppercase().parse().ok()
}

/// Longest phone-number string we try to parse; anything longer is not a number.
const MAX_NUMBER_CHARS: usize = 32;

/// Normalises a dialled number to E.164 (`+919876543210`) using `region` for
/// numbers written without a country code.
pub fn normalise(raw: &str, region: country::Id) -> Result<String, String> {
    let parsed = parse(raw, region)?;
    // `e164`: the crate's own rules on patterns compiled once, without its
    // global regex-cache mutex (intake/e164.rs).
    let e164 = e164::e164(&parsed);
    if !e164::is_valid(&parsed) {
        return Err(format!(
            "is not a valid phone number (read as {e164} with default region {})",
            region.as_ref()
        ));
    }
    // The parser's metadata allows some national numbers longer than E.164
    // does (`+00490639382521712609` came out as 17 digits; found by the
    // `phone` fuzz target): E.164 has at most 15 digits after the `+`.
    if e164.len() > 16 {
        return Err(format!(
            "is not a valid phone number (read as {e164}, over E.164's 15 digits)"
        ));
    }
    Ok(e164)
}

/// A dialled number checked for what cannot be a phone number, then parsed.
fn parse(raw: &str, region: country::Id) -> Result<phonenumber::PhoneNumber, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("is empty".into());
    }
    if raw.chars().count() > MAX_NUMBER_CHARS {
        return Err(format!("is longer than {MAX_NUMBER_CHARS} characters"));
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '.' | '(' | ')')))
    {
        return Err(format!("contains {bad:?}, which is not part of a phone number"));
    }
    if !raw.chars().any(|c| c.is_ascii_digit()) {
        return Err("has no digits".into());
    }
    // The parser has panicked on odd inputs in the past; bad input must be a
    // 422, never a crash, so a panic is turned into a rejection.
    catch_unwind(AssertUnwindSafe(|| phonenumber::parse(Some(region), raw)))
        .map_err(|_| "could not be parsed as a phone number".to_owned())?
        .map_err(|e| format!("is not a phone number ({e})"))
}

fn str_field<'a>(body: &'a Value, field: &str) -> Result<Option<&'a str>, FieldError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

fn valid_call_type(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Oldest event time accepted: 30 days back.
const EVENT_MAX_AGE_MS: i64 = 30 * 24 * 3600 * 1000;
/// Clock skew allowed for event times ahead of the control plane's clock.
const EVENT_MAX_AHEAD_MS: i64 = 10 * 60 * 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    event: String,
    #[serde(default)]
    at: Option<String>,
}

/// Validates a call-event body (`{"event": …, "at": RFC 3339}`) received at
/// `now_ms`: the event and its time in milliseconds (`now_ms` when absent).
pub fn event_request(body: Value, now_ms: i64) -> Result<(crate::record::EventKind, i64), Vec<FieldError>> {
    let ev: EventBody = serde_json::from_value(body).map_err(|e| {
        vec![FieldError::new(
            "event",
            format!("body must be {{\"event\": …, \"at\": RFC 3339}} ({e})"),
        )]
    })?;
    let kind = crate::record::EventKind::parse(&ev.event).ok_or_else(|| {
        vec![FieldError::new(
            "event",
            "must be ringing, answered, completed or failed",
        )]
    })?;
    let at = match &ev.at {
        None => now_ms,
        Some(s) => {
            let at = chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| {
                    vec![FieldError::new(
                        "at",
                        format!("must be an RFC 3339 timestamp ({e})"),
                    )]
                })?;
            // Late events are normal (an agent delivers what it held during
            // an outage); events from the far past or the future are a
            // broken clock or a forged body, and would corrupt the timeline.
            if !(now_ms.saturating_sub(EVENT_MAX_AGE_MS)..=now_ms.saturating_add(EVENT_MAX_AHEAD_MS))
                .contains(&at)
            {
                return Err(vec![FieldError::new(
                    "at",
                    "must be within the last 30 days and at most 10 minutes ahead of the control plane's clock",
                )]);
            }
            at
        }
    };
    Ok((kind, at))
}

/// A recording of a call, as stored in the object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    pub bucket: String,
    pub key: String,
    pub size: i64,
    /// Lower-case hex.
    pub sha256: String,
    pub duration_ms: Option<i64>,
    pub content_type: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordingBody {
    bucket: String,
    key: String,
    size: i64,
    sha256: String,
    #[serde(default)]
    duration_seconds: Option<f64>,
    #[serde(default)]
    content_type: Option<String>,
}

/// The largest object S3 stores (5 TiB).
const RECORDING_MAX_SIZE: i64 = 5 << 40;
/// A recording longer than a day is a broken clock or a forged body.
const RECORDING_MAX_SECONDS: f64 = 24.0 * 3600.0;

/// Validates a recording body (`POST /v1/calls/{id}/recordings`). Every
/// problem is reported at once.
pub fn recording_request(body: Value) -> Result<Recording, Vec<FieldError>> {
    let r: RecordingBody = serde_json::from_value(body).map_err(|e| {
        vec![FieldError::new(
            "",
            format!("body must be {{\"bucket\", \"key\", \"size\", \"sha256\", \"duration_seconds\"?, \"content_type\"?}} ({e})"),
        )]
    })?;
    let mut errors = Vec::new();
    // S3's bucket naming rules, the parts that matter for a key we store.
    let bucket_ok = (3..=63).contains(&r.bucket.len())
        && r.bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && r.bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && r.bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        errors.push(FieldError::new(
            "bucket",
            "must be an S3 bucket name: 3 to 63 lower-case letters, digits, '-' or '.'",
        ));
    }
    if r.key.is_empty() || r.key.len() > 1024 || r.key.chars().any(char::is_control) {
        errors.push(FieldError::new(
            "key",
            "must be an object key of 1 to 1024 bytes without control characters",
        ));
    }
    if !(0..=RECORDING_MAX_SIZE).contains(&r.size) {
        errors.push(FieldError::new("size", "must be a byte count from 0 to 5 TiB"));
    }
    if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        errors.push(FieldError::new("sha256", "must be 64 hexadecimal digits"));
    }
    let duration_ms = match r.duration_seconds {
        None => None,
        Some(d) if d.is_finite() && (0.0..=RECORDING_MAX_SECONDS).contains(&d) => {
            Some((d * 1000.0).round() as i64)
        }
        Some(_) => {
            errors.push(FieldError::new("duration_seconds", "must be from 0 to 86400"));
            None
        }
    };
    if let Some(t) = &r.content_type
        && (t.is_empty() || t.len() > 255 || !t.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        errors.push(FieldError::new(
            "content_type",
            "must be a media type of 1 to 255 printable ASCII characters",
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Recording {
        bucket: r.bucket,
        key: r.key,
        size: r.size,
        sha256: r.sha256.to_ascii_lowercase(),
        duration_ms,
        content_type: r.content_type,
    })
}

/// Validates a call-initiation body. Every problem is reported at once.
///
/// Emergency workflow: when the destination is on the emergency list only
/// the destination is mandatory; an invalid caller is kept as sent, a bad
/// call type or metadata is replaced by the default, and the priority is
/// emergency whatever the request says.
pub fn call_request(body: &Value, numbers: &Numbers) -> Result<CallRequest, Vec<FieldError>> {
    if !body.is_object() {
        return Err(vec![FieldError::new("", "the body must be a JSON object")]);
    }
    let mut errors = Vec::new();

    let destination_raw = match str_field(body, "destination") {
        Ok(Some(d)) => Some(d),
        Ok(None) => {
            errors.push(FieldError::new("destination", "is required"));
            None
        }
        Err(e) => {
            errors.push(e);
            None
        }
    };

    if let Some(code) = destination_raw.and_then(|d| numbers.emergency_code(d)) {
        return Ok(emergency_call(body, code, numbers));
    }

    let destination = destination_raw.and_then(|d| match normalise(d, numbers.region) {
        Ok(n) => Some(n),
        Err(reason) => {
            errors.push(FieldError::new("destination", reason));
            None
        }
    });
    let caller = caller_field(body, numbers, &mut errors);
    let call_type = call_type_field(body, &mut errors);
    match str_field(body, "priority") {
        Ok(None) | Ok(Some("normal")) => {}
        Ok(Some("emergency")) => errors.push(FieldError::new(
            "priority",
            "emergency priority is only for the configured emergency numbers",
        )),
        Ok(Some(_)) => errors.push(FieldError::new("priority", "must be \"normal\" or \"emergency\"")),
        Err(e) => errors.push(e),
    }
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => {
            errors.push(FieldError::new("metadata", "must be a JSON object"));
            Value::Null
        }
    };
    if let Some(obj) = body.as_object() {
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "caller" | "destination" | "call_type" | "priority" | "metadata"
            ) {
                errors.push(FieldError::new(key, "is not a known field"));
            }
        }
    }
    match (errors.is_empty(), destination) {
        (true, Some(destination)) => Ok(CallRequest {
            caller,
            destination,
            call_type,
            priority: Priority::Normal,
            metadata,
        }),
        _ => Err(errors),
    }
}

/// A call to the emergency number `code`: never refused, whatever else the
/// body holds (see [`call_request`]).
fn emergency_call(body: &Value, code: String, numbers: &Numbers) -> CallRequest {
    let caller = match body.get("caller") {
        Some(Value::String(s)) => {
            Some(normalise(s, numbers.region).unwrap_or_else(|_| s.chars().take(MAX_NUMBER_CHARS).collect()))
        }
        _ => None,
    };
    let call_type = match str_field(body, "call_type") {
        Ok(Some(t)) if valid_call_type(t) => t.to_owned(),
        _ => "outbound".to_owned(),
    };
    let metadata = match body.get("metadata") {
        Some(m @ Value::Object(_)) => m.clone(),
        _ => Value::Object(Default::default()),
    };
    CallRequest {
        caller,
        destination: code,
        call_type,
        priority: Priority::Emergency,
        metadata,
    }
}

/// A normal call's caller, in E.164 (required).
fn caller_field(body: &Value, numbers: &Numbers, errors: &mut Vec<FieldError>) -> Option<String> {
    match str_field(body, "caller") {
        Ok(Some(c)) => match normalise(c, numbers.region) {
            Ok(n) => Some(n),
            Err(reason) => {
                errors.push(FieldError::new("caller", reason));
                None
            }
        },
        Ok(None) => {
            errors.push(FieldError::new("caller", "is required"));
            None
        }
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

/// A normal call's type (`outbound` when not given).
fn call_type_field(body: &Value, errors: &mut Vec<FieldError>) -> String {
    match str_field(body, "call_type") {
        Ok(None) => "outbound".to_owned(),
        Ok(Some(t)) if valid_call_type(t) => t.to_owned(),
        Ok(Some(_)) => {
            errors.push(FieldError::new(
                "call_type",
                "must be 1 to 32 lowercase letters, digits, '_' or '-', starting with a letter",
            ));
            String::new()
        }
        Err(e) => {
            errors.push(e);
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_longer_than_e164_allows_are_refused() {
        // Found by the `phone` fuzz target.
        let err = normalise("+00490639382521712609", country::Id::IN).unwrap_err();
        assert!(err.contains("15 digits"), "{err}");
    }

    fn numbers() -> Numbers {
        Numbers::new("IN", ["100", "101", "102", "108", "112"].map(String::from))
    }

    #[test]
    fn normalisation_table() {
        let ok = [
            ("08041234567", "+918041234567"),
            ("+91 98765 43210", "+919876543210"),
            ("9876543210", "+919876543210"),
            ("+1 (650) 253-0000", "+16502530000"),
            ("+44 20 7946 0958", "+442079460958"),
            ("0091 98765 43210", "+919876543210"),
        ];
        for (raw, want) in ok {
            assert_eq!(normalise(raw, country::Id::IN).as_deref(), Ok(want), "{raw}");
        }
        let bad = [
            "",
            "hello",
            "12",
            "+91 12345",
            "+999 1234567",
            "98765x43210",
            "0804123456789012345678901234567890",
            "+",
            "'; DROP TABLE calls; --",
        ];
        for raw in bad {
            assert!(normalise(raw, country::Id::IN).is_err(), "{raw:?} accepted");
        }
    }

    #[test]
    fn default_region_applies_to_national_numbers() {
        assert_eq!(
            normalise("(650) 253-0000", country::Id::US).as_deref(),
            Ok("+16502530000")
        );
    }

    #[test]
    fn valid_normal_call() {
        let r = call_request(
            &json!({"caller": "+919876543210", "destination": "08041234567",
                    "call_type": "outbound", "priority": "normal", "metadata": {"a": 1}}),
            &numbers(),
        )
        .unwrap();
        assert_eq!(r.destination, "+918041234567");
        assert_eq!(r.caller.as_deref(), Some("+919876543210"));
        assert_eq!(r.priority, Priority::Normal);
        assert_eq!(r.metadata, json!({"a": 1}));
    }

    #[test]
    fn every_bad_field_is_named() {
        let errs = call_request(
            &json!({"caller": "abc", "destination": 5, "call_type": "Out Bound",
                    "priority": "urgent", "metadata": [], "colour": "red"}),
            &numbers(),
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "destination",
                "caller",
                "call_type",
                "priority",
                "metadata",
                "colour"
            ]
        );
        let missing = call_request(&json!({}), &numbers()).unwrap_err();
        assert_eq!(missing[0].field, "destination");
        assert_eq!(missing[0].reason, "is required");
        assert!(call_request(&json!([1]), &numbers()).is_err());
    }

    #[test]
    fn emergency_is_relaxed_and_forced() {
        for code in ["112", "100", "1 0 8", "101", "102"] {
            let r = call_request(&json!({"destination": code}), &numbers()).unwrap();
            assert_eq!(r.priority, Priority::Emergency, "{code}");
            assert_eq!(r.caller, None);
        }
        let r = call_request(
            &json!({"destination": "112", "caller": "unknown", "priority": "normal",
                    "call_type": 7, "metadata": "x"}),
            &numbers(),
        )
        .unwrap();
        assert_eq!(r.priority, Priority::Emergency);
        assert_eq!(r.caller.as_deref(), Some("unknown"));
        assert_eq!(r.call_type, "outbound");
        let r = call_request(&json!({"destination": "108", "caller": "9876543210"}), &numbers()).unwrap();
        assert_eq!(r.caller.as_deref(), Some("+919876543210"));
    }

    #[test]
    fn emergency_priority_on_a_normal_number_is_rejected() {
        let errs = call_request(
            &json!({"caller": "+919876543210", "destination": "08041234567",
                    "priority": "emergency"}),
            &numbers(),
        )
        .unwrap_err();
        assert_eq!(errs[0].field, "priority");
    }

    #[test]
    fn region_codes() {
        assert_eq!(region("in"), Some(country::Id::IN));
        assert_eq!(region("XX"), None);
    }

    /// `normalise` as it was written with the crate's own validity check
    /// and formatter: what `intake/e164.rs` must answer exactly.
    fn normalise_with_crate(raw: &str, region: country::Id) -> Result<String, String> {
        let parsed = parse(raw, region)?;
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        if !phonenumber::is_valid(&parsed) {
            return Err(format!(
                "is not a valid phone number (read as {e164} with default region {})",
                region.as_ref()
            ));
        }
        if e164.len() > 16 {
            return Err(format!(
                "is not a valid phone number (read as {e164}, over E.164's 15 digits)"
            ));
        }
        Ok(e164)
    }

    /// Default regions the equivalence tests use: several per shared
    /// country code (+1, +7, +44, +61), leading zeros (IT), and others.
    const REGIONS: [country::Id; 16] = [
        country::Id::IN,
        country::Id::US,
        country::Id::CA,
        country::Id::GB,
        country::Id::JE,
        country::Id::DE,
        country::Id::FR,
        country::Id::IT,
        country::Id::NZ,
        country::Id::AU,
        country::Id::CX,
        country::Id::RU,
        country::Id::KZ,
        country::Id::BR,
        country::Id::SG,
        country::Id::AE,
    ];

    #[test]
    fn validity_is_the_crates_on_varied_numbers() {
        let numbers = [
            // India: mobile, fixed line, toll free, national forms, IDD.
            "+919876543210",
            "+91 98765 43210",
            "9876543210",
            "09876543210",
            "08041234567",
            "+918041234567",
            "1800 425 1234",
            "+91 1800 425 1234",
            "0091 98765 43210",
            "+91 12345",
            "+917000012345",
            "+91 70000 99999",
            // North America (+1 shared by US, CA and the Caribbean).
            "+1 650 253 0000",
            "(650) 253-0000",
            "+1 416 555 0123",
            "+1 204 555 0199",
            "+1 876 555 0100",
            "+1 800 555 0100",
            "+1 2530000",
            "011 44 20 7946 0958",
            // +44 shared by GB, GG, JE, IM.
            "+44 20 7946 0958",
            "+44 7911 123456",
            "+44 1534 456789",
            "+44 7797 123456",
            "+44 1624 456789",
            "020 7946 0958",
            // +7 (RU, KZ), +61 (AU, CX, CC), leading zeros (IT).
            "+7 495 123 45 67",
            "+7 701 123 4567",
            "+7 727 123 4567",
            "+61 2 9876 5432",
            "+61 8 9164 1234",
            "+61 4 1234 5678",
            "+39 06 6982 1234",
            "+39 02 3661 8300",
            "+39 312 345 6789",
            "06 6982 1234",
            // Elsewhere.
            "+49 30 123456",
            "+49 1512 3456789",
            "+33 1 42 68 53 00",
            "+33 6 12 34 56 78",
            "+64 3 331 6005",
            "+64 21 387 835",
            "+55 11 91234 5678",
            "+65 6123 4567",
            "+971 50 123 4567",
            "+86 10 1234 5678",
            "+81 3 1234 5678",
            "+27 21 123 4567",
            // Non-geographic codes.
            "+800 1234 5678",
            "+979 123456789",
            "+882 1234 5678",
            "+870 773 111 632",
            // Emergency and short codes, as numbers (the emergency list is
            // checked before normalisation; these must still agree).
            "112",
            "100",
            "911",
            "999",
            "108",
            "1 0 8",
            // Invalid in assorted ways.
            "+999 1234567",
            "+0 123 456 7890",
            "+00490639382521712609",
            "+91 0000000000",
            "000000000000",
            "+1 000 000 0000",
            "12",
            "123",
            "+44",
            "(((1)))",
            "1-2-3-4-5-6-7-8",
        ];
        for region in REGIONS {
            for raw in numbers {
                assert_eq!(
                    normalise(raw, region),
                    normalise_with_crate(raw, region),
                    "{raw:?} in {}",
                    region.as_ref()
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn validity_is_the_crates(
            s in "\\+?[0-9 ()-]{3,20}",
            r in 0..REGIONS.len(),
        ) {
            proptest::prop_assert_eq!(normalise(&s, REGIONS[r]), normalise_with_crate(&s, REGIONS[r]));
        }

        #[test]
        fn validity_is_the_crates_on_plausible_numbers(
            cc in proptest::sample::select(vec!["1", "7", "33", "39", "44", "49", "61", "64", "91", "800", "979"]),
            rest in "[0-9]{4,13}",
            r in 0..REGIONS.len(),
        ) {
            for raw in [format!("+{cc}{rest}"), rest.clone(), format!("0{rest}")] {
                proptest::prop_assert_eq!(normalise(&raw, REGIONS[r]), normalise_with_crate(&raw, REGIONS[r]), "{}", raw);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn normalise_never_panics(s in "\\PC{0,40}") {
            let _ = normalise(&s, country::Id::IN);
        }

        #[test]
        fn normalise_never_panics_on_number_like(s in "[+0-9 ()-]{0,32}") {
            if let Ok(n) = normalise(&s, country::Id::IN) {
                proptest::prop_assert!(n.starts_with('+'));
            }
        }
    }
}
