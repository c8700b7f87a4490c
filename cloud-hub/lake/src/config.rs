//! `[lake]`: where the analytics lake goes and how it is de-identified
//! (docs/lake.md, "Operations").

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the lake's files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// A local directory (`lake.path`).
    Local,
    /// An Azure Blob Storage / ADLS Gen2 container (`[lake.azure]`).
    Azure,
}

/// `[lake]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    pub destination: Destination,
    /// The lake's directory (`destination = "local"`); created 0700.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `[lake.azure]` (`destination = "azure"`).
    #[serde(default)]
    pub azure: Option<AzureConfig>,
    /// The key of the pseudonyms and date shifts (64 hex characters, mode
    /// 0600; `cloud-hub lake keygen`). Keep it outside the lake.
    pub pseudonym_key_file: PathBuf,
    /// 0 (default): silver and gold keep the real times. N: each patient's
    /// times are shifted by the same whole number of days in [-N, N] (never
    /// 0). Fixed for a lake's life.
    #[serde(default)]
    pub date_shift_max_days: u16,
    /// `cloud-hub serve` exports every `interval_s` seconds (0, the
    /// default: only `cloud-hub lake export`).
    #[serde(default)]
    pub interval_s: u64,
    /// Readings per export chunk: at most this many rows per bronze file.
    #[serde(default = "default_rows_per_chunk")]
    pub rows_per_chunk: usize,
    /// Rows stored less than this long ago wait for the next export, so
    /// that a transaction still committing a lower cursor is never skipped.
    #[serde(default = "default_settle_s")]
    pub settle_s: u64,
}

fn default_rows_per_chunk() -> usize {
    100_000
}

fn default_settle_s() -> u64 {
    60
}

/// `[lake.azure]`: a container of a storage account. One credential:
/// `access_key_file`, `sas_file` or `managed_identity = true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    pub account: String,
    /// The container (created beforehand).
    pub container: String,
    /// A path prefix inside the container (e.g. `vigil/lake`); empty: the
    /// container's root.
    #[serde(default)]
    pub prefix: String,
    /// The account key, base64, in a 0600 file.
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    /// A SAS token (query string, with or without the leading `?`) in a
    /// 0600 file.
    #[serde(default)]
    pub sas_file: Option<PathBuf>,
    /// Use the managed identity of the VM / AKS pod (Azure instance
    /// metadata service).
    #[serde(default)]
    pub managed_identity: bool,
    /// The client id of a user-assigned managed identity.
    #[serde(default)]
    pub managed_identity_client_id: Option<String>,
    /// Another blob endpoint than `https://{account}.blob.core.windows.net`
    /// (a private endpoint; Azurite: `http://127.0.0.1:10000/devstoreaccount1`).
    /// Plain `http://` only to a loopback address.
    #[serde(default)]
    pub endpoint: Option<String>,
}

impl LakeConfig {
    /// Makes relative file paths relative to `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        fix(&mut self.pseudonym_key_file);
        if let Some(p) = &mut self.path {
            fix(p);
        }
        if let Some(a) = &mut self.azure {
            for p in [&mut a.access_key_file, &mut a.sas_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
    }

    /// Checks every field; the error names it (dotted TOML path).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: &str| Err((format!("lake.{field}"), msg.to_owned()));
        if self.rows_per_chunk == 0 || self.rows_per_chunk > 1_000_000 {
            return bad("rows_per_chunk", "must be between 1 and 1000000");
        }
        if self.date_shift_max_days > 3650 {
            return bad(
                "date_shift_max_days",
                "must be at most 3650 days (0: times kept)",
            );
        }
        if self.pseudonym_key_file.as_os_str().is_empty() {
            return bad("pseudonym_key_file", "must not be empty");
        }
        match self.destination {
            Destination::Local => {
                if self.path.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                    return bad("path", "is required with destination = \"local\"");
                }
            }
            Destination::Azure => {
                let Some(a) = &self.azure else {
                    return bad("azure", "is required with destination = \"azure\"");
                };
                a.validate()?;
            }
        }
        Ok(())
    }
}

