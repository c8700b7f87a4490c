//! Abuse of the hub's patient-movement inputs, against the real
//! `cloud-hub` binary: forged HL7 ADT messages (from an address the
//! listener does not trust, or naming a sending facility it does not allow)
//! are answered AR, counted, and move nobody; a non-loopback ADT listener
//! without mutual TLS does not start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use vigil_e2e::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POST JSON with the harness's admin token: (status, body).
fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(url)
            .bearer_auth(HARNESS_ADMIN_TOKEN)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    })
}

fn get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

/// An ADT message (HL7 v2.5 ch. 3) from `facility`, MLLP-framed: A01 admit
/// into `ICU3^07^B` at `at` or A03 discharge at `at`.
fn adt(trigger: &str, facility: &str, mrn: &str, at: &str, id: &str) -> Vec<u8> {
    let structure = format!("ADT_{trigger}");
    format!(
        "\x0bMSH|^~\\&|ADT1|{facility}|VIGIL|ICU|{at}||ADT^{trigger}^{structure}|{id}|P|2.5\r\
         EVN|{trigger}|{at}\rPID|1||{mrn}^^^GHH^MR\rPV1|1|I|ICU3^07^B\r\x1c\r"
    )
    .into_bytes()
}

/// Sends one framed message from local address `from` to `port`; the ACK's
/// MSA-1 and its text.
fn send(from: &str, port: u16, msg: &[u8]) -> (String, String) {
    let mut s = connect_from(from, port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(2).any(|w| w == [0x1c, 0x0d]) {
        let n = s.read(&mut chunk).expect("an ACK within 10 s");
        assert!(n > 0, "closed before the ACK");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let code = text
        .split('\r')
        .find_map(|seg| seg.strip_prefix("MSA|"))
        .map(|msa| msa[..2].to_owned())
        .expect("MSA");
    (code, text)
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from`
/// (another loopback address is another source).
fn connect_from(from: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        sock.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

#[test]
fn forged_adt_messages_are_refused_and_move_nobody() {
    let (_keep, dir) = test_dir("hub-abuse-adt");
    let port = free_port();
    let config = write_hub_config(&dir, "127.0.0.1:0", &[]).unwrap();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!(
        "[adt]\nlisten = \"127.0.0.1:{port}\"\nallow_sources = [\"127.0.0.1\"]\n\
         allowed_sending_facilities = [\"GHH\"]\n"
    ));
    std::fs::write(&config, toml).unwrap();
    let hub = start_hub(&dir, &config).unwrap();
    let base = hub.base_url.clone();
    let (status, body) = post_json(
        &format!("{base}/api/v1/beds"),
        &json!({ "id": "ICU3-07-B", "ward": "ICU 3", "label": "Bed B" }),
    );
    assert_eq!(status, 201, "{body}");
    wait_for(Duration::from_secs(10), "the ADT listener", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .unwrap();
    let patient_at = |at: &str| {
        let (status, body) = get_json(&format!("{base}/api/v1/occupancy?at={at}")).unwrap();
        assert_eq!(status, 200, "{body}");
        body["beds"][0]["patient"]["value"]
            .as_str()
            .map(str::to_owned)
    };

    // The real admission, from the trusted sender.
    let (code, text) = send(
        "127.0.0.1",
        port,
        &adt("A01", "GHH", "MRN-1", "20240501100000+0000", "C1"),
    );
    assert_eq!(code, "AA", "{text}");
    assert_eq!(patient_at("2024-05-01T11:00:00Z").as_deref(), Some("MRN-1"));

    // Forged: a discharge of MRN-1 from another address, and a back-dated
    // admission of another patient naming a facility not allowed (also
    // from the trusted address).
    let (code, text) = send(
        "127.0.0.2",
        port,
        &adt("A03", "GHH", "MRN-1", "20240501100500+0000", "F1"),
    );
    assert_eq!(code, "AR", "{text}");
    assert!(text.contains("untrusted source"), "{text}");
    for from in ["127.0.0.1", "127.0.0.2"] {
        let (code, text) = send(
            from,
            port,
            &adt("A03", "EVIL", "MRN-1", "20240501100500+0000", "F2"),
        );
        assert_eq!(code, "AR", "{from}: {text}");
    }
    let (code, text) = send(
        "127.0.0.1",
        port,
        &adt(
            "A01",
            "EVIL^1.2.3^ISO",
            "MRN-666",
            "20200101000000+0000",
            "F3",
        ),
    );
    assert_eq!(code, "AR", "{text}");
    assert!(text.contains("MSH^1^4"), "{text}");

    // Nobody moved: MRN-1 still in the bed, before and after the forged
    // discharge time; the back-dated admission left no trace.
    assert_eq!(patient_at("2024-05-01T11:00:00Z").as_deref(), Some("MRN-1"));
    assert_eq!(patient_at("2021-01-01T00:00:00Z"), None);
    let metrics = get_text(&format!("{base}/metrics"));
    for line in [
        "vigil_hub_adt_refused_total{reason=\"untrusted_source\"} 2",
        "vigil_hub_adt_refused_total{reason=\"facility\"} 2",
        "vigil_hub_adt_messages_total{ack=\"AA\"} 1",
        "vigil_hub_adt_messages_total{ack=\"AR\"} 4",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // The hub's log names the refused source, never a patient.
    let log = std::fs::read_to_string(dir.join("hub.log")).unwrap();
    assert!(log.contains("untrusted source"), "{log}");
    assert!(!log.contains("MRN-1") && !log.contains("MRN-666"), "{log}");
    drop(hub);
}

#[test]
fn a_non_loopback_adt_listener_without_mutual_tls_does_not_start() {
    let (_keep, dir) = test_dir("hub-abuse-adt-open");
    let config = write_hub_config(&dir, "127.0.0.1:0", &[]).unwrap();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(
        "[adt]\nlisten = \"0.0.0.0:0\"\nallow_sources = [\"10.1.2.3\"]\n\
         allowed_sending_facilities = [\"GHH\"]\n",
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(bin("cloud-hub"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the hub started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adt.allow_sources"), "{err}");
}
