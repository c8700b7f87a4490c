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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Stored readings whose patient changed because of it.
    pub reattributed: u64,
    /// Which patients' readings moved where, and how many (the audit log
    /// names them; never logs or metrics). Sorted, one entry per pair.
    #[serde(skip)]
    pub moved: Vec<Moved>,
}

/// The patient a stored reading is attributed to: the identifier value
/// (the FHIR `Patient` id) and its system, when known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Subject {
    pub system: Option<String>,
    pub value: String,
}

impl Subject {
    /// A stored `(patient_system, patient_id)` pair: `None` without a
    /// value; an empty system is no system.
    pub fn of(system: Option<String>, value: Option<String>) -> Option<Subject> {
        let value = value.filter(|v| !v.is_empty())?;
        Some(Subject {
            system: system.filter(|s| !s.is_empty()),
            value,
        })
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.system {
            Some(s) => write!(f, "Patient/{} ({s})", self.value),
            None => write!(f, "Patient/{}", self.value),
        }
    }
}

/// Stored readings re-attributed from one patient (or nobody) to another
/// (or nobody).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Moved {
    pub from: Option<Subject>,
    pub to: Option<Subject>,
    pub readings: u64,
}

impl Moved {
    /// The audit text: how many readings went from whom to whom.
    pub fn describe(&self) -> String {
        let who = |s: &Option<Subject>| s.as_ref().map_or("no patient".into(), Subject::to_string);
        format!(
            "re-attributed {} reading(s) from {} to {}",
            self.readings,
            who(&self.from),
            who(&self.to)
        )
    }

    /// The patients it names (each gets the audit entry), `from` first.
    pub fn patients(&self) -> impl Iterator<Item = &Subject> {
        self.from
            .iter()
            .chain(self.to.iter().filter(|t| Some(*t) != self.from.as_ref()))
    }
}

impl Change {
    /// Counts `n` readings whose attribution changed from `from` to `to`;
    /// only a change of patient (value or system) is a move.
    pub fn add(&mut self, from: Option<Subject>, to: Option<Subject>, n: u64) {
        if n == 0 {
            return;
        }
        self.reattributed += n;
        if from == to {
            return;
        }
        match self.moved.iter_mut().find(|m| m.from == from && m.to == to) {
            Some(m) => m.readings += n,
            None => {
                self.moved.push(Moved {
                    from,
                    to,
                    readings: n,
                });
                self.moved.sort();
            }
        }
    }

    /// Adds `other`'s counts to this one.
    pub fn merge(&mut self, other: Change) {
        let same_patient = other.reattributed - other.moved.iter().map(|m| m.readings).sum::<u64>();
        self.reattributed += same_patient;
        for m in other.moved {
            self.add(m.from, m.to, m.readings);
        }
    }
}

/// What a re-attribution's audit entries say besides the moves.
#[derive(Debug, Clone, Copy)]
pub struct AuditContext<'a> {
    pub time_us: i64,
    /// The principal (HTTP) or the ADT source.
    pub actor: &'a str,
    /// The request path or the HL7 message type.
    pub resource: &'a str,
    /// HTTP status of the change (200 for an applied ADT event).
    pub outcome: u16,
    /// What was done, e.g. `device g/d placed at bed B at 2026-…`.
    pub what: &'a str,
    pub reason: Option<&'a str>,
}

/// The audit entries of a change: one per patient it names (`named`, e.g.
/// the patient admitted, then every patient readings moved from or to),
/// each with what was done, every move (who from, who to, how many) and the
/// reason. None when it names no patient and moved nothing.
pub fn audit_entries(
    ctx: &AuditContext<'_>,
    named: &[Subject],
    change: &Change,
) -> Vec<crate::audit::Entry> {
    let mut patients: Vec<&Subject> = Vec::new();
    for p in named
        .iter()
        .chain(change.moved.iter().flat_map(Moved::patients))
    {
        if !patients.iter().any(|q| q.value == p.value) {
            patients.push(p);
        }
    }
    let mut detail = ctx.what.to_owned();
    if change.moved.is_empty() {
        detail.push_str("; no stored reading changed patient");
    }
    for m in &change.moved {
        detail.push_str("; ");
        detail.push_str(&m.describe());
    }
    if let Some(r) = ctx.reason {
        detail.push_str("; reason: ");
        detail.push_str(r);
    }
    patients
        .into_iter()
        .map(|p| crate::audit::Entry {
            time_us: ctx.time_us,
            actor: ctx.actor.to_owned(),
            action: "update".into(),
            resource: ctx.resource.to_owned(),
            patient: Some(p.value.clone()),
            outcome: ctx.outcome,
            detail: detail.clone(),
            patients: Vec::new(),
        })
        .collect()
}

