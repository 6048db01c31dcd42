//! Routing: pure rule evaluation (no IO). Longest destination prefix, then
//! call type, priority and time-of-day window, then a weighted trunk choice
//! with an ordered failover list.
//!
//! **Invariant:** `routing` does no IO; the caller passes the clock and the
//! random source, so decisions are reproducible in tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, Timelike, Weekday};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::intake::{FieldError, Priority};

/// A routing rule as written by `PUT /v1/routes/{name}` and stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination prefix: `+` and digits for E.164 numbers (`+9180`), digits
    /// only for short codes (`112`), or empty to match everything.
    pub prefix: String,
    /// One trunk (shorthand for `trunks: [{name, weight: 1}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
    /// Trunks chosen at random in proportion to `weight`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunks: Vec<WeightedTrunk>,
    /// The PoP whose gateways own the trunks.
    pub pop: String,
    /// Trunks to try, in order, when the chosen one fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    /// Only calls of this type (`outbound`, …); unset matches every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_type: Option<String>,
    /// Only calls of this priority; unset matches both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// Only during this local time window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// Ask an external service for the trunk; this rule's static choice is
    /// the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookSpec>,
}

/// A trunk and its share of calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTrunk {
    pub name: String,
    /// Relative share; 0 keeps the trunk for failover only. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A local time-of-day window, `start` inclusive, `end` exclusive. A window
/// whose end is before its start runs over midnight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// `HH:MM`, 24-hour clock.
    pub start: String,
    /// `HH:MM`, 24-hour clock.
    pub end: String,
    /// `mon` … `sun`, checked against the local day at the time of the call;
    /// empty means every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
}

/// An external routing hook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// `http://` or `https://` URL that receives a POST with the call.
    pub url: String,
    /// Overrides `hook.timeout` from config, e.g. `"150ms"`.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A validated, compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub spec: RouteSpec,
    call_type: Option<String>,
    priority: Option<Priority>,
    window: Option<Window>,
    /// `(trunk, cumulative weight)`, for the weighted draw.
    cumulative: Vec<(String, u64)>,
    /// Trunks in failover order (other weighted trunks, then `failover`).
    others: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    start: u32,
    end: u32,
    /// Bit `n` set: allowed on weekday `n` (Monday = 0); 0 means every day.
    days: u8,
}

