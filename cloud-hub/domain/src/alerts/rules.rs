//! Physiological alert rules: defaults, ward and patient overrides.
//!
//! The default limits are the NEWS2 chart's band boundaries (Royal College
//! of Physicians, National Early Warning Score 2, 2017, chart 1; SpO2 on
//! Scale 1): a value the chart scores 3 raises a **high** priority alert, a
//! value it scores 2 a **medium** one. They are a starting point a ward sets
//! for itself (`[[alerts.rule]]` in the hub config, per ward) and a
//! clinician per patient (API), not a clinical recommendation.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::early_warning::Parameter;

/// IEC 60601-1-8 alarm priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Low, Self::Medium, Self::High]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// Which side of the limit is the alarm condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// value < limit
    Below,
    /// value > limit
    Above,
}

/// One rule, as the engine uses it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub id: String,
    #[serde(serialize_with = "ser_parameter")]
    pub parameter: Parameter,
    pub direction: Direction,
    /// In the chart unit of the parameter: SpO2 %, rates /min, systolic BP
    /// mm[Hg], temperature °C.
    pub limit: f64,
    pub priority: Priority,
    /// The condition must hold this long (reading time) before the alert.
    pub delay_s: u64,
    /// A raised alert resolves when the value is back past the limit by
    /// this much.
    pub hysteresis: f64,
    pub enabled: bool,
}

fn ser_parameter<S: serde::Serializer>(p: &Parameter, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str())
}

impl Rule {
    pub fn message(&self) -> String {
        let unit = unit_of(self.parameter);
        format!(
            "{} {} {}{}",
            self.parameter.display(),
            match self.direction {
                Direction::Below => "below",
                Direction::Above => "above",
            },
            self.limit,
            if unit == "%" {
                "%".to_owned()
            } else {
                format!(" {unit}")
            }
        )
    }
}

/// The chart unit of a device parameter (UCUM).
pub fn unit_of(p: Parameter) -> &'static str {
    match p {
        Parameter::RespirationRate | Parameter::Pulse => "/min",
        Parameter::Spo2 => "%",
        Parameter::SystolicBp => "mm[Hg]",
        Parameter::Temperature => "Cel",
        _ => "",
    }
}

/// The device parameters a rule may name, by config name.
pub fn parameter_named(name: &str) -> Option<Parameter> {
    [
        Parameter::RespirationRate,
        Parameter::Spo2,
        Parameter::SystolicBp,
        Parameter::Pulse,
        Parameter::Temperature,
    ]
    .into_iter()
    .find(|p| p.as_str() == name)
}

/// The default rules (NEWS2 chart boundaries, see the module docs). Delay
/// 10 s; hysteresis 1 % SpO2, 1 /min respiration, 5 mmHg, 5 /min pulse,
/// 0.2 °C.
pub fn default_rules() -> Vec<Rule> {
    use Direction::{Above, Below};
    use Parameter::*;
    use Priority::{High, Medium};
    let r = |id: &str, parameter, direction, limit, priority, hysteresis| Rule {
        id: id.into(),
        parameter,
        direction,
        limit,
        priority,
        delay_s: 10,
        hysteresis,
        enabled: true,
    };
    vec![
        // Respiration rate: ≤ 8 scores 3, 21–24 scores 2, ≥ 25 scores 3.
        r("resp-rate-low-high", RespirationRate, Below, 9.0, High, 1.0),
        r(
            "resp-rate-high-medium",
            RespirationRate,
            Above,
            20.0,
            Medium,
            1.0,
        ),
        r(
            "resp-rate-high-high",
            RespirationRate,
            Above,
            24.0,
            High,
            1.0,
        ),
        // SpO2 Scale 1: 92–93 scores 2, ≤ 91 scores 3.
        r("spo2-low-medium", Spo2, Below, 94.0, Medium, 1.0),
        r("spo2-low-high", Spo2, Below, 92.0, High, 1.0),
        // Systolic BP: 91–100 scores 2, ≤ 90 and ≥ 220 score 3.
        r("sys-bp-low-medium", SystolicBp, Below, 101.0, Medium, 5.0),
        r("sys-bp-low-high", SystolicBp, Below, 91.0, High, 5.0),
        r("sys-bp-high-high", SystolicBp, Above, 219.0, High, 5.0),
        // Pulse: ≤ 40 scores 3, 111–130 scores 2, ≥ 131 scores 3.
        r("pulse-low-high", Pulse, Below, 41.0, High, 5.0),
        r("pulse-high-medium", Pulse, Above, 110.0, Medium, 5.0),
        r("pulse-high-high", Pulse, Above, 130.0, High, 5.0),
        // Temperature: ≤ 35.0 scores 3, ≥ 39.1 scores 2.
        r("temp-low-high", Temperature, Below, 35.1, High, 0.2),
        r("temp-high-medium", Temperature, Above, 39.0, Medium, 0.2),
    ]
}

