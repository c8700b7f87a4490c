//! GE Datex-Ohmeda S/5 monitors, "Computer Interface" (DRI) on the serial
//! port: codec, mapping of displayed values to readings, and the session
//! (request displayed values, decode records, re-request on silence, stop on
//! shutdown).
//!
//! See [`codec`] for the sources of the facts used.

pub mod codec;

use std::time::Duration;

use bytes::BytesMut;
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use codec::{BasicPhdb, DatexDecoder, DatexError, DatexRecord, GroupHdr, Phdb, RawValue};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "datex-s5-serial";
/// The monitor's computer interface: 19200 baud, 8 data bits, even parity,
/// 1 stop bit, RTS/CTS hardware flow control.
pub const SERIAL: SerialSettings = SerialSettings::new(
    19200,
    DataBits::Eight,
    Parity::Even,
    StopBits::One,
    FlowControl::Hardware,
);

/// Shortest transmission interval accepted for displayed values, seconds.
/// Public re-statements of the specification give 5 s as the monitor's
/// minimum for displayed values (not confirmed against the document itself).
pub const MIN_INTERVAL_S: u16 = 5;

/// Options of an S/5 monitor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatexOptions {
    /// Seconds between displayed-value records the monitor is asked for
    /// (`tx_ival`); at least 5 (the monitor's minimum). Default 10.
    pub interval_s: u16,
    /// DRI interface levels the request is sent with, one request each
    /// (the monitor answers the one matching its software level). Default
    /// `[9, 8, 7]` (levels 2005, 2003, 2001).
    pub dri_levels: Vec<u8>,
    /// UTC offset of the monitor's clock in minutes (its Unix time stamps
    /// are taken from a clock staff set to local time). Default 0.
    pub clock_offset_minutes: i32,
}

impl Default for DatexOptions {
    fn default() -> Self {
        DatexOptions {
            interval_s: 10,
            dri_levels: vec![
                codec::DRI_LEVEL_2005,
                codec::DRI_LEVEL_2003,
                codec::DRI_LEVEL_2001,
            ],
            clock_offset_minutes: 0,
        }
    }
}

/// The S/5 computer-interface protocol.
#[derive(Debug, Clone)]
pub struct Datex {
    interval_s: u16,
    dri_levels: Vec<u8>,
    clock_offset_s: i64,
}

impl Datex {
    pub fn new(opts: DatexOptions) -> Result<Self, String> {
        if opts.interval_s < MIN_INTERVAL_S {
            return Err(format!(
                "interval_s must be at least {MIN_INTERVAL_S} (the monitor's minimum)"
            ));
        }
        if opts.interval_s > i16::MAX as u16 {
            return Err("interval_s must be at most 32767".into());
        }
        if opts.dri_levels.is_empty() || opts.dri_levels.len() > 16 {
            return Err("dri_levels must list 1 to 16 levels".into());
        }
        if opts.clock_offset_minutes.abs() > 18 * 60 {
            return Err("clock_offset_minutes must be within ±1080".into());
        }
        Ok(Datex {
            interval_s: opts.interval_s,
            dri_levels: opts.dri_levels,
            clock_offset_s: i64::from(opts.clock_offset_minutes) * 60,
        })
    }

    fn requests(&self, interval_s: i16) -> Vec<u8> {
        let mut out = Vec::new();
        for &level in &self.dri_levels {
            let class = if interval_s == 0 {
                0
            } else {
                codec::DRI_PHDBCL_REQ_BASIC_MASK
            };
            out.extend(codec::frame(&codec::phdb_request(
                level,
                codec::DRI_PH_DISPL,
                interval_s,
                class,
            )));
        }
        out
    }
}

/// Temperature labels (`t_group.hdr.label`) that name a body site; other
/// labels (skin, airway, room, myocardial, surface, or the generic T1–T4)
/// are not body temperature and are not reported as MDC_TEMP_BODY.
fn temp_site(label: u16) -> Option<&'static str> {
    Some(match label {
        1 => "ESO",
        2 => "NASO",
        3 => "TYMP",
        4 => "RECT",
        5 => "BLAD",
        6 => "AXIL",
        15 => "CORE",
        _ => return None,
    })
}

