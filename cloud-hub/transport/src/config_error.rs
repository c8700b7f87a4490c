//! The configuration error (a leaf module, so that each config section's
//! module can validate itself without depending on the whole config, which
//! the composition root composes and loads).

use std::path::PathBuf;

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
    /// An invalid value of `field` (its dotted TOML path).
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
