//! The clinician dashboard: a small single-page web app served by the hub
//! itself, plus the one JSON view it needs that the other APIs lack
//! (`GET /api/v1/gateways`).
//!
//! - `GET /` redirects to `/ui/`; `GET /ui/` and `GET /ui/{asset}` serve
//!   the app's files, **embedded in the binary** (`include_bytes!` of
//!   `assets/`): no CDN, no external fonts, no build step. The files hold
//!   no patient data and are public; every datum comes from the JSON APIs
//!   with the user's session. Each answer carries its Content-Type, an
//!   ETag (`no-cache`: revalidated, so an upgraded hub serves its own
//!   files) and the security headers (a `default-src 'self'` Content
//!   Security Policy without inline script or style, `frame-ancestors
//!   'none'`, `nosniff`, no referrer).
//! - `GET /api/v1/gateways`: what the hub knows about each gateway and its
//!   devices for biomedical engineers (last batch, batches/readings/
//!   duplicates/rejections over the last 24 h, buffer overflows the
//!   gateway reported, each device's last reading and last link event).
//!   The agent does not report its backlog in batches (only in the Azure
//!   IoT Hub twin and on its own `/metrics`), so there is no backlog
//!   field. The figures come from the store's `GatewayViewStore`.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use hub_storage::{DeviceActivity, GatewayActivity, StoreError};
use serde_json::{Value as Json, json};

use crate::fhir::format_instant;
use crate::store::{Store, now_us};

/// One embedded file of the app.
#[derive(Debug)]
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The app's files. `index.html` is also served at `/ui/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        name: "charts.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/charts.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/style.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/favicon.svg"),
    },
];

/// Content Security Policy of every dashboard answer: only the hub's own
/// scripts, styles and API; no inline script or style attribute; never
/// framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// Strong ETags of the assets (hex SHA-256 prefix), computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = ring::digest::digest(&ring::digest::SHA256, a.body);
                format!("\"{}\"", hex::encode(&d.as_ref()[..16]))
            })
            .collect()
    })
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
}

/// The answer for asset `name` (404 when there is none).
fn asset_response(name: &str, request: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        let mut r = (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
        security_headers(r.headers_mut());
        return r;
    };
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    security_headers(h);
    r
}

async fn index(headers: HeaderMap) -> Response {
    asset_response("index.html", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    asset_response(&name, &headers)
}

/// State of the dashboard's gateway view.
#[derive(Debug, Clone)]
pub struct DashState {
    store: Store,
}

impl DashState {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The dashboard's routes: `/`, `/ui/`, `/ui/{asset}` (public files) and
/// `GET /api/v1/gateways` (who may: `crate::access::POLICY`, checked by the
/// access layer before the handler).
pub fn routes<S: Clone + Send + Sync + 'static>(state: DashState) -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/{asset}", get(asset))
        .route("/api/v1/gateways", get(get_gateways))
        .with_state(state)
}

async fn get_gateways(State(st): State<DashState>) -> Response {
    let store = st.store.clone();
    let now = now_us();
    match tokio::task::spawn_blocking(move || gateways(&store, now)).await {
        Ok(Ok(g)) => {
            axum::Json(json!({ "at": format_instant(now), "gateways": g })).into_response()
        }
        Ok(Err(e)) if e.is_transient() => {
            tracing::warn!(error = %e, "gateways view: store unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
                axum::Json(json!({ "error": "store unavailable" })),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "gateways view failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({ "error": "internal error" })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "gateways view task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({ "error": "internal error" })),
            )
                .into_response()
        }
    }
}

/// The window of the per-gateway counts.
const WINDOW_US: i64 = 24 * 3600 * 1_000_000;
/// At most this many of a gateway's newest batches are summed (about a day
/// at one batch per second).
const MAX_BATCHES: u32 = 100_000;

fn instant(us: Option<i64>) -> Json {
    us.map_or(Json::Null, |t| json!(format_instant(t)))
}