/// Default of `[association] reattribution_window_minutes`: how far back a
/// placement or stay change may reach without being a re-attribution.
pub const DEFAULT_REATTRIBUTION_WINDOW_MINUTES: u32 = 15;

/// Longest re-attribution reason (characters).
pub const MAX_REASON_CHARS: usize = 500;

/// Why a back-dated change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReattributionRefused {
    /// The caller holds neither the clinician nor the admin role.
    #[error(
        "a change dated before the re-attribution window moves stored readings between patients: \
         it needs the clinician or admin role"
    )]
    Role,
    /// No usable `reason` was given.
    #[error(
        "a change dated before the re-attribution window moves stored readings between patients: \
         give a reason"
    )]
    NoReason,
    /// The reason is too long or holds control characters.
    #[error("reason must be 1-{MAX_REASON_CHARS} characters without control characters")]
    BadReason,
}

/// Whether a change at `at_us` reaches further back than `window_us` before
/// `now_us`, i.e. may move readings already stored (a re-attribution).
pub fn is_backdated(at_us: i64, now_us: i64, window_us: i64) -> bool {
    at_us < now_us.saturating_sub(window_us)
}

/// Who may make a placement or stay change dated `at_us`: within the window
/// anyone the route admits; before it only a clinician or admin
/// (`clinical`) with a reason. A given reason is always checked. Returns
/// the trimmed reason.
pub fn check_reattribution(
    at_us: i64,
    now_us: i64,
    window_us: i64,
    clinical: bool,
    reason: Option<&str>,
) -> Result<Option<&str>, ReattributionRefused> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if let Some(r) = reason
        && (r.chars().count() > MAX_REASON_CHARS || r.chars().any(char::is_control))
    {
        return Err(ReattributionRefused::BadReason);
    }
    if is_backdated(at_us, now_us, window_us) {
        if !clinical {
            return Err(ReattributionRefused::Role);
        }
        if reason.is_none() {
            return Err(ReattributionRefused::NoReason);
        }
    }
    Ok(reason)
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
    /// `[from, to)` windows of this device whose readings belonged to an
    /// erased patient (`hub_domain::privacy`): dropped, never stored.
    pub erased: Vec<(i64, i64)>,
    /// Erased patients, for readings that carry their own identifier
    /// (loaded only when a batch holds such readings).
    pub erased_subjects: Option<std::sync::Arc<crate::privacy::ErasedSubjects>>,
}

/// How a row was attributed (the `attribution` column).
#[derive(Debug)]
pub struct Attributed<'a> {
    pub patient: Option<&'a str>,
    pub system: Option<&'a str>,
    pub how: &'static str,
}

impl DeviceAttribution {
    /// Whether a reading at `at_us` (with its own identifier `subject`, if
    /// any) belongs to data that was erased: inside an erased window of
    /// the device, or naming an erased patient and dated before the
    /// erasure.
    pub fn is_erased(&self, subject: Option<&shared_protocol::v1::Identifier>, at_us: i64) -> bool {
        if self
            .erased
            .iter()
            .any(|(from, to)| (*from..*to).contains(&at_us))
        {
            return true;
        }
        match (
            subject.filter(|s| !s.value.trim().is_empty()),
            &self.erased_subjects,
        ) {
            (Some(s), Some(erased)) => erased.covers(&s.system, &s.value, at_us),
            _ => false,
        }
    }

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

/// A device id as sent by gateways: 1-128 characters without control
/// characters (gateway ids are keys).
pub fn check_device(gateway_id: &str, device_id: &str) -> Result<(), Invalid> {
    check_key("gateway_id", gateway_id)?;
    if device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(char::is_control) {
        return Err(Invalid {
            field: "device_id",
            message: "must be 1-128 characters without control characters".into(),
        });
    }
    Ok(())
}

// ---- Timelines: the decisions, over intervals the backend loaded ----
//
// A backend loads, inside its transaction (holding its association lock),
// the intervals a change looks at, asks one of the functions below what to
// do, applies the returned [`Plan`] and re-attributes what it names. The
// functions decide; they never touch storage.

/// Open end of an interval, in comparisons and queries.
pub const OPEN: i64 = i64::MAX;

/// A stored placement or stay: at `bed` during `[from, to)` (`to` `None`:
/// still open). `id` is the backend's row id; `visit` is the stay's
/// encounter number (`None` for placements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub id: i64,
    pub bed: String,
    pub from: i64,
    pub to: Option<i64>,
    pub visit: Option<String>,
}

impl Interval {
    /// The end, [`OPEN`] when open.
    pub fn end(&self) -> i64 {
        self.to.unwrap_or(OPEN)
    }

    /// Whether `at` is inside `[from, to)`.
    pub fn covers(&self, at: i64) -> bool {
        self.from <= at && at < self.end()
    }

