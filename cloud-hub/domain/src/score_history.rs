//! Early-warning score history: what is stored of each computed
//! [`ScoreReport`] (an [`Entry`] per score [`Kind`]) and the **write
//! rule**: per patient and kind, a row when the result (total, band,
//! components, missing/stale inputs) differs from the last stored row,
//! otherwise at most one row per [`HEARTBEAT_US`]. Pure: the storage layer
//! applies [`should_write`] inside the transaction that writes the rows.

use serde_json::{Value as Json, json};

use crate::early_warning::{Parameter, ScoreReport, band, news2_components};

/// An unchanged result is stored again at most this often (UTC µs).
pub const HEARTBEAT_US: i64 = 60 * 1_000_000;
/// Longest window one history request may ask for.
pub const MAX_WINDOW_US: i64 = 7 * 86_400 * 1_000_000;
/// Most rows one history request returns (the newest, when there are more).
pub const MAX_POINTS: usize = 20_000;

/// A score kind of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    News2,
    Qsofa,
    Mews,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::News2, Kind::Qsofa, Kind::Mews];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::News2 => "news2",
            Self::Qsofa => "qsofa",
            Self::Mews => "mews",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The inputs the score needs (the SpO2 scale always has a value).
    pub fn inputs(self) -> &'static [Parameter] {
        use Parameter::*;
        match self {
            Self::News2 => &[
                RespirationRate,
                Spo2,
                SupplementalOxygen,
                SystolicBp,
                Pulse,
                Consciousness,
                Temperature,
            ],
            Self::Qsofa => &[RespirationRate, SystolicBp, Consciousness],
            Self::Mews => &[
                SystolicBp,
                Pulse,
                RespirationRate,
                Temperature,
                Consciousness,
            ],
        }
    }
}

/// One history row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub total: Option<i64>,
    /// NEWS2: `low`, `low-medium`, `medium`, `high`; qSOFA: `positive`
    /// (≥ 2) or `negative`; MEWS: none (its trigger levels are local).
    pub band: Option<String>,
    /// Inputs without a usable fresh value (missing or stale), by name.
    pub missing: Vec<String>,
    /// The stale ones among `missing`.
    pub stale: Vec<String>,
    /// Component scores by parameter name (NULL when not computed).
    pub components: Option<Json>,
}

/// The result of `kind` in a report.
pub fn entry(report: &ScoreReport, kind: Kind) -> Entry {
    let needs = kind.inputs();
    let stale: Vec<String> = report
        .stale
        .iter()
        .map(|i| i.parameter)
        .filter(|p| needs.contains(p))
        .map(|p| p.as_str().to_owned())
        .collect();
    let mut missing: Vec<String> = report
        .missing
        .iter()
        .filter(|p| needs.contains(p))
        .map(|p| p.as_str().to_owned())
        .collect();
    missing.extend(stale.iter().cloned());
    missing.sort();
    let (total, band, components) = match kind {
        Kind::News2 => match &report.news2 {
            Some(n) => {
                let mut c = serde_json::Map::new();
                for (p, s) in news2_components(n) {
                    c.insert(p.as_str().into(), json!(s));
                }
                (
                    Some(i64::from(n.total)),
                    Some(band(n.risk).to_owned()),
                    Some(Json::Object(c)),
                )
            }
            None => (None, None, None),
        },
        Kind::Qsofa => match &report.qsofa {
            Some(q) => (
                Some(i64::from(q.score)),
                Some(if q.positive { "positive" } else { "negative" }.to_owned()),
                Some(json!({
                    "respiration_rate": u8::from(q.respiratory_rate),
                    "systolic_bp": u8::from(q.systolic_bp),
                    "consciousness": u8::from(q.altered_mentation),
                })),
            ),
            None => (None, None, None),
        },
        Kind::Mews => match &report.mews {
            Some(m) => (
                Some(i64::from(m.total)),
                None,
                Some(json!({
                    "systolic_bp": m.systolic_bp,
                    "pulse": m.heart_rate,
                    "respiration_rate": m.respiration,
                    "temperature": m.temperature,
                    "consciousness": m.avpu,
                })),
            ),
            None => (None, None, None),
        },
    };
    Entry {
        total,
        band,
        missing,
        stale,
        components,
    }
}

/// A stored point: time (UTC µs) and its result.
pub type Point = (i64, Entry);

/// The write rule, as the storage layer is handed it: whether `new`,
/// computed at `at_us`, is stored given the last stored row of its kind.
pub type WriteRule = fn(last: Option<&Point>, new: &Entry, at_us: i64) -> bool;

/// The write rule (module docs): a changed result at once, an unchanged
/// one at most once per [`HEARTBEAT_US`].
pub fn should_write(last: Option<&Point>, new: &Entry, at_us: i64) -> bool {
    match last {
        None => true,
        Some((last_us, last)) => last != new || at_us - last_us >= HEARTBEAT_US,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn e(total: Option<i64>) -> Entry {
        Entry {
            total,
            band: None,
            missing: vec![],
            stale: vec![],
            components: None,
        }
    }

    #[test]
    fn unchanged_results_wait_for_the_heartbeat_changes_do_not() {
        assert!(should_write(None, &e(Some(1)), 0));
        let last = (100 * S, e(Some(1)));
        assert!(!should_write(
            Some(&last),
            &e(Some(1)),
            100 * S + HEARTBEAT_US - 1
        ));
        assert!(should_write(
            Some(&last),
            &e(Some(1)),
            100 * S + HEARTBEAT_US
        ));
        assert!(should_write(Some(&last), &e(Some(2)), 100 * S + 1));
        assert!(should_write(Some(&last), &e(None), 100 * S + 1));
    }
}
