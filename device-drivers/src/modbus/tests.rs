//! Session tests against a hand-written slave over an in-memory duplex
//! link: the exact request bytes the driver sends (MBAP / RTU framing as in
//! the specifications) and the readings made from byte-level answers.

use std::sync::Arc;

use bytes::BytesMut;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::TechnicalKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::*;
use crate::{DriverOutput, DriverStats};

/// A map of a small ventilator-like device: holding 0 RR (u16), 1 VT (u16),
/// 2–3 FiO2 (f32 CDAB), 4 PEEP (i16 × 0.1 hPa, 0x7FFF invalid); input 0
/// SpO2 (u16); coil 0 → a bit (as "SpO2" only to have a catalogue metric).
const MAP: &str = r#"
description = "test map"
[[points]]
label = "RR"
table = "holding"
address = 0
type = "u16"
unit = "/min"
mdc = "MDC_RESP_RATE"
[[points]]
label = "VT"
table = "holding"
address = 1
type = "u16"
unit = "mL"
mdc = "MDC_VENT_VOL_TIDAL"
invalid = [0xFFFF]
[[points]]
label = "FiO2"
table = "holding"
address = 2
type = "f32"
order = "CDAB"
unit = "%"
mdc = "MDC_CONC_AWAY_O2_INSP"
[[points]]
label = "PEEP"
table = "holding"
address = 4
type = "i16"
scale = 0.1
unit = "hPa"
mdc = "MDC_VENT_PRESS_AWAY_END_EXP_POS"
invalid = [0x7FFF]
"#;

fn modbus(framing: Framing, extra: impl FnOnce(&mut ModbusOptions)) -> Modbus {
    let mut o = ModbusOptions {
        points: Some(map::parse_map(MAP).unwrap().points),
        poll_interval_ms: 100,
        response_timeout_ms: 200,
        ..ModbusOptions::default()
    };
    extra(&mut o);
    Modbus::new(framing, o).unwrap()
}

#[test]
fn the_test_map_is_one_coalesced_read() {
    let m = modbus(Framing::Tcp, |_| {});
    assert_eq!(m.reads().len(), 1);
    assert_eq!((m.reads()[0].start, m.reads()[0].count), (0, 5));
}

#[test]
fn options_are_checked() {
    let err = |f: fn(&mut ModbusOptions), want: &str| {
        let mut o = ModbusOptions {
            points: Some(map::parse_map(MAP).unwrap().points),
            ..ModbusOptions::default()
        };
        f(&mut o);
        let e = Modbus::new(Framing::Rtu, o).unwrap_err();
        assert!(e.contains(want), "{e} / {want}");
    };
    err(|o| o.unit_id = 0, "unit_id");
    err(|o| o.unit_id = 248, "unit_id");
    err(|o| o.points = None, "register map is required");
    err(|o| o.map = Some("x.toml".into()), "not both");
    err(|o| o.max_registers_per_read = 3, "max_registers_per_read");
    err(|o| o.max_bits_per_read = 2001, "max_bits_per_read");
    err(|o| o.poll_interval_ms = 1, "poll_interval_ms");
    err(|o| o.response_timeout_ms = 0, "response_timeout_ms");
    err(
        |o| {
            o.points = None;
            o.map = Some("/nonexistent/map.toml".into());
        },
        "/nonexistent/map.toml",
    );
    // TCP accepts any unit id, 0 and 255 included.
    let o = ModbusOptions {
        unit_id: 255,
        points: Some(map::parse_map(MAP).unwrap().points),
        ..ModbusOptions::default()
    };
    Modbus::new(Framing::Tcp, o).unwrap();
    // Unknown options are refused.
    assert!(toml::from_str::<ModbusOptions>("bogus = 1").is_err());
}

/// Holding registers 0..5 as the slave holds them:
/// RR 16, VT 450, FiO2 40.5 (0x42220000, CDAB: 0000 4222), PEEP 50 (5.0 hPa).
const REGS: [u16; 5] = [16, 450, 0x0000, 0x4222, 50];