struct Metric {
    mdc: u32,
    label: String,
    raw: i16,
    /// Physical value = raw / divisor.
    divisor: f64,
    unit: Unit,
    flags: Vec<QualityFlag>,
    questionable: bool,
}

/// Map one displayed-values sub-record to readings. Only groups whose
/// status says "exists" and "active" are reported. Reserved values become
/// readings without a value (INVALID with a reason); status bits that
/// qualify a measurement (calibrating, artifact, …) make it QUESTIONABLE.
/// Returns the readings and the number of reserved values without a known
/// meaning (for the `unknown_flags` counter).
pub fn phdb_to_readings(
    p: &Phdb,
    clock_offset_s: i64,
    gateway_time_us: i64,
) -> (Vec<Reading>, usize) {
    let Some(b) = p.basic else {
        return (vec![], 0);
    };
    let on = |h: GroupHdr| h.exists() && h.active();
    let mut m: Vec<Metric> = Vec::new();

    // ECG: hr in 1/min. Status bits 3-6 hold the heart-rate source
    // (1 = ECG); only an ECG-derived rate is MDC_ECG_HEART_RATE. Bit 7 noise,
    // bit 8 artifact, bit 9 learning.
    if on(b.ecg.hdr) && (b.ecg.hdr.status >> 3) & 0x0F == 1 {
        let mut flags = vec![];
        if b.ecg.hdr.bit(7) || b.ecg.hdr.bit(8) {
            flags.push(QualityFlag::Interference);
        }
        if b.ecg.hdr.bit(9) {
            flags.push(QualityFlag::Searching);
        }
        let questionable = !flags.is_empty();
        m.push(Metric {
            mdc: codes::ECG_HEART_RATE,
            label: "ECG HR".into(),
            raw: b.ecg.v[0],
            divisor: 1.0,
            unit: units::BEAT_PER_MIN,
            flags,
            questionable,
        });
    }
    // NIBP: sys/dia/mean in 0.01 mmHg. Label bit 7: calibrating.
    if on(b.nibp.hdr) {
        let cal = b.nibp.hdr.label & (1 << 7) != 0;
        let flags = if cal {
            vec![QualityFlag::Calibrating]
        } else {
            vec![]
        };
        for (i, (mdc, label)) in [
            (codes::PRESS_BLD_NONINV_SYS, "NIBP SYS"),
            (codes::PRESS_BLD_NONINV_DIA, "NIBP DIA"),
            (codes::PRESS_BLD_NONINV_MEAN, "NIBP MEAN"),
        ]
        .into_iter()
        .enumerate()
        {
            m.push(Metric {
                mdc,
                label: label.into(),
                raw: b.nibp.v[i],
                divisor: 100.0,
                unit: units::MMHG,
                flags: flags.clone(),
                questionable: cal,
            });
        }
    }
    // Temperatures: 0.01 °C, only for body-site labels.
    for (i, t) in b.t.iter().enumerate() {
        if let (true, Some(site)) = (on(t.hdr), temp_site(t.hdr.label)) {
            m.push(Metric {
                mdc: codes::TEMP_BODY,
                label: format!("T{} {site}", i + 1),
                raw: t.v[0],
                divisor: 100.0,
                unit: units::DEGC,
                flags: vec![],
                questionable: false,
            });
        }
    }
    // SpO2: SpO2 in 0.01 %, pulse rate in 1/min.
    if on(b.spo2.hdr) {
        m.push(Metric {
            mdc: codes::PULS_OXIM_SAT_O2,
            label: "SpO2".into(),
            raw: b.spo2.v[0],
            divisor: 100.0,
            unit: units::PERCENT,
            flags: vec![],
            questionable: false,
        });
        m.push(Metric {
            mdc: codes::PULS_OXIM_PULS_RATE,
            label: "SpO2 PR".into(),
            raw: b.spo2.v[1],
            divisor: 1.0,
            unit: units::BEAT_PER_MIN,
            flags: vec![],
            questionable: false,
        });
    }
    // CO2: et in 0.01 % (a volume fraction, NOT mmHg: no conversion with a
    // barometric pressure is made), rr in 1/min. Status bit 3 calibrating,
    // 4 zeroing, 5 occlusion, 6 air leak.
    if on(b.co2.hdr) {
        let h = b.co2.hdr;
        let mut flags = vec![];
        if h.bit(3) || h.bit(4) {
            flags.push(QualityFlag::Calibrating);
        }
        if h.bit(5) || h.bit(6) {
            flags.push(QualityFlag::DeviceFault);
        }
        let questionable = !flags.is_empty();
        m.push(Metric {
            // MDC_CONC_AWAY_CO2_ET (2::20636) is a concentration or partial
            // pressure; the S/5 gives it in %.
            mdc: codes::CONC_AWAY_CO2_ET,
            label: "CO2 ET".into(),
            raw: b.co2.v[0],
            divisor: 100.0,
            unit: units::PERCENT,
            flags: flags.clone(),
            questionable,
        });
        m.push(Metric {
            mdc: codes::RESP_RATE,
            label: "CO2 RR".into(),
            raw: b.co2.v[2],
            divisor: 1.0,
            unit: units::RESP_PER_MIN,
            flags,
            questionable,
        });
    }

    let device_time_us = (i64::from(p.time) - clock_offset_s) * 1_000_000;
    let mut unknown = 0;
    let readings = m
        .into_iter()
        .map(|x| {
            let mut flags: Vec<i32> = x.flags.iter().map(|&f| f as i32).collect();
            let mut add = |f: QualityFlag| {
                if !flags.contains(&(f as i32)) {
                    flags.push(f as i32);
                }
            };
            let (value, validity) = match RawValue::classify(x.raw) {
                RawValue::Value(v) => (
                    Some(Value::Numeric(f64::from(v) / x.divisor)),
                    if x.questionable {
                        Validity::Questionable
                    } else {
                        Validity::Valid
                    },
                ),
                special => {
                    match special {
                        RawValue::Discontinuity | RawValue::NotCalibrated => {
                            add(QualityFlag::Calibrating)
                        }
                        RawValue::UnderRange | RawValue::OverRange => {
                            add(QualityFlag::OutOfDeviceRange)
                        }
                        RawValue::OtherReserved(_) => unknown += 1,
                        _ => {}
                    }
                    add(QualityFlag::ValueMissing);
                    (None, Validity::Invalid)
                }
            };
            Reading {
                mdc_code: x.mdc,
                vendor_label: x.label,
                value,
                mdc_unit: x.unit.mdc,
                ucum_unit: x.unit.ucum.to_string(),
                device_time_us,
                time_source: TimeSource::DeviceClockUnsynced as i32,
                gateway_time_us,
                validity: validity as i32,
                flags,
                sequence: 0,
                subject: None,
                // This protocol carries no abnormal flag the driver maps.
                interpretation: 0,
            }
        })
        .collect();
    (readings, unknown)
}

