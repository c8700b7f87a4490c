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

/// The senders a loopback test listener trusts: this host, facilities GHH
/// (the vectors above) and PYHOSP (the hl7apy messages).
const TRUSTED: &str =
    "allow_sources = [\"127.0.0.1\"]\nallowed_sending_facilities = [\"GHH\", \"PYHOSP\"]\n";

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
    let config: AdtConfig =
        toml::from_str(&format!("listen = \"127.0.0.1:0\"\n{TRUSTED}")).unwrap();
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
async fn read_ack<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> (String, String, String) {
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
    let config: AdtConfig = toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\nmax_message_bytes = 1024\n{TRUSTED}"
    ))
    .unwrap();
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
        "{}\n[adt]\nlisten = \"127.0.0.1:{port}\"\n{TRUSTED}\
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
    let text = hub.metrics().await;
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
    let fac = "allowed_sending_facilities = [\"GHH\"]";
    let tls = "tls_cert_file = \"a.crt\"\ntls_key_file = \"a.key\"";
    let bad = [
        ("listen = \"nowhere\"".to_owned(), "adt.listen"),
        // Off loopback: mutual TLS or nothing; an allow-list is not enough.
        (
            format!("listen = \"0.0.0.0:2576\"\n{fac}"),
            "adt.client_ca_file",
        ),
        (
            format!("listen = \"0.0.0.0:2576\"\n{tls}\n{fac}"),
            "adt.client_ca_file",
        ),
        (
            format!("listen = \"0.0.0.0:2576\"\nallow_sources = [\"10.0.0.5\"]\n{fac}"),
            "adt.allow_sources",
        ),
        (
            format!("listen = \"0.0.0.0:2576\"\nallow_plaintext = true\n{fac}"),
            "adt.allow_plaintext",
        ),
        // A client CA needs the server's own certificate.
        (
            format!("listen = \"127.0.0.1:2576\"\nclient_ca_file = \"ca.pem\"\n{fac}"),
            "adt.client_ca_file",
        ),
        // On loopback the senders are still named.
        (
            format!("listen = \"127.0.0.1:2576\"\n{fac}"),
            "adt.allow_sources",
        ),
        (
            format!("listen = \"127.0.0.1:2576\"\nallow_sources = [\"localhost\"]\n{fac}"),
            "adt.allow_sources",
        ),
        (
            "listen = \"127.0.0.1:2576\"\nallow_sources = [\"127.0.0.1\"]".to_owned(),
            "adt.allowed_sending_facilities",
        ),
        (
            "listen = \"127.0.0.1:2576\"\nallow_sources = [\"127.0.0.1\"]\n\
             allowed_sending_facilities = [\" \"]"
                .to_owned(),
            "adt.allowed_sending_facilities",
        ),
        (
            format!("listen = \"127.0.0.1:2576\"\nbed_id = \"{{ward}}\"\n{TRUSTED}"),
            "adt.bed_id",
        ),
        (
            format!("listen = \"127.0.0.1:2576\"\nutc_offset_minutes = 5000\n{TRUSTED}"),
            "adt.utc_offset_minutes",
        ),
    ];
    for (text, field) in bad {
        let c: AdtConfig = toml::from_str(&text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    for ok in [
        format!("listen = \"127.0.0.1:2576\"\n{TRUSTED}"),
        format!("listen = \"0.0.0.0:2576\"\n{tls}\nclient_ca_file = \"ca.pem\"\n{fac}"),
        format!(
            "listen = \"0.0.0.0:2576\"\n{tls}\nclient_ca_file = \"ca.pem\"\n\
             allow_sources = [\"10.0.0.5\"]\n{fac}"
        ),
    ] {
        let c: AdtConfig = toml::from_str(&ok).unwrap();
        c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// A test CA (rcgen) issuing server and client certificates.
struct Ca {
    pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, params, key }
    }

    /// (certificate DER, key DER, certificate PEM, key PEM).
    fn issue(&self, name: &str, client: bool) -> (Vec<u8>, Vec<u8>, String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (
            cert.der().to_vec(),
            key.serialize_der(),
            cert.pem(),
            key.serialize_pem(),
        )
    }
}

/// A TLS client trusting `server_ca`, presenting `identity` (certificate
/// and key DER) if given.
fn tls_client(server_ca: &Ca, identity: Option<(Vec<u8>, Vec<u8>)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(server_ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(cert)],
                rustls::pki_types::PrivateKeyDer::try_from(key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Whether a connection gets no ACK for `msg` (closed, refused in the
/// handshake, or silent).
async fn no_ack<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    msg: &str,
) -> bool {
    if s.write_all(&frame(msg)).await.is_err() {
        return true;
    }
    let _ = s.flush().await;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
        Ok(Ok(n)) => !buf[..n].contains(&SB),
        Ok(Err(_)) => true,
        Err(_) => true,
    }
}

/// With `client_ca_file` the listener is mutual TLS: a sender with a
/// certificate from that CA is served (and named by it in the audit log);
/// without a certificate, with one from another CA, or in plaintext there
/// is no ACK and nothing changes.
#[tokio::test]
async fn adt_over_mutual_tls_serves_only_senders_with_a_certificate_from_the_client_ca() {
    use std::os::unix::fs::PermissionsExt;
    let fx_dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, foreign_ca) = (Ca::new("srv"), Ca::new("adt"), Ca::new("evil"));
    let (_, _, cert_pem, key_pem) = server_ca.issue("localhost", false);
    let (cert, key, ca) = (
        fx_dir.path().join("adt.crt"),
        fx_dir.path().join("adt.key"),
        fx_dir.path().join("adt-clients.pem"),
    );
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&ca, &client_ca.pem).unwrap();
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
        "listen = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
         client_ca_file = \"{}\"\nallowed_sending_facilities = [\"GHH\"]",
        cert.display(),
        key.display(),
        ca.display()
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
    let (addr, stats) = (l.local_addr().unwrap(), l.stats());
    let stop = CancellationToken::new();
    let task = tokio::spawn(l.serve(stop.clone()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mrn1 = PatientId {
        system: "urn:vigil:authority:GHH".into(),
        value: "MRN-1".into(),
    };

    // Refused senders first: no certificate, a foreign one, plaintext.
    let (fcert, fkey, _, _) = foreign_ca.issue("sender", true);
    for identity in [None, Some((fcert, fkey))] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // (TLS 1.3: the client may finish its side before the server's
        // refusal arrives; then the message gets no ACK.)
        if let Ok(s) = tls_client(&server_ca, identity)
            .connect(name.clone(), tcp)
            .await
        {
            assert!(no_ack(s, A01).await);
        }
    }
    assert!(no_ack(TcpStream::connect(addr).await.unwrap(), A01).await);
    assert_eq!(store.bed_of(&mrn1, T0).unwrap(), None);
    assert_eq!(AdtStats::get(&stats.accepted), 0);

    // The sender with a certificate from the client CA.
    let (ccert, ckey, _, _) = client_ca.issue("adt-engine", true);
    let fingerprint = {
        let d = ring::digest::digest(&ring::digest::SHA256, &ccert);
        hex::encode(d)[..16].to_owned()
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tls_client(&server_ca, Some((ccert, ckey)))
        .connect(name, tcp)
        .await
        .unwrap();
    s.write_all(&frame(A01)).await.unwrap();
    let mut buf = Vec::new();
    let (code, id, _) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AA", "C1"));
    assert_eq!(
        store.bed_of(&mrn1, T0).unwrap().as_deref(),
        Some("ICU3-07-B")
    );
    let entries = cloud_hub::audit::entries(&store.handle(), i64::MIN).unwrap();
    let e = &entries.last().unwrap().entry;
    assert_eq!(e.actor, format!("adt:GHH@cert:{fingerprint}"));
    assert_eq!(e.patient.as_deref(), Some("MRN-1"));
    assert_eq!(e.resource, "hl7:ADT^A01");
    stop.cancel();
    task.await.unwrap();
}

/// Forged movements: a message from an address `allow_sources` does not
/// list, or from a sending facility not allowed, is answered AR, counted
/// by reason, and moves nothing. An applied one is in the audit log with
/// its source, its patient and the readings it moved.
#[tokio::test]
async fn forged_adt_messages_are_refused_and_applied_ones_audited() {
    let fx = start().await;
    fx.ingest(1, "mon-7", vec![spo2(1, 97.0, T0 + MINUTE)]);
    // From 127.0.0.2 (loopback, but not the allowed 127.0.0.1).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(fx.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(&frame(A01)).await.unwrap();
    let (code, id, text) = read_ack(&mut s, &mut buf).await;
    assert_eq!((code.as_str(), id.as_str()), ("AR", "C1"), "{text}");
    assert!(text.contains("untrusted source"), "{text}");
    drop(s);
    // From the allowed address, but MSH-4 names another facility.
    let forged = A01.replace("|ADT1|GHH|", "|ADT1|EVIL^9.9.9^ISO|");
    let mut s = TcpStream::connect(fx.addr).await.unwrap();
    s.write_all(&frame(&forged)).await.unwrap();
    let (code, _, text) = read_ack(&mut s, &mut buf).await;
    assert_eq!(code, "AR", "{text}");
    assert!(text.contains("ERR||MSH^1^4|103^"), "{text}");
    assert_eq!(fx.patient_of("mon-7", 1), None, "nothing moved");
    assert_eq!(AdtStats::get(&fx.stats.refused_source), 1);
    assert_eq!(AdtStats::get(&fx.stats.refused_facility), 1);
    assert_eq!(AdtStats::get(&fx.stats.rejected), 2);
    let audit = || cloud_hub::audit::entries(&fx.store.handle(), i64::MIN).unwrap();
    assert!(audit().is_empty(), "refused messages change nothing");
    let mut text = String::new();
    fx.stats.render(&mut text);
    assert!(
        text.contains("vigil_hub_adt_refused_total{reason=\"untrusted_source\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vigil_hub_adt_refused_total{reason=\"facility\"} 1"),
        "{text}"
    );

    // The real A01: applied, and audited with source, patient and count.
    s.write_all(&frame(A01)).await.unwrap();
    assert_eq!(read_ack(&mut s, &mut buf).await.0, "AA");
    assert_eq!(fx.patient_of("mon-7", 1).as_deref(), Some("MRN-1"));
    let entries = audit();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0].entry;
    assert_eq!(e.actor, "adt:GHH@ip:127.0.0.1");
    assert_eq!(
        (e.action.as_str(), e.resource.as_str()),
        ("update", "hl7:ADT^A01")
    );
    assert_eq!(e.patient.as_deref(), Some("MRN-1"));
    assert!(
        e.detail
            .contains("re-attributed 1 reading(s) from no patient to Patient/MRN-1"),
        "{}",
        e.detail
    );
    // A transfer naming the patient whose readings move: both named.
    fx.ingest(2, "mon-8", vec![spo2(1, 95.0, T0 + 35 * MINUTE)]);
    s.write_all(&frame(A02)).await.unwrap();
    assert_eq!(read_ack(&mut s, &mut buf).await.0, "AA");
    let entries = audit();
    let last = &entries.last().unwrap().entry;
    assert_eq!(last.resource, "hl7:ADT^A02");
    assert!(
        last.detail
            .contains("re-attributed 1 reading(s) from no patient to Patient/MRN-1"),
        "{}",
        last.detail
    );
    fx.stop().await;
}
