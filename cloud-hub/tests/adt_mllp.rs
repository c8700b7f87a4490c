//! The HL7 v2 ADT listener over real TCP with MLLP frames: admit, transfer,
//! identifier update and discharge move readings between patients; refused
//! messages change nothing; framing errors resync; hl7apy interop; the hub
//! starts the listener from `[adt]`.
//!
//! Message layouts follow HL7 v2.5 chapter 3 (3.3.1 A01 ADT_A01, 3.3.2 A02
//! ADT_A02, 3.3.3 A03 ADT_A03, 3.3.8 A08 ADT_A01); MLLP framing is the HL7
//! v2 Implementation Guide appendix C.4 (0x0B message 0x1C 0x0D).

use crate::common;

use std::sync::Arc;

use cloud_hub::adt_listener::{AdtConfig, AdtListener, AdtStats};
use cloud_hub::association::{Bed, PatientId};
use cloud_hub::store::{Associations, Store};
use common::{GATEWAY, MINUTE, T0, batch, spo2};
use shared_protocol::hl7v2::parse_ack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// MLLP start block, end block, carriage return.
const SB: u8 = 0x0B;
const EB: u8 = 0x1C;
const CR: u8 = 0x0D;

/// ADT^A01 (3.3.1): MSH, EVN, PID, PV1 at T0 = 2024-05-01T10:00:00Z into
/// ICU3^07^B (point of care ^ room ^ bed → bed `ICU3-07-B`), visit V1.
const A01: &str = concat!(
    // MSH-1 `|`, MSH-2 `^~\&`, MSH-3..6 sender/receiver, MSH-7 time,
    // MSH-9 ADT^A01^ADT_A01, MSH-10 control id C1, MSH-11 P, MSH-12 2.5.
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501100000+0000||ADT^A01^ADT_A01|C1|P|2.5\r",
    // EVN-1 A01, EVN-2 recorded time (= event time here).
    "EVN|A01|20240501100000+0000\r",
    // PID-3 MRN-1 (type MR, authority GHH); PID-5 name, PID-7 birth date:
    // never kept.
    "PID|1||MRN-1^^^GHH^MR||Sentinel^Wilhelmina||19400101|F\r",
    // PV1-2 I(npatient), PV1-3 location, PV1-19 visit number.
    "PV1|1|I|ICU3^07^B||||||||||||||||V1\r",
);

/// ADT^A02 (3.3.2) at 10:30 to ICU3^08^A; PV1-6 prior location.
const A02: &str = concat!(
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501103000+0000||ADT^A02^ADT_A02|C2|P|2.5\r",
    "EVN|A02|20240501103000+0000\r",
    "PID|1||MRN-1^^^GHH^MR||Sentinel^Wilhelmina\r",
    "PV1|1|I|ICU3^08^A|||ICU3^07^B||||||||||||V1\r",
);

/// ADT^A08 (3.3.8) at 10:40: the same visit V1 now under MRN-1B (a
/// corrected identifier), location unchanged.
const A08: &str = concat!(
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501104000+0000||ADT^A08^ADT_A01|C3|P|2.5\r",
    "EVN|A08|20240501104000+0000\r",
    "PID|1||MRN-1B^^^GHH^MR||Sentinel^Wilhelmina\r",
    "PV1|1|I|ICU3^08^A||||||||||||||||V1\r",
);

/// ADT^A03 (3.3.3) discharge at 10:50 (EVN-6 event occurred).
const A03: &str = concat!(
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501105500+0000||ADT^A03^ADT_A03|C4|P|2.5\r",
    "EVN|A03|20240501105500+0000||||20240501105000+0000\r",
    "PID|1||MRN-1B^^^GHH^MR\r",
    "PV1|1|I|ICU3^08^A\r",
);

/// A01 into a location that is no known bed: AE.
const A01_UNKNOWN_BED: &str = concat!(
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501100000+0000||ADT^A01^ADT_A01|C5|P|2.5\r",
    "EVN|A01|20240501100000+0000\r",
    "PID|1||MRN-2^^^GHH^MR\r",
    "PV1|1|I|WARD9^01^Z\r",
);

/// A01 without PV1-3: AR (required part missing).
const A01_NO_LOCATION: &str = concat!(
    "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501100000+0000||ADT^A01^ADT_A01|C6|P|2.5\r",
    "EVN|A01|20240501100000+0000\r",
    "PID|1||MRN-3^^^GHH^MR\r",
    "PV1|1|I\r",
);

