//! Gold: per patient-hour aggregates of the silver readings and the
//! pseudonymized score history (pure: no I/O).

use std::collections::BTreeMap;

use hub_storage::LakeScore;

use crate::rows::{SilverRow, shift};

/// Microseconds in an hour.
pub const HOUR_US: i64 = 3_600_000_000;

/// One patient, hour and vital: over the silver rows with a value and
/// status `final` (what the FHIR API serves as a final value).
#[derive(Debug, Clone, PartialEq)]
pub struct GoldVital {
    pub pseudonym: String,
    /// Start of the (shifted) hour, UTC µs.
    pub hour_us: i64,
    pub loinc: String,
    pub ucum: String,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

/// A score history entry, pseudonymized and shifted.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldScore {
    pub pseudonym: String,
    pub time_us: i64,
    /// `news2`, `qsofa` or `mews`.
    pub kind: String,
    pub total: Option<i64>,
    pub band: Option<String>,
    /// Input names without a usable fresh value, comma-separated.
    pub missing: String,
    /// The stale ones among them, comma-separated.
    pub stale: String,
    /// Component scores by parameter name (JSON object), when computed.
    pub components: Option<String>,
}

/// Start of the hour holding `us`.
pub fn hour_of(us: i64) -> i64 {
    us.div_euclid(HOUR_US) * HOUR_US
}

/// Running patient-hour aggregates, fed one silver value at a time (from
/// rows or straight from a file's columns).
#[derive(Debug, Default)]
pub struct Aggregator {
    groups: BTreeMap<(String, i64, String, String), Acc>,
}

#[derive(Debug)]
struct Acc {
    count: i64,
    min: f64,
    max: f64,
    sum: f64,
}

impl Aggregator {
    /// Adds one silver value; left out unless it has a value and status
    /// `final`.
    pub fn add(
        &mut self,
        pseudonym: &str,
        effective_us: i64,
        loinc: &str,
        ucum: &str,
        value: Option<f64>,
        status: &str,
    ) {
        let Some(v) = value.filter(|_| status == "final") else {
            return;
        };
        let key = (
            pseudonym.to_owned(),
            hour_of(effective_us),
            loinc.to_owned(),
            ucum.to_owned(),
        );
        let a = self.groups.entry(key).or_insert(Acc {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        });
        a.count += 1;
        a.min = a.min.min(v);
        a.max = a.max.max(v);
        a.sum += v;
    }

    /// The aggregates, ordered by pseudonym, hour and LOINC code.
    pub fn finish(self) -> Vec<GoldVital> {
        self.groups
            .into_iter()
            .map(|((pseudonym, hour_us, loinc, ucum), a)| GoldVital {
                pseudonym,
                hour_us,
                loinc,
                ucum,
                count: a.count,
                min: a.min,
                max: a.max,
                mean: a.sum / a.count as f64,
            })
            .collect()
    }
}

/// The patient-hour aggregates of `rows` (see [`Aggregator`]).
pub fn aggregate<'a>(rows: impl IntoIterator<Item = &'a SilverRow>) -> Vec<GoldVital> {
    let mut agg = Aggregator::default();
    for r in rows {
        agg.add(
            &r.pseudonym,
            r.effective_us,
            &r.loinc,
            &r.ucum,
            r.value,
            &r.status,
        );
    }
    agg.finish()
}

/// A stored score history row as gold holds it.
pub fn gold_score(s: &LakeScore, pseudonym: &str, shift_days: i64) -> GoldScore {
    let (time_us, e) = &s.point;
    GoldScore {
        pseudonym: pseudonym.to_owned(),
        time_us: shift(*time_us, shift_days),
        kind: s.kind.clone(),
        total: e.total,
        band: e.band.clone(),
        missing: e.missing.join(","),
        stale: e.stale.join(","),
        components: e.components.as_ref().map(|c| c.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: &str, t: i64, loinc: &str, value: Option<f64>, status: &str) -> SilverRow {
        SilverRow {
            pseudonym: p.into(),
            effective_us: t,
            loinc: loinc.into(),
            mdc_code: 1,
            metric: "M".into(),
            ucum: "%".into(),
            value,
            status: status.into(),
            validity: "VALIDITY_VALID".into(),
            quality_flags: String::new(),
            interpretation: String::new(),
            out_of_range: false,
            time_source: String::new(),
        }
    }

    #[test]
    fn aggregates_per_patient_hour_and_vital_over_final_values_only() {
        let h = 10 * HOUR_US;
        let rows = vec![
            row("a", h + 1, "59408-5", Some(97.0), "final"),
            row("a", h + HOUR_US - 1, "59408-5", Some(93.0), "final"),
            row("a", h + 5, "59408-5", Some(95.0), "final"),
            // Next hour.
            row("a", h + HOUR_US, "59408-5", Some(90.0), "final"),
            // Withheld and preliminary values are not aggregated.
            row("a", h + 7, "59408-5", None, "final"),
            row("a", h + 8, "59408-5", Some(10.0), "preliminary"),
            // Another vital, another patient.
            row("a", h + 9, "8867-4", Some(70.0), "final"),
            row("b", h + 9, "59408-5", Some(99.0), "final"),
        ];
        let g = aggregate(&rows);
        assert_eq!(g.len(), 4);
        let first = &g[0];
        assert_eq!(
            (
                first.pseudonym.as_str(),
                first.hour_us,
                first.loinc.as_str()
            ),
            ("a", h, "59408-5")
        );
        assert_eq!(first.count, 3);
        assert_eq!((first.min, first.max, first.mean), (93.0, 97.0, 95.0));
        assert_eq!((g[1].hour_us, g[1].loinc.as_str()), (h, "8867-4"));
        assert_eq!(
            (g[2].hour_us, g[2].count, g[2].mean),
            (h + HOUR_US, 1, 90.0)
        );
        assert_eq!((g[3].pseudonym.as_str(), g[3].mean), ("b", 99.0));
    }

    #[test]
    fn hours_start_on_the_hour_before_1970_too() {
        assert_eq!(hour_of(HOUR_US + 5), HOUR_US);
        assert_eq!(hour_of(-1), -HOUR_US);
        assert_eq!(hour_of(0), 0);
    }
}
