//! The HL7 listener over real loopback sockets: ACK only after a durable
//! append, nothing stored for AE/AR, AE when the store fails, concurrency,
//! limits, TLS.

use super::*;
use bytes::BytesMut;
use device_drivers::hl7::{MllpDecoder, mllp_encode, parse_ack};
use shared_protocol::v1::reading::Value;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn device(extra: &str) -> DeviceConfig {
    toml::from_str(&format!(
        "kind = \"hl7-mllp\"\nid = \"hl7-1\"\nlisten = \"127.0.0.1:0\"\n{extra}"
    ))
    .unwrap()
}

/// An ORU^R01 with SpO2 and heart rate for patient MRN-1 (name and birth
/// date included, as a real sender would).
fn oru(control: &str, spo2: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|MON|ICU|VIGIL|HOSP|20240501115958+0000||ORU^R01^ORU_R01|{control}|P|2.6\r\
         PID|||MRN-1^^^HOSP^MR||Secretname^Jane||19700101\r\
         OBR|1|||x|||20240501115955+0000\r\
         OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.1.1.1|{spo2}|%^%^UCUM|||||F\r\
         OBX|2|NM|8867-4^Heart rate^LN|1.1.1.2|72|/min^/min^UCUM|||||F\r"
    )
    .into_bytes()
}

/// A sink that keeps what it was given, or fails every store.
#[derive(Debug, Default)]
struct Memory {
    fail: bool,
    stored: Mutex<Vec<DriverOutput>>,
}

impl Sink for Memory {
    fn store(
        &self,
        out: DriverOutput,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self.fail {
                return Err("disk full".into());
            }
            self.stored.lock().unwrap().push(out);
            Ok(())
        })
    }
}