fn frame(msg: &str) -> Vec<u8> {
    let mut v = vec![SB];
    v.extend_from_slice(msg.as_bytes());
    v.extend_from_slice(&[EB, CR]);
    v
}

struct Fx {
    dir: tempfile::TempDir,
    store: Store,
    addr: std::net::SocketAddr,
    stats: Arc<AdtStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("adt.sqlite")).unwrap();
    for id in ["ICU3-07-B", "ICU3-08-A"] {
        store
            .create_bed(&Bed {
                id: id.into(),
                ward: "ICU3".into(),
                label: id.into(),
            })
            .unwrap();
    }
    let none = Associations::new();
    store
        .place_device(GATEWAY, "mon-7", "ICU3-07-B", T0 - 60 * MINUTE, &none)
        .unwrap();
    store
        .place_device(GATEWAY, "mon-8", "ICU3-08-A", T0 - 60 * MINUTE, &none)
        .unwrap();
    let config: AdtConfig = toml::from_str("listen = \"127.0.0.1:0\"").unwrap();
    let l = AdtListener::bind(&config, store.handle(), Arc::new(none))
        .await
        .unwrap();
    let (addr, stats) = (l.local_addr().unwrap(), l.stats());
    let stop = CancellationToken::new();
    let task = tokio::spawn(l.serve(stop.clone()));
    Fx {
        dir,
        store,
        addr,
        stats,
        stop,
        task,
    }
}

impl Fx {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    fn ingest(&self, seq: u64, device: &str, readings: Vec<shared_protocol::v1::Reading>) {
        let now = cloud_hub::store::now_us();
        self.store
            .ingest(
                GATEWAY,
                &batch(seq, device, readings),
                &Associations::new(),
                now,
                now,
            )
            .unwrap();
    }

    fn patient_of(&self, device: &str, seq: u64) -> Option<String> {
        let c = rusqlite::Connection::open(self.dir.path().join("adt.sqlite")).unwrap();
        c.query_row(
            "SELECT patient_id FROM observations WHERE device_id = ?1 AND sequence = ?2",
            rusqlite::params![device, seq as i64],
            |r| r.get(0),
        )
        .unwrap()
    }
}