impl AzureConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: &str| Err((format!("lake.azure.{field}"), msg.to_owned()));
        if self.account.is_empty() {
            return bad("account", "must not be empty");
        }
        if self.container.is_empty() {
            return bad("container", "must not be empty");
        }
        let credentials = usize::from(self.access_key_file.is_some())
            + usize::from(self.sas_file.is_some())
            + usize::from(self.managed_identity);
        if credentials != 1 {
            return bad(
                "access_key_file",
                "set exactly one of access_key_file, sas_file or managed_identity = true",
            );
        }
        if self.managed_identity_client_id.is_some() && !self.managed_identity {
            return bad(
                "managed_identity_client_id",
                "needs managed_identity = true",
            );
        }
        if let Some(e) = &self.endpoint {
            let Some(rest) = e
                .strip_prefix("https://")
                .or_else(|| e.strip_prefix("http://"))
            else {
                return bad("endpoint", "must be an http:// or https:// URL");
            };
            if e.starts_with("http://") && !is_loopback_host(rest) {
                return bad(
                    "endpoint",
                    "plain http:// is allowed only to a loopback address (127.0.0.1, [::1], localhost)",
                );
            }
        }
        Ok(())
    }
}

/// Whether the authority at the start of `rest` (`host[:port]/…`) is a
/// loopback host.
fn is_loopback_host(rest: &str) -> bool {
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LakeConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn local_and_azure_configs_validate_and_name_the_field() {
        let ok = parse("destination = \"local\"\npath = \"lake\"\npseudonym_key_file = \"k\"\n");
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.rows_per_chunk, 100_000);
        assert_eq!(ok.settle_s, 60);
        let no_path = parse("destination = \"local\"\npseudonym_key_file = \"k\"\n");
        assert_eq!(no_path.validate().unwrap_err().0, "lake.path");
        let azure = |extra: &str| {
            parse(&format!(
                "destination = \"azure\"\npseudonym_key_file = \"k\"\n[azure]\naccount = \"a\"\ncontainer = \"c\"\n{extra}"
            ))
        };
        assert_eq!(azure("managed_identity = true").validate(), Ok(()));
        assert_eq!(azure("sas_file = \"s\"").validate(), Ok(()));
        assert_eq!(
            azure("").validate().unwrap_err().0,
            "lake.azure.access_key_file"
        );
        assert_eq!(
            azure("sas_file = \"s\"\naccess_key_file = \"k\"")
                .validate()
                .unwrap_err()
                .0,
            "lake.azure.access_key_file"
        );
        assert_eq!(
            azure("access_key_file = \"k\"\nendpoint = \"http://10.0.0.1:10000/x\"")
                .validate()
                .unwrap_err()
                .0,
            "lake.azure.endpoint"
        );
        assert_eq!(
            azure(
                "access_key_file = \"k\"\nendpoint = \"http://127.0.0.1:10000/devstoreaccount1\""
            )
            .validate(),
            Ok(())
        );
        let big = parse(
            "destination = \"local\"\npath = \"l\"\npseudonym_key_file = \"k\"\ndate_shift_max_days = 4000\n",
        );
        assert_eq!(big.validate().unwrap_err().0, "lake.date_shift_max_days");
        assert!(
            toml::from_str::<LakeConfig>(
                "destination = \"local\"\npath = \"l\"\npseudonym_key_file = \"k\"\ntypo = 1\n"
            )
            .is_err()
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let mut c = parse(
            "destination = \"azure\"\npseudonym_key_file = \"k\"\n[azure]\naccount = \"a\"\ncontainer = \"c\"\nsas_file = \"s\"\n",
        );
        c.resolve_paths(Path::new("/etc/vigil"));
        assert_eq!(c.pseudonym_key_file, Path::new("/etc/vigil/k"));
        assert_eq!(
            c.azure.unwrap().sas_file.unwrap(),
            Path::new("/etc/vigil/s")
        );
    }
}