/// A change to a rule: every field optional, the rest inherited (from the
/// default for a global or ward override, from the ward's or global rule
/// for a patient's). A rule id that is not a default is a new rule and
/// must give `parameter`, `direction`, `limit` and `priority`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleOverride {
    pub id: String,
    /// Applies only to patients in beds of this ward (config only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ward: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Longest condition delay accepted (1 h).
pub const MAX_DELAY_S: u64 = 3600;

impl RuleOverride {
    /// Applies this override to `base` (or builds a new rule); the error
    /// names the field.
    pub fn apply(&self, base: Option<&Rule>) -> Result<Rule, (String, String)> {
        let field = |f: &str| format!("rule `{}`: {f}", self.id);
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err((
                "id".into(),
                "must be 1–64 characters of letters, digits, - and _".into(),
            ));
        }
        let parameter = match (&self.parameter, base) {
            (Some(p), _) => parameter_named(p).ok_or_else(|| {
                (
                    field("parameter"),
                    "must be one of respiration_rate, spo2, systolic_bp, pulse, temperature".into(),
                )
            })?,
            (None, Some(b)) => b.parameter,
            (None, None) => return Err((field("parameter"), "is required for a new rule".into())),
        };
        let need = |what: &str| (field(what), "is required for a new rule".to_owned());
        let rule = Rule {
            id: self.id.clone(),
            parameter,
            direction: self
                .direction
                .or(base.map(|b| b.direction))
                .ok_or_else(|| need("direction"))?,
            limit: self
                .limit
                .or(base.map(|b| b.limit))
                .ok_or_else(|| need("limit"))?,
            priority: self
                .priority
                .or(base.map(|b| b.priority))
                .ok_or_else(|| need("priority"))?,
            delay_s: self.delay_s.or(base.map(|b| b.delay_s)).unwrap_or(10),
            hysteresis: self
                .hysteresis
                .or(base.map(|b| b.hysteresis))
                .unwrap_or(0.0),
            enabled: self.enabled.or(base.map(|b| b.enabled)).unwrap_or(true),
        };
        if !rule.limit.is_finite() {
            return Err((field("limit"), "must be a finite number".into()));
        }
        if !rule.hysteresis.is_finite() || rule.hysteresis < 0.0 {
            return Err((field("hysteresis"), "must be a number ≥ 0".into()));
        }
        if rule.delay_s > MAX_DELAY_S {
            return Err((field("delay_s"), format!("must be at most {MAX_DELAY_S}")));
        }
        Ok(rule)
    }
}

/// The rules in force: global (defaults with the config's global
/// overrides), per ward (config) and per patient (API).
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    global: Vec<Rule>,
    wards: HashMap<String, Vec<RuleOverride>>,
    patients: HashMap<String, Vec<RuleOverride>>,
}

impl RuleSet {
    pub fn new(global: Vec<Rule>) -> Self {
        Self {
            global,
            ..Default::default()
        }
    }

    /// Defaults plus the config's `[[alerts.rule]]` entries.
    pub fn from_config(overrides: &[RuleOverride]) -> Result<Self, (String, String)> {
        let mut global = default_rules();
        let mut wards: HashMap<String, Vec<RuleOverride>> = HashMap::new();
        for o in overrides {
            match &o.ward {
                Some(w) => {
                    // Checked against the global rule it would apply to.
                    let base = global.iter().find(|r| r.id == o.id);
                    o.apply(base)?;
                    wards.entry(w.clone()).or_default().push(o.clone());
                }
                None => {
                    let rule = o.apply(global.iter().find(|r| r.id == o.id))?;
                    match global.iter_mut().find(|r| r.id == o.id) {
                        Some(r) => *r = rule,
                        None => global.push(rule),
                    }
                }
            }
        }
        Ok(Self {
            global,
            wards,
            patients: HashMap::new(),
        })
    }

    pub fn global(&self) -> &[Rule] {
        &self.global
    }

    /// Replaces one patient's overrides.
    pub fn set_patient(&mut self, patient: &str, overrides: Vec<RuleOverride>) {
        if overrides.is_empty() {
            self.patients.remove(patient);
        } else {
            self.patients.insert(patient.into(), overrides);
        }
    }

    pub fn patient_overrides(&self, patient: &str) -> &[RuleOverride] {
        self.patients.get(patient).map_or(&[], Vec::as_slice)
    }