/// CRC-16/MODBUS (Modbus over Serial Line v1.02 §6.2.2: polynomial 0xA001
/// reflected, initial 0xFFFF, low byte first on the wire).
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[test]
fn crc_matches_the_classic_specification_example() {
    // Read holding registers 108–110 from slave 17 (Application Protocol
    // §6.3 example PDU 03 00 6B 00 03): RTU frame 11 03 00 6B 00 03 76 87.
    let c = crc16(&[0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]);
    assert_eq!(c.to_le_bytes(), [0x76, 0x87]);
}

/// How the fake slave behaves.
#[derive(Clone, Copy)]
enum Slave2 {
    Answer,
    Exception(u8),
    /// Answer `n` requests, then never again.
    SilentAfter(usize),
}

/// A Modbus TCP slave: reads one MBAP request, checks it is the expected
/// read, answers from `REGS`.
async fn tcp_slave(mut s: DuplexStream, mode: Slave2, seen: mpsc::UnboundedSender<Vec<u8>>) {
    let mut n = 0;
    loop {
        // MBAP (TCP Implementation Guide §3.1.3): transaction id (2), protocol
        // id 0 (2), length (2) = unit id + PDU, unit id (1).
        let mut hdr = [0u8; 7];
        if s.read_exact(&mut hdr).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        let mut pdu = vec![0u8; len - 1];
        if s.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let mut all = hdr.to_vec();
        all.extend_from_slice(&pdu);
        let _ = seen.send(all);
        n += 1;
        let body: Vec<u8> = match mode {
            Slave2::SilentAfter(k) if n > k => continue,
            Slave2::Exception(code) => vec![pdu[0] | 0x80, code],
            _ => {
                let start = usize::from(u16::from_be_bytes([pdu[1], pdu[2]]));
                let count = usize::from(u16::from_be_bytes([pdu[3], pdu[4]]));
                let mut b = vec![pdu[0], (count * 2) as u8];
                for r in &REGS[start..start + count] {
                    b.extend_from_slice(&r.to_be_bytes());
                }
                b
            }
        };
        let mut out = vec![hdr[0], hdr[1], 0, 0];
        out.extend_from_slice(&((body.len() + 1) as u16).to_be_bytes());
        out.push(hdr[6]);
        out.extend_from_slice(&body);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

struct Harness {
    tx: mpsc::Sender<DriverOutput>,
    rx: mpsc::Receiver<DriverOutput>,
    stats: Arc<DriverStats>,
    _stop: tokio::sync::watch::Sender<bool>,
    shutdown: crate::Shutdown,
}

fn harness() -> Harness {
    let (tx, rx) = mpsc::channel(64);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    Harness {
        tx,
        rx,
        stats: Arc::new(DriverStats::default()),
        _stop: stop,
        shutdown,
    }
}

fn values(out: &[DriverOutput]) -> Vec<(String, Option<f64>, u32, String, i32)> {
    out.iter()
        .flat_map(|o| &o.readings)
        .map(|r| {
            (
                r.vendor_label.clone(),
                match r.value {
                    Some(Value::Numeric(v)) => Some((v * 1000.0).round() / 1000.0),
                    _ => None,
                },
                r.mdc_unit,
                r.ucum_unit.clone(),
                r.validity,
            )
        })
        .collect()
}

#[tokio::test]
async fn tcp_session_sends_one_coalesced_request_and_maps_every_point() {
    let m = modbus(Framing::Tcp, |_| {});
    let (a, b) = tokio::io::duplex(1024);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(tcp_slave(b, Slave2::Answer, seen_tx));
    let mut h = harness();
    let session = {
        let stats = h.stats.clone();
        let tx = h.tx.clone();
        let mut sd = h.shutdown.clone();
        tokio::spawn(async move {
            let mut ctx = SessionCtx::new("vent-1", &stats, &tx, &mut sd, Duration::from_secs(2));
            m.session(a, &mut ctx).await
        })
    };
    let mut outs = vec![];
    while values(&outs).len() < 8 {
        outs.push(h.rx.recv().await.unwrap());
    }
    session.abort();
    // First: CONNECTED.
    assert_eq!(outs[0].technical[0].kind, TechnicalKind::Connected as i32);
    let v = values(&outs);
    let valid = Validity::Valid as i32;
    assert_eq!(
        v[..4],
        [
            (
                "RR".into(),
                Some(16.0),
                units::RESP_PER_MIN.mdc,
                "/min".into(),
                valid
            ),
            (
                "VT".into(),
                Some(450.0),
                units::MILLI_L.mdc,
                "mL".into(),
                valid
            ),
            (
                "FiO2".into(),
                Some(40.5),
                units::PERCENT.mdc,
                "%".into(),
                valid
            ),
            (
                "PEEP".into(),
                Some(5.0),
                units::HECTO_PA.mdc,
                "hPa".into(),
                valid
            ),
        ]
    );
    let r = &outs[1].readings[0];
    assert_eq!(r.mdc_code, codes::RESP_RATE);
    assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
    assert_eq!(r.device_time_us, r.gateway_time_us);
    // The request (Application Protocol §6.3, function 0x03), in MBAP:
    // 00 00 transaction 0 (tokio-modbus counts from 0) | 00 00 protocol | 00 06 length | 01 unit 1 |
    // 03 read holding | 00 00 start 0 | 00 05 quantity 5.
    assert_eq!(
        seen.recv().await.unwrap(),
        [
            0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x00, 0x00, 0x00, 0x05
        ]
    );
    // Second poll: the next transaction id.
    assert_eq!(seen.recv().await.unwrap()[..2], [0x00, 0x01]);
    assert_eq!(h.stats.snapshot().frames_ok, 2);
}

#[tokio::test]
async fn sentinels_become_invalid_readings_without_a_value() {
    let m = modbus(Framing::Tcp, |_| {});
    let p = &m.points()[3]; // PEEP, invalid 0x7FFF
    let r = point_reading(p, codec::decode_registers(p, 4, &[0x7FFF]).unwrap(), 7);
    assert_eq!(r.value, None);
    assert_eq!(r.validity, Validity::Invalid as i32);
    assert_eq!(r.flags, [QualityFlag::ValueMissing as i32]);
    assert_eq!(r.mdc_unit, units::HECTO_PA.mdc);
    // A short response: the missing points are not made up.
    let (rs, short) = response_to_readings(
        m.points(),
        &m.reads()[0],
        &ReadData::Registers(vec![1, 2]),
        0,
    );
    assert_eq!((rs.len(), short), (2, 2));
}

#[tokio::test]
async fn exceptions_are_counted_and_keep_the_session() {
    let m = modbus(Framing::Tcp, |_| {});
    let (a, b) = tokio::io::duplex(1024);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    // 0x02 ILLEGAL DATA ADDRESS (Application Protocol §7).
    tokio::spawn(tcp_slave(b, Slave2::Exception(0x02), seen_tx));
    let mut h = harness();
    let stats = h.stats.clone();
    let tx = h.tx.clone();
    let mut sd = h.shutdown.clone();
    let session = tokio::spawn(async move {
        let mut ctx = SessionCtx::new("vent-1", &stats, &tx, &mut sd, Duration::from_secs(2));
        m.session(a, &mut ctx).await
    });
    let first = h.rx.recv().await.unwrap();
    assert_eq!(first.technical[0].kind, TechnicalKind::Connected as i32);
    for _ in 0..3 {
        seen.recv().await.unwrap();
    }
    // Let the third answer be processed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let snap = h.stats.snapshot();
    assert!(snap.exceptions >= 2, "{snap:?}");
    assert!(h.rx.try_recv().is_err(), "no readings from exceptions");
    assert!(!session.is_finished());
    session.abort();
}

#[tokio::test]
async fn a_slave_that_stops_answering_ends_the_session_as_silent() {
    let m = modbus(Framing::Tcp, |_| {});
    let (a, b) = tokio::io::duplex(1024);
    let (seen_tx, _seen) = mpsc::unbounded_channel();
    tokio::spawn(tcp_slave(b, Slave2::SilentAfter(2), seen_tx));
    let h = harness();
    let mut sd = h.shutdown.clone();
    let mut ctx = SessionCtx::new(
        "vent-1",
        &h.stats,
        &h.tx,
        &mut sd,
        Duration::from_millis(700),
    );
    let t0 = Instant::now();
    let r = m.session(a, &mut ctx).await;
    assert!(matches!(r, Err(DriverError::Silent(_))), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(700));
    let snap = h.stats.snapshot();
    assert!(snap.timeouts >= 2, "{snap:?}");
    assert_eq!(snap.frames_ok, 2);
}

/// A Modbus RTU slave (unit 7): reads one 8-byte request frame, checks its
/// CRC, answers with a CRC'd frame.
async fn rtu_slave(mut s: DuplexStream, seen: mpsc::UnboundedSender<Vec<u8>>) {
    loop {
        // Address (1) | function (1) | start (2) | quantity (2) | CRC (2).
        let mut req = [0u8; 8];
        if s.read_exact(&mut req).await.is_err() {
            return;
        }
        let _ = seen.send(req.to_vec());
        assert_eq!(crc16(&req[..6]).to_le_bytes(), [req[6], req[7]]);
        let start = usize::from(u16::from_be_bytes([req[2], req[3]]));
        let count = usize::from(u16::from_be_bytes([req[4], req[5]]));
        let mut out = vec![req[0], req[1], (count * 2) as u8];
        for r in &REGS[start..start + count] {
            out.extend_from_slice(&r.to_be_bytes());
        }
        let c = crc16(&out);
        out.extend_from_slice(&c.to_le_bytes());
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn rtu_session_frames_requests_with_address_and_crc() {
    let m = modbus(Framing::Rtu, |o| o.unit_id = 7);
    let (a, b) = tokio::io::duplex(1024);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(rtu_slave(b, seen_tx));
    let mut h = harness();
    let stats = h.stats.clone();
    let tx = h.tx.clone();
    let mut sd = h.shutdown.clone();
    let session = tokio::spawn(async move {
        let mut ctx = SessionCtx::new("vent-1", &stats, &tx, &mut sd, Duration::from_secs(2));
        m.session(a, &mut ctx).await
    });
    let mut outs = vec![];
    while values(&outs).len() < 4 {
        outs.push(h.rx.recv().await.unwrap());
    }
    session.abort();
    let v = values(&outs);
    assert_eq!(v[2].1, Some(40.5));
    assert_eq!(v[3].1, Some(5.0));
    // 07 slave | 03 read holding | 00 00 start | 00 05 quantity | CRC lo hi.
    let req = seen.recv().await.unwrap();
    assert_eq!(req[..6], [0x07, 0x03, 0x00, 0x00, 0x00, 0x05]);
    assert_eq!(req[6..], crc16(&req[..6]).to_le_bytes());
}

#[tokio::test]
async fn garbage_answers_are_counted_and_end_in_silence() {
    let m = modbus(Framing::Rtu, |_| {});
    let (a, mut b) = tokio::io::duplex(1024);
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64);
        loop {
            buf.clear();
            if b.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            // A frame with a bad CRC.
            let _ = b
                .write_all(&[0x01, 0x03, 0x02, 0x00, 0x10, 0xDE, 0xAD])
                .await;
        }
    });
    let h = harness();
    let mut sd = h.shutdown.clone();
    let mut ctx = SessionCtx::new(
        "vent-1",
        &h.stats,
        &h.tx,
        &mut sd,
        Duration::from_millis(600),
    );
    let r = m.session(a, &mut ctx).await;
    assert!(matches!(r, Err(DriverError::Silent(_))), "{r:?}");
    let snap = h.stats.snapshot();
    assert_eq!(snap.frames_ok, 0);
    assert!(snap.frames_bad + snap.timeouts >= 1, "{snap:?}");
    assert!(!ctx.was_connected());
}