    /// Whether it overlaps `[lo, hi)`.
    pub fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.from < hi && self.end() > lo
    }
}

/// An interval with its key: (gateway, device) of a placement,
/// (system, value) of a stay.
pub type Keyed = (String, String, Interval);

/// A change refused because of what is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("bed `{0}` is occupied by another patient at or after that time")]
    BedOccupied(String),
    #[error("the patient already has a stay at or after that time (use transfer)")]
    AlreadyAdmitted,
    #[error("the patient has no stay at that time")]
    NotAdmitted,
    #[error("the device is not placed at a bed at that time")]
    NotPlaced,
}

/// A new interval row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInterval {
    pub bed: String,
    pub from: i64,
    pub to: Option<i64>,
    pub visit: Option<String>,
}

/// What to write for a change of one key's timeline, applied in this
/// order: deletes, new ends, inserts; then re-attribute `affected`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<i64>,
    /// (row id, new `to`).
    pub set_end: Vec<(i64, Option<i64>)>,
    pub insert: Vec<NewInterval>,
    pub affected: Affected,
}

/// The readings whose attribution a change can alter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affected {
    /// (gateway, device, lo, hi): that device's readings in `[lo, hi)`.
    pub devices: Vec<(String, String, i64, i64)>,
    /// (bed, lo, hi): those of every device placed at the bed in the span.
    pub beds: Vec<(String, i64, i64)>,
}

impl Affected {
    fn device(&mut self, g: &str, d: &str, lo: i64, hi: i64) {
        if lo < hi {
            self.devices.push((g.to_owned(), d.to_owned(), lo, hi));
        }
    }

    fn bed(&mut self, bed: &str, lo: i64, hi: i64) {
        if lo < hi {
            self.beds.push((bed.to_owned(), lo, hi));
        }
    }
}

impl Plan {
    /// Shortens `iv` to end at `at`, deleting it when it would be empty.
    fn cut(&mut self, iv: &Interval, at: i64) {
        if iv.from >= at {
            self.delete.push(iv.id);
        } else {
            self.set_end.push((iv.id, Some(at)));
        }
    }

    /// Puts the key at `bed` during `[from, to)`, merged with a directly
    /// adjacent interval of the key at the same bed before and after.
    /// `mine` are the key's intervals ending at or after `from`; `cut` the
    /// one this change cut (never a merge partner: it is at another bed or
    /// deleted).
    fn put_merged(
        &mut self,
        mine: &[Interval],
        cut: Option<i64>,
        bed: &str,
        from: i64,
        to: Option<i64>,
        visit: Option<String>,
    ) {
        let others = || mine.iter().filter(|i| Some(i.id) != cut && i.bed == bed);
        let prev = others().find(|i| i.to == Some(from)).map(|i| i.id);
        let next = to.and_then(|t| others().find(|i| i.from == t));
        let to = match next {
            Some(n) => {
                self.delete.push(n.id);
                n.to
            }
            None => to,
        };
        match prev {
            Some(p) => self.set_end.push((p, to)),
            None => self.insert.push(NewInterval {
                bed: bed.to_owned(),
                from,
                to,
                visit,
            }),
        }
    }
}

/// The first of `mine` covering `at`.
fn covering(mine: &[Interval], at: i64) -> Option<&Interval> {
    mine.iter().filter(|i| i.covers(at)).min_by_key(|i| i.from)
}

/// Places device `(g, d)` at `bed` from `at`; `mine` are the device's
/// placements ending at or after `at`. A placement elsewhere covering `at`
/// ends there and the new one lasts as long as it would have (else until
/// the device's next placement, or open). `None`: already there.
pub fn place(g: &str, d: &str, mine: &[Interval], bed: &str, at: i64) -> Option<Plan> {
    let mut plan = Plan::default();
    let (cut, end) = match covering(mine, at) {
        Some(p) if p.bed == bed => return None,
        Some(p) => {
            plan.cut(p, at);
            (Some(p.id), p.to)
        }
        None => (None, mine.iter().map(|i| i.from).filter(|f| *f > at).min()),
    };
    plan.put_merged(mine, cut, bed, at, end, None);
    plan.affected.device(g, d, at, end.unwrap_or(OPEN));
    Some(plan)
}

/// Ends device `(g, d)`'s placement covering `at` there.
pub fn remove(g: &str, d: &str, mine: &[Interval], at: i64) -> Result<Plan, Conflict> {
    let p = covering(mine, at).ok_or(Conflict::NotPlaced)?;
    let mut plan = Plan::default();
    plan.cut(p, at);
    plan.affected.device(g, d, at, p.end());
    Ok(plan)
}