struct Running {
    addr: SocketAddr,
    stats: Arc<Hl7Stats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(dev: DeviceConfig, sink: Arc<dyn Sink>) -> Running {
    let l = Hl7Listener::bind(&dev).await.unwrap();
    let addr = l.local_addr().unwrap();
    let stats = l.stats();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(l.serve_with(sink, Arc::new(Notify::new()), rx));
    Running {
        addr,
        stats,
        stop,
        task,
    }
}

/// Send one framed message, read one framed ACK.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> (String, String) {
    s.write_all(&mllp_encode(msg)).await.unwrap();
    let mut dec = MllpDecoder::default();
    let mut buf = BytesMut::new();
    loop {
        if let Some(ack) = dec.decode(&mut buf).unwrap() {
            return parse_ack(&ack).expect("ACK parses");
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .expect("ACK in time")
            .unwrap();
        assert!(n > 0, "connection closed before the ACK");
    }
}

#[tokio::test]
async fn aa_after_the_append_and_nothing_stored_for_ae_or_ar() {
    let sink = Arc::new(Memory::default());
    let r = start(device(""), sink.clone()).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();

    assert_eq!(
        exchange(&mut c, &oru("M1", "97")).await,
        ("AA".into(), "M1".into())
    );
    {
        let stored = sink.stored.lock().unwrap();
        assert_eq!(stored.len(), 1, "one append per message");
        let out = &stored[0];
        assert_eq!(out.device_id, "hl7-1");
        assert_eq!(out.readings.len(), 2);
        assert_eq!(out.readings[0].value, Some(Value::Numeric(97.0)));
        let subj = out.readings[0].subject.clone().unwrap();
        assert_eq!(
            (subj.system.as_str(), subj.value.as_str()),
            ("HOSP", "MRN-1")
        );
        let dump = format!("{out:?}");
        assert!(!dump.contains("Secretname") && !dump.contains("19700101"));
    }
    // AE (NM that is not a number): the good OBX of the message is not kept.
    assert_eq!(
        exchange(&mut c, &oru("M2", "9x7")).await,
        ("AE".into(), "M2".into())
    );
    // AR (not ORU^R01).
    let adt = b"MSH|^~\\&|A|B|C|D|20240501120000||ADT^A01|M3|P|2.5\rPID|||1\r";
    assert_eq!(exchange(&mut c, adt).await, ("AR".into(), "M3".into()));
    assert_eq!(sink.stored.lock().unwrap().len(), 1);
    assert_eq!(Hl7Stats::get(&r.stats.messages_accepted), 1);
    assert_eq!(Hl7Stats::get(&r.stats.messages_refused), 1);
    assert_eq!(Hl7Stats::get(&r.stats.messages_rejected), 1);

    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn a_store_failure_is_answered_ae_never_aa() {
    let sink = Arc::new(Memory {
        fail: true,
        ..Default::default()
    });
    let r = start(device(""), sink).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    assert_eq!(
        exchange(&mut c, &oru("M1", "97")).await,
        ("AE".into(), "M1".into())
    );
    assert_eq!(Hl7Stats::get(&r.stats.store_errors), 1);
    assert_eq!(Hl7Stats::get(&r.stats.messages_accepted), 0);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn the_real_buffer_holds_readings_with_the_subject_and_no_name() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Arc::new(Buffer::open(dir.path(), &[7u8; 32]).unwrap());
    let r = start(device(""), buffer.clone()).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    assert_eq!(exchange(&mut c, &oru("M1", "97")).await.0, "AA");
    // AA means it is already in the buffer.
    assert_eq!(buffer.pending_readings(), 2);
    let recs = buffer.oldest(10).unwrap();
    let rd = &recs[0].data.readings;
    assert_eq!(rd[0].subject.as_ref().unwrap().value, "MRN-1");
    assert_eq!(rd[1].sequence, rd[0].sequence + 1);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
    buffer.flush().await.unwrap();
    drop(recs);
    drop(buffer);
    for f in walk(dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [&b"Secretname"[..], b"19700101", b"MRN-1"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds plaintext",
                f.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn many_concurrent_connections_each_get_their_acks() {
    let sink = Arc::new(Memory::default());
    let r = start(device(""), sink.clone()).await;
    let mut tasks = vec![];
    for c in 0..8 {
        let addr = r.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for m in 0..5 {
                let id = format!("C{c}M{m}");
                assert_eq!(exchange(&mut s, &oru(&id, "95")).await, ("AA".into(), id));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sink.stored.lock().unwrap().len(), 40);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn limits_oversized_messages_junk_and_connection_count() {
    let sink = Arc::new(Memory::default());
    let dev =
        device("[options]\nmax_message_bytes = 1024\nmax_junk_bytes = 100\nmax_connections = 1\n");
    let r = start(dev, sink.clone()).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    // Too large: AR naming the control id, nothing stored.
    let mut big = oru("BIG", "97");
    big.extend(std::iter::repeat_n(b'x', 2000));
    assert_eq!(exchange(&mut c, &big).await, ("AR".into(), "BIG".into()));
    assert_eq!(exchange(&mut c, &oru("OK", "97")).await.0, "AA");
    // A second connection is over the limit: closed at once.
    let mut c2 = TcpStream::connect(r.addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), c2.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    assert_eq!(Counters::get(&r.stats.listener.connections_refused), 1);
    // Junk beyond the limit closes the connection.
    c.write_all(&[b'j'; 200]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    assert_eq!(sink.stored.lock().unwrap().len(), 1);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn tls_listener_with_rustls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dev = device(&format!(
        "[options]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    // A key readable by others is refused.
    let err = Hl7Listener::bind(&dev).await.unwrap_err();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let sink = Arc::new(Memory::default());
    let r = start(dev, sink.clone()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(r.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = conn.connect(name, tcp).await.unwrap();
    assert_eq!(
        exchange(&mut s, &oru("T1", "97")).await,
        ("AA".into(), "T1".into())
    );
    assert_eq!(sink.stored.lock().unwrap().len(), 1);
    // Plaintext to the TLS port gets no ACK.
    let mut plain = TcpStream::connect(r.addr).await.unwrap();
    plain
        .write_all(&mllp_encode(&oru("P1", "97")))
        .await
        .unwrap();
    let mut b = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), plain.read(&mut b)).await;
    assert!(
        !matches!(n, Ok(Ok(k)) if k > 0 && b.contains(&0x0B)),
        "no MLLP ACK over plaintext"
    );
    assert_eq!(sink.stored.lock().unwrap().len(), 1);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[test]
fn config_rules_for_the_listener_kind() {
    let base = "gateway_id = \"gw\"\ndata_dir = \"d\"\n[uplink]\nurl = \"http://127.0.0.1:1/api/v1/ingest\"\n";
    let parse = |dev: &str| -> Result<(), String> {
        let cfg: crate::config::AgentConfig = toml::from_str(&format!(
            "{base}[[device]]\nkind = \"hl7-mllp\"\nid = \"h\"\n{dev}"
        ))
        .map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())
    };
    parse("listen = \"127.0.0.1:2575\"").unwrap();
    parse("listen = \"::1\"").unwrap();
    let e = parse("").unwrap_err();
    assert!(
        e.contains("device[0].listen") && e.contains("required"),
        "{e}"
    );
    let e = parse("listen = \"nowhere\"").unwrap_err();
    assert!(e.contains("device[0].listen"), "{e}");
    let e = parse("listen = \"127.0.0.1:2575\"\nport = \"/dev/x\"").unwrap_err();
    assert!(e.contains("device[0].port"), "{e}");
    // Plaintext off loopback needs TLS or allow_plaintext (as for the hub).
    let e = parse("listen = \"0.0.0.0:2575\"").unwrap_err();
    assert!(
        e.contains("device[0].options") && e.contains("tls_cert_file"),
        "{e}"
    );
    parse("listen = \"0.0.0.0:2575\"\n[device.options]\nallow_plaintext = true").unwrap();
    let e = parse("listen = \"127.0.0.1:2575\"\n[device.options]\nutc_offset_minutes = 5000")
        .unwrap_err();
    assert!(e.contains("utc_offset_minutes"), "{e}");
    assert_eq!(
        listen_addr("10.0.0.5").unwrap(),
        "10.0.0.5:2575".parse::<SocketAddr>().unwrap()
    );
}