fn age_s(now: i64, us: Option<i64>) -> Json {
    us.map_or(Json::Null, |t| json!((now - t).max(0) / 1_000_000))
}

/// Every gateway (revoked ones included) with its devices, as
/// `GET /api/v1/gateways` returns them.
pub fn gateways(store: &Store, now: i64) -> Result<Vec<Json>, StoreError> {
    Ok(store
        .gateway_activity(now - WINDOW_US, MAX_BATCHES)?
        .iter()
        .map(|g| gateway_json(g, now))
        .collect())
}

fn gateway_json(g: &GatewayActivity, now: i64) -> Json {
    let last_received = g.last_batch.as_ref().map(|b| b.received_us);
    json!({
        "id": g.id,
        "created": format_instant(g.created_us),
        "revoked": instant(g.revoked_us),
        "last_seen": instant(last_received),
        "last_seen_age_s": age_s(now, last_received),
        "last_batch": g.last_batch.as_ref().map(|b| json!({
            "sequence": b.sequence,
            "received": format_instant(b.received_us),
            "created": format_instant(b.created_us),
            "agent_version": b.agent_version,
        })),
        "last_24h": {
            "batches": g.window.batches,
            "accepted": g.window.accepted,
            "duplicates": g.window.duplicates,
            "rejected": g.window.rejected,
        },
        "rejected_total": g.rejected_total,
        "buffer_overflows": {
            "count": g.overflows,
            "last": g.last_overflow.as_ref().map(|(t, d)| json!({ "time": format_instant(*t), "detail": d })),
        },
        "buffer_incarnation": g.last_incarnation.as_ref().map(|(t, d)| json!({ "time": format_instant(*t), "detail": d })),
        "devices": g.devices.iter().map(|d| device_json(d, now)).collect::<Vec<_>>(),
    })
}

fn device_json(d: &DeviceActivity, now: i64) -> Json {
    json!({
        "id": d.id,
        "protocol": d.protocol,
        "manufacturer": d.manufacturer,
        "model": d.model,
        "location": d.location,
        "first_seen": format_instant(d.first_seen_us),
        "last_seen": format_instant(d.last_seen_us),
        "last_seen_age_s": age_s(now, Some(d.last_seen_us)),
        "last_reading": d.last_reading.map(|(e, r)| json!({
            "effective": format_instant(e),
            "received": format_instant(r),
            "age_s": (now - e).max(0) / 1_000_000,
        })),
        "last_link_event": d.last_link_event.as_ref().map(|(k, t, detail)| json!({
            "kind": k, "time": format_instant(*t), "detail": detail,
        })),
        "rejected_total": d.rejected_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_type_and_security_headers() {
        for a in ASSETS {
            let r = asset_response(a.name, &HeaderMap::new());
            assert_eq!(r.status(), StatusCode::OK, "{}", a.name);
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], a.content_type);
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert!(CSP.contains("frame-ancestors 'none'"));
            // Revalidation: the ETag answers 304 without a body.
            let mut req = HeaderMap::new();
            req.insert(header::IF_NONE_MATCH, h[header::ETAG].clone());
            assert_eq!(
                asset_response(a.name, &req).status(),
                StatusCode::NOT_MODIFIED
            );
        }
        let r = asset_response("../Cargo.toml", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }

    #[test]
    fn assets_load_nothing_from_elsewhere_and_inline_nothing() {
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap();
            for bad in ["http://", "https://", "//cdn", "@import", "fonts.g"] {
                // The SVG namespace URI is an identifier, not a load.
                let hits = text
                    .matches(bad)
                    .count()
                    .saturating_sub(text.matches("http://www.w3.org/2000/svg").count());
                assert_eq!(hits, 0, "{} mentions {bad}", a.name);
            }
        }
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(!html.contains("<script>"), "no inline script (CSP)");
        assert!(!html.contains("style="), "no inline style (CSP)");
        assert!(!html.contains("onclick"), "no inline handlers (CSP)");
    }
}