/// Admits a patient to `bed` from `at` (an open stay). `mine` are the
/// patient's stays ending at or after `at`, `at_bed` the bed's stays
/// overlapping `[at, OPEN)`. Refused when the patient or the bed has a stay
/// at or after `at`; `None` when admitted exactly so already.
pub fn admit(
    mine: &[Interval],
    at_bed: &[Keyed],
    bed: &str,
    at: i64,
    visit: Option<&str>,
) -> Result<Option<Plan>, Conflict> {
    let mine: Vec<&Interval> = mine.iter().filter(|i| i.end() > at).collect();
    if let Some(s) = mine.first() {
        if mine.len() == 1 && s.bed == bed && s.from == at {
            return Ok(None);
        }
        return Err(Conflict::AlreadyAdmitted);
    }
    if at_bed.iter().any(|(_, _, s)| s.end() > at) {
        return Err(Conflict::BedOccupied(bed.to_owned()));
    }
    let mut plan = Plan::default();
    plan.insert.push(NewInterval {
        bed: bed.to_owned(),
        from: at,
        to: None,
        visit: visit.map(str::to_owned),
    });
    plan.affected.bed(bed, at, OPEN);
    Ok(Some(plan))
}

/// Transfers patient `key` to `bed` at `at`: the stay covering `at` ends
/// there and a stay at `bed` (same visit) continues until that stay's end.
/// `mine` are the patient's stays ending at or after `at`, `at_bed` the
/// target bed's stays overlapping `[at, OPEN)`. `None`: already there.
pub fn transfer(
    key: (&str, &str),
    mine: &[Interval],
    at_bed: &[Keyed],
    bed: &str,
    at: i64,
) -> Result<Option<Plan>, Conflict> {
    let s = covering(mine, at).ok_or(Conflict::NotAdmitted)?;
    if s.bed == bed {
        return Ok(None);
    }
    if at_bed
        .iter()
        .any(|(sys, val, o)| o.overlaps(at, s.end()) && (sys.as_str(), val.as_str()) != key)
    {
        return Err(Conflict::BedOccupied(bed.to_owned()));
    }
    let mut plan = Plan::default();
    plan.cut(s, at);
    plan.put_merged(mine, Some(s.id), bed, at, s.to, s.visit.clone());
    plan.affected.bed(&s.bed, at, s.end());
    plan.affected.bed(bed, at, s.end());
    Ok(Some(plan))
}

/// Discharges a patient at `at`: the stay covering `at` ends there and the
/// directly following stays (later transfers of the same admission) are
/// removed. `mine` are the patient's stays ending at or after `at`. `None`:
/// a stay already ends exactly at `at` (a repeat).
pub fn discharge(mine: &[Interval], at: i64) -> Result<Option<Plan>, Conflict> {
    let Some(first) = covering(mine, at) else {
        return if mine.iter().any(|i| i.to == Some(at)) {
            Ok(None)
        } else {
            Err(Conflict::NotAdmitted)
        };
    };
    let mut plan = Plan::default();
    plan.affected.bed(&first.bed, at, first.end());
    plan.cut(first, at);
    let mut end = first.to;
    while let Some(e) = end {
        let Some(next) = covering(mine, e).filter(|n| n.from == e) else {
            break;
        };
        plan.affected.bed(&next.bed, next.from, next.end());
        plan.delete.push(next.id);
        end = next.to;
    }
    Ok(Some(plan))
}

/// An identifier change of a visit: `visit_stays` are the old identifier's
/// stays of the visit (all re-keyed), `new_stays` the new identifier's
/// stays overlapping them. Refused when they overlap.
pub fn change_identifier(
    visit_stays: &[Interval],
    new_stays: &[Interval],
) -> Result<Affected, Conflict> {
    let mut affected = Affected::default();
    for s in visit_stays {
        if new_stays.iter().any(|n| n.overlaps(s.from, s.end())) {
            return Err(Conflict::AlreadyAdmitted);
        }
        affected.bed(&s.bed, s.from, s.end());
    }
    Ok(affected)
}

/// The span `[min from, max end)` covering `stays` (`None` when empty), to
/// load what overlaps them.
pub fn span(stays: &[Interval]) -> Option<(i64, i64)> {
    let lo = stays.iter().map(|s| s.from).min()?;
    let hi = stays.iter().map(Interval::end).max()?;
    Some((lo, hi))
}

/// The device spans of a bed span: the placements at the bed overlapping
/// `[lo, hi)` (loaded as `at_bed`), clipped to it.
pub fn device_spans(lo: i64, hi: i64, at_bed: &[Keyed]) -> Vec<(String, String, i64, i64)> {
    at_bed
        .iter()
        .filter(|(_, _, p)| p.overlaps(lo, hi))
        .map(|(g, d, p)| (g.clone(), d.clone(), lo.max(p.from), hi.min(p.end())))
        .collect()
}

