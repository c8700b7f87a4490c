//! Hub configuration: a TOML file (see `hub.example.toml`), typed with serde,
//! plus environment overrides and validation that names the offending field.
//! Each section's type lives with the piece that uses it (the transport
//! layer's modules, `store.rs` for `[storage]`); [`Config`] composes them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable overriding `server.bind`.
pub const ENV_BIND: &str = "VIGIL_HUB_BIND";
/// Environment variable overriding `storage.sqlite_path`.
pub const ENV_SQLITE_PATH: &str = "VIGIL_HUB_SQLITE_PATH";

pub use crate::store::{StorageBackend, StorageConfig};

// Each transport piece owns its section; this file composes them.
pub use hub_transport::ConfigError;
pub use hub_transport::access::AuthConfig;
pub use hub_transport::association::Association;
pub use hub_transport::fhir_api::FhirConfig;
pub use hub_transport::ingest_api::IngestConfig;
pub use hub_transport::mqtt_ingest::{
    DEFAULT_MQTT_GROUP, DEFAULT_MQTT_PORT, DEFAULT_MQTT_SESSION_EXPIRY_S,
    DEFAULT_MQTT_TOPIC_FILTER, MqttConfig, MqttTlsConfig,
};
pub use hub_transport::server::{ClientAuth, DEFAULT_MAX_BODY_BYTES, ServerConfig, TlsConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub fhir: FhirConfig,
    /// `[association]`: the bed/placement/stay API (see `association_api`).
    #[serde(default)]
    pub association: hub_transport::association_api::AssociationConfig,
    /// `[adt]`: HL7 v2 ADT listener over MLLP (off when absent).
    #[serde(default)]
    pub adt: Option<hub_transport::adt_listener::AdtConfig>,
    /// Static device → patient mapping: the fallback after a reading's own
    /// subject and the bed stays (see `association`).
    #[serde(default)]
    pub associations: Vec<Association>,
    /// `[ingest]`: per-gateway rate limits of the HTTP ingest.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// `[mqtt]`: also consume batches from an MQTT 5 broker (optional).
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// `[kafka]`: also consume batches from a Kafka topic / Event Hub
    /// (optional; see `kafka_ingest`).
    #[serde(default)]
    pub kafka: Option<hub_transport::kafka_ingest::KafkaConfig>,
    /// `[scores]`: early-warning scores from stored data (see `early_warning`).
    #[serde(default)]
    pub scores: hub_transport::early_warning::ScoresConfig,
    /// `[alerts]`: the alert engine (see `alerts`).
    #[serde(default)]
    pub alerts: hub_transport::alerts::AlertsConfig,
    /// `[auth]`: sessions and OIDC (see `access`, docs/access.md).
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[identifiers]`: HL7 assigning authorities / sending facilities →
    /// identifier system URIs (see docs/hub.md).
    #[serde(default)]
    pub identifiers: hub_transport::identifiers::IdentifiersConfig,
    /// `[audit]`: the audit key and checkpoints (see `audit`,
    /// docs/operations.md "Audit log").
    #[serde(default)]
    pub audit: hub_transport::audit::AuditConfig,
    /// `[retention]`: how long each data class is kept (docs/privacy.md).
    #[serde(default)]
    pub retention: RetentionConfig,
    /// `[lake]`: the de-identified analytics lake (docs/lake.md; off when
    /// absent).
    #[serde(default)]
    pub lake: Option<hub_lake::LakeConfig>,
}

/// `[retention]`: days each data class is kept, by its own time; unset =
/// keep. Rows of patients under a legal hold are always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Readings (observations by effective time), device events, rejected
    /// readings. Defaults to `storage.retention_days`.
    pub readings_days: Option<u32>,
    /// Chart buckets and score history. Defaults to `storage.retention_days`.
    pub aggregates_days: Option<u32>,
    /// Resolved alerts and their transitions, by resolution time.
    pub alerts_days: Option<u32>,
    /// The audit log, purged only up to a signed checkpoint older than the
    /// window (needs the audit key); never shorter than another class.
    pub audit_days: Option<u32>,
    /// FHIR bulk export jobs and their files, by start time (hours).
    pub exports_hours: Option<u32>,
}

impl RetentionConfig {
    /// The classes' days with `storage.retention_days` as the fallback of
    /// readings and aggregates; None when nothing is purged.
    pub fn effective(&self, storage_days: Option<u32>) -> Option<RetentionConfig> {
        let r = RetentionConfig {
            readings_days: self.readings_days.or(storage_days),
            aggregates_days: self.aggregates_days.or(storage_days),
            alerts_days: self.alerts_days,
            audit_days: self.audit_days,
            // Applied by the serving hub's export jobs, not by a purge.
            exports_hours: None,
        };
        (r != RetentionConfig::default()).then_some(r)
    }
}

/// Environment variable overriding `lake.pseudonym_key_file`.
pub const ENV_LAKE_KEY_FILE: &str = "VIGIL_HUB_LAKE_PSEUDONYM_KEY_FILE";

/// Environment variable overriding `mqtt.client_id` (one per hub instance).
pub const ENV_MQTT_CLIENT_ID: &str = "VIGIL_HUB_MQTT_CLIENT_ID";

impl Config {
    /// Reads `path`, applies the environment overrides (`VIGIL_HUB_BIND`,
    /// `VIGIL_HUB_SQLITE_PATH`, `VIGIL_HUB_AUDIT_KEY_FILE`, …), resolves relative paths against the config
    /// file's directory and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut config = Self::parse(&text)?;
        config.apply_overrides(
            std::env::var(ENV_BIND).ok().filter(|s| !s.is_empty()),
            std::env::var(ENV_SQLITE_PATH)
                .ok()
                .filter(|s| !s.is_empty()),
        );
        if let (Some(m), Ok(id)) = (&mut config.mqtt, std::env::var(ENV_MQTT_CLIENT_ID))
            && !id.is_empty()
        {
            m.client_id = id;
        }
        if let (Some(k), Ok(id)) = (
            &mut config.kafka,
            std::env::var(hub_transport::kafka_ingest::ENV_KAFKA_REPLICA_ID),
        ) && !id.is_empty()
        {
            k.replica_id = id;
        }
        if let Ok(p) = std::env::var(hub_transport::audit::ENV_AUDIT_KEY_FILE)
            && !p.is_empty()
        {
            config.audit.key_file = Some(PathBuf::from(p));
        }
        if let (Some(l), Ok(p)) = (&mut config.lake, std::env::var(ENV_LAKE_KEY_FILE))
            && !p.is_empty()
        {
            l.pseudonym_key_file = PathBuf::from(p);
        }
        if let (Some(pg), Ok(url)) = (
            &mut config.storage.postgres,
            std::env::var(crate::pg::ENV_PG_URL),
        ) && !url.is_empty()
        {
            pg.url = url;
        }
        config.resolve_paths(base_dir);
        config.validate_fields()?;
        Ok(config)
    }

    /// Parses TOML text without overrides, path resolution or validation.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Applies override values (as taken from the environment).
    pub fn apply_overrides(&mut self, bind: Option<String>, sqlite_path: Option<String>) {
        if let Some(bind) = bind {
            self.server.bind = bind;
        }
        if let Some(p) = sqlite_path {
            self.storage.sqlite_path = PathBuf::from(p);
        }
    }

    /// Makes relative file paths relative to `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        fix(&mut self.storage.sqlite_path);
        if let Some(pg) = &mut self.storage.postgres {
            for p in [&mut pg.password_file, &mut pg.ca_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        if let Some(p) = &mut self.association.admin_token_file {
            fix(p);
        }
        if let Some(adt) = &mut self.adt {
            adt.resolve_paths(base_dir);
        }
        self.audit.resolve_paths(base_dir);
        if let Some(l) = &mut self.lake {
            l.resolve_paths(base_dir);
        }
        if let Some(o) = &mut self.auth.oidc {
            for p in [&mut o.jwks_file, &mut o.ca_file].into_iter().flatten() {
                fix(p);
            }
        }
        if let Some(tls) = &mut self.server.tls {
            fix(&mut tls.cert_file);
            fix(&mut tls.key_file);
            if let Some(ca) = &mut tls.client_ca_file {
                fix(ca);
            }
        }
        if let Some(k) = &mut self.kafka {
            for p in [&mut k.ca_file, &mut k.connection_string_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        if let Some(m) = &mut self.mqtt {
            if let Some(p) = &mut m.password_file {
                fix(p);
            }
            if let Some(t) = &mut m.tls {
                for p in [&mut t.ca_file, &mut t.cert_file, &mut t.key_file]
                    .into_iter()
                    .flatten()
                {
                    fix(p);
                }
            }
        }
    }

    /// The parsed `server.bind` address.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.bind.parse().map_err(|e| {
            ConfigError::invalid(
                "server.bind",
                format!("`{}` is not an IP:port address: {e}", self.server.bind),
            )
        })
    }

    /// Checks the rules a file cannot express by its shape alone, including
    /// "TLS by default off loopback" (see [`Config::validate_fields`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_fields()?;
        check_plaintext_allowed(self, self.bind_addr()?)
    }

    /// Checks every field's value, but not the serving rule that plaintext
    /// off loopback needs `server.allow_plaintext` (so gateway administration
    /// works with any serving setup). [`Config::load`] runs this; serving
    /// runs [`Config::validate`].
    pub fn validate_fields(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        self.scores
            .validate()
            .map_err(|(field, message)| ConfigError::invalid(field, message))?;
        self.alerts.validate()?;
        self.auth.validate()?;
        self.identifiers.validate()?;
        self.audit.validate()?;
        if let Some(l) = &self.lake {
            l.validate()
                .map_err(|(field, message)| ConfigError::invalid(field, message))?;
        }
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.storage.sqlite_path.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "storage.sqlite_path",
                "must not be empty",
            ));
        }
        match (&self.storage.backend, &self.storage.postgres) {
            (StorageBackend::Postgres, None) => {
                return Err(ConfigError::invalid(
                    "storage.postgres",
                    "is required with storage.backend = \"postgres\"",
                ));
            }
            (_, Some(pg)) => pg
                .validate()
                .map_err(|(field, message)| ConfigError::invalid(field, message))?,
            (StorageBackend::Sqlite, None) => {}
        }
        for (field, days) in [
            ("storage.retention_days", self.storage.retention_days),
            ("retention.readings_days", self.retention.readings_days),
            ("retention.aggregates_days", self.retention.aggregates_days),
            ("retention.alerts_days", self.retention.alerts_days),
            ("retention.audit_days", self.retention.audit_days),
        ] {
            if let Some(d) = days
                && !(1..=36_500).contains(&d)
            {
                return Err(ConfigError::invalid(
                    field,
                    "must be between 1 and 36500 days (leave it out to keep everything)",
                ));
            }
        }
        if self.retention.exports_hours == Some(0) {
            return Err(ConfigError::invalid(
                "retention.exports_hours",
                "must be at least 1 hour (leave it out to keep export files until cancelled)",
            ));
        }
        if let Some(audit) = self.retention.audit_days {
            let r = self.retention.effective(self.storage.retention_days);
            let longest = r
                .iter()
                .flat_map(|r| [r.readings_days, r.aggregates_days, r.alerts_days])
                .flatten()
                .max();
            if longest.is_some_and(|l| audit < l) {
                return Err(ConfigError::invalid(
                    "retention.audit_days",
                    "must be at least the longest other retention: the record of who accessed \
                     the data outlives the data",
                ));
            }
        }
        if let Some(tls) = &self.server.tls
            && tls.client_auth.is_some()
            && tls.client_ca_file.is_none()
        {
            return Err(ConfigError::invalid(
                "server.tls.client_auth",
                "needs server.tls.client_ca_file (the CA that issues client certificates)",
            ));
        }
        if let Some(url) = &self.fhir.base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "fhir.base_url",
                "must be an absolute http:// or https:// URL",
            ));
        }
        self.ingest.validate()?;
        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        if let Some(k) = &self.kafka {
            k.validate()?;
        }
        if let Some(adt) = &self.adt {
            adt.validate()?;
        }
        self.association.validate()?;
        let mut seen = HashSet::new();
        for (i, a) in self.associations.iter().enumerate() {
            let field = |name: &str| format!("associations[{i}].{name}");
            if a.gateway_id.is_empty() {
                return Err(ConfigError::invalid(
                    field("gateway_id"),
                    "must not be empty",
                ));
            }
            if a.device_id.is_empty() {
                return Err(ConfigError::invalid(
                    field("device_id"),
                    "must not be empty",
                ));
            }
            if !crate::fhir::is_valid_id(&a.patient_id) {
                return Err(ConfigError::invalid(
                    field("patient_id"),
                    "must be a FHIR id ([A-Za-z0-9-.]{1,64})",
                ));
            }
            if !seen.insert((&a.gateway_id, &a.device_id)) {
                return Err(ConfigError::invalid(
                    field("device_id"),
                    format!(
                        "device `{}` of gateway `{}` is associated twice",
                        a.device_id, a.gateway_id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The base URL with any trailing slash removed.
    pub fn fhir_base_url(&self) -> Option<String> {
        self.fhir.base_url()
    }
}

/// "TLS by default off loopback": plaintext on a non-loopback address needs
/// `server.allow_plaintext = true`.
pub(crate) fn check_plaintext_allowed(
    config: &Config,
    addr: SocketAddr,
) -> Result<(), ConfigError> {
    if config.server.tls.is_none() && !addr.ip().is_loopback() && !config.server.allow_plaintext {
        return Err(ConfigError::invalid(
            "server.tls",
            format!(
                "{addr} is not a loopback address: configure [server.tls], or set \
                 server.allow_plaintext = true when a TLS-terminating proxy is in front"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        bind = "127.0.0.1:8080"
        [storage]
        sqlite_path = "hub.sqlite"
    "#;

    #[test]
    fn retention_classes_fall_back_to_the_storage_window_and_are_checked() {
        let c = Config::parse(&format!(
            "{MINIMAL}retention_days = 30\n[retention]\nalerts_days = 400\n"
        ))
        .unwrap();
        assert_eq!(
            c.retention.effective(c.storage.retention_days),
            Some(RetentionConfig {
                readings_days: Some(30),
                aggregates_days: Some(30),
                alerts_days: Some(400),
                audit_days: None,
                exports_hours: None,
            })
        );
        let err = Config::parse(&format!(
            "{MINIMAL}retention_days = 30\n[retention]\naudit_days = 20\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("retention.audit_days"), "{err}");
        assert_eq!(RetentionConfig::default().effective(None), None);
        let err = Config::parse(&format!("{MINIMAL}[retention]\naggregates_days = 0\n"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.aggregates_days"), "{err}");
    }

    #[test]
    fn retention_days_are_checked() {
        let with = |d: &str| {
            Config::parse(&format!("{MINIMAL}retention_days = {d}\n"))
                .unwrap()
                .validate()
        };
        assert!(with("30").is_ok());
        let err = with("0").unwrap_err().to_string();
        assert!(err.contains("storage.retention_days"), "{err}");
        assert!(with("36501").is_err());
    }

    #[test]
    fn example_file_parses_and_validates() {
        let text = include_str!("../hub.example.toml");
        let mut c = Config::parse(text).unwrap();
        c.resolve_paths(Path::new("/etc/vigil"));
        c.validate().unwrap();
        assert_eq!(
            c.storage.sqlite_path,
            Path::new("/etc/vigil/vigil-hub.sqlite")
        );
        assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        // Copying the example must not silently assign a device to a patient.
        assert!(
            c.associations.is_empty(),
            "hub.example.toml must ship no active [[associations]]"
        );
    }

    #[test]
    fn lake_section_validates_naming_the_field_and_resolves_paths() {
        let lake = "[lake]\ndestination = \"azure\"\npseudonym_key_file = \"lake.key\"\n\
                    [lake.azure]\naccount = \"a\"\ncontainer = \"c\"\n";
        let c = Config::parse(&format!("{MINIMAL}\n{lake}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`lake.azure.access_key_file`"), "{e}");
        let mut c = Config::parse(&format!("{MINIMAL}\n{lake}sas_file = \"s.sas\"\n")).unwrap();
        c.validate().unwrap();
        c.resolve_paths(Path::new("/etc/vigil"));
        let l = c.lake.unwrap();
        assert_eq!(l.pseudonym_key_file, Path::new("/etc/vigil/lake.key"));
        assert_eq!(
            l.azure.unwrap().sas_file.unwrap(),
            Path::new("/etc/vigil/s.sas")
        );
    }

    #[test]
    fn kafka_section_validates_naming_the_field_and_resolves_paths() {
        let kafka = "[kafka]\nbrokers = [\"ns.servicebus.windows.net:9093\"]\ntopic = \"vigil\"\nreplica_id = \"hub-1\"\nconnection_string_file = \"eh.conn\"\n";
        let mut c = Config::parse(&format!("{MINIMAL}\n{kafka}")).unwrap();
        c.validate().unwrap();
        c.resolve_paths(Path::new("/etc/vigil"));
        let k = c.kafka.as_ref().unwrap();
        assert!(k.uses_tls());
        assert_eq!(
            k.connection_string_file.as_deref(),
            Some(Path::new("/etc/vigil/eh.conn"))
        );
        c.kafka.as_mut().unwrap().tls = Some(false);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("kafka.tls"), "{err}");
        c.kafka.as_mut().unwrap().tls = None;
        c.kafka.as_mut().unwrap().lease_ms = 1;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("kafka.lease_ms"), "{err}");
        // The connection string itself is not a config field.
        let err =
            Config::parse(&format!("{MINIMAL}\n{kafka}connection_string = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("connection_string"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse(&format!("{MINIMAL}\n[fhir]\nbase = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("base"), "{err}");
    }

    #[test]
    fn non_loopback_plaintext_is_refused_naming_server_tls() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.apply_overrides(Some("0.0.0.0:8080".into()), None);
        let err = c.validate().unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid { field, .. } if field == "server.tls"));
        c.server.allow_plaintext = true;
        c.validate().unwrap();
    }

    #[test]
    fn bad_bind_names_the_field() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.server.bind = "localhost".into();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("server.bind"), "{err}");
    }

    #[test]
    fn bad_association_names_the_field() {
        let text = format!(
            "{MINIMAL}\n[[associations]]\ngateway_id = \"g\"\ndevice_id = \"d\"\npatient_id = \"no spaces\"\n"
        );
        let err = Config::parse(&text).unwrap().validate().unwrap_err();
        assert!(
            err.to_string().contains("associations[0].patient_id"),
            "{err}"
        );
    }

    #[test]
    fn mqtt_and_ingest_sections_validate_naming_the_field() {
        let mqtt = "[mqtt]\nhost = \"broker.example.org\"\nclient_id = \"hub-1\"\n";
        let c = Config::parse(&format!("{MINIMAL}\n{mqtt}")).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("mqtt.tls"), "{err}");
        let mut c = Config::parse(&format!("{MINIMAL}\n{mqtt}[mqtt.tls]\n")).unwrap();
        c.validate().unwrap();
        let m = c.mqtt.as_ref().unwrap();
        assert_eq!(
            (m.port, m.group.as_str(), m.topic_filter.as_str()),
            (8883, "vigil-hub", "devices/+/messages/events/#")
        );
        c.mqtt.as_mut().unwrap().topic_filter = "devices/#/x".into();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("mqtt.topic_filter"), "{err}");
        c.mqtt.as_mut().unwrap().topic_filter = "devices/+/messages/events/#".into();
        c.mqtt.as_mut().unwrap().username = Some("hub".into());
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("mqtt.password_file"), "{err}");

        let c = Config::parse(&format!(
            "{MINIMAL}\n[ingest]\nrate_limit_batches_per_s = 0.0\n"
        ))
        .unwrap();
        let err = c.validate().unwrap_err();
        assert!(
            err.to_string().contains("ingest.rate_limit_batches_per_s"),
            "{err}"
        );
        let c = Config::parse(&format!(
            "{MINIMAL}\n[ingest]\nrate_limit_batches_per_s = 2.5\n"
        ))
        .unwrap();
        assert_eq!(c.ingest.rate_limit(), Some((2.5, 3)));
    }

    #[test]
    fn absolute_paths_are_kept() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.apply_overrides(None, Some("/var/lib/vigil/hub.sqlite".into()));
        c.resolve_paths(Path::new("/etc"));
        assert_eq!(
            c.storage.sqlite_path,
            Path::new("/var/lib/vigil/hub.sqlite")
        );
    }
}
