//! HTTP routes of the alerts (who may call them: `crate::access::POLICY`;
//! acknowledgements and rule changes record the caller's principal):
//!
//! - `GET  /api/v1/alerts?open=true&patient=…&_count=…` — newest first
//! - `GET  /api/v1/alerts/{id}` — one alert with its transitions
//! - `POST /api/v1/alerts/{id}/acknowledge`
//! - `GET  /api/v1/alerts/stream` — Server-Sent Events, one `alert` event
//!   (JSON: transition, alert, actor) per change
//! - `GET  /api/v1/alerts/rules` — the global rules
//! - `GET|PUT /api/v1/patients/{id}/alert-rules` — a patient's rules in
//!   force and their overrides

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::Stream;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::rules::RuleOverride;
use super::{AlertError, AlertService, ListFilter};
use crate::access::Principal;
use crate::store::now_us;
use axum::Extension;

/// State of the alert routes.
#[derive(Debug, Clone)]
pub struct AlertsState {
    service: Option<Arc<AlertService>>,
    /// Cancelled when the hub shuts down: live streams end then (a
    /// graceful shutdown waits for open connections).
    shutdown: CancellationToken,
}

impl AlertsState {
    /// `service` is `None` when the engine is off (disabled, or a storage
    /// backend without alert tables yet): the routes then answer 503.
    pub fn new(service: Option<Arc<AlertService>>, shutdown: CancellationToken) -> Self {
        Self { service, shutdown }
    }
}

/// The alert routes.
pub fn router<S: Clone + Send + Sync + 'static>(state: AlertsState) -> Router<S> {
    Router::new()
        .route("/api/v1/alerts", get(list))
        .route("/api/v1/alerts/stream", get(stream))
        .route("/api/v1/alerts/rules", get(global_rules))
        .route("/api/v1/alerts/{id}", get(one))
        .route("/api/v1/alerts/{id}/acknowledge", post(acknowledge))
        .route(
            "/api/v1/patients/{id}/alert-rules",
            get(patient_rules).put(put_patient_rules),
        )
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

impl IntoResponse for AlertError {
    fn into_response(self) -> Response {
        match &self {
            AlertError::Ack(_) => error(StatusCode::CONFLICT, &self.to_string()),
            AlertError::Invalid { field, .. } => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": self.to_string(), "field": field })),
            )
                .into_response(),
            AlertError::Disabled => error(StatusCode::SERVICE_UNAVAILABLE, &self.to_string()),
            AlertError::Store(_) => {
                tracing::error!(error = %self, "alerts request failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// The service (who may call: `crate::access::POLICY`).
fn service(st: &AlertsState) -> Result<Arc<AlertService>, Box<Response>> {
    st.service
        .clone()
        .ok_or_else(|| Box::new(AlertError::Disabled.into_response()))
}

/// The audit name of the caller (`access` always sets one on these routes).
fn actor(principal: Option<Extension<Principal>>) -> String {
    principal.map_or_else(|| "unknown".to_owned(), |Extension(p)| p.id)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AlertError> + Send + 'static,
) -> Result<T, AlertError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "alerts task failed");
        Err(AlertError::Store(crate::storage::StoreError::Poisoned))
    })
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    #[serde(default)]
    open: Option<bool>,
    #[serde(default)]
    patient: Option<String>,
    #[serde(default, rename = "_count")]
    count: Option<u32>,
}

async fn list(
    State(st): State<AlertsState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "query: open=true|false, patient=<id>, _count=1..1000",
        );
    };
    let f = ListFilter {
        open: q.open.unwrap_or(false),
        patient: q.patient,
        limit: q.count.unwrap_or(100),
    };
    match blocking(move || svc.list(&f)).await {
        Ok(alerts) => {
            // The audit entry names the alerts' patients.
            let patients: Vec<String> = alerts.iter().filter_map(|a| a.patient.clone()).collect();
            crate::audit::with_patients(
                axum::Json(json!({ "alerts": alerts })).into_response(),
                patients,
            )
        }
        Err(e) => e.into_response(),
    }
}

async fn one(State(st): State<AlertsState>, Path(id): Path<i64>) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match blocking(move || svc.get(id)).await {
        Ok(Some((alert, events))) => {
            let events: Vec<_> = events
                .into_iter()
                .map(|(t, transition, actor)| {
                    json!({ "time": crate::fhir::format_instant(t), "transition": transition, "actor": actor })
                })
                .collect();
            let patient = alert.patient.clone();
            crate::audit::with_patients(
                axum::Json(json!({ "alert": alert, "events": events })).into_response(),
                patient,
            )
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such alert"),
        Err(e) => e.into_response(),
    }
}

async fn acknowledge(
    State(st): State<AlertsState>,
    Path(id): Path<i64>,
    principal: Option<Extension<Principal>>,
) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let actor = actor(principal);
    match blocking(move || svc.acknowledge(id, &actor, now_us())).await {
        Ok(alert) => {
            let patient = alert.patient.clone();
            crate::audit::with_patients(axum::Json(alert).into_response(), patient)
        }
        Err(e) => e.into_response(),
    }
}

async fn stream(State(st): State<AlertsState>) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    Sse::new(events(svc.subscribe(), st.shutdown.clone()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The live stream: every change as an `alert` event; a client too slow
/// to keep up is told how many it missed (`lagged` event) and should
/// re-read the list. The stream ends when `shutdown` is cancelled.
fn events(
    rx: tokio::sync::broadcast::Receiver<super::Change>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
        use tokio::sync::broadcast::error::RecvError;
        if shutdown.is_cancelled() {
            return None;
        }
        let got = tokio::select! {
            r = rx.recv() => r,
            () = shutdown.cancelled() => return None,
        };
        let ev = match got {
            Ok(c) => SseEvent::default()
                .event("alert")
                .id(c.alert.id.to_string())
                .json_data(super::Event::from(c))
                .unwrap_or_else(|_| SseEvent::default().event("error")),
            Err(RecvError::Lagged(n)) => SseEvent::default().event("lagged").data(n.to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), (rx, shutdown)))
    })
}

async fn global_rules(State(st): State<AlertsState>) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let rules = svc.engine().rules().global().to_vec();
    axum::Json(json!({ "rules": rules })).into_response()
}

async fn patient_rules(State(st): State<AlertsState>, Path(id): Path<String>) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let r = blocking(move || {
        let rules = svc.rules_for(&id, now_us());
        Ok(json!({ "patient": id, "rules": rules, "overrides": svc.patient_overrides(&id) }))
    })
    .await;
    match r {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn put_patient_rules(
    State(st): State<AlertsState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: axum::body::Bytes,
) -> Response {
    let svc = match service(&st) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    if !crate::association::is_valid_key(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "patient id is not a valid identifier",
        );
    }
    let overrides: Vec<RuleOverride> = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("body must be a JSON array of rule overrides: {e}"),
            );
        }
    };
    let actor = actor(principal);
    let r = blocking(move || {
        svc.set_patient_rules(&id, overrides, &actor, now_us())?;
        Ok(json!({ "patient": id, "overrides": svc.patient_overrides(&id) }))
    })
    .await;
    match r {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}