/// The bed windows of a device's `[lo, hi)`: each placement (loaded as
/// overlapping `[lo, hi)`) clipped to it, for loading the stays there.
pub fn bed_windows(lo: i64, hi: i64, placements: &[Interval]) -> Vec<(String, i64, i64)> {
    placements
        .iter()
        .map(|p| (p.bed.clone(), p.from.max(lo), p.end().min(hi)))
        .collect()
}

/// A constant piece of a device's attribution: `[from, to)` and the patient
/// of the stay covering its bed then, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub from: i64,
    pub to: i64,
    pub patient: Option<PatientId>,
}

/// The constant pieces of a device's attribution over `[lo, hi)`, from its
/// placements overlapping the span and the stays (with their patient) of
/// each [`bed_windows`] window, as (bed, patient, stay).
pub fn pieces(
    lo: i64,
    hi: i64,
    placements: &[Interval],
    stays: &[(String, PatientId, Interval)],
) -> Vec<Piece> {
    let mut cuts = std::collections::BTreeSet::from([lo, hi]);
    for (bed, a, b) in bed_windows(lo, hi, placements) {
        cuts.insert(a);
        cuts.insert(b);
        for (_, _, s) in stays
            .iter()
            .filter(|(sb, _, s)| *sb == bed && s.overlaps(a, b))
        {
            cuts.insert(s.from.clamp(a, b));
            cuts.insert(s.end().clamp(a, b));
        }
    }
    let cuts: Vec<i64> = cuts.into_iter().collect();
    let mut out: Vec<Piece> = Vec::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        let who = placements.iter().find(|p| p.covers(x)).and_then(|p| {
            stays
                .iter()
                .find(|(bed, _, s)| *bed == p.bed && s.covers(x))
                .map(|(_, pid, _)| pid.clone())
        });
        match out.last_mut() {
            Some(last) if last.patient == who && last.to == x => last.to = y,
            _ => out.push(Piece {
                from: x,
                to: y,
                patient: who,
            }),
        }
    }
    out
}

/// What a re-attributed reading's columns become (`patient_system`,
/// `patient_id`, `attribution`): the stay's patient, else the static config
/// map's, else nobody.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub system: Option<String>,
    pub value: Option<String>,
    pub how: &'static str,
}

impl Target {
    /// The patient a row gets.
    pub fn subject(&self) -> Option<Subject> {
        Subject::of(self.system.clone(), self.value.clone())
    }

