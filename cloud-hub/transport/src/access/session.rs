//! `/api/v1/session`: log in (POST), who am I (GET), log out (DELETE).
//!
//! The session id travels only in an `HttpOnly; SameSite=Strict` cookie
//! (plus `Secure` when served over TLS or `auth.cookie_secure`); the CSRF
//! token comes back in the JSON body and must be sent as `X-CSRF-Token` on
//! every cookie-authenticated write. Login takes JSON only, so a cross-site
//! form cannot post it.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::{AccessState, PeerAddr, Principal, Refusal, SESSION_COOKIE, Via, accounts, cookie};
use crate::metrics::{AuthFailure, LoginThrottle};
use crate::store::now_us;
use hub_domain::login_throttle::Decision;

/// The session routes.
pub fn routes<S: Clone + Send + Sync + 'static>(state: AccessState) -> Router<S> {
    Router::new()
        .route("/api/v1/session", get(whoami).post(login).delete(logout))
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(state)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

fn set_cookie(st: &AccessState, value: &str, max_age_s: i64) -> HeaderValue {
    let secure = if st.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("vigil_session=; Max-Age=0"))
}

fn body(principal: &Principal) -> serde_json::Value {
    let csrf = match &principal.via {
        Via::Session { csrf } => Some(csrf.as_str()),
        _ => None,
    };
    json!({
        "user": principal.id.split_once(':').map_or(principal.id.as_str(), |(_, n)| n),
        "principal": principal.id,
        "role": principal.roles.first().map(|r| r.as_str()),
        "roles": principal.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "csrf_token": csrf,
    })
}

async fn login(
    State(st): State<AccessState>,
    PeerAddr(peer): PeerAddr,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_type {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            axum::Json(json!({ "error": "log in with Content-Type: application/json {\"username\", \"password\"}" })),
        )
            .into_response();
    }
    let req: Login = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": format!("expected JSON {{\"username\", \"password\"}}: {e}") })),
            )
                .into_response();
        }
    };
    let source = st.client_source(peer, &headers);
    // No password check beyond the permits: an excess login is refused at
    // once, before anything is counted against its user name.
    let Ok(permit) = st.hashing.clone().try_acquire_owned() else {
        st.metrics.login_throttled(LoginThrottle::Busy);
        return throttled(&st, 1, "too many logins at once: try again in a second");
    };
    // Charged before the check (stored: every hub counts together, and
    // concurrent guesses each see their own count).
    let now = now_us();
    let (store, name, src) = (st.store.clone(), req.username.clone(), source);
    let charged =
        tokio::task::spawn_blocking(move || accounts::charge_login(&store, &name, &src, now)).await;
    let (decision, pair_key) = match charged {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "login throttle unavailable");
            return unavailable();
        }
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    };
    let permit = match decision {
        Decision::Locked { retry_after_s } => {
            st.metrics.login_throttled(LoginThrottle::Locked);
            tracing::info!("login refused: too many failed logins for this name from this address");
            return throttled(
                &st,
                retry_after_s,
                "too many failed logins for this user name from this address: try again later",
            );
        }
        Decision::Check { delay_ms: 0 } => permit,
        Decision::Check { delay_ms } => {
            // The step-up delay, without holding a permit; then wait for
            // one (this attempt is already counted).
            st.metrics.login_throttled(LoginThrottle::StepUp);
            drop(permit);
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
            match st.hashing.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return unavailable(),
            }
        }
    };
    let (store, name, pw) = (st.store.clone(), req.username.clone(), req.password);
    let checked = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let role = accounts::check_password(&store, &name, &pw)?;
        match role {
            Some(role) => {
                accounts::login_succeeded(&store, &pair_key)?;
                let (id, csrf) = accounts::create_session(&store, &name, now_us())?;
                Ok(Checked::Session(role, id, csrf))
            }
            None => Ok::<_, accounts::AccountError>(Checked::Refused),
        }
    })
    .await;
    match checked {
        Ok(Ok(Checked::Session(role, id, csrf))) => {
            st.metrics.login();
            tracing::info!(user = %req.username, role = %role, "login");
            let principal = Principal {
                id: format!("user:{}", req.username),
                roles: vec![role],
                via: Via::Session { csrf },
            };
            let mut resp = axum::Json(body(&principal)).into_response();
            resp.headers_mut().insert(
                header::SET_COOKIE,
                set_cookie(&st, &id, st.max_age_us / 1_000_000),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp.extensions_mut().insert(principal);
            resp
        }
        Ok(Ok(Checked::Refused)) => {
            tracing::info!("login refused: wrong user name or password");
            Refusal {
                status: StatusCode::UNAUTHORIZED,
                reason: AuthFailure::BadLogin,
                message: "wrong user name or password".into(),
            }
            .into_response(&st.metrics)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "login failed");
            unavailable()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "error": "account store unavailable" })),
    )
        .into_response()
}

/// What checking a login found.
enum Checked {
    Refused,
    Session(super::Role, String, String),
}

/// 429 with `Retry-After`: a locked (user name, address) pair, or no
/// password-check permit free.
fn throttled(st: &AccessState, retry_after_s: u64, message: &str) -> Response {
    st.metrics.auth_failure(AuthFailure::Throttled);
    let mut resp = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({ "error": message })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    resp
}

async fn whoami(State(st): State<AccessState>, headers: HeaderMap) -> Response {
    match st.authenticate(&headers, &Method::GET).await {
        Ok(p) => {
            let mut resp = axum::Json(body(&p)).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp.extensions_mut().insert(p);
            resp
        }
        Err(r) => r.into_response(&st.metrics),
    }
}

async fn logout(State(st): State<AccessState>, headers: HeaderMap) -> Response {
    let Some(id) = cookie(&headers, SESSION_COOKIE) else {
        return Refusal::unauthenticated("no session to end").into_response(&st.metrics);
    };
    // Checks the session and its CSRF token (DELETE is a write).
    let principal = match st.authenticate(&headers, &Method::DELETE).await {
        Ok(p) => p,
        Err(r) => return r.into_response(&st.metrics),
    };
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || accounts::end_session(&store, &id)).await {
        Ok(Ok(())) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(&st, "", 0));
            resp.extensions_mut().insert(principal);
            resp
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": "account store unavailable" })),
        )
            .into_response(),
    }
}
