//! Patient association, the model: beds, patient identifiers, occupancy
//! and the validation of what clients send. The timelines (placements and
//! stays, half-open `[from, to)`) and the attribution rule are described in
//! docs/association.md.

use serde::Serialize;

/// An invalid field of an association request; `field` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

/// A bed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bed {
    pub id: String,
    pub ward: String,
    pub label: String,
}

/// A patient identifier (FHIR `Identifier`: system and value). `system`
/// may be empty when the source gave none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientId {
    #[serde(default)]
    pub system: String,
    pub value: String,
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Stored readings whose patient changed because of it.
    pub reattributed: u64,
}

/// One bed's occupancy at an instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BedOccupancy {
    #[serde(flatten)]
    pub bed: Bed,
    pub patient: Option<OccupantPatient>,
    pub devices: Vec<OccupantDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OccupantPatient {
    pub system: String,
    pub value: String,
    pub since_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OccupantDevice {
    pub gateway_id: String,
    pub device_id: String,
    pub since_us: i64,
}

/// `[A-Za-z0-9._-]{1,64}`: bed ids, gateway and device ids.
pub fn is_valid_key(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn check_text(
    field: &'static str,
    s: &str,
    max: usize,
    allow_empty: bool,
) -> Result<(), Invalid> {
    if s.is_empty() && !allow_empty {
        return Err(Invalid {
            field,
            message: "must not be empty".into(),
        });
    }
    if s.chars().count() > max {
        return Err(Invalid {
            field,
            message: format!("must be at most {max} characters"),
        });
    }
    if s.chars().any(char::is_control) || s.trim() != s {
        return Err(Invalid {
            field,
            message: "must not hold control characters or leading/trailing spaces".into(),
        });
    }
    Ok(())
}

pub fn check_key(field: &'static str, s: &str) -> Result<(), Invalid> {
    if is_valid_key(s) {
        Ok(())
    } else {
        Err(Invalid {
            field,
            message: "must be 1-64 characters of A-Z a-z 0-9 . _ -".into(),
        })
    }
}

impl Bed {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_key("id", &self.id)?;
        check_text("ward", &self.ward, 128, false)?;
        check_text("label", &self.label, 128, false)
    }
}

impl PatientId {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_text("patient.system", &self.system, 256, true)?;
        check_text("patient.value", &self.value, 64, false)
    }
}

/// Who a device's readings in one batch belong to, resolved once per device
/// before the rows are inserted (so each row is written once, with its
/// final patient): the bed stays overlapping the device's placements in the
/// batch's time span, and the static config fallback.
#[derive(Debug, Default)]
pub struct DeviceAttribution {
    /// `[from, to)` pieces with the patient (value, system) of the stay.
    pub spans: Vec<(i64, i64, String, String)>,
    pub fallback: Option<String>,
}

/// How a row was attributed (the `attribution` column).
#[derive(Debug)]
pub struct Attributed<'a> {
    pub patient: Option<&'a str>,
    pub system: Option<&'a str>,
    pub how: &'static str,
}

impl DeviceAttribution {
    /// The patient of a row at `at_us`; `subject` is the reading's own
    /// identifier (it wins), if any.
    pub fn of<'a>(
        &'a self,
        subject: Option<&'a shared_protocol::v1::Identifier>,
        at_us: i64,
    ) -> Attributed<'a> {
        if let Some(s) = subject.filter(|s| !s.value.trim().is_empty()) {
            return Attributed {
                patient: Some(&s.value),
                system: (!s.system.is_empty()).then_some(s.system.as_str()),
                how: "subject",
            };
        }
        if let Some((_, _, value, system)) = self
            .spans
            .iter()
            .find(|(from, to, _, _)| *from <= at_us && at_us < *to)
        {
            return Attributed {
                patient: Some(value),
                system: Some(system),
                how: "stay",
            };
        }
        match &self.fallback {
            Some(p) => Attributed {
                patient: Some(p),
                system: None,
                how: "config",
            },
            None => Attributed {
                patient: None,
                system: None,
                how: "unattributed",
            },
        }
    }
}
