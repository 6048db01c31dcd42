//! Intake: the validity check of a parsed phone number, the `phonenumber`
//! crate's own rules (`is_valid`) run on regular expressions compiled once.
//!
//! Why not `phonenumber::is_valid`: every pattern it matches goes through the
//! crate's shared regex cache, a `Mutex` around an LRU map keyed by the
//! pattern's text, so each match locks a global mutex and hashes the whole
//! pattern (Indian fixed-line numbers: several kilobytes) before it starts.
//! Measured with callgrind on the benchmark's numbers, that hashing was half
//! of the intake's instructions, and the mutex is shared by every runtime
//! thread. Here each region's patterns are compiled on first use into plain
//! `regex::Regex`es (which are safe to share and keep their scratch space per
//! thread), anchored at the start as the crate's `find(..).start() == 0` is.
//!
//! The metadata, the order of the checks and the pattern options are the
//! crate's (phonenumber 0.3: `validator::{is_valid_with, source_for,
//! number_type}`, `Descriptor::is_match`, `Database::from`); the intake tests
//! compare this with the crate's own answer on a wide set of numbers.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

use phonenumber::metadata::{DATABASE, Descriptor, Metadata};
use phonenumber::{PhoneNumber, country};
use regex::{Regex, RegexBuilder};

/// The E.164 text of a parsed number: what `format().mode(Mode::E164)`
/// writes (`+`, the country code, the national number with its leading
/// zeros), without that formatter's search for a national format, which
/// E.164 does not use.
pub fn e164(number: &PhoneNumber) -> String {
    format!("+{}{}", number.country().code(), number.national())
}

/// Whether a parsed number is valid: `phonenumber::is_valid`.
pub fn is_valid(number: &PhoneNumber) -> bool {
    let national = number.national().to_string();
    source_for(number.country().code(), &national).is_some_and(|meta| meta.has_type(&national))
}

/// The metadata that decides a number of country code `code`
/// (`validator::source_for`, then the lookup `is_valid_with` does).
fn source_for(code: u16, national: &str) -> Option<&'static Region> {
    let regions = DATABASE.region(&code)?;
    if let [only] = regions[..] {
        let meta = if only == "001" {
            // Non-geographic codes (+800, +979…): the code's first entry.
            DATABASE.by_code(&code)?.into_iter().next()?
        } else {
            let id: country::Id = only.parse().ok()?;
            DATABASE.by_id(id.as_ref())?
        };
        return compiled(meta);
    }
    for id in regions {
        let meta = DATABASE.by_id(id)?;
        let region = compiled(meta)?;
        let chosen = match &region.leading_digits {
            Some(leading) => leading.is_match(national),
            None => region.has_type(national),
        };
        if chosen {
            // The crate parses the id and unwraps it; an id that does not
            // parse is no region here rather than a panic.
            let id: country::Id = id.parse().ok()?;
            return compiled(DATABASE.by_id(id.as_ref())?);
        }
    }
    None
}

/// One region's patterns, compiled.
struct Region {
    leading_digits: Option<Regex>,
    general: Pattern,
    /// Every specific type `number_type` tries (premium rate, toll free,
    /// shared cost, VoIP, personal, pager, UAN, voicemail, fixed line,
    /// mobile): a number is valid when one of them matches.
    types: Vec<Pattern>,
}

impl Region {
    fn new(meta: &Metadata) -> Region {
        let d = meta.descriptors();
        let types = [
            d.premium_rate(),
            d.toll_free(),
            d.shared_cost(),
            d.voip(),
            d.personal_number(),
            d.pager(),
            d.uan(),
            d.voicemail(),
            d.fixed_line(),
            d.mobile(),
        ];
        Region {
            leading_digits: meta.leading_digits().map(|r| anchored(r.as_str())),
            general: Pattern::new(d.general()),
            types: types.into_iter().flatten().map(Pattern::new).collect(),
        }
    }

    /// `number_type(meta, national) != Type::Unknown`.
    fn has_type(&self, national: &str) -> bool {
        self.general.is_match(national) && self.types.iter().any(|t| t.is_match(national))
    }
}

/// A descriptor's national-number pattern and possible lengths.
struct Pattern {
    possible_length: Vec<u16>,
    re: Regex,
}

impl Pattern {
    fn new(d: &Descriptor) -> Pattern {
        Pattern {
            possible_length: d.possible_length().to_vec(),
            re: anchored(d.national_number().as_str()),
        }
    }

    /// `Descriptor::is_match`.
    fn is_match(&self, value: &str) -> bool {
        if !self.possible_length.is_empty() && !self.possible_length.contains(&(value.len() as u16)) {
            return false;
        }
        self.re.is_match(value)
    }
}

/// `pattern` compiled as the crate compiles its metadata (extended mode:
/// whitespace ignored; the `regex` crate's default limits otherwise) and
/// anchored at the start: a match starting at 0 exists exactly when the
/// leftmost match starts at 0. The newline before the closing parenthesis
/// ends a `#` comment, should a pattern ever have one.
fn anchored(pattern: &str) -> Regex {
    RegexBuilder::new(&format!("^(?:{pattern}\n)"))
        .ignore_whitespace(true)
        .size_limit(10 << 20)
        .dfa_size_limit(2 << 20)
        .build()
        // The crate checked the same pattern's syntax when it loaded its
        // metadata, so this does not fail; if it ever did, a pattern that
        // never matches answers "not valid" (the crate would panic).
        .unwrap_or_else(|_| Regex::new(NEVER).expect("a valid pattern"))
}

/// A pattern that matches nothing: a word boundary that is not one.
const NEVER: &str = r"\b\B";

/// A region's compiled patterns, built on first use (compiling all ~250
/// regions up front would cost seconds at start for numbers never seen).
/// Keyed by id and country code: the non-geographic entries (+800, +882…)
/// all have the id `001`, which is also why the table is filled from the
/// country codes (`DATABASE.iter()` yields one `001` entry only).
fn compiled(meta: &'static Metadata) -> Option<&'static Region> {
    type Regions = HashMap<(&'static str, u16), OnceLock<Region>>;
    static REGIONS: LazyLock<Regions> = LazyLock::new(|| {
        (0..1000u16)
            .filter_map(|code| DATABASE.by_code(&code))
            .flatten()
            .map(|m| ((m.id(), m.country_code()), OnceLock::new()))
            .collect()
    });
    let cell = REGIONS.get(&(meta.id(), meta.country_code()))?;
    Some(cell.get_or_init(|| Region::new(meta)))
}