    pub fn of(piece: &Piece, config: Option<&str>) -> Target {
        match (&piece.patient, config) {
            (Some(p), _) => Target {
                system: Some(p.system.clone()),
                value: Some(p.value.clone()),
                how: "stay",
            },
            (None, Some(c)) => Target {
                system: None,
                value: Some(c.to_owned()),
                how: "config",
            },
            (None, None) => Target {
                system: None,
                value: None,
                how: "unattributed",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_000_000;

    fn iv(id: i64, bed: &str, from: i64, to: Option<i64>) -> Interval {
        Interval {
            id,
            bed: bed.into(),
            from,
            to,
            visit: None,
        }
    }

    fn pid(v: &str) -> PatientId {
        PatientId {
            system: "urn:mrn".into(),
            value: v.into(),
        }
    }

    fn keyed(v: &str, i: Interval) -> Keyed {
        ("urn:mrn".into(), v.into(), i)
    }

    #[test]
    fn placing_where_the_device_is_is_a_no_op_and_elsewhere_cuts_and_moves() {
        let mine = [iv(1, "b1", T, None)];
        assert_eq!(place("g", "d", &mine, "b1", T + 5), None);
        let plan = place("g", "d", &mine, "b2", T + 5).unwrap();
        assert_eq!(plan.set_end, vec![(1, Some(T + 5))]);
        assert!(plan.delete.is_empty());
        assert_eq!(
            plan.insert,
            vec![NewInterval {
                bed: "b2".into(),
                from: T + 5,
                to: None,
                visit: None
            }]
        );
        assert_eq!(
            plan.affected.devices,
            vec![("g".into(), "d".into(), T + 5, OPEN)]
        );
        // At the placement's own start: replaced, not shortened to nothing.
        let plan = place("g", "d", &mine, "b2", T).unwrap();
        assert_eq!(plan.delete, vec![1]);
        assert!(plan.set_end.is_empty());
    }

    #[test]
    fn a_back_dated_placement_lasts_until_the_next_and_merges_with_it() {
        // Placed at b1 from T + 10; back-dated to T: one interval.
        let mine = [iv(1, "b1", T + 10, None)];
        let plan = place("g", "d", &mine, "b1", T).unwrap();
        assert_eq!(plan.delete, vec![1]);
        assert_eq!(plan.insert.len(), 1);
        assert_eq!((plan.insert[0].from, plan.insert[0].to), (T, None));
        assert_eq!(
            plan.affected.devices,
            vec![("g".into(), "d".into(), T, T + 10)]
        );
        // At another bed: ends where the next starts.
        let plan = place("g", "d", &mine, "b2", T).unwrap();
        assert!(plan.delete.is_empty());
        assert_eq!(plan.insert[0].to, Some(T + 10));
        // Adjacent before, at the same bed: extended instead of inserted.
        let mine = [iv(1, "b1", T, Some(T + 10)), iv(2, "b2", T + 10, None)];
        let plan = place("g", "d", &mine, "b1", T + 10).unwrap();
        assert_eq!(plan.delete, vec![2]);
        assert_eq!(plan.set_end, vec![(1, None)]);
        assert!(plan.insert.is_empty());
    }

    #[test]
    fn removing_is_half_open_and_needs_a_placement() {
        let mine = [iv(1, "b1", T, Some(T + 10))];
        assert_eq!(remove("g", "d", &mine, T + 10), Err(Conflict::NotPlaced));
        assert_eq!(remove("g", "d", &mine, T - 1), Err(Conflict::NotPlaced));
        let plan = remove("g", "d", &mine, T + 9).unwrap();
        assert_eq!(plan.set_end, vec![(1, Some(T + 9))]);
        assert_eq!(
            plan.affected.devices,
            vec![("g".into(), "d".into(), T + 9, T + 10)]
        );
    }

    #[test]
    fn admission_conflicts_and_repeats() {
        let plan = admit(&[], &[], "b1", T, Some("V1")).unwrap().unwrap();
        assert_eq!(plan.insert[0].visit.as_deref(), Some("V1"));
        assert_eq!(plan.affected.beds, vec![("b1".into(), T, OPEN)]);
        let mine = [iv(1, "b1", T, None)];
        assert_eq!(admit(&mine, &[], "b1", T, None), Ok(None));
        assert_eq!(
            admit(&mine, &[], "b2", T + 1, None),
            Err(Conflict::AlreadyAdmitted)
        );
        // A stay that ended exactly at `at` does not count (half-open).
        let ended = [iv(1, "b1", T, Some(T + 5))];
        assert!(admit(&ended, &[], "b2", T + 5, None).unwrap().is_some());
        // The bed is taken at or after `at`, also by a later stay.
        let later = [keyed("MRN-2", iv(7, "b1", T + 10, None))];
        assert_eq!(
            admit(&[], &later, "b1", T, None),
            Err(Conflict::BedOccupied("b1".into()))
        );
    }

    #[test]
    fn a_back_dated_transfer_splits_the_stay_and_keeps_its_visit() {
        let mut s = iv(1, "b1", T, Some(T + 60));
        s.visit = Some("V1".into());
        let plan = transfer(("urn:mrn", "MRN-1"), &[s], &[], "b2", T + 30)
            .unwrap()
            .unwrap();
        assert_eq!(plan.set_end, vec![(1, Some(T + 30))]);
        assert_eq!(
            plan.insert,
            vec![NewInterval {
                bed: "b2".into(),
                from: T + 30,
                to: Some(T + 60),
                visit: Some("V1".into())
            }]
        );
        assert_eq!(
            plan.affected.beds,
            vec![("b1".into(), T + 30, T + 60), ("b2".into(), T + 30, T + 60)]
        );
        // Transferring again earlier to the same bed merges with the b2 stay.
        let mine = [iv(1, "b1", T, Some(T + 30)), iv(2, "b2", T + 30, None)];
        let plan = transfer(("urn:mrn", "MRN-1"), &mine, &[], "b2", T + 20)
            .unwrap()
            .unwrap();
        assert_eq!(plan.set_end, vec![(1, Some(T + 20))]);
        assert_eq!(plan.delete, vec![2]);
        assert_eq!((plan.insert[0].from, plan.insert[0].to), (T + 20, None));
        // Already there; not admitted; the target bed taken by another.
        assert_eq!(
            transfer(("urn:mrn", "MRN-1"), &mine, &[], "b2", T + 40),
            Ok(None)
        );
        assert_eq!(
            transfer(("urn:mrn", "MRN-1"), &mine, &[], "b2", T - 1),
            Err(Conflict::NotAdmitted)
        );
        let other = [keyed("MRN-2", iv(9, "b3", T + 25, None))];
        assert_eq!(
            transfer(("urn:mrn", "MRN-1"), &mine, &other, "b3", T + 10),
            Err(Conflict::BedOccupied("b3".into()))
        );
        // One that ended before `at` does not block it.
        let gone = [keyed("MRN-2", iv(9, "b3", T, Some(T + 10)))];
        assert!(transfer(("urn:mrn", "MRN-1"), &mine, &gone, "b3", T + 10).is_ok());
    }

    #[test]
    fn discharge_ends_the_admission_including_later_transfers() {
        let mine = [
            iv(1, "b1", T, Some(T + 10)),
            iv(2, "b2", T + 10, Some(T + 20)),
            iv(3, "b3", T + 20, None),
            iv(4, "b1", T + 90, None),
        ];
        let plan = discharge(&mine, T + 5).unwrap().unwrap();
        assert_eq!(plan.set_end, vec![(1, Some(T + 5))]);
        assert_eq!(plan.delete, vec![2, 3]);
        assert_eq!(
            plan.affected.beds,
            vec![
                ("b1".into(), T + 5, T + 10),
                ("b2".into(), T + 10, T + 20),
                ("b3".into(), T + 20, OPEN)
            ]
        );
        // At the admission instant: the stay goes.
        assert_eq!(discharge(&mine[..1], T).unwrap().unwrap().delete, vec![1]);
        // Again at the instant it ends: a repeat; elsewhere not admitted.
        let ended = [iv(1, "b1", T, Some(T + 5))];
        assert_eq!(discharge(&ended, T + 5), Ok(None));
        assert_eq!(discharge(&ended, T + 6), Err(Conflict::NotAdmitted));
    }

    #[test]
    fn an_identifier_change_is_refused_over_the_new_identifiers_stays() {
        let visit = [iv(1, "b1", T, Some(T + 10)), iv(2, "b2", T + 10, None)];
        let a = change_identifier(&visit, &[iv(5, "b4", 0, Some(T))]).unwrap();
        assert_eq!(
            a.beds,
            vec![("b1".into(), T, T + 10), ("b2".into(), T + 10, OPEN)]
        );
        assert_eq!(
            change_identifier(&visit, &[iv(5, "b4", T + 50, None)]),
            Err(Conflict::AlreadyAdmitted)
        );
        assert_eq!(span(&visit), Some((T, OPEN)));
        assert_eq!(span(&[]), None);
    }

    #[test]
    fn pieces_follow_placements_and_stays_half_open() {
        // Device at b1 [T, T+30), at b2 [T+30, ...); patient in b1 [T+10, T+40)
        // then b2 from T+40.
        let placements = [iv(1, "b1", T, Some(T + 30)), iv(2, "b2", T + 30, None)];
        assert_eq!(
            bed_windows(T + 5, T + 100, &placements),
            vec![("b1".into(), T + 5, T + 30), ("b2".into(), T + 30, T + 100)]
        );
        let stays = [
            (
                "b1".to_string(),
                pid("P"),
                iv(7, "b1", T + 10, Some(T + 40)),
            ),
            ("b2".to_string(), pid("P"), iv(8, "b2", T + 40, None)),
        ];
        let got = pieces(T + 5, T + 100, &placements, &stays);
        let want = |from, to, p: Option<&str>| Piece {
            from,
            to,
            patient: p.map(pid),
        };
        assert_eq!(
            got,
            vec![
                want(T + 5, T + 10, None),
                want(T + 10, T + 30, Some("P")),
                want(T + 30, T + 40, None),
                want(T + 40, T + 100, Some("P")),
            ]
        );
        // Adjacent pieces of the same patient are one.
        let stays = [
            ("b1".to_string(), pid("P"), iv(7, "b1", T, Some(T + 30))),
            ("b2".to_string(), pid("P"), iv(8, "b2", T + 30, None)),
        ];
        assert_eq!(
            pieces(T, T + 100, &placements, &stays),
            vec![want(T, T + 100, Some("P"))]
        );
        // No placement: one unattributed piece.
        assert_eq!(pieces(T, T + 1, &[], &[]), vec![want(T, T + 1, None)]);
    }

    #[test]
    fn targets_prefer_the_stay_then_the_config_map() {
        let p = Piece {
            from: 0,
            to: 1,
            patient: Some(pid("P")),
        };
        assert_eq!(Target::of(&p, Some("cfg")).how, "stay");
        let none = Piece { patient: None, ..p };
        let t = Target::of(&none, Some("cfg"));
        assert_eq!(
            (t.value.as_deref(), t.system, t.how),
            (Some("cfg"), None, "config")
        );
        assert_eq!(Target::of(&none, None).how, "unattributed");
    }

    #[test]
    fn device_spans_clip_the_beds_placements() {
        let at_bed = [
            (
                "g".to_string(),
                "d1".to_string(),
                iv(1, "b1", T, Some(T + 10)),
            ),
            ("g".to_string(), "d2".to_string(), iv(2, "b1", T + 10, None)),
        ];
        assert_eq!(
            device_spans(T + 5, T + 20, &at_bed),
            vec![
                ("g".into(), "d1".into(), T + 5, T + 10),
                ("g".into(), "d2".into(), T + 10, T + 20)
            ]
        );
    }

    fn subj(v: &str) -> Option<Subject> {
        Some(Subject {
            system: Some("urn:mrn".into()),
            value: v.into(),
        })
    }

    #[test]
    fn backdated_changes_need_a_clinical_role_and_a_reason() {
        let now = 1_000 * 60 * T;
        let w = 15 * 60 * T;
        // Within the window (or ahead): anyone the route admits.
        for at in [now, now - w, now + 60 * T] {
            assert_eq!(check_reattribution(at, now, w, false, None), Ok(None));
        }
        // Just before the window: a re-attribution.
        let at = now - w - 1;
        assert!(is_backdated(at, now, w) && !is_backdated(now - w, now, w));
        assert_eq!(
            check_reattribution(at, now, w, false, Some("wrong bed")),
            Err(ReattributionRefused::Role)
        );
        assert_eq!(
            check_reattribution(at, now, w, true, None),
            Err(ReattributionRefused::NoReason)
        );
        assert_eq!(
            check_reattribution(at, now, w, true, Some("  ")),
            Err(ReattributionRefused::NoReason)
        );
        assert_eq!(
            check_reattribution(at, now, w, true, Some(" wrong bed ")),
            Ok(Some("wrong bed"))
        );
        // A bad reason is refused even where none is needed.
        let long = "x".repeat(MAX_REASON_CHARS + 1);
        assert_eq!(
            check_reattribution(now, now, w, false, Some(&long)),
            Err(ReattributionRefused::BadReason)
        );
        assert_eq!(
            check_reattribution(now, now, w, true, Some("a\nb")),
            Err(ReattributionRefused::BadReason)
        );
        // A zero window: everything before now.
        assert!(is_backdated(now - 1, now, 0) && !is_backdated(now, now, 0));
    }

    #[test]
    fn a_change_counts_moves_per_patient_pair() {
        let mut c = Change::default();
        c.add(subj("A"), subj("B"), 3);
        c.add(None, subj("B"), 2);
        c.add(subj("A"), subj("B"), 4);
        c.add(subj("B"), subj("B"), 5); // same patient: counted, not a move
        c.add(subj("A"), None, 0);
        assert_eq!(c.reattributed, 14);
        assert_eq!(
            c.moved,
            vec![
                Moved {
                    from: None,
                    to: subj("B"),
                    readings: 2
                },
                Moved {
                    from: subj("A"),
                    to: subj("B"),
                    readings: 7
                },
            ]
        );
        let mut total = Change::default();
        total.add(subj("A"), subj("B"), 1);
        total.merge(c.clone());
        assert_eq!(total.reattributed, 15);
        assert_eq!(total.moved[1].readings, 8);
        let m = &c.moved[1];
        assert_eq!(
            m.describe(),
            "re-attributed 7 reading(s) from Patient/A (urn:mrn) to Patient/B (urn:mrn)"
        );
        assert_eq!(
            m.patients().map(|s| s.value.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(
            c.moved[0].describe(),
            "re-attributed 2 reading(s) from no patient to Patient/B (urn:mrn)"
        );
        assert_eq!(
            Subject::of(Some(String::new()), Some("X".into()))
                .unwrap()
                .system,
            None
        );
        assert_eq!(Subject::of(Some("s".into()), None), None);
    }

    #[test]
    fn audit_entries_name_every_patient_moved() {
        let mut c = Change::default();
        c.add(subj("A"), subj("B"), 30);
        let ctx = AuditContext {
            time_us: 7,
            actor: "user:ann",
            resource: "/api/v1/placements/end",
            outcome: 200,
            what: "placement of g/d ended",
            reason: Some("wrong bed"),
        };
        let e = audit_entries(&ctx, &[], &c);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].patient.as_deref(), Some("A"));
        assert_eq!(e[1].patient.as_deref(), Some("B"));
        assert_eq!(
            e[0].detail,
            "placement of g/d ended; re-attributed 30 reading(s) from Patient/A (urn:mrn) to \
             Patient/B (urn:mrn); reason: wrong bed"
        );
        assert!(
            e.iter()
                .all(|e| e.actor == "user:ann" && e.action == "update" && e.time_us == 7)
        );
        // A named patient without moves still gets its entry; nothing named
        // and nothing moved: none.
        let named = [subj("C").unwrap()];
        let e = audit_entries(&ctx, &named, &Change::default());
        assert_eq!(e.len(), 1);
        assert!(
            e[0].detail.contains("no stored reading changed patient"),
            "{}",
            e[0].detail
        );
        assert!(audit_entries(&ctx, &[], &Change::default()).is_empty());
    }
}