/// Reads one MLLP-framed ACK; (MSA-1, MSA-2) and the raw text.
async fn read_ack(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String, String) {
    loop {
        if let Some(start) = buf.iter().position(|&b| b == SB)
            && let Some(end) = buf[start..].windows(2).position(|w| w == [EB, CR])
        {
            let msg = buf[start + 1..start + end].to_vec();
            buf.drain(..start + end + 2);
            let (code, id) = parse_ack(&msg).expect("an ACK with MSA");
            return (code, id, String::from_utf8(msg).unwrap());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("ACK within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed before the ACK");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn admit_transfer_update_discharge_move_readings_between_patients() {
    let fx = start().await;
    // Readings stored before any ADT message: held without a patient.
    fx.ingest(
        1,
        "mon-7",
        vec![spo2(1, 97.0, T0 + MINUTE), spo2(2, 96.0, T0 + 35 * MINUTE)],
    );
    fx.ingest(
        2,
        "mon-8",
        vec![
            spo2(1, 95.0, T0 + 35 * MINUTE),
            spo2(2, 94.0, T0 + 45 * MINUTE),
            spo2(3, 93.0, T0 + 50 * MINUTE),
        ],
    );
    assert_eq!(fx.patient_of("mon-7", 1), None);

    let mut s = TcpStream::connect(fx.addr).await.unwrap();
    let mut buf = Vec::new();

    // A01, split across two writes with the boundary inside the end block.
    let a01 = frame(A01);
    let (head, tail) = a01.split_at(a01.len() - 1);
    s.write_all(head).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.write_all(tail).await.unwrap();
    let (code, id, text) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C1"), "{text}");
    // MSH of the ACK: sender and receiver swapped, ACK^A01^ACK.
    assert!(text.starts_with("MSH|^~\\&|VIGIL|ICU|ADT1|GHH|"), "{text}");
    assert!(text.contains("|ACK^A01^ACK|"), "{text}");
    assert_eq!(fx.patient_of("mon-7", 1).as_deref(), Some("MRN-1"));
    assert_eq!(fx.patient_of("mon-7", 2).as_deref(), Some("MRN-1"));

    // A02 and A08 in one write, with junk before them (dropped, resync).
    let mut wire = b"\r\nnoise".to_vec();
    wire.extend(frame(A02));
    wire.extend(frame(A08));
    s.write_all(&wire).await.unwrap();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C2"));
    // (The A08 may already be applied: it was sent in the same write.)
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C3"));
    // Transfer at 10:30: mon-7's 10:35 reading is nobody's now, mon-8's
    // 10:35 reading is the patient's; the A08 changed the visit's
    // identifier on both stays.
    assert_eq!(fx.patient_of("mon-7", 2), None);
    assert_eq!(fx.patient_of("mon-7", 1).as_deref(), Some("MRN-1B"));
    assert_eq!(fx.patient_of("mon-8", 1).as_deref(), Some("MRN-1B"));

    s.write_all(&frame(A03)).await.unwrap();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C4"));
    // Discharged at 10:50 (EVN-6): the reading exactly at 10:50 is held.
    assert_eq!(fx.patient_of("mon-8", 2).as_deref(), Some("MRN-1B"));
    assert_eq!(fx.patient_of("mon-8", 3), None);
    // A repeated discharge is acknowledged and changes nothing.
    s.write_all(&frame(A03)).await.unwrap();
    assert_eq!(read_ack(&mut s, &mut buf).await.0, "AA");

    // Refusals: AE for an unknown bed, AR for a missing location and for
    // bytes that are no HL7; the connection stays usable.
    s.write_all(&frame(A01_UNKNOWN_BED)).await.unwrap();
    let (code, id, text) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AE", "C5"), "{text}");
    assert!(text.contains("ERR||PV1^1^3|103^"), "{text}");
    s.write_all(&frame(A01_NO_LOCATION)).await.unwrap();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AR", "C6"));
    s.write_all(&frame("GET / HTTP/1.1\r\n\r\n")).await.unwrap();
    assert_eq!(read_ack(&mut s, &mut buf).await.0, "AR");
    assert_eq!(
        fx.store
            .bed_of(
                &PatientId {
                    system: "urn:vigil:authority:GHH".into(),
                    value: "MRN-2".into()
                },
                T0 + MINUTE
            )
            .unwrap(),
        None
    );

    // No name or birth date was stored anywhere in the database file.
    drop(s);
    let db = std::fs::read(fx.dir.path().join("adt.sqlite")).unwrap();
    let wal = std::fs::read(fx.dir.path().join("adt.sqlite-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        let hay = String::from_utf8_lossy(bytes);
        assert!(
            !hay.contains("Sentinel") && !hay.contains("Wilhelmina") && !hay.contains("19400101")
        );
    }
    assert_eq!(AdtStats::get(&fx.stats.accepted), 5);
    assert_eq!(AdtStats::get(&fx.stats.errors), 1);
    assert_eq!(AdtStats::get(&fx.stats.rejected), 2);
    fx.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_answered_ar_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("o.sqlite")).unwrap();
    store
        .create_bed(&Bed {
            id: "ICU3-07-B".into(),
            ward: "ICU3".into(),
            label: "7B".into(),
        })
        .unwrap();
    let config: AdtConfig =
        toml::from_str("listen = \"127.0.0.1:0\"\nmax_message_bytes = 1024").unwrap();
    let l = AdtListener::bind(&config, store.handle(), Arc::default())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(l.serve(stop.clone()));
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let big = format!("{A01}NTE|1||{}\r", "x".repeat(2000));
    s.write_all(&frame(&big)).await.unwrap();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AR", "C1"));
    s.write_all(&frame(A01)).await.unwrap();
    assert_eq!(read_ack(&mut s, &mut buf).await.0, "AA");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn hl7apy_built_adt_messages_are_understood() {
    let fx = start().await;
    fx.ingest(1, "mon-8", vec![spo2(1, 97.0, T0 + 31 * MINUTE)]);
    let out = fx.dir.path().join("adt_interop.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/adt_interop.py");
    let port = fx.addr.port().to_string();
    let out_s = out.display().to_string();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                script,
                "--port",
                &port,
                "--at",
                "20240501100000+0000",
                "--out",
                &out_s,
            ])
            .status()
            .expect("python3 is required (scripts/setup.sh installs hl7apy)")
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "adt_interop.py failed ({status}); exit 3 means hl7apy is missing: run scripts/setup.sh"
    );
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let acks: Vec<(String, String)> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["echoed"].as_str().unwrap().to_owned(),
                r["ack"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        acks,
        vec![
            ("PYA01".to_owned(), "AA".to_owned()),
            ("PYA02".to_owned(), "AA".to_owned()),
            ("PYA01X".to_owned(), "AE".to_owned()),
        ]
    );
    // Transferred at 10:30 to ICU3-08-A (mon-8): its 10:31 reading.
    assert_eq!(fx.patient_of("mon-8", 1).as_deref(), Some("PY-MRN-1"));
    fx.stop().await;
}

#[tokio::test]
async fn the_hub_serves_the_adt_listener_from_its_config() {
    // A free loopback port for [adt] listen.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[adt]\nlisten = \"127.0.0.1:{port}\"\n\
         [identifiers.authorities]\nGHH = \"urn:oid:1.2.3.4\"\n",
        common::config_text(dir.path(), "")
    );
    let config = cloud_hub::Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = common::TestHub::start_config(dir, config, "http").await;
    let mut s = None;
    for _ in 0..50 {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(c) => {
                s = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let mut s = s.expect("the ADT listener accepts connections");
    let mut buf = Vec::new();
    // No bed ICU3-07-B on this hub: AE, but answered by the hub's listener.
    s.write_all(&frame(A01)).await.unwrap();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AE", "C1"));
    drop(s);
    let text = hub
        .client
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("vigil_hub_adt_messages_total{ack=\"AE\"} 1"),
        "{text}"
    );
    assert!(text.contains("vigil_hub_adt_messages_total{ack=\"AA\"} 0"));
    // With the bed: admitted, PID-3's authority GHH stored as the URI the
    // hub's [identifiers] table gives it.
    let (status, body) = common::call_json(
        &hub,
        Some(&hub.reader),
        "POST",
        "/api/v1/beds",
        Some(serde_json::json!({ "id": "ICU3-07-B", "ward": "ICU 3", "label": "Bed B" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&frame(A01)).await.unwrap();
    let (code, _, text) = read_ack(&mut s, &mut buf).await;
    assert_eq!(code, "AA", "{text}");
    drop(s);
    let (status, body) = hub
        .get_json("/api/v1/occupancy?at=2024-05-01T10:30:00Z")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["beds"][0]["patient"]["system"], "urn:oid:1.2.3.4",
        "{body}"
    );
    hub.stop().await;
}

#[test]
fn adt_config_errors_name_the_field() {
    let bad = [
        ("listen = \"nowhere\"", "adt.listen"),
        ("listen = \"0.0.0.0:2576\"", "adt.tls_cert_file"),
        (
            "listen = \"127.0.0.1:2576\"\nbed_id = \"{ward}\"",
            "adt.bed_id",
        ),
        (
            "listen = \"127.0.0.1:2576\"\nutc_offset_minutes = 5000",
            "adt.utc_offset_minutes",
        ),
    ];
    for (text, field) in bad {
        let c: AdtConfig = toml::from_str(text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    let ok: AdtConfig =
        toml::from_str("listen = \"0.0.0.0:2576\"\nallow_plaintext = true").unwrap();
    ok.validate().unwrap();
}

#[tokio::test]
async fn adt_over_tls_with_rustls() {
    use std::os::unix::fs::PermissionsExt;
    let fx_dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (fx_dir.path().join("adt.crt"), fx_dir.path().join("adt.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&fx_dir.path().join("t.sqlite")).unwrap();
    store
        .create_bed(&Bed {
            id: "ICU3-07-B".into(),
            ward: "ICU3".into(),
            label: "7B".into(),
        })
        .unwrap();
    let config: AdtConfig = toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        cert.display(),
        key.display()
    ))
    .unwrap();
    // A key others can read is refused.
    let err = AdtListener::bind(&config, store.handle(), Arc::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let l = AdtListener::bind(&config, store.handle(), Arc::default())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(l.serve(stop.clone()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    s.write_all(&frame(A01)).await.unwrap();
    s.flush().await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(2).any(|w| w == [EB, CR]) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    let (code, id) = parse_ack(&got[1..got.len() - 2]).unwrap();
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C1"));
    assert_eq!(
        store
            .bed_of(
                &PatientId {
                    system: "urn:vigil:authority:GHH".into(),
                    value: "MRN-1".into()
                },
                T0
            )
            .unwrap()
            .as_deref(),
        Some("ICU3-07-B")
    );
    // Plaintext MLLP to the TLS listener gets no ACK.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(&frame(A01)).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), plain.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))) || matches!(r, Ok(Ok(n)) if !buf[..n].contains(&SB)),
        "{r:?}"
    );
    stop.cancel();
    task.await.unwrap();
}
