//! [`Hub`]: the composition of one hub. Opens the backend the config names,
//! builds the transport layer's [`AppState`] (one sub-state per concern)
//! over it, registers the after-ingest consumers, starts the listeners
//! (HTTP(S), and with their sections MQTT ingest, Kafka ingest and the ADT
//! listener) and
//! the background tasks (retention, the alert clock), and stops them all
//! with one cancellation token.

use std::future::Future;
use std::sync::Arc;

use hub_transport::kafka_ingest::KafkaIngest;
use hub_transport::mqtt_ingest::MqttIngest;
use hub_transport::{AppState, server};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, check_plaintext_allowed};
use crate::store::Store;
use crate::{HubError, SharedMetrics};

/// An opened hub: database open, TLS material loaded, ready to serve.
#[derive(Debug)]
pub struct Hub {
    config: Arc<Config>,
    store: Store,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: SharedMetrics,
    mqtt: Option<MqttIngest>,
    kafka: Option<KafkaIngest>,
    audit_keys: hub_transport::audit::AuditKeys,
}

impl Hub {
    /// Validates the config, opens the database and loads the TLS
    /// certificate and key (if configured). Blocking: call before serving.
    pub fn open(config: Config) -> Result<Self, HubError> {
        config.validate()?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(server::load_tls)
            .transpose()?;
        // The audit key (checked: mode 0600, length) before anything is
        // audited.
        let audit_keys = config.audit.keys()?;
        // The lake's pseudonym key (mode 0600, format) when serve exports.
        if let Some(l) = config.lake.as_ref().filter(|l| l.interval_s > 0) {
            hub_lake::LakeKey::load(&l.pseudonym_key_file, crate::lake::KEY_SETTING)
                .map_err(hub_lake::LakeError::from)?;
        }
        if config.retention.audit_days.is_some() && audit_keys.current().is_none() {
            return Err(crate::ConfigError::invalid(
                "retention.audit_days",
                "needs the audit key (audit.key_file or VIGIL_HUB_AUDIT_KEY): the log is only \
                 purged up to a signed checkpoint",
            )
            .into());
        }
        let store = Store::open_config(&config.storage)?;
        // Patient identifier systems stored before `[identifiers]` (HL7
        // assigning authorities such as `HOSP`) become their URIs; once
        // done, a restart finds nothing to change.
        hub_transport::identifiers::migrate_stored(
            &store.handle(),
            &Arc::new(config.identifiers.systems()),
            &audit_keys,
        )
        .map_err(|e| HubError::Io(std::io::Error::other(e.to_string())))?;
        let mqtt = config
            .mqtt
            .as_ref()
            .map(|m| MqttIngest::prepare(m, config.server.max_body_bytes))
            .transpose()?;
        let kafka = config
            .kafka
            .as_ref()
            .map(KafkaIngest::prepare)
            .transpose()?;
        Ok(Self {
            config: Arc::new(config),
            store,
            tls,
            metrics: Arc::default(),
            mqtt,
            kafka,
            audit_keys,
        })
    }

    /// Whether the hub serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The hub's counters (also served at `/metrics`).
    pub fn metrics(&self) -> SharedMetrics {
        self.metrics.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down
    /// gracefully: the future cancels the hub's token (see
    /// [`Hub::serve_until`]).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubError> {
        let token = CancellationToken::new();
        let serving = self.serve_until(listener, token.clone());
        tokio::pin!(serving);
        tokio::select! {
            r = &mut serving => r,
            () = shutdown => {
                token.cancel();
                serving.await
            }
        }
    }