impl Window {
    fn active(&self, weekday: Weekday, minute: u32) -> bool {
        let day_ok = self.days == 0 || self.days & (1 << weekday.num_days_from_monday()) != 0;
        let time_ok = if self.start < self.end {
            self.start <= minute && minute < self.end
        } else {
            minute >= self.start || minute < self.end
        };
        day_ok && time_ok
    }
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` may name a route (used in URLs and audit entries). A name
/// of dots only (`.`, `..`) would be a dot segment in `/v1/routes/{name}`,
/// which clients normalise away, so such a route could not be read or
/// deleted again.
pub fn valid_route_name(name: &str) -> bool {
    valid_name(name, 64) && !name.bytes().all(|b| b == b'.')
}

/// What makes two rules' matchers identical: prefix, call type, priority
/// and window together. The database keeps it unique among routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// The destination prefix, as in the rule.
    pub prefix: String,
    /// The call type, or empty when the rule matches every type.
    pub call_type: String,
    /// The priority, or empty when the rule matches both.
    pub priority: String,
    /// The window as `HH:MM-HH:MM/day,day`, or empty when there is none.
    pub window: String,
}

impl RouteSpec {
    /// The rule's [`Matcher`].
    pub fn matcher_key(&self) -> Matcher {
        let window = self
            .window
            .as_ref()
            .map(|w| format!("{}-{}/{}", w.start, w.end, w.days.join(",")))
            .unwrap_or_default();
        Matcher {
            prefix: self.prefix.clone(),
            call_type: self.call_type.clone().unwrap_or_default(),
            priority: self.priority.clone().unwrap_or_default(),
            window,
        }
    }

    /// Validates the rule and compiles it; every problem is reported at once.
    pub fn compile(&self, name: &str) -> Result<Rule, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, reason: &str| {
            errors.push(FieldError {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if !valid_route_name(name) {
            err(
                "name",
                "must be 1 to 64 letters, digits, '.', '_' or '-', and not dots only",
            );
        }
        let digits = self.prefix.strip_prefix('+').unwrap_or(&self.prefix);
        if self.prefix.len() > 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            err(
                "prefix",
                "must be '+' and up to 15 digits (E.164), digits only (short codes) or empty",
            );
        }
        if !valid_name(&self.pop, 32) {
            err("pop", "must be 1 to 32 letters, digits, '.', '_' or '-'");
        }
        let weighted = self.weighted_trunks(&mut err);
        for t in &self.failover {
            if !valid_name(t, 64) {
                err(
                    "failover",
                    "trunk names must be 1 to 64 letters, digits, '.', '_' or '-'",
                );
            }
        }
        if self.failover.len() > 16 {
            err("failover", "at most 16 trunks");
        }
        let call_type = match &self.call_type {
            Some(t) if t.is_empty() || !valid_name(t, 32) => {
                err("call_type", "must be a call type such as \"outbound\"");
                None
            }
            other => other.clone(),
        };
        let priority = match self.priority.as_deref() {
            None => None,
            Some(p) => match Priority::parse(p) {
                Some(p) => Some(p),
                None => {
                    err("priority", "must be \"normal\" or \"emergency\"");
                    None
                }
            },
        };
        let window = self.window.as_ref().and_then(|w| w.compile(&mut err));
        if let Some(h) = &self.hook {
            h.check(&mut err);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Rule {
            name: name.to_owned(),
            spec: self.clone(),
            call_type,
            priority,
            window,
            cumulative: cumulative(&weighted),
            others: self.others(&weighted),
        })
    }

    /// The trunks with their weights, checked (`trunk` is one of weight 1).
    fn weighted_trunks(&self, err: &mut impl FnMut(&str, &str)) -> Vec<(String, u32)> {
        let mut weighted: Vec<(String, u32)> = Vec::new();
        match (&self.trunk, self.trunks.is_empty()) {
            (Some(t), true) => weighted.push((t.clone(), 1)),
            (None, false) => weighted.extend(self.trunks.iter().map(|t| (t.name.clone(), t.weight))),
            (Some(_), false) => err("trunks", "give either trunk or trunks, not both"),
            (None, true) => err("trunk", "is required (or trunks)"),
        }
        for (t, _) in &weighted {
            if !valid_name(t, 64) {
                err(
                    "trunks",
                    "trunk names must be 1 to 64 letters, digits, '.', '_' or '-'",
                );
            }
        }
        if !weighted.is_empty() && weighted.iter().all(|(_, w)| *w == 0) {
            err("trunks", "at least one trunk needs a weight above 0");
        }
        let mut seen = std::collections::HashSet::new();
        if weighted.iter().any(|(t, _)| !seen.insert(t.clone())) {
            err("trunks", "a trunk is listed twice");
        }
        if weighted.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            err("trunks", "weights add up to too much");
        }
        weighted
    }

    /// Every trunk after the drawn one, in failover order: the weighted
    /// trunks by weight (then name), then `failover`'s others.
    fn others(&self, weighted: &[(String, u32)]) -> Vec<String> {
        let mut by_weight = weighted.to_vec();
        by_weight.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut others: Vec<String> = by_weight.into_iter().map(|(t, _)| t).collect();
        for t in &self.failover {
            if !others.contains(t) {
                others.push(t.clone());
            }
        }
        others
    }
}

/// Each trunk with the running total of the weights up to it.
fn cumulative(weighted: &[(String, u32)]) -> Vec<(String, u64)> {
    let mut cumulative = Vec::new();
    let mut total = 0u64;
    for (t, w) in weighted {
        total += u64::from(*w);
        cumulative.push((t.clone(), total));
    }
    cumulative
}

impl WindowSpec {
    /// The window in minutes and a day mask; `None` (and an error) when it
    /// is invalid.
    fn compile(&self, err: &mut impl FnMut(&str, &str)) -> Option<Window> {
        let (start, end) = (parse_hhmm(&self.start), parse_hhmm(&self.end));
        let mut days = 0u8;
        for d in &self.days {
            match d.as_str() {
                "mon" => days |= 1,
                "tue" => days |= 2,
                "wed" => days |= 4,
                "thu" => days |= 8,
                "fri" => days |= 16,
                "sat" => days |= 32,
                "sun" => days |= 64,
                _ => err("window.days", "days are mon, tue, wed, thu, fri, sat, sun"),
            }
        }
        match (start, end) {
            (Some(s), Some(e)) if s != e => Some(Window {
                start: s,
                end: e,
                days,
            }),
            (Some(_), Some(_)) => {
                err("window", "start and end are equal; omit the window for all day");
                None
            }
            _ => {
                err("window", "start and end must be HH:MM on a 24-hour clock");
                None
            }
        }
    }
}

impl HookSpec {
    /// Reports what is wrong with the hook's URL and timeout.
    fn check(&self, err: &mut impl FnMut(&str, &str)) {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://"))
            || reqwest::Url::parse(&self.url).is_err()
        {
            err("hook.url", "must be an http:// or https:// URL");
        }
        if let Some(t) = self.timeout
            && (t.is_zero() || t > Duration::from_secs(5))
        {
            err("hook.timeout", "must be above 0 and at most 5s");
        }
    }
}

/// What a call needs routing for.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub destination: &'a str,
    pub call_type: &'a str,
    pub priority: Priority,
    pub weekday: Weekday,
    /// Minutes since local midnight.
    pub minute: u32,
}

impl<'a> Query<'a> {
    /// A query at local time `now`.
    pub fn at<Tz: chrono::TimeZone>(
        destination: &'a str,
        call_type: &'a str,
        priority: Priority,
        now: &chrono::DateTime<Tz>,
    ) -> Self {
        Query {
            destination,
            call_type,
            priority,
            weekday: now.weekday(),
            minute: now.hour() * 60 + now.minute(),
        }
    }
}

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub rule: String,
    pub trunk: String,
    pub pop: String,
    /// Trunks to try next, in order.
    pub failover: Vec<String>,
}

/// All rules of one route version, indexed by prefix.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub version: i64,
    by_prefix: HashMap<String, Vec<Arc<Rule>>>,
    len: usize,
}

impl RuleSet {
    /// Indexes `rules`; within a prefix the most specific rule comes first
    /// (call type, priority and window each count one), then by name.
    pub fn new(version: i64, rules: impl IntoIterator<Item = Rule>) -> Self {
        let mut by_prefix: HashMap<String, Vec<Arc<Rule>>> = HashMap::new();
        let mut len = 0;
        for r in rules {
            len += 1;
            by_prefix
                .entry(r.spec.prefix.clone())
                .or_default()
                .push(Arc::new(r));
        }
        for rules in by_prefix.values_mut() {
            rules.sort_by(|a, b| {
                b.specificity()
                    .cmp(&a.specificity())
                    .then_with(|| a.name.cmp(&b.name))
            });
        }
        RuleSet {
            version,
            by_prefix,
            len,
        }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rule that applies: the longest prefix with an eligible rule wins;
    /// within it the most specific, then the first by name.
    pub fn matching(&self, q: &Query<'_>) -> Option<&Arc<Rule>> {
        let dest = q.destination;
        (0..=dest.len()).rev().find_map(|n| {
            let prefix = dest.get(..n)?;
            self.by_prefix.get(prefix)?.iter().find(|r| r.eligible(q))
        })
    }

    /// Routes a call: the matching rule and a weighted draw among its trunks.
    pub fn decide(&self, q: &Query<'_>, rng: &mut impl Rng) -> Option<(Arc<Rule>, Decision)> {
        let rule = self.matching(q)?;
        Some((rule.clone(), rule.pick(rng)))
    }
}

impl Rule {
    fn specificity(&self) -> u8 {
        u8::from(self.call_type.is_some())
            + u8::from(self.priority.is_some())
            + u8::from(self.window.is_some())
    }

    fn eligible(&self, q: &Query<'_>) -> bool {
        self.call_type.as_deref().is_none_or(|t| t == q.call_type)
            && self.priority.is_none_or(|p| p == q.priority)
            && self.window.is_none_or(|w| w.active(q.weekday, q.minute))
    }

    /// Weighted draw of the first trunk; the rest follow in failover order.
    pub fn pick(&self, rng: &mut impl Rng) -> Decision {
        let total = self.cumulative.last().map_or(0, |(_, c)| *c);
        let draw = if total == 0 { 0 } else { rng.random_range(0..total) };
        let trunk = self
            .cumulative
            .iter()
            .find(|(_, c)| draw < *c)
            .or(self.cumulative.first())
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        self.decision_with(trunk)
    }

    /// A decision for a given first trunk (hooks choose it).
    pub fn decision_with(&self, trunk: String) -> Decision {
        let failover = self.others.iter().filter(|t| **t != trunk).cloned().collect();
        Decision {
            rule: self.name.clone(),
            trunk,
            pop: self.spec.pop.clone(),
            failover,
        }
    }
}

#[cfg(test)]
mod tests;
