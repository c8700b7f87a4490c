//! `[identifiers]`: patient identifier systems as URIs
//! ([`hub_domain::identifiers`]), applied where patient identifiers enter
//! the hub (ingest: each reading's `subject.system`; the ADT listener:
//! PID-3 / MSH-4; the association API; FHIR `patient:identifier` searches),
//! and the migration of systems stored before the mapping existed.

use std::collections::BTreeMap;
use std::sync::Arc;

use hub_domain::audit::Entry;
pub use hub_domain::identifiers::{DEFAULT_BASE_URI, IdentifierSystems, is_absolute_uri};
use hub_storage::SystemsMigrated;
use serde::Deserialize;
use shared_protocol::v1::Batch;

use crate::ConfigError;
use crate::store::{Store, now_us};

/// `[identifiers]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentifiersConfig {
    /// Prefix of the system of an authority without a table entry (default
    /// `urn:vigil:authority:`).
    #[serde(default = "default_base_uri")]
    pub base_uri: String,
    /// `[identifiers.authorities]`: assigning authority → system URI.
    #[serde(default)]
    pub authorities: BTreeMap<String, String>,
    /// `[identifiers.facilities]`: ADT sending facility (MSH-4) → system
    /// URI of PID-3 identifiers without an assigning authority.
    #[serde(default)]
    pub facilities: BTreeMap<String, String>,
}

fn default_base_uri() -> String {
    DEFAULT_BASE_URI.into()
}

impl Default for IdentifiersConfig {
    fn default() -> Self {
        Self {
            base_uri: default_base_uri(),
            authorities: BTreeMap::new(),
            facilities: BTreeMap::new(),
        }
    }
}

impl IdentifiersConfig {
    /// The mapping.
    pub fn systems(&self) -> IdentifierSystems {
        IdentifierSystems {
            base_uri: self.base_uri.clone(),
            authorities: self.authorities.clone(),
            facilities: self.facilities.clone(),
        }
    }

    /// Checks every URI; errors name the field (`identifiers.base_uri`,
    /// `identifiers.authorities."HOSP"`, …).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.systems()
            .validate()
            .map_err(|e| ConfigError::invalid(format!("identifiers.{}", e.field), e.message))
    }
}

/// Maps the `subject.system` of every reading of `batch` to its URI (the
/// stored payload then carries the URI, as every row's patient system).
pub fn map_batch(systems: &IdentifierSystems, batch: &mut Batch) {
    for entry in &mut batch.devices {
        for r in &mut entry.readings {
            if let Some(s) = r.subject.as_mut()
                && !s.system.is_empty()
            {
                let mapped = systems.system_uri(&s.system);
                if mapped != s.system {
                    s.system = mapped;
                }
            }
        }
    }
}

/// Migrates stored systems that are not URIs (see
/// `AssociationStore::migrate_patient_systems`), logs the counts (never a
/// system or identifier) and, when something changed, appends an audit
/// entry as actor `system`. Blocking: run at hub start.
pub fn migrate_stored(
    store: &Store,
    systems: &Arc<IdentifierSystems>,
    keys: &crate::audit::AuditKeys,
) -> Result<SystemsMigrated, hub_storage::AssocError> {
    let map = systems.clone();
    let done = store.migrate_patient_systems(&move |s: &str| map.system_uri(s))?;
    if done == SystemsMigrated::default() {
        tracing::debug!("stored patient identifier systems are URIs already");
        return Ok(done);
    }
    tracing::info!(
        systems = done.systems,
        stays = done.stays,
        observations = done.observations,
        "stored patient identifier systems migrated to URIs ([identifiers])"
    );
    let entry = Entry {
        time_us: now_us(),
        actor: "system".into(),
        action: "update".into(),
        resource: "identifier-systems-migration".into(),
        patient: None,
        patients: Vec::new(),
        outcome: 0,
        detail: format!(
            "systems={} stays={} observations={}",
            done.systems, done.stays, done.observations
        ),
    };
    if let Err(e) = crate::audit::append(store, keys, &entry) {
        tracing::error!(error = %e, "audit entry of the identifier system migration not written");
    }
    Ok(done)
}
