//! Call records: folds a call's events (ringing, answered, completed, failed)
//! into its state and duration. Pure: the result depends only on the set of
//! events, never on the order they arrived in.

use serde::{Deserialize, Serialize};

/// A call event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Ringing,
    Answered,
    Completed,
    Failed,
}

impl EventKind {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Ringing => "ringing",
            EventKind::Answered => "answered",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "ringing" => Some(EventKind::Ringing),
            "answered" => Some(EventKind::Answered),
            "completed" => Some(EventKind::Completed),
            "failed" => Some(EventKind::Failed),
            _ => None,
        }
    }
}

/// The folded record: timestamps in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Folded {
    /// `initiated`, `ringing`, `answered`, `completed` or `failed`.
    pub state: &'static str,
    pub ringing_at: Option<i64>,
    pub answered_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// Talk time: answered → completed, never negative; `None` until both exist.
    pub duration_ms: Option<i64>,
}

/// Folds events (each kind at most once) into a record.
///
/// When both `completed` and `failed` arrive, the earlier one ends the call
/// (a tie goes to `failed`), so the outcome is the same in any arrival order.
pub fn fold(events: &[(EventKind, i64)]) -> Folded {
    let at = |k: EventKind| {
        events
            .iter()
            .filter(|(kind, _)| *kind == k)
            .map(|(_, t)| *t)
            .min()
    };
    let ringing_at = at(EventKind::Ringing);
    let answered_at = at(EventKind::Answered);
    let ended = match (at(EventKind::Completed), at(EventKind::Failed)) {
        (Some(c), Some(f)) if c < f => Some(("completed", c)),
        (_, Some(f)) => Some(("failed", f)),
        (Some(c), None) => Some(("completed", c)),
        (None, None) => None,
    };
    let state = match (ended, answered_at, ringing_at) {
        (Some((s, _)), _, _) => s,
        (None, Some(_), _) => "answered",
        (None, None, Some(_)) => "ringing",
        (None, None, None) => "initiated",
    };
    let duration_ms = match (ended, answered_at) {
        (Some(("completed", end)), Some(ans)) => Some((end - ans).max(0)),
        (Some(_), None) => Some(0),
        _ => None,
    };
    Folded {
        state,
        ringing_at,
        answered_at,
        ended_at: ended.map(|(_, t)| t),
        duration_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventKind::*;

    #[test]
    fn normal_lifecycle() {
        let f = fold(&[(Ringing, 1_000), (Answered, 3_000), (Completed, 63_000)]);
        assert_eq!(f.state, "completed");
        assert_eq!(f.duration_ms, Some(60_000));
        assert_eq!(f.ended_at, Some(63_000));
    }

    #[test]
    fn partial_states() {
        assert_eq!(fold(&[]).state, "initiated");
        assert_eq!(fold(&[(Ringing, 1)]).state, "ringing");
        assert_eq!(fold(&[(Answered, 2)]).duration_ms, None);
        assert_eq!(fold(&[(Failed, 5), (Ringing, 1)]).duration_ms, Some(0));
    }

    proptest::proptest! {
        #[test]
        fn arrival_order_does_not_matter(
            ts in proptest::collection::vec(0i64..100_000, 4),
            mask in 0u8..16,
            rot in 0usize..4,
        ) {
            let kinds = [Ringing, Answered, Completed, Failed];
            let mut events: Vec<(EventKind, i64)> = kinds.iter().zip(&ts)
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (k, t))| (*k, *t))
                .collect();
            let a = fold(&events);
            let n = events.len().max(1);
            events.rotate_left(rot % n);
            events.reverse();
            let b = fold(&events);
            proptest::prop_assert_eq!(a, b);
            proptest::prop_assert!(a.duration_ms.is_none_or(|d| d >= 0));
        }
    }
}