    /// The enabled rules for a patient in a ward, in the global order (new
    /// ward or patient rules after): patient override over ward override
    /// over the global rule.
    pub fn effective(&self, patient: &str, ward: Option<&str>) -> Vec<Rule> {
        let mut rules = self.global.clone();
        let layers = [
            ward.and_then(|w| self.wards.get(w)),
            self.patients.get(patient),
        ];
        for layer in layers.into_iter().flatten() {
            for o in layer {
                let base = rules.iter().find(|r| r.id == o.id);
                if let Ok(rule) = o.apply(base) {
                    match rules.iter_mut().find(|r| r.id == o.id) {
                        Some(r) => *r = rule,
                        None => rules.push(rule),
                    }
                }
            }
        }
        rules.retain(|r| r.enabled);
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_news2_chart_boundaries() {
        // RCP 2017 chart 1: the first value of each band that scores 3 (high)
        // or 2 (medium) meets the rule; the neighbouring value does not.
        let rules = default_rules();
        let meets = |id: &str, v: f64| {
            let r = rules.iter().find(|r| r.id == id).unwrap();
            match r.direction {
                Direction::Below => v < r.limit,
                Direction::Above => v > r.limit,
            }
        };
        for (id, yes, no) in [
            ("resp-rate-low-high", 8.0, 9.0),
            ("resp-rate-high-medium", 21.0, 20.0),
            ("resp-rate-high-high", 25.0, 24.0),
            ("spo2-low-medium", 93.0, 94.0),
            ("spo2-low-high", 91.0, 92.0),
            ("sys-bp-low-medium", 100.0, 101.0),
            ("sys-bp-low-high", 90.0, 91.0),
            ("sys-bp-high-high", 220.0, 219.0),
            ("pulse-low-high", 40.0, 41.0),
            ("pulse-high-medium", 111.0, 110.0),
            ("pulse-high-high", 131.0, 130.0),
            ("temp-low-high", 35.0, 35.1),
            ("temp-high-medium", 39.1, 39.0),
        ] {
            assert!(meets(id, yes), "{id} at {yes}");
            assert!(!meets(id, no), "{id} at {no}");
        }
    }

    #[test]
    fn patient_over_ward_over_global() {
        let ward = RuleOverride {
            id: "spo2-low-high".into(),
            ward: Some("COPD".into()),
            limit: Some(86.0),
            ..Default::default()
        };
        let global = RuleOverride {
            id: "spo2-low-medium".into(),
            delay_s: Some(30),
            ..Default::default()
        };
        let mut set = RuleSet::from_config(&[ward, global]).unwrap();
        let find = |rules: &[Rule], id: &str| rules.iter().find(|r| r.id == id).cloned();
        let anywhere = set.effective("p1", Some("ICU"));
        assert_eq!(find(&anywhere, "spo2-low-high").unwrap().limit, 92.0);
        assert_eq!(find(&anywhere, "spo2-low-medium").unwrap().delay_s, 30);
        let copd = set.effective("p1", Some("COPD"));
        assert_eq!(find(&copd, "spo2-low-high").unwrap().limit, 86.0);
        set.set_patient(
            "p1",
            vec![
                RuleOverride {
                    id: "spo2-low-high".into(),
                    limit: Some(85.0),
                    ..Default::default()
                },
                RuleOverride {
                    id: "spo2-low-medium".into(),
                    enabled: Some(false),
                    ..Default::default()
                },
            ],
        );
        let p1 = set.effective("p1", Some("COPD"));
        assert_eq!(find(&p1, "spo2-low-high").unwrap().limit, 85.0);
        assert!(find(&p1, "spo2-low-medium").is_none(), "disabled");
        assert_eq!(
            find(&set.effective("p2", Some("COPD")), "spo2-low-high")
                .unwrap()
                .limit,
            86.0
        );
    }

    #[test]
    fn overrides_are_checked_with_the_field_named() {
        let bad = |o: RuleOverride| RuleSet::from_config(&[o]).unwrap_err();
        let (f, _) = bad(RuleOverride {
            id: "new-rule".into(),
            limit: Some(3.0),
            ..Default::default()
        });
        assert_eq!(f, "rule `new-rule`: parameter");
        let (f, _) = bad(RuleOverride {
            id: "spo2-low-high".into(),
            hysteresis: Some(-1.0),
            ..Default::default()
        });
        assert_eq!(f, "rule `spo2-low-high`: hysteresis");
        let (f, _) = bad(RuleOverride {
            id: "x".into(),
            parameter: Some("lactate".into()),
            ..Default::default()
        });
        assert_eq!(f, "rule `x`: parameter");
        let (f, _) = bad(RuleOverride {
            id: "bad id!".into(),
            ..Default::default()
        });
        assert_eq!(f, "id");
        let ok = RuleSet::from_config(&[RuleOverride {
            id: "etco2-free-pulse".into(),
            parameter: Some("pulse".into()),
            direction: Some(Direction::Above),
            limit: Some(150.0),
            priority: Some(Priority::High),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(ok.global().len(), default_rules().len() + 1);
    }
}
