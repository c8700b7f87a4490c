//! The lake's object store: a local directory or an Azure Blob Storage
//! container, through `object_store`, driven from blocking code (the
//! export runs on a blocking thread; the sink owns a small runtime for the
//! store's async calls).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::LakeError;
use crate::config::{Destination, LakeConfig};
use crate::key::read_private;

/// An open lake destination.
#[derive(Debug)]
pub struct Sink {
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    prefix: String,
    /// A local destination's directory: each put is fsynced (file and
    /// directory), so the state object never counts a file a power loss
    /// could take back.
    local_root: Option<std::path::PathBuf>,
    /// Where it is, for logs and the summary (no credential).
    pub location: String,
}

fn store_error(op: &'static str, path: &str, source: object_store::Error) -> LakeError {
    LakeError::Store {
        op,
        path: path.to_owned(),
        source: Box::new(source),
    }
}

impl Sink {
    /// Opens the configured destination (a local directory is created,
    /// mode 0700). Credential files must be private (0600).
    pub fn open(config: &LakeConfig) -> Result<Self, LakeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LakeError::Runtime)?;
        let local_root = match config.destination {
            Destination::Local => config.path.clone(),
            Destination::Azure => None,
        };
        let (store, prefix, location): (Arc<dyn ObjectStore>, String, String) = match config
            .destination
        {
            Destination::Local => {
                let dir = config.path.as_deref().ok_or_else(|| {
                    LakeError::Config("lake.path is required with destination = \"local\"".into())
                })?;
                vigil_io::private_fs::create_dir_all(dir).map_err(|source| LakeError::Local {
                    path: dir.to_owned(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| store_error("open", &dir.display().to_string(), e))?;
                (Arc::new(fs), String::new(), dir.display().to_string())
            }
            Destination::Azure => {
                let a = config.azure.as_ref().ok_or_else(|| {
                    LakeError::Config(
                        "[lake.azure] is required with destination = \"azure\"".into(),
                    )
                })?;
                // reqwest is built without a bundled provider: ring, as
                // everywhere in the hub (already installed when serving).
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = MicrosoftAzureBuilder::new()
                    .with_account(&a.account)
                    .with_container_name(&a.container);
                if let Some(e) = &a.endpoint {
                    b = b
                        .with_endpoint(e.trim_end_matches('/').to_owned())
                        .with_allow_http(e.starts_with("http://"));
                }
                if let Some(p) = &a.access_key_file {
                    let key = read_private(p, "lake.azure.access_key_file")?;
                    b = b.with_access_key(String::from_utf8_lossy(key.trim_ascii()));
                } else if let Some(p) = &a.sas_file {
                    let sas = read_private(p, "lake.azure.sas_file")?;
                    let sas = String::from_utf8_lossy(sas.trim_ascii()).into_owned();
                    b = b.with_config(
                        AzureConfigKey::SasKey,
                        sas.trim_start_matches('?').to_owned(),
                    );
                } else if a.managed_identity {
                    b = b.with_credential_type("managed_identity");
                    if let Some(id) = &a.managed_identity_client_id {
                        b = b.with_client_id(id);
                    }
                }
                let store = b
                    .build()
                    .map_err(|e| store_error("open", &a.container, e))?;
                let location = format!(
                    "azure://{}/{}/{}",
                    a.account,
                    a.container,
                    a.prefix.trim_matches('/')
                );
                (
                    Arc::new(store),
                    a.prefix.trim_matches('/').to_owned(),
                    location,
                )
            }
        };
        Ok(Self {
            store,
            rt,
            prefix,
            local_root,
            location,
        })
    }

    fn path(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Writes (or replaces) the object `rel`.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), LakeError> {
        let path = self.path(rel);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map_err(|e| store_error("put", rel, e))?;
        if let Some(root) = &self.local_root {
            let file = root.join(rel);
            sync_path(&file)
                .and_then(|()| file.parent().map_or(Ok(()), sync_path))
                .map_err(|source| LakeError::Local { path: file, source })?;
        }
        Ok(())
    }

    /// The object `rel`, None when it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Bytes>, LakeError> {
        let path = self.path(rel);
        self.rt
            .block_on(async {
                match self.store.get(&path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| store_error("get", rel, e))
    }

    /// Removes the object `rel` (absent is fine).
    pub fn delete(&self, rel: &str) -> Result<(), LakeError> {
        let path = self.path(rel);
        match self.rt.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error("delete", rel, e)),
        }
        // A removal (an erasure) must not come back after a power loss.
        if let Some(dir) = self
            .local_root
            .as_ref()
            .and_then(|r| r.join(rel).parent().map(|p| p.to_owned()))
            && dir.exists()
        {
            sync_path(&dir).map_err(|source| LakeError::Local { path: dir, source })?;
        }
        Ok(())
    }

    /// The objects under `rel_prefix` (relative paths and sizes), sorted.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, LakeError> {
        let path = self.path(rel_prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<(String, u64)> = self
            .rt
            .block_on(self.store.list(Some(&path)).try_collect::<Vec<_>>())
            .map_err(|e| store_error("list", rel_prefix, e))?
            .into_iter()
            .map(|m| {
                let p = m.location.to_string();
                (p.strip_prefix(&strip).unwrap_or(&p).to_owned(), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// fsync of a file or directory.
fn sync_path(p: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(p).and_then(|f| f.sync_all())
}