/// Map a record to readings: every displayed-values sub-record of a
/// physiological record. Other record types yield nothing. Returns the
/// readings, the number of unparseable sub-records, and the number of
/// reserved values without a known meaning.
pub fn record_to_readings(
    r: &DatexRecord,
    clock_offset_s: i64,
    gateway_time_us: i64,
) -> (Vec<Reading>, usize, usize) {
    let (mut out, mut bad, mut unknown) = (vec![], 0, 0);
    if r.header.maintype != codec::DRI_MT_PHDB {
        return (out, bad, unknown);
    }
    for (sr_type, bytes) in r.subrecord_bytes() {
        if sr_type != codec::DRI_PH_DISPL {
            continue;
        }
        match bytes.and_then(Phdb::parse) {
            Ok(p) => {
                let (rs, u) = phdb_to_readings(&p, clock_offset_s, gateway_time_us);
                out.extend(rs);
                unknown += u;
            }
            Err(_) => bad += 1,
        }
    }
    (out, bad, unknown)
}

async fn write<L: AsyncWrite + Unpin>(link: &mut L, bytes: &[u8]) -> Result<(), DriverError> {
    link.write_all(bytes).await.map_err(DriverError::Link)?;
    link.flush().await.map_err(DriverError::Link)
}

impl Protocol for Datex {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn manufacturer(&self) -> &'static str {
        "GE Healthcare (Datex-Ohmeda)"
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, mut link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let start = self.requests(self.interval_s as i16);
        write(&mut link, &start).await?;
        // A record is due every interval; allow the silence limit on top.
        let wait = Duration::from_secs(u64::from(self.interval_s)) + ctx.silence;
        let mut dec = DatexDecoder::new();
        let mut buf = BytesMut::with_capacity(4096);
        let mut re_requested = false;
        loop {
            let res = ctx.read_within(&mut link, &mut buf, wait).await;
            let eof = matches!(res, Err(DriverError::Eof));
            match res {
                Ok(_) | Err(DriverError::Eof) => {}
                Err(DriverError::Silent(_)) if !re_requested => {
                    // The monitor may have dropped the request (restart,
                    // interface reset): ask once more before giving up.
                    tracing::info!(device_id = %ctx.device_id, "datex: no record; re-requesting");
                    re_requested = true;
                    write(&mut link, &start).await?;
                    continue;
                }
                Err(DriverError::Shutdown) => {
                    // Best effort: ask the monitor to stop transmitting.
                    let stop = self.requests(0);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), write(&mut link, &stop)).await;
                    return Err(DriverError::Shutdown);
                }
                Err(e) => return Err(e),
            }
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(rec)) => {
                        ctx.stats.frame_ok();
                        re_requested = false;
                        ctx.connected().await?;
                        let (readings, bad, unknown) =
                            record_to_readings(&rec, self.clock_offset_s, now_us());
                        for _ in 0..bad {
                            ctx.stats.frame_error(0);
                        }
                        for _ in 0..unknown {
                            ctx.stats.unknown_flags();
                        }
                        ctx.emit(readings, vec![]).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ctx.stats.frame_error(e.dropped());
                        tracing::warn!(device_id = %ctx.device_id, error = %e, "datex: bad input skipped");
                    }
                }
            }
            if eof {
                if !buf.is_empty() {
                    ctx.stats.frame_error(buf.len());
                }
                return Err(DriverError::Eof);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;

    fn group<const N: usize>(status: u32, label: u16, v: [i16; N]) -> codec::Group<N> {
        codec::Group {
            hdr: GroupHdr { status, label },
            v,
        }
    }

    fn basic() -> BasicPhdb {
        let mut b = BasicPhdb {
            // exists + active + HR source ECG (1 << 3)
            ecg: group(0b11 | (1 << 3), 0, [72, 0, 0, 0, 15]),
            nibp: group(0b11, 3, [12000, 8000, 9300, 72]),
            spo2: group(0b11, 0, [9700, 71, 0, 0]),
            co2: group(0b11, 1, [510, 0, 12, 7600]),
            ..BasicPhdb::default()
        };
        b.t[0] = group(0b11, 1, [3680]); // ESO
        b.t[1] = group(0b11, 7, [3300]); // SKIN: not body temperature
        b.p[0] = group(0, 0, [0; 4]); // no module
        b
    }

    fn phdb(b: BasicPhdb) -> Phdb {
        Phdb {
            time: 1_795_514_400, // 2026-11-24T10:00:00Z
            basic: Some(b),
            marker: 0,
            cl_drilvl_subt: u16::from(DRI_PH_DISPL),
        }
    }

    fn find<'a>(rs: &'a [Reading], label: &str) -> &'a Reading {
        rs.iter()
            .find(|r| r.vendor_label == label)
            .unwrap_or_else(|| panic!("no {label} in {rs:?}"))
    }

    #[test]
    fn displayed_values_map_with_units_and_scaling() {
        let (rs, unknown) = phdb_to_readings(&phdb(basic()), 0, 7);
        assert_eq!(unknown, 0);
        let labels: Vec<&str> = rs.iter().map(|r| r.vendor_label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ECG HR",
                "NIBP SYS",
                "NIBP DIA",
                "NIBP MEAN",
                "T1 ESO",
                "SpO2",
                "SpO2 PR",
                "CO2 ET",
                "CO2 RR"
            ]
        );
        let hr = find(&rs, "ECG HR");
        assert_eq!(hr.mdc_code, codes::ECG_HEART_RATE);
        assert_eq!(hr.value, Some(Value::Numeric(72.0)));
        assert_eq!(hr.ucum_unit, "/min");
        let sys = find(&rs, "NIBP SYS");
        assert_eq!(sys.value, Some(Value::Numeric(120.0)));
        assert_eq!(sys.mdc_unit, units::MMHG.mdc);
        assert_eq!(find(&rs, "T1 ESO").value, Some(Value::Numeric(36.8)));
        assert_eq!(find(&rs, "T1 ESO").ucum_unit, "Cel");
        assert_eq!(find(&rs, "SpO2").value, Some(Value::Numeric(97.0)));
        let et = find(&rs, "CO2 ET");
        assert_eq!(et.mdc_code, 151_708);
        assert_eq!(et.value, Some(Value::Numeric(5.1)));
        assert_eq!(et.ucum_unit, "%");
        assert_eq!(et.mdc_unit, units::PERCENT.mdc);
        assert_eq!(find(&rs, "CO2 RR").mdc_code, codes::RESP_RATE);
        for r in &rs {
            assert_eq!(r.device_time_us, 1_795_514_400_000_000);
            assert_eq!(r.time_source, TimeSource::DeviceClockUnsynced as i32);
            assert_eq!(r.gateway_time_us, 7);
            assert_eq!(r.validity, Validity::Valid as i32);
        }
    }

    #[test]
    fn reserved_values_become_flagged_readings_without_value() {
        let mut b = basic();
        b.spo2.v[0] = DATA_INVALID;
        b.spo2.v[1] = DATA_NOT_UPDATED;
        b.nibp.v[0] = DATA_OVER_RANGE;
        b.t[0].v[0] = DATA_NOT_CALIBRATED;
        b.co2.v[0] = -32010; // reserved, meaning unknown
        let (rs, unknown) = phdb_to_readings(&phdb(b), 0, 0);
        assert_eq!(unknown, 1);
        for (label, flag) in [
            ("SpO2", QualityFlag::ValueMissing),
            ("SpO2 PR", QualityFlag::ValueMissing),
            ("NIBP SYS", QualityFlag::OutOfDeviceRange),
            ("T1 ESO", QualityFlag::Calibrating),
            ("CO2 ET", QualityFlag::ValueMissing),
        ] {
            let r = find(&rs, label);
            assert_eq!(r.value, None, "{label}");
            assert_eq!(r.validity, Validity::Invalid as i32, "{label}");
            assert!(r.flags.contains(&(flag as i32)), "{label}: {:?}", r.flags);
            assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
        }
        // Other values of the same group are unaffected.
        assert_eq!(find(&rs, "NIBP DIA").value, Some(Value::Numeric(80.0)));
    }

    #[test]
    fn group_status_decides_what_is_reported() {
        let mut b = basic();
        b.spo2.hdr.status = GroupHdr::EXISTS; // exists, not active
        b.nibp.hdr.status = 0;
        b.ecg.hdr.status = 0b11 | (6 << 3); // HR source SpO2: not ECG HR
        let (rs, _) = phdb_to_readings(&phdb(b), 0, 0);
        assert!(
            rs.iter().all(|r| !r.vendor_label.starts_with("SpO2")
                && !r.vendor_label.starts_with("NIBP")
                && r.vendor_label != "ECG HR"),
            "{rs:?}"
        );
        // Non-basic sub-record: nothing.
        let mut p = phdb(basic());
        p.basic = None;
        assert!(phdb_to_readings(&p, 0, 0).0.is_empty());
    }

    #[test]
    fn status_bits_make_values_questionable() {
        let mut b = basic();
        b.co2.hdr.status |= 1 << 4; // zeroing
        b.ecg.hdr.status |= 1 << 8; // artifact
        b.nibp.hdr.label |= 1 << 7; // calibrating
        let (rs, _) = phdb_to_readings(&phdb(b), 60, 0);
        for (label, flag) in [
            ("CO2 ET", QualityFlag::Calibrating),
            ("ECG HR", QualityFlag::Interference),
            ("NIBP MEAN", QualityFlag::Calibrating),
        ] {
            let r = find(&rs, label);
            assert_eq!(r.validity, Validity::Questionable as i32, "{label}");
            assert!(r.value.is_some());
            assert_eq!(r.flags, vec![flag as i32]);
        }
        // Clock offset: monitor clock one minute ahead of UTC.
        assert_eq!(rs[0].device_time_us, (1_795_514_400 - 60) * 1_000_000);
    }

    #[test]
    fn options_are_validated() {
        assert!(Datex::new(DatexOptions::default()).is_ok());
        let o: DatexOptions = toml::from_str("interval_s = 5").unwrap();
        assert_eq!(o.dri_levels, vec![9, 8, 7]);
        assert!(
            Datex::new(DatexOptions {
                interval_s: 4,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Datex::new(DatexOptions {
                dri_levels: vec![],
                ..Default::default()
            })
            .is_err()
        );
        assert!(toml::from_str::<DatexOptions>("bogus = 1").is_err());
    }

    fn record(p: &Phdb) -> Vec<u8> {
        let data = p.encode_union();
        let mut sr = [SrDesc::default(); 8];
        sr[0] = SrDesc {
            offset: 0,
            sr_type: DRI_PH_DISPL,
        };
        sr[1] = SrDesc {
            offset: 0,
            sr_type: DRI_EOL_SUBR_LIST,
        };
        DatexRecord {
            header: DatexHeader {
                r_len: (HEADER_LEN + data.len()) as i16,
                r_time: p.time,
                maintype: DRI_MT_PHDB,
                sr,
                ..Default::default()
            },
            data,
        }
        .encode()
    }

    #[tokio::test]
    async fn session_requests_decodes_and_stops_on_shutdown() {
        use crate::DriverStats;
        use tokio::io::AsyncReadExt;
        let stats = DriverStats::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let (stop, mut shutdown) = tokio::sync::watch::channel(false);
        let (mut dev, host) = tokio::io::duplex(8192);
        let proto = Datex::new(DatexOptions {
            interval_s: 5,
            dri_levels: vec![9],
            clock_offset_minutes: 0,
        })
        .unwrap();
        let device = tokio::spawn(async move {
            // The request: one frame of 49 bytes (no escapes) + checksum.
            let mut req = vec![0u8; 52];
            dev.read_exact(&mut req).await.unwrap();
            let mut b = BytesMut::from(&req[..]);
            let r = DatexDecoder::new().decode(&mut b).unwrap().unwrap();
            assert_eq!(r.data[0], DRI_PH_DISPL);
            assert_eq!(i16::from_le_bytes([r.data[1], r.data[2]]), 5);
            let mut out = b"noise".to_vec();
            out.extend(frame(&record(&phdb(basic()))));
            dev.write_all(&out).await.unwrap();
            // After shutdown the driver asks to stop (interval 0).
            let mut stopreq = vec![0u8; 52];
            dev.read_exact(&mut stopreq).await.unwrap();
            let mut b = BytesMut::from(&stopreq[..]);
            let r = DatexDecoder::new().decode(&mut b).unwrap().unwrap();
            assert_eq!(i16::from_le_bytes([r.data[1], r.data[2]]), 0);
        });
        let session = async {
            let mut ctx = SessionCtx::new("s5", &stats, &tx, &mut shutdown, Duration::from_secs(5));
            proto.session(host, &mut ctx).await
        };
        let checker = async {
            let connected = rx.recv().await.unwrap();
            assert_eq!(connected.technical.len(), 1);
            let out = rx.recv().await.unwrap();
            assert_eq!(out.readings.len(), 9);
            stop.send(true).unwrap();
        };
        let (end, ()) = tokio::join!(session, checker);
        assert!(matches!(end, Err(DriverError::Shutdown)), "{end:?}");
        device.await.unwrap();
        let snap = stats.snapshot();
        assert_eq!(snap.frames_ok, 1);
        assert_eq!(snap.frames_bad, 1);
        assert_eq!(snap.bytes_dropped, 5);
    }
}
