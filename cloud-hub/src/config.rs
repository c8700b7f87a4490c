//! Hub configuration: a TOML file (see `hub.example.toml`), typed with serde,
//! plus environment overrides and validation that names the offending field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable overriding `server.bind`.
pub const ENV_BIND: &str = "VIGIL_HUB_BIND";
/// Environment variable overriding `storage.sqlite_path`.
pub const ENV_SQLITE_PATH: &str = "VIGIL_HUB_SQLITE_PATH";

/// Default limit for an ingest body (4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A field has an invalid value; `field` is its dotted TOML path.
    #[error("invalid config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub fhir: FhirConfig,
    /// Static device → patient mapping (temporary, until an ADT/association
    /// API exists).
    #[serde(default)]
    pub associations: Vec<Association>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    pub bind: String,
    /// Ingest bodies larger than this get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Allow plaintext HTTP on a non-loopback address (e.g. behind a
    /// TLS-terminating ingress).
    #[serde(default)]
    pub allow_plaintext: bool,
    /// `[server.tls]`: serve HTTPS.
    pub tls: Option<TlsConfig>,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key; must not be group/world readable.
    pub key_file: PathBuf,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// SQLite database file; relative paths are relative to the config
    /// file's directory.
    pub sqlite_path: PathBuf,
}

/// `[fhir]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// Public base URL of the FHIR API (e.g. `https://hub.example.org/fhir`),
    /// used for `fullUrl` and paging links. Derived from the request's
    /// `Host` header when absent.
    pub base_url: Option<String>,
}

/// `[[associations]]`: a device of a gateway is attached to a patient.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Association {
    pub gateway_id: String,
    pub device_id: String,
    /// FHIR Patient logical id.
    pub patient_id: String,
}

impl Config {
    /// Reads `path`, applies the environment overrides (`VIGIL_HUB_BIND`,
    /// `VIGIL_HUB_SQLITE_PATH`), resolves relative paths against the config
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
        if let Some(tls) = &mut self.server.tls {
            fix(&mut tls.cert_file);
            fix(&mut tls.key_file);
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
        if let Some(url) = &self.fhir.base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "fhir.base_url",
                "must be an absolute http:// or https:// URL",
            ));
        }
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
        self.fhir
            .base_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned())
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
        assert_eq!(c.associations.len(), 1);
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