    /// Serves on `listener` until `shutdown` is cancelled. Every part of
    /// the hub stops on that one token, at once: the HTTP server stops
    /// accepting and lets in-flight requests finish, live alert streams
    /// end, MQTT ingest hands over its last acknowledgements and
    /// disconnects, the ADT listener lets open connections finish the
    /// message in hand, and retention and the alert clock stop; this
    /// returns when all of them have. Should serving fail, the parts
    /// already started are stopped too (`shutdown` itself is left alone).
    pub async fn serve_until(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), HubError> {
        let addr = listener.local_addr()?;
        check_plaintext_allowed(&self.config, addr)?;
        // The hub's own token: cancelled with the caller's, and when this
        // returns (an error included), so nothing started outlives it.
        let shutdown = shutdown.child_token();
        let _stop_all_on_return = shutdown.clone().drop_guard();
        let store = self.store.handle();
        let associations = Arc::new(hub_transport::association::static_map(
            &self.config.associations,
        ));
        // After-ingest consumers (`after_ingest`): the alert engine and the
        // score history, each on its own switch.
        let alerts = {
            let (store, cfg) = (store.clone(), self.config.alerts.clone());
            tokio::task::spawn_blocking(move || {
                hub_transport::alerts::AlertService::start(&store, &cfg)
            })
            .await
            .map_err(|e| HubError::Io(std::io::Error::other(e)))?
            .map_err(|e| HubError::Io(std::io::Error::other(e.to_string())))?
        };
        let scores = self.config.scores;
        let identifiers = Arc::new(self.config.identifiers.systems());
        // Ingest (HTTP and MQTT): store, count, then the consumers.
        let pipeline = hub_transport::pipeline::Pipeline::new(
            store.clone(),
            associations.clone(),
            self.metrics.clone(),
            hub_transport::after_ingest::AfterIngest::new(
                store.clone(),
                alerts.clone(),
                scores,
                self.config.alerts.max_value_age_s,
            ),
            self.config.server.max_body_bytes,
        )
        .with_identifiers(identifiers.clone());
        // The audit log: keyed (its start recorded with the key's id, so a
        // configured key is in the chain from now on) or, without
        // `[audit] key_file`, the unkeyed legacy chain.
        match self.audit_keys.current() {
            Some(key) => {
                let (s, keys) = (store.clone(), self.audit_keys.clone());
                let entry = hub_transport::audit::Entry {
                    time_us: crate::store::now_us(),
                    actor: "system".into(),
                    action: "execute".into(),
                    resource: "hub start".into(),
                    patient: None,
                    patients: Vec::new(),
                    outcome: 0,
                    detail: format!("audit_key={}", key.id()),
                };
                tokio::task::spawn_blocking(move || {
                    hub_transport::audit::append(&s, &keys, &entry)
                })
                .await??;
                tracing::info!(key_id = key.id(), "audit log keyed");
            }
            None => tracing::warn!(
                "audit log NOT keyed ([audit] key_file and VIGIL_HUB_AUDIT_KEY unset): anyone \
                 with the database can rewrite it undetected; see docs/operations.md \"Audit log\""
            ),
        }
        let checkpoints = self.audit_keys.current().is_some().then(|| {
            tokio::spawn(hub_transport::audit::run_checkpoints(
                store.clone(),
                self.audit_keys.clone(),
                self.config.audit.clone(),
                shutdown.child_token(),
            ))
        });
        // Retention (optional) stops with the hub.
        let retention = self
            .config
            .retention
            .effective(self.config.storage.retention_days)
            .map(|days| {
                tokio::spawn(crate::retention::run(
                    store.clone(),
                    days,
                    self.audit_keys.clone(),
                    shutdown.child_token(),
                ))
            });
        // The lake export loop (optional) stops with the hub.
        let lake = self
            .config
            .lake
            .clone()
            .filter(|l| l.interval_s > 0)
            .map(|l| tokio::spawn(crate::lake::run(store.clone(), l, shutdown.child_token())));
        // The alert clock (stale data, offline gateways, escalation).
        let alert_clock = alerts
            .clone()
            .map(|a| tokio::spawn(hub_transport::alerts::run_clock(a, shutdown.child_token())));
        // MQTT ingest runs beside the HTTP server and stops with it.
        let mqtt = self.mqtt.map(|m| {
            tokio::spawn(hub_transport::mqtt_ingest::run(
                m,
                pipeline.clone(),
                shutdown.child_token(),
            ))
        });
        // Kafka / Event Hubs ingest likewise.
        let kafka = self.kafka.map(|k| {
            tokio::spawn(hub_transport::kafka_ingest::run(
                k,
                pipeline.clone(),
                shutdown.child_token(),
            ))
        });
        // The HL7 ADT listener (optional) runs beside the server and stops
        // with it.
        let adt = match &self.config.adt {
            Some(c) => {
                let l = hub_transport::adt_listener::AdtListener::bind(
                    c,
                    store.clone(),
                    associations.clone(),
                )
                .await?;
                let l = l
                    .with_stats(self.metrics.adt.clone())
                    .with_identifiers(&identifiers)
                    .with_audit_keys(self.audit_keys.clone());
                Some(tokio::spawn(l.serve(shutdown.child_token())))
            }
            None => None,
        };
        // Who may do what: every routed request passes the access policy
        // (hub_transport::access::POLICY) before its handler.
        let admin_sha256 = self
            .config
            .association
            .admin_token_file
            .as_deref()
            .map(hub_transport::association_api::load_admin_token)
            .transpose()
            .map_err(|e| {
                HubError::Config(crate::ConfigError::Invalid {
                    field: "association.admin_token_file".into(),
                    message: e.to_string(),
                })
            })?;
        let access = hub_transport::access::AccessState::new(
            &self.config.auth,
            admin_sha256,
            store.clone(),
            self.metrics.clone(),
            self.tls.is_some(),
        )
        .map_err(|e| {
            HubError::Config(crate::ConfigError::Invalid {
                field: "auth.oidc".into(),
                message: e.to_string(),
            })
        })?;
        let metrics = self.metrics.clone();
        let association_metrics = self.metrics.clone();
        let state = AppState {
            ops: server::OpsState::new(store.clone(), metrics.clone()),
            ingest: hub_transport::ingest_api::IngestState::new(
                pipeline.clone(),
                &self.config.ingest,
            ),
            fhir: hub_transport::fhir_api::FhirState::new(
                store.clone(),
                metrics.clone(),
                &self.config.fhir,
                self.tls.is_some(),
                hub_transport::export::dir_for(&self.config.storage.sqlite_path),
            )
            .with_identifiers(identifiers.clone()),
            access,
            audit: hub_transport::audit::AuditState::new(
                store.clone(),
                metrics,
                self.audit_keys.clone(),
            ),
            association: hub_transport::association_api::ApiState::new(store.clone(), associations)
                .with_identifiers(identifiers)
                .with_config(&self.config.association)
                .with_metrics(association_metrics)
                .with_audit_keys(self.audit_keys.clone()),
            scores: hub_transport::early_warning::ScoresState::new(
                store.clone(),
                self.config.scores,
            ),
            score_history: hub_transport::score_history::HistoryState::new(store.clone()),
            privacy: hub_transport::privacy::PrivacyState {
                store: store.clone(),
                audit_keys: self.audit_keys.clone(),
            },
            trends: hub_transport::trends::TrendsState::new(store.clone()),
            ward: hub_transport::ward::WardState::new(
                store.clone(),
                alerts.clone(),
                self.config.scores,
            ),
            alerts: hub_transport::alerts::api::AlertsState::new(alerts, shutdown.child_token()),
            dashboard: hub_transport::dashboard::DashState::new(store),
        };
        // Exports retention: bulk export files older than the window go.
        if let Some(hours) = self.config.retention.exports_hours {
            tokio::spawn(crate::retention::run_exports(
                state.fhir.exports(),
                std::time::Duration::from_secs(u64::from(hours) * 3600),
                shutdown.child_token(),
            ));
        }
        server::serve(
            listener,
            server::router(state),
            self.tls,
            shutdown.child_token(),
        )
        .await?;
        if let Some(task) = mqtt {
            task.await?;
        }
        if let Some(task) = kafka {
            task.await?;
        }
        if let Some(task) = retention {
            task.await?;
        }
        if let Some(task) = lake {
            task.await?;
        }
        if let Some(task) = alert_clock {
            task.await?;
        }
        if let Some(task) = adt {
            task.await?;
        }
        // The last checkpoint, once the server has answered its last
        // request.
        if let Some(task) = checkpoints {
            task.await?;
            hub_transport::audit::final_checkpoint(
                &self.store.handle(),
                &self.audit_keys,
                &self.config.audit,
            )
            .await;
        }
        tracing::info!("hub stopped");
        Ok(())
    }
}
