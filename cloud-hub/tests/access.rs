//! Roles, authentication and the authorisation matrix (docs/access.md):
//! every route for every role and for no credentials; sessions with their
//! cookie flags, CSRF and lockout; API tokens; OIDC/JWT; the CLI.

use crate::common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use cloud_hub::access::{Access, POLICY, Role};
use common::*;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-the-access-tests-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");
const PASSWORD: &str = "correct horse battery staple";

/// A routed path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{ward}", "ICU")
        .replace("{job}", "j1")
        .replace("{file}", "f1")
        .replace("{asset}", "app.js")
}

async fn status_of(
    client: &reqwest::Client,
    hub: &TestHub,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> u16 {
    let mut req = client
        .request(method.parse().unwrap(), hub.url(&concrete(path)))
        .timeout(std::time::Duration::from_secs(10));
    if let Some(t) = auth {
        req = req.bearer_auth(t);
    }
    if method != "GET" && method != "DELETE" {
        req = req.header("content-type", "application/json").body("{}");
    }
    // Streams (SSE) answer with headers first; the status is all we need.
    req.send().await.unwrap().status().as_u16()
}

/// The authorisation matrix as the roles' users expect it, written
/// independently of `POLICY` (a change to either fails this test):
/// `P` public, `G` gateways only, otherwise the roles that may call it:
/// C clinician, B biomedical engineer, O operator, A administrator.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "P"),
    ("GET", "/readyz", "P"),
    ("GET", "/metrics", "P"),
    ("POST", "/api/v1/ingest", "G"),
    ("POST", "/api/v1/enroll", "G"),
    ("GET", "/api/v1/session", "P"),
    ("POST", "/api/v1/session", "P"),
    ("DELETE", "/api/v1/session", "P"),
    ("GET", "/", "P"),
    ("GET", "/ui/", "P"),
    ("GET", "/ui/{asset}", "P"),
    ("GET", "/fhir/metadata", "P"),
    ("GET", "/fhir/Observation", "CA"),
    ("GET", "/fhir/Observation/{id}", "CA"),
    ("GET", "/fhir/Patient/{id}", "CA"),
    ("GET", "/fhir/Device", "CBA"),
    ("GET", "/fhir/Device/{id}", "CBA"),
    ("GET", "/fhir/Location", "CBA"),
    ("GET", "/fhir/Location/{id}", "CBA"),
    ("GET", "/fhir/$export", "A"),
    ("GET", "/fhir/Patient/$export", "A"),
    ("GET", "/fhir/Group/{id}/$export", "A"),
    ("GET", "/fhir/$export-status/{job}", "A"),
    ("DELETE", "/fhir/$export-status/{job}", "A"),
    ("GET", "/fhir/$export-file/{job}/{file}", "A"),
    ("GET", "/api/v1/beds", "CBA"),
    ("POST", "/api/v1/beds", "BA"),
    ("POST", "/api/v1/placements", "BA"),
    ("POST", "/api/v1/placements/end", "BA"),
    ("POST", "/api/v1/patients/admit", "CA"),
    ("POST", "/api/v1/patients/transfer", "CA"),
    ("POST", "/api/v1/patients/discharge", "CA"),
    ("GET", "/api/v1/occupancy", "CA"),
    ("GET", "/api/v1/patients/{id}/scores", "CA"),
    ("GET", "/api/v1/patients/{id}/scores/news2", "CA"),
    ("PUT", "/api/v1/patients/{id}/manual-inputs", "CA"),
    ("GET", "/api/v1/patients/{id}/series", "CA"),
    ("GET", "/api/v1/patients/{id}/scores/history", "CA"),
    ("GET", "/api/v1/wards/{ward}/overview", "CA"),
    ("GET", "/api/v1/alerts", "CA"),
    ("GET", "/api/v1/alerts/stream", "CA"),
    ("GET", "/api/v1/alerts/rules", "CA"),
    ("GET", "/api/v1/alerts/{id}", "CA"),
    ("POST", "/api/v1/alerts/{id}/acknowledge", "CA"),
    ("GET", "/api/v1/patients/{id}/alert-rules", "CA"),
    ("PUT", "/api/v1/patients/{id}/alert-rules", "CA"),
    ("GET", "/api/v1/gateways", "BOA"),
    ("GET", "/api/v1/patients/{id}/$everything", "AV"),
    ("POST", "/api/v1/patients/{id}/erase", "AV"),
    ("PUT", "/api/v1/patients/{id}/legal-hold", "AV"),
    ("DELETE", "/api/v1/patients/{id}/legal-hold", "AV"),
    ("GET", "/api/v1/legal-holds", "AV"),
];

fn letter(role: Role) -> char {
    match role {
        Role::Clinician => 'C',
        Role::Biomed => 'B',
        Role::Operator => 'O',
        Role::Admin => 'A',
        Role::Privacy => 'V',
    }
}

#[tokio::test]
async fn every_route_for_every_role_and_for_no_credentials() {
    let data = tempfile::tempdir().unwrap();
    let hub = start_with_admin(data.path(), ADMIN, "").await;
    let plain = client();
    let mut tokens = vec![];
    for role in Role::ALL {
        let t = cloud_hub::token_create(&hub.config, &format!("matrix-{role}"), role).unwrap();
        tokens.push((role, t));
    }
    // The expected matrix names exactly the routes of the policy (and the
    // source: see the next test).
    let expected: BTreeSet<(&str, &str)> = EXPECTED.iter().map(|(m, p, _)| (*m, *p)).collect();
    let policy: BTreeSet<(&str, &str)> = POLICY.iter().map(|r| (r.method, r.path)).collect();
    assert_eq!(expected, policy);
    let mut checked = 0;
    for r in POLICY {
        let want = EXPECTED
            .iter()
            .find(|(m, p, _)| *m == r.method && *p == r.path)
            .unwrap()
            .2;
        match r.access {
            Access::Public => assert_eq!(want, "P", "{} {}", r.method, r.path),
            Access::Gateway => assert_eq!(want, "G", "{} {}", r.method, r.path),
            Access::Roles(_) => assert!(!["P", "G"].contains(&want), "{} {}", r.method, r.path),
        }
        let anonymous = status_of(&plain, &hub, r.method, r.path, None).await;
        let gateway = status_of(&plain, &hub, r.method, r.path, Some(&hub.token)).await;
        match r.access {
            Access::Public => {
                // Reachable without credentials (the session routes answer
                // 401 themselves when there is no session).
                let own_401 = r.path == "/api/v1/session" && r.method != "POST";
                assert!(
                    ![403, 404, 405].contains(&anonymous) && (anonymous != 401 || own_401),
                    "{} {} public but answered {anonymous}",
                    r.method,
                    r.path
                );
            }
            Access::Gateway => {
                // Gateways authenticate in the handler: nobody else gets in.
                assert!(
                    !(200..300).contains(&anonymous) && ![403, 404, 405].contains(&anonymous),
                    "{} {}: {anonymous}",
                    r.method,
                    r.path
                );
                for (role, t) in &tokens {
                    let s = status_of(&plain, &hub, r.method, r.path, Some(t)).await;
                    assert!(
                        !(200..300).contains(&s),
                        "{} {} as {role}: {s}",
                        r.method,
                        r.path
                    );
                }
            }
            Access::Roles(allowed) => {
                // 401 from the access layer proves the route is routed and
                // governed by this entry (an unrouted path would be 404).
                assert_eq!(
                    anonymous, 401,
                    "{} {} without credentials",
                    r.method, r.path
                );
                assert_eq!(gateway, 401, "{} {} with a gateway token", r.method, r.path);
                for (role, t) in &tokens {
                    let s = status_of(&plain, &hub, r.method, r.path, Some(t)).await;
                    assert_eq!(
                        allowed.contains(role),
                        want.contains(letter(*role)),
                        "{} {}: policy and expected matrix disagree for {role}",
                        r.method,
                        r.path
                    );
                    if want.contains(letter(*role)) {
                        assert!(
                            ![401, 403].contains(&s),
                            "{} {} as {role} (allowed): {s}",
                            r.method,
                            r.path
                        );
                    } else {
                        assert_eq!(s, 403, "{} {} as {role} (not allowed)", r.method, r.path);
                    }
                }
                // The bootstrap admin token is role admin.
                let s = status_of(&plain, &hub, r.method, r.path, Some(ADMIN)).await;
                assert!(
                    ![401, 403].contains(&s),
                    "{} {} as admin token: {s}",
                    r.method,
                    r.path
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, POLICY.len());
    // Patient data is never public, and biomedical engineers and operators
    // never see it.
    let (_, fhir) = call_json(&hub, None, "GET", "/fhir/Observation", None).await;
    // FHIR clients get an OperationOutcome.
    assert_eq!(fhir["resourceType"], "OperationOutcome", "{fhir}");
    assert_eq!(fhir["issue"][0]["code"], "security");
    assert!(
        fhir["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("authentication required")
    );
    let metrics = plain
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("vigil_hub_auth_failures_total{reason=\"forbidden\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    hub.stop().await;
}

/// Re-attribution (docs/access.md, "Re-attribution"): the placement and
/// stay routes dated before the window (here 2024) move stored readings
/// between patients. Per route: the roles that may do that, with a reason
/// (written independently of the code): C clinician, A administrator. A
/// role the route admits but that may not re-attribute gets 403; one that
/// may, without a reason, gets 400 naming `reason`; in the present the
/// route's own policy applies (biomed places devices).
const REATTRIBUTION: &[(&str, &str, &str)] = &[
    // (route, may re-attribute, route admits)
    ("/api/v1/placements", "A", "BA"),
    ("/api/v1/placements/end", "A", "BA"),
    ("/api/v1/patients/admit", "CA", "CA"),
    ("/api/v1/patients/transfer", "CA", "CA"),
    ("/api/v1/patients/discharge", "CA", "CA"),
];

fn reattribution_body(path: &str, at: Option<&str>, reason: Option<&str>) -> Value {
    let patient = json!({ "system": "urn:mrn", "value": "MRN-M" });
    let mut b = match path {
        "/api/v1/placements" => {
            json!({ "gateway_id": GATEWAY, "device_id": "m-1", "bed_id": "m1" })
        }
        "/api/v1/placements/end" => json!({ "gateway_id": GATEWAY, "device_id": "m-1" }),
        "/api/v1/patients/discharge" => json!({ "patient": patient }),
        _ => json!({ "patient": patient, "bed_id": "m1" }),
    };
    if let Some(at) = at {
        b["at"] = json!(at);
    }
    if let Some(r) = reason {
        b["reason"] = json!(r);
    }
    b
}

#[tokio::test]
async fn reattribution_needs_a_clinical_role_and_a_reason() {
    let data = tempfile::tempdir().unwrap();
    let hub = start_with_admin(data.path(), ADMIN, "").await;
    let (status, _) = call_json(
        &hub,
        Some(ADMIN),
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "m1", "ward": "W", "label": "M1" })),
    )
    .await;
    assert_eq!(status, 201);
    let mut tokens = vec![];
    for role in Role::ALL {
        let t = cloud_hub::token_create(&hub.config, &format!("re-{role}"), role).unwrap();
        tokens.push((role, t));
    }
    let back = Some("2024-05-01T10:00:00Z");
    for (path, may, admits) in REATTRIBUTION {
        // The route's policy is the one the main matrix expects.
        let main = EXPECTED
            .iter()
            .find(|(m, p, _)| *m == "POST" && p == path)
            .unwrap();
        assert_eq!(main.2, *admits, "{path}");
        for (role, t) in &tokens {
            let l = letter(*role);
            let hub = &hub;
            let call = move |at, reason| {
                let body = reattribution_body(path, at, reason);
                async move { call_json(hub, Some(t), "POST", path, Some(body)).await }
            };
            let (without, body) = call(back, None).await;
            let (with, body_with) = call(back, Some("charted late")).await;
            if !admits.contains(l) {
                assert_eq!((without, with), (403, 403), "{path} as {role}");
            } else if !may.contains(l) {
                assert_eq!(without, 403, "{path} as {role}: {body}");
                assert_eq!(with, 403, "{path} as {role}: {body_with}");
                assert!(
                    body_with["error"]
                        .as_str()
                        .unwrap()
                        .contains("clinician or admin")
                );
                // In the present the route's own policy applies.
                let (now, body) = call(None, None).await;
                assert!(
                    ![400, 401, 403].contains(&now),
                    "{path} as {role} now: {now} {body}"
                );
            } else {
                assert_eq!(without, 400, "{path} as {role}: {body}");
                assert_eq!(body["field"], "reason", "{path} as {role}");
                assert!(
                    ![400, 401, 403].contains(&with),
                    "{path} as {role} with a reason: {with} {body_with}"
                );
            }
        }
    }
    hub.stop().await;
}

/// The ADT listener is a source of patient movements with its own access
/// rule (docs/access.md, "HL7 ADT"): only the configured senders. On a
/// loopback listen with `allow_sources = ["127.0.0.1"]` and facility GHH:
/// a message from 127.0.0.2 or naming another facility is refused (AR) and
/// moves nothing; the trusted sender's is applied (AA).
#[tokio::test]
async fn adt_applies_movements_only_from_trusted_sources() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let adt = format!(
        "[adt]\nlisten = \"127.0.0.1:{port}\"\nallow_sources = [\"127.0.0.1\"]\n\
         allowed_sending_facilities = [\"GHH\"]\n"
    );
    let hub = start_with_admin(data.path(), ADMIN, &adt).await;
    let (status, _) = call_json(
        &hub,
        Some(ADMIN),
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "ICU3-07-B", "ward": "ICU3", "label": "7B" })),
    )
    .await;
    assert_eq!(status, 201);
    let msg = |facility: &str| {
        format!(
            "\x0bMSH|^~\\&|ADT1|{facility}|VIGIL|ICU|20240501100000+0000||ADT^A01^ADT_A01|C1|P|2.5\r\
             EVN|A01|20240501100000+0000\rPID|1||MRN-9^^^GHH^MR\rPV1|1|I|ICU3^07^B\r\x1c\r"
        )
    };
    let send = |from: &'static str, facility: &'static str| {
        let m = msg(facility);
        async move {
            let mut s = None;
            for _ in 0..50 {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
                if let Ok(c) = sock.connect(([127, 0, 0, 1], port).into()).await {
                    s = Some(c);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let mut s = s.expect("the ADT listener accepts connections");
            s.write_all(m.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while !got.windows(2).any(|w| w == [0x1c, 0x0d]) {
                let n =
                    tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut chunk))
                        .await
                        .unwrap()
                        .unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&got).to_string();
            let code = text
                .split('\r')
                .find_map(|seg| seg.strip_prefix("MSA|"))
                .map(|msa| msa[..2].to_owned())
                .unwrap();
            (code, text)
        }
    };
    let occupied = || async {
        let (status, body) = call_json(
            &hub,
            Some(ADMIN),
            "GET",
            "/api/v1/occupancy?at=2024-05-01T10:30:00Z",
            None,
        )
        .await;
        assert_eq!(status, 200);
        !body["beds"][0]["patient"].is_null()
    };
    let (code, text) = send("127.0.0.2", "GHH").await;
    assert_eq!(code, "AR", "untrusted source: {text}");
    let (code, text) = send("127.0.0.1", "EVIL").await;
    assert_eq!(code, "AR", "facility not allowed: {text}");
    assert!(!occupied().await, "refused messages move nothing");
    let (code, text) = send("127.0.0.1", "GHH").await;
    assert_eq!(code, "AA", "trusted: {text}");
    assert!(occupied().await);
    let metrics = hub.metrics().await;
    for line in [
        "vigil_hub_adt_refused_total{reason=\"untrusted_source\"} 1",
        "vigil_hub_adt_refused_total{reason=\"facility\"} 1",
        "vigil_hub_adt_messages_total{ack=\"AA\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    hub.stop().await;
}

/// `(method, path)` of every `.route(…)` the hub's source declares (the
/// FHIR router is nested under `/fhir`).
fn declared_routes() -> BTreeSet<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    // The routers are the transport layer's (`cloud-hub/transport`); the
    // composition root declares none, but is walked too.
    let mut files = vec![];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    walk(&root.join("transport/src"), &mut files);
    walk(&root.join("src"), &mut files);
    let consts = [
        ("INGEST_PATH", "/api/v1/ingest"),
        ("ENROLL_PATH", "/api/v1/enroll"),
    ];
    let mut routes = BTreeSet::new();
    for (file, text) in files {
        let fhir_file = file.ends_with("fhir_api.rs");
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            // The call's text up to its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap();
            let call = &rest[..end];
            let (first, handlers) = call.split_once(',').unwrap();
            let first = first.trim();
            let path = match first.strip_prefix('"') {
                Some(p) => p.trim_end_matches('"').to_owned(),
                None => consts
                    .iter()
                    .find(|(n, _)| *n == first)
                    .unwrap_or_else(|| panic!("{}: route path `{first}`", file.display()))
                    .1
                    .to_owned(),
            };
            let path = if fhir_file
                && !path.starts_with("/api")
                && !["/healthz", "/readyz", "/metrics"].contains(&path.as_str())
            {
                format!("/fhir{path}")
            } else {
                path
            };
            for (m, name) in [
                ("GET", "get("),
                ("POST", "post("),
                ("PUT", "put("),
                ("DELETE", "delete("),
                ("PATCH", "patch("),
            ] {
                let found = handlers.match_indices(name).any(|(i, _)| {
                    i == 0
                        || !handlers.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && handlers.as_bytes()[i - 1] != b'_'
                });
                if found {
                    routes.insert((m.to_owned(), path.clone()));
                }
            }
            rest = &rest[end..];
        }
    }
    routes
}

#[test]
fn the_policy_covers_exactly_the_routes_the_source_declares() {
    let declared = declared_routes();
    let policy: BTreeSet<(String, String)> = POLICY
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert!(declared.len() > 40, "{declared:?}");
    let missing: Vec<_> = declared.difference(&policy).collect();
    assert!(
        missing.is_empty(),
        "routes without an access policy: {missing:?}"
    );
    let stale: Vec<_> = policy.difference(&declared).collect();
    assert!(stale.is_empty(), "policy entries for no route: {stale:?}");
}

async fn login(hub: &TestHub, user: &str, password: &str) -> reqwest::Response {
    client()
        .post(hub.url("/api/v1/session"))
        .header("content-type", "application/json")
        .body(json!({ "username": user, "password": password }).to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_clinician_logs_in_reads_writes_with_csrf_and_logs_out() {
    let data = tempfile::tempdir().unwrap();
    let hub = start_with_admin(data.path(), ADMIN, "").await;
    cloud_hub::user_add(&hub.config, "alice", Role::Clinician, PASSWORD).unwrap();
    cloud_hub::user_add(&hub.config, "bob", Role::Biomed, PASSWORD).unwrap();
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;

    // Login takes JSON only (a cross-site form cannot post it).
    let resp = client()
        .post(hub.url("/api/v1/session"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("username=alice&password=x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert_eq!(login(&hub, "alice", "wrong password!!").await.status(), 401);
    assert_eq!(login(&hub, "mallory", PASSWORD).await.status(), 401);

    let resp = login(&hub, "alice", PASSWORD).await;
    assert_eq!(resp.status(), 200);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "plain http on loopback: {set_cookie}"
    );
    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["role"], "clinician");
    let csrf = body["csrf_token"].as_str().unwrap().to_owned();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert!(!cookie.contains(&csrf));

    let with_cookie = |method: &str, path: &str| {
        client()
            .request(method.parse().unwrap(), hub.url(path))
            .header("cookie", &cookie)
    };
    // Who am I; reads of patient data; not the bulk export.
    let me: Value = serde_json::from_str(
        &with_cookie("GET", "/api/v1/session")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(me["csrf_token"], csrf.as_str());
    let r = with_cookie("GET", &format!("/fhir/Observation?patient={PATIENT}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(b["total"], 1);
    let r = with_cookie("GET", "/fhir/$export").send().await.unwrap();
    assert_eq!(r.status(), 403);

    // A write needs the CSRF token.
    let path = format!("/api/v1/patients/{PATIENT}/manual-inputs");
    let body = json!({ "consciousness": "alert" }).to_string();
    let r = with_cookie("PUT", &path)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = with_cookie("PUT", &path)
        .header("content-type", "application/json")
        .header("x-csrf-token", "0".repeat(64))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = with_cookie("PUT", &path)
        .header("content-type", "application/json")
        .header("x-csrf-token", &csrf)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);

    // The audit log names the user, never the session.
    let actors: Vec<String> = hub
        .db()
        .prepare("SELECT actor FROM audit_log WHERE resource = ?1 AND outcome = 200")
        .unwrap()
        .query_map([&path], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(actors, ["user:alice"]);
    let all: String = hub
        .db()
        .query_row(
            "SELECT group_concat(actor || detail, ' ') FROM audit_log",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!all.contains(cookie.trim_start_matches("vigil_session=")));

    // A biomedical engineer sees devices, not patients.
    let resp = login(&hub, "bob", PASSWORD).await;
    let bob = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = client()
        .get(hub.url("/fhir/Device"))
        .header("cookie", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(hub.url(&format!("/fhir/Observation?patient={PATIENT}")))
        .header("cookie", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Logout needs the CSRF token too; afterwards the cookie is dead.
    assert_eq!(
        with_cookie("DELETE", "/api/v1/session")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let r = with_cookie("DELETE", "/api/v1/session")
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = with_cookie("GET", "/fhir/Observation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Disabling a user ends its sessions at once.
    let resp = login(&hub, "alice", PASSWORD).await;
    let again = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let ok = client()
        .get(hub.url("/fhir/Observation"))
        .header("cookie", &again)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    cloud_hub::user_disable(&hub.config, "alice").unwrap();
    let r = client()
        .get(hub.url("/fhir/Observation"))
        .header("cookie", &again)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(login(&hub, "alice", PASSWORD).await.status(), 401);
    hub.stop().await;
}

#[tokio::test]
async fn five_failed_logins_lock_the_name_at_that_address_out_and_cookies_are_secure_on_request() {
    let data = tempfile::tempdir().unwrap();
    // Loopback is the trusted proxy: X-Forwarded-For names the client.
    let hub = start_with_admin(
        data.path(),
        ADMIN,
        "[auth]\ncookie_secure = true\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
    .await;
    cloud_hub::user_add(&hub.config, "carol", Role::Clinician, PASSWORD).unwrap();
    let r = login(&hub, "carol", PASSWORD).await;
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
    for _ in 0..5 {
        assert_eq!(login(&hub, "carol", "not the password").await.status(), 401);
    }
    // Even the right password is refused while locked out, from this
    // address.
    let r = login(&hub, "carol", PASSWORD).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "300");
    // Another name is not affected.
    cloud_hub::user_add(&hub.config, "dave", Role::Clinician, PASSWORD).unwrap();
    assert_eq!(login(&hub, "dave", PASSWORD).await.status(), 200);
    // Nor is carol at another address: the guesses did not lock her out.
    let from = |ip: &str| {
        client()
            .post(hub.url("/api/v1/session"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", ip)
            .body(json!({ "username": "carol", "password": PASSWORD }).to_string())
    };
    assert_eq!(from("198.51.100.2").send().await.unwrap().status(), 200);
    // Hops appended by trusted proxies are skipped: the nearest other one is the client.
    let r = from("198.51.100.2, 127.0.0.1").send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "127.0.0.1 is the trusted proxy, 198.51.100.2 the client"
    );
    let metrics = client()
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("vigil_hub_auth_failures_total{reason=\"bad_login\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vigil_hub_auth_failures_total{reason=\"throttled\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vigil_hub_logins_total 4"), "{metrics}");
    assert!(
        metrics.contains("vigil_hub_login_throttled_total{reason=\"locked\"} 1"),
        "{metrics}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn api_tokens_carry_their_role_until_revoked() {
    let data = tempfile::tempdir().unwrap();
    let hub = start_with_admin(data.path(), ADMIN, "").await;
    let t = cloud_hub::token_create(&hub.config, "ward-board", Role::Clinician).unwrap();
    let (s, _) = call_json(&hub, Some(&t), "GET", "/fhir/Observation", None).await;
    assert_eq!(s, 200);
    let (s, _) = call_json(
        &hub,
        Some(&t),
        "POST",
        "/api/v1/beds",
        Some(json!({"id": "b1", "ward": "W"})),
    )
    .await;
    assert_eq!(s, 403);
    cloud_hub::token_revoke(&hub.config, "ward-board").unwrap();
    // The hub trusts a token it found active for TOKEN_CACHE_TTL (the CLI
    // that revoked it is another process); refused once that has passed.
    tokio::time::sleep(cloud_hub::access::TOKEN_CACHE_TTL + std::time::Duration::from_millis(50))
        .await;
    let (s, body) = call_json(&hub, Some(&t), "GET", "/fhir/Observation", None).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body}"
    );
    // A made-up token of the right shape is just unknown.
    let (s, _) = call_json(
        &hub,
        Some(&format!("vgu_{}", "ab".repeat(32))),
        "GET",
        "/fhir/Observation",
        None,
    )
    .await;
    assert_eq!(s, 401);
    hub.stop().await;
}

#[test]
fn the_cli_manages_users_and_tokens_without_printing_secrets() {
    let data = tempfile::tempdir().unwrap();
    let text = admin_config_text(data.path(), ADMIN, "");
    let cfg = data.path().join("hub.toml");
    std::fs::write(&cfg, &text).unwrap();
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            use std::io::Write;
            // A command refused before it reads stdin may have exited
            // already (broken pipe): its output and status are what counts.
            let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
        }
        child.wait_with_output().unwrap()
    };
    let out = run(
        &[
            "user",
            "add",
            "erin",
            "--role",
            "clinician",
            "--password-file",
            "-",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A world-readable password file is refused; so is an unknown role.
    let pw = data.path().join("pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = run(
        &[
            "user",
            "add",
            "frank",
            "--role",
            "clinician",
            "--password-file",
            pw.to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    let out = run(
        &[
            "user",
            "add",
            "frank",
            "--role",
            "root",
            "--password-file",
            "-",
        ],
        Some(PASSWORD),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role"));
    let out = run(
        &[
            "user",
            "add",
            "frank",
            "--role",
            "biomed",
            "--password-file",
            "-",
        ],
        Some("short\n"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));

    let out = run(
        &["token", "create", "integration", "--role", "operator"],
        None,
    );
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("vgu_") && token.len() == 68, "{token}");
    let users = String::from_utf8(run(&["user", "list"], None).stdout).unwrap();
    assert!(
        users.contains("erin") && users.contains("clinician"),
        "{users}"
    );
    assert!(!users.contains("argon2"));
    let tokens = String::from_utf8(run(&["token", "list"], None).stdout).unwrap();
    assert!(
        tokens.contains("integration") && !tokens.contains(&token),
        "{tokens}"
    );
    let out = run(&["token", "revoke", "integration"], None);
    assert!(out.status.success());
    let out = run(&["user", "disable", "erin"], None);
    assert!(out.status.success());
    // Every change is in the audit log, as the CLI.
    let db = rusqlite::Connection::open(data.path().join("hub-audit.sqlite")).unwrap();
    let cmds: Vec<String> = db
        .prepare("SELECT resource FROM audit_log WHERE actor = 'cli' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        cmds,
        ["user add", "token create", "token revoke", "user disable"]
    );
}

/// API token lookups are cached for `TOKEN_CACHE_TTL`: a token revoked by
/// the CLI (another process, so the hub is not told) stops working within
/// that time, never later; a new token works at once (unknown tokens are
/// not cached), and so does its revocation once the entry has expired.
#[tokio::test]
async fn a_revoked_api_token_stops_working_within_the_cache_ttl() {
    let hub = TestHub::start().await;
    let token = cloud_hub::token_create(&hub.config, "cached", Role::Clinician).unwrap();
    let read = |t: String| {
        let req = common::client()
            .get(hub.url(&format!("/fhir/Observation?patient={PATIENT}")))
            .bearer_auth(t)
            .send();
        async move { req.await.unwrap().status().as_u16() }
    };
    assert_eq!(read(token.clone()).await, 200);
    assert_eq!(read(token.clone()).await, 200);
    let revoked = std::time::Instant::now();
    cloud_hub::token_revoke(&hub.config, "cached").unwrap();
    let ttl = cloud_hub::access::TOKEN_CACHE_TTL;
    loop {
        let status = read(token.clone()).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < ttl + std::time::Duration::from_millis(500),
            "the revoked token still works after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Refused from then on; a token created now works at once.
    assert_eq!(read(token.clone()).await, 401);
    let fresh = cloud_hub::token_create(&hub.config, "fresh", Role::Clinician).unwrap();
    assert_eq!(read(fresh).await, 200);
    hub.stop().await;
}

// ---- OIDC ----------------------------------------------------------------

mod oidc {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use std::sync::{Arc, Mutex};

    const ISS: &str = "https://login.example/tenant/v2.0";
    const AUD: &str = "api://vigil-hub";

    struct Keys {
        ec: EncodingKey,
        ec_jwk: Value,
        rsa: EncodingKey,
        rsa_jwk: Value,
    }

    fn keys(dir: &std::path::Path) -> Keys {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref(); // 0x04 ‖ x ‖ y (SEC 1)
        let ec_jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "ec-1",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        // RS256 as Entra ID signs: a throwaway 2048-bit key from openssl.
        let pem = dir.join("rsa.pem");
        let ok = Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&pem)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl (Debian package openssl) generates the test RSA key");
        assert!(ok.success());
        let der = Command::new("openssl")
            .args(["rsa", "-traditional", "-outform", "DER", "-in"])
            .arg(&pem)
            .stderr(Stdio::null())
            .output()
            .unwrap()
            .stdout;
        let modulus = String::from_utf8(
            Command::new("openssl")
                .args(["rsa", "-noout", "-modulus", "-in"])
                .arg(&pem)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        let rsa_jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "rsa-1",
            "n": B64.encode(n), "e": "AQAB",
        });
        Keys {
            ec: EncodingKey::from_ec_der(pkcs8.as_ref()),
            ec_jwk,
            rsa: EncodingKey::from_rsa_der(&der),
            rsa_jwk,
        }
    }

    fn claims(roles: &[&str], exp_in: i64) -> Value {
        let now = now_us() / 1_000_000;
        json!({ "iss": ISS, "aud": AUD, "sub": "clinician-7f3a", "iat": now, "nbf": now - 5,
                "exp": now + exp_in, "roles": roles })
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    /// Serves `keys` as a JWKS document on loopback; returns its URL and a
    /// counter of fetches.
    async fn jwks_server(keys: Arc<Mutex<Vec<Value>>>) -> (String, Arc<Mutex<u32>>) {
        let fetches = Arc::new(Mutex::new(0u32));
        let f = fetches.clone();
        let app = axum::Router::new().route(
            "/keys",
            axum::routing::get(move || {
                let (keys, f) = (keys.clone(), f.clone());
                async move {
                    *f.lock().unwrap() += 1;
                    axum::Json(json!({ "keys": *keys.lock().unwrap() }))
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (format!("http://{addr}/keys"), fetches)
    }

    #[tokio::test]
    async fn entra_style_access_tokens_are_validated_and_mapped_to_roles() {
        let data = tempfile::tempdir().unwrap();
        let k = keys(data.path());
        let published = Arc::new(Mutex::new(vec![k.ec_jwk.clone()]));
        let (url, fetches) = jwks_server(published.clone()).await;
        let extra = format!(
            "[auth.oidc]\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\njwks_url = \"{url}\"\n\
             jwks_min_refetch_s = 0\n[auth.oidc.role_map]\n\"Vigil.Clinician\" = \"clinician\"\n\
             \"Vigil.Biomed\" = \"biomed\"\n"
        );
        let hub = start_with_admin(data.path(), ADMIN, &extra).await;
        let get = |token: String, path: &'static str| {
            let hub = &hub;
            async move { call_json(hub, Some(&token), "GET", path, None).await }
        };
        let good = sign(
            Algorithm::ES256,
            "ec-1",
            &k.ec,
            &claims(&["Vigil.Clinician"], 600),
        );
        let (s, body) = get(good.clone(), "/fhir/Observation").await;
        assert_eq!(s, 200, "{body}");
        // The audit log names the token's subject.
        let actor: String = hub
            .db()
            .query_row(
                "SELECT actor FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(actor, "oidc:clinician-7f3a");
        // A biomedical engineer's token: devices yes, patients no.
        let biomed = sign(
            Algorithm::ES256,
            "ec-1",
            &k.ec,
            &claims(&["Vigil.Biomed"], 600),
        );
        assert_eq!(get(biomed.clone(), "/fhir/Device").await.0, 200);
        assert_eq!(get(biomed, "/fhir/Observation").await.0, 403);

        // Refused, each with 401 and a reason.
        let refused = [
            (
                "expired",
                sign(
                    Algorithm::ES256,
                    "ec-1",
                    &k.ec,
                    &claims(&["Vigil.Clinician"], -600),
                ),
            ),
            (
                "no mapped role",
                sign(
                    Algorithm::ES256,
                    "ec-1",
                    &k.ec,
                    &claims(&["Vigil.Unknown"], 600),
                ),
            ),
            ("wrong audience", {
                let mut c = claims(&["Vigil.Clinician"], 600);
                c["aud"] = json!("api://another-app");
                sign(Algorithm::ES256, "ec-1", &k.ec, &c)
            }),
            ("wrong issuer", {
                let mut c = claims(&["Vigil.Clinician"], 600);
                c["iss"] = json!("https://evil.example/");
                sign(Algorithm::ES256, "ec-1", &k.ec, &c)
            }),
            (
                "unknown key id",
                sign(
                    Algorithm::ES256,
                    "ec-9",
                    &k.ec,
                    &claims(&["Vigil.Clinician"], 600),
                ),
            ),
            ("HMAC", {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("ec-1".into());
                jsonwebtoken::encode(
                    &h,
                    &claims(&["Vigil.Clinician"], 600),
                    &EncodingKey::from_secret(b"guess"),
                )
                .unwrap()
            }),
            ("alg none", {
                let (_, rest) = good.split_once('.').unwrap();
                format!(
                    "{}.{}",
                    B64.encode(br#"{"alg":"none","kid":"ec-1"}"#),
                    rest.rsplit_once('.').unwrap().0
                ) + "."
            }),
            ("payload changed", {
                let parts: Vec<&str> = good.split('.').collect();
                let mut c = claims(&["Vigil.Clinician"], 600);
                c["sub"] = json!("someone-else");
                format!("{}.{}.{}", parts[0], B64.encode(c.to_string()), parts[2])
            }),
        ];
        for (what, token) in refused {
            let (s, body) = get(token, "/fhir/Observation").await;
            assert_eq!(s, 401, "{what}: {body}");
        }
        // Key rotation: a token signed with a key published after the first
        // fetch is accepted once the hub fetches the keys again.
        let rs = sign(
            Algorithm::RS256,
            "rsa-1",
            &k.rsa,
            &claims(&["Vigil.Clinician"], 600),
        );
        let before = *fetches.lock().unwrap();
        published.lock().unwrap().push(k.rsa_jwk.clone());
        let (s, body) = get(rs, "/fhir/Observation").await;
        assert_eq!(s, 200, "RS256 after rotation: {body}");
        assert!(*fetches.lock().unwrap() > before);
        // A token claiming ES256 under the RSA key's id is refused.
        let mixed = sign(
            Algorithm::ES256,
            "rsa-1",
            &k.ec,
            &claims(&["Vigil.Clinician"], 600),
        );
        let (s, body) = get(mixed, "/fhir/Observation").await;
        assert_eq!(s, 401, "{body}");
        let metrics = client()
            .get(hub.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.lines().any(|l| l
                .starts_with("vigil_hub_auth_failures_total{reason=\"invalid_jwt\"}")
                && !l.ends_with(" 0")),
            "{metrics}"
        );
        hub.stop().await;
    }

    #[test]
    fn oidc_config_errors_name_the_field() {
        let data = tempfile::tempdir().unwrap();
        for (extra, field) in [
            (
                "[auth.oidc]\nissuer = \"x\"\naudience = \"a\"\njwks_url = \"http://idp.example/keys\"\n",
                "auth.oidc.jwks_url",
            ),
            (
                "[auth.oidc]\nissuer = \"x\"\naudience = \"a\"\njwks_url = \"https://idp.example/keys\"\nalgorithms = [\"HS256\"]\n",
                "auth.oidc.algorithms",
            ),
            (
                "[auth]\nsession_idle_minutes = 0\n",
                "auth.session_idle_minutes",
            ),
        ] {
            let cfg =
                cloud_hub::Config::parse(&admin_config_text(data.path(), ADMIN, extra)).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
