//! Philips IntelliVue MP-series Data Export (MIB/RS232): codec, mapping of
//! polled numerics to readings, and the session (association, MDS create,
//! extended polls, release).
//!
//! Reference: Philips "Data Export Interface Programming Guide, IntelliVue
//! X2, MP Series & MX Series" (4535 642 59271), §3 "Protocol Dialog" and
//! "Connection Time-out Mechanism", §4 (transport), §5 (messages).
//!
//! The session logic is written once over "an ordered link of messages":
//! [`run_session`] takes any `AsyncRead + AsyncWrite` and a [`Framing`]:
//! [`SerialFraming`] for MIB/RS232 (the [`Protocol`] impl), [`RawFraming`]
//! for the LAN interface, where each UDP datagram carries one unframed
//! message (UDP port 24105, Guide §4 "UDP Port Number").

pub mod codec;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use shared_protocol::catalogue::{CATALOGUE, codes};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value};
use time::UtcOffset;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use codec::{
    DataApdu, FloatType, FloatValue, Framing, IntellivueDecoder, IntellivueError, Message,
    NuObsValue, PollReply, RawFraming, RoKind, SerialFraming,
};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "intellivue-serial";
/// MIB/RS232 settings of the fixed-baudrate protocol (Guide §4 "The Fixed
/// Baudrate Protocol, RS232 Port Settings"): 115200 baud, 8N1, no flow
/// control.
pub const SERIAL: SerialSettings = SerialSettings::new(
    115_200,
    DataBits::Eight,
    Parity::None,
    StopBits::One,
    FlowControl::None,
);
/// UDP port of the LAN Data Export interface (Guide §4 "UDP Port Number").
pub const UDP_PORT: u16 = 24105;

/// Physio ids the monitor uses for a metric the catalogue holds under a
/// different MDC term code. Every other physio id maps to `(2 << 16) | id`
/// when the catalogue has that code.
const ALIASES: &[(u16, u32)] = &[
    // NOM_PLETH_PULS_RATE (0x4822), "Pulse Rate from Plethysmogram" (label
    // NLS_NOM_PULS_OXIM_PULS_RATE): the SpO2 pulse rate.
    (0x4822, codes::PULS_OXIM_PULS_RATE),
    // NOM_TEMP (0x4B48), the monitor's generic "Temp" (patient temperature,
    // site unspecified) -> body temperature.
    (0x4B48, codes::TEMP_BODY),
    // NOM_AWAY_CO2_ET (0x50B0 = 20656), end-tidal CO2 partial pressure ->
    // the catalogue's EtCO2 row (mmHg, LOINC 19891-1), which carries term
    // code 20636 (see docs/protocols.md: catalogue discrepancy).
    (0x50B0, codes::CONC_AWAY_CO2_ET),
];

/// Physio ids never mapped by identity: 20636 is NOM_CONC_AWAY_CO2_ET (CO2
/// *concentration*, %) in the IntelliVue nomenclature, which the catalogue's
/// partial-pressure EtCO2 row must not receive.
const NOT_IDENTITY: &[u16] = &[20636];

/// Names of the physio ids this driver knows (vendor label of readings).
const NAMES: &[(u16, &str)] = &[
    (0x4182, "NOM_ECG_CARD_BEAT_RATE"),
    (0x4822, "NOM_PLETH_PULS_RATE"),
    (0x4BB8, "NOM_PULS_OXIM_SAT_O2"),
    (0x4BB0, "NOM_PULS_OXIM_PERF_REL"),
    (0x500A, "NOM_RESP_RATE"),
    (0x4A05, "NOM_PRESS_BLD_NONINV_SYS"),
    (0x4A06, "NOM_PRESS_BLD_NONINV_DIA"),
    (0x4A07, "NOM_PRESS_BLD_NONINV_MEAN"),
    (0x4B48, "NOM_TEMP"),
    (0x4B5C, "NOM_TEMP_BODY"),
    (0x50B0, "NOM_AWAY_CO2_ET"),
];

/// Units outside the catalogue the monitor may use (value passed through
/// unconverted; the hub decides).
const EXTRA_UNITS: &[(u16, &str)] = &[
    (0x0F03, "kPa"),    // NOM_DIM_KILO_PASCAL
    (0x1140, "[degF]"), // NOM_DIM_FAHR
    (0x0200, "1"),      // NOM_DIM_DIMLESS
];

/// The catalogue MDC code for a physio id, if the driver maps it.
pub fn mdc_for_physio(physio_id: u16) -> Option<u32> {
    if let Some((_, mdc)) = ALIASES.iter().find(|(p, _)| *p == physio_id) {
        return Some(*mdc);
    }
    if NOT_IDENTITY.contains(&physio_id) {
        return None;
    }
    let mdc = (2 << 16) | u32::from(physio_id);
    CATALOGUE.by_mdc(mdc).map(|m| m.mdc)
}

/// `(4 << 16) | unit_code` and its UCUM code (empty when unknown).
pub fn unit_for(unit_code: u16) -> (u32, &'static str) {
    let mdc = (4 << 16) | u32::from(unit_code);
    let ucum = CATALOGUE
        .unit_by_mdc(mdc)
        .map(|u| u.ucum)
        .or_else(|| {
            EXTRA_UNITS
                .iter()
                .find(|(c, _)| *c == unit_code)
                .map(|(_, u)| *u)
        })
        .unwrap_or("");
    (mdc, ucum)
}

fn label(physio_id: u16) -> String {
    NAMES.iter().find(|(p, _)| *p == physio_id).map_or_else(
        || format!("physio 0x{physio_id:04X}"),
        |(_, n)| n.to_string(),
    )
}

/// Validity and flags from a MeasurementState (Guide §5 "MeasurementState").
///
/// - INVALID → INVALID; UNAVAILABLE → INVALID + VALUE_MISSING;
///   CALIBRATION_ONGOING → INVALID + CALIBRATING; TEST_DATA / DEMO_DATA →
///   INVALID + DEMO_MODE (never patient data);
/// - QUESTIONABLE, EARLY_INDICATION → QUESTIONABLE;
/// - VALIDATED_DATA, MSMT_ONGOING, alarm state bits: no effect on quality.
pub fn state_quality(st: u16) -> (Validity, Vec<QualityFlag>) {
    use codec::state::*;
    let mut flags = Vec::new();
    let mut invalid = st & INVALID != 0;
    if st & UNAVAILABLE != 0 {
        invalid = true;
        flags.push(QualityFlag::ValueMissing);
    }
    if st & CALIBRATION_ONGOING != 0 {
        invalid = true;
        flags.push(QualityFlag::Calibrating);
    }
    if st & (TEST_DATA | DEMO_DATA) != 0 {
        invalid = true;
        flags.push(QualityFlag::DemoMode);
    }
    let validity = if invalid {
        Validity::Invalid
    } else if st & (QUESTIONABLE | EARLY_INDICATION) != 0 {
        Validity::Questionable
    } else {
        Validity::Valid
    };
    (validity, flags)
}

/// Map one observed value to a reading, or `None` if its metric is not
/// mapped. Special FLOAT values never become numbers.
pub fn value_to_reading(
    v: &NuObsValue,
    device_time_us: i64,
    time_source: TimeSource,
    gateway_time_us: i64,
) -> Option<Reading> {
    let mdc = mdc_for_physio(v.physio_id)?;
    let (mut validity, mut flags) = state_quality(v.state);
    let push = |f: QualityFlag, flags: &mut Vec<QualityFlag>| {
        if !flags.contains(&f) {
            flags.push(f);
        }
    };
    let value = match v.value.value() {
        FloatValue::Number(x) => Some(Value::Numeric(x)),
        FloatValue::NaN => {
            validity = Validity::Invalid;
            push(QualityFlag::ValueMissing, &mut flags);
            None
        }
        FloatValue::NRes | FloatValue::PosInf | FloatValue::NegInf => {
            validity = Validity::Invalid;
            push(QualityFlag::ValueMissing, &mut flags);
            push(QualityFlag::OutOfDeviceRange, &mut flags);
            None
        }
    };
    let (mdc_unit, ucum) = unit_for(v.unit_code);
    Some(Reading {
        mdc_code: mdc,
        vendor_label: label(v.physio_id),
        value,
        mdc_unit,
        ucum_unit: ucum.to_string(),
        device_time_us,
        time_source: time_source as i32,
        gateway_time_us,
        validity: validity as i32,
        flags: flags.into_iter().map(|f| f as i32).collect(),
        sequence: 0,
        subject: None,
        // This protocol carries no abnormal flag the driver maps.
        interpretation: 0,
    })
}

/// Map a poll result to readings. The reply's absolute time stamp is the
/// device clock (no zone; `offset` configured); when the monitor leaves it
/// unset, the gateway receive time is used instead. Returns the readings
/// and how many values carried state bits this driver does not know.
pub fn poll_reply_to_readings(
    p: &PollReply,
    offset: UtcOffset,
    gateway_time_us: i64,
) -> (Vec<Reading>, usize) {
    let (device_time, source) = match p.abs_time_stamp.to_datetime() {
        Some(dt) => (
            (dt.assume_offset(offset).unix_timestamp_nanos() / 1_000) as i64,
            TimeSource::DeviceClockUnsynced,
        ),
        None => (gateway_time_us, TimeSource::GatewayReceive),
    };
    let mut unknown = 0;
    let mut out = Vec::new();
    for (_, obs) in &p.contexts {
        for o in obs {
            for v in &o.values {
                if v.state & !codec::state::KNOWN != 0 {
                    unknown += 1;
                }
                out.extend(value_to_reading(v, device_time, source, gateway_time_us));
            }
        }
    }
    (out, unknown)
}

/// Options of an IntelliVue monitor.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntellivueOptions {
    /// UTC offset of the monitor clock in minutes (its absolute time stamps
    /// carry no zone).
    #[serde(default)]
    pub clock_offset_minutes: i32,
    /// Time between Extended Poll Data Requests, in ms (250..=10000). The
    /// polls also keep the association alive (Guide §3 "Connection
    /// Time-out Mechanism").
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
}

fn default_poll_ms() -> u64 {
    1000
}

impl Default for IntellivueOptions {
    fn default() -> Self {
        IntellivueOptions {
            clock_offset_minutes: 0,
            poll_interval_ms: default_poll_ms(),
        }
    }
}

/// The IntelliVue Data Export client over MIB/RS232.
#[derive(Debug, Clone, Copy)]
pub struct Intellivue {
    clock_offset: UtcOffset,
    poll_interval: Duration,
}

impl Intellivue {
    pub fn new(opts: IntellivueOptions) -> Result<Self, String> {
        if opts.clock_offset_minutes.abs() > 18 * 60 {
            return Err("clock_offset_minutes must be within ±1080".into());
        }
        if !(250..=10_000).contains(&opts.poll_interval_ms) {
            return Err("poll_interval_ms must be within 250..=10000".into());
        }
        let clock_offset = UtcOffset::from_whole_seconds(opts.clock_offset_minutes * 60)
            .map_err(|e| e.to_string())?;
        Ok(Intellivue {
            clock_offset,
            poll_interval: Duration::from_millis(opts.poll_interval_ms),
        })
    }
}

impl Protocol for Intellivue {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn manufacturer(&self) -> &'static str {
        "Philips"
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        run_session(self, link, SerialFraming, ctx).await
    }
}

/// Agent-config kind of the LAN variant.
pub const LAN_KIND: &str = "intellivue-lan";

/// IntelliVue Data Export over the LAN (UDP, port [`UDP_PORT`] on the
/// monitor): the same session, with no serial framing (each message is one
/// datagram). Use it with a [`crate::udp::UdpLink`] via `run_link`.
#[derive(Debug, Clone)]
pub struct IntellivueLan(pub Intellivue);

impl IntellivueLan {
    pub fn new(opts: IntellivueOptions) -> Result<Self, String> {
        Intellivue::new(opts).map(IntellivueLan)
    }
}

impl Protocol for IntellivueLan {
    fn kind(&self) -> &'static str {
        LAN_KIND
    }

    fn manufacturer(&self) -> &'static str {
        "Philips"
    }

    /// Not used on the LAN; the serial settings of the MIB port.
    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        run_session(&self.0, link, RawFraming, ctx).await
    }
}

/// A message link: bytes + framing.
struct Conn<L, F> {
    link: L,
    framing: F,
    dec: IntellivueDecoder<F>,
    buf: BytesMut,
    last_rx: Instant,
}

impl<L, F> Conn<L, F>
where
    L: AsyncRead + AsyncWrite + Unpin + Send,
    F: Framing + Clone,
{
    async fn send(&mut self, msg: &[u8]) -> Result<(), DriverError> {
        let mut out = BytesMut::new();
        self.framing.encode(msg, &mut out);
        self.link.write_all(&out).await.map_err(DriverError::Link)?;
        self.link.flush().await.map_err(DriverError::Link)
    }

    /// The next message, or `Ok(None)` when `deadline` passes first.
    /// Undecodable input is counted and skipped.
    async fn next(
        &mut self,
        ctx: &mut SessionCtx<'_>,
        deadline: Instant,
    ) -> Result<Option<Message>, DriverError> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(m)) => {
                    ctx.stats.frame_ok();
                    return Ok(Some(m));
                }
                Ok(None) => {}
                Err(e) => {
                    ctx.stats.frame_error(e.dropped());
                    tracing::warn!(device_id = %ctx.device_id, error = %e, "intellivue: bad input skipped");
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match ctx.read_within(&mut self.link, &mut self.buf, left).await {
                Ok(_) => self.last_rx = Instant::now(),
                Err(DriverError::Silent(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Best-effort release on shutdown (ctx's shutdown has fired, so read
    /// without it, briefly).
    async fn release(&mut self) {
        if self.send(&codec::encode_release_request()).await.is_err() {
            return;
        }
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(Message::Session {
                    spdu: codec::SPDU_DN,
                    ..
                })) => return,
                Ok(Some(_)) | Err(_) => continue,
                Ok(None) => {}
            }
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.link.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }
}

/// Ticks of RelativeTime (1/8 ms) in a duration.
fn rel_ticks(d: Duration) -> u32 {
    u32::try_from(d.as_micros() / 125).unwrap_or(u32::MAX)
}

/// One Data Export session over `link` with `framing`: associate, answer
/// the MDS Create Event, poll numerics every `poll_interval` (which also
/// keeps the association alive), release on shutdown.
pub async fn run_session<L, F>(
    proto: &Intellivue,
    link: L,
    framing: F,
    ctx: &mut SessionCtx<'_>,
) -> Result<(), DriverError>
where
    L: AsyncRead + AsyncWrite + Unpin + Send,
    F: Framing + Clone,
{
    let mut conn = Conn {
        link,
        dec: IntellivueDecoder::new(framing.clone()),
        framing,
        buf: BytesMut::with_capacity(4096),
        last_rx: Instant::now(),
    };
    let r = session_inner(proto, &mut conn, ctx).await;
    if matches!(r, Err(DriverError::Shutdown)) {
        conn.release().await;
        return Ok(());
    }
    r
}

async fn session_inner<L, F>(
    proto: &Intellivue,
    conn: &mut Conn<L, F>,
    ctx: &mut SessionCtx<'_>,
) -> Result<(), DriverError>
where
    L: AsyncRead + AsyncWrite + Unpin + Send,
    F: Framing + Clone,
{
    // 1. Association Request -> Association Result (Guide §3).
    conn.send(&codec::encode_association_request(rel_ticks(
        proto.poll_interval,
    )))
    .await?;
    let deadline = Instant::now() + ctx.silence;
    loop {
        match conn.next(ctx, deadline).await? {
            None => return Err(DriverError::Silent(ctx.silence)),
            Some(Message::Session { spdu, .. }) => match spdu {
                codec::SPDU_AC => break,
                codec::SPDU_RF => return Err(DriverError::Refused("association refused".into())),
                codec::SPDU_AB => {
                    return Err(DriverError::Refused("association aborted".into()));
                }
                _ => {}
            },
            Some(Message::Data(_)) => {} // stale data from an old association
        }
    }
    // 2. MDS Create Event Report -> MDS Create Event Result.
    let deadline = Instant::now() + ctx.silence;
    loop {
        match conn.next(ctx, deadline).await? {
            None => return Err(DriverError::Silent(ctx.silence)),
            Some(Message::Data(d))
                if d.kind == RoKind::Invoke
                    && d.command_type == codec::CMD_CONFIRMED_EVENT_REPORT =>
            {
                match codec::parse_event_report(&d.body) {
                    Ok(ev) => {
                        conn.send(&codec::encode_event_report_result(d.invoke_id, &ev))
                            .await?;
                        if ev.event_type == codec::NOM_NOTI_MDS_CREAT {
                            break;
                        }
                    }
                    Err(reason) => {
                        ctx.stats.frame_error(d.body.len().max(1));
                        tracing::warn!(device_id = %ctx.device_id, reason, "intellivue: bad event report");
                    }
                }
            }
            Some(Message::Session { spdu, .. }) if spdu == codec::SPDU_AB => {
                return Err(DriverError::Protocol(
                    "monitor aborted the association".into(),
                ));
            }
            Some(_) => {}
        }
    }
    ctx.connected().await?;
    // 3. Poll loop.
    let mut invoke_id: u16 = 0;
    let mut poll_number: u16 = 0;
    let mut next_poll = Instant::now();
    conn.last_rx = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_poll {
            invoke_id = invoke_id.wrapping_add(1);
            poll_number = poll_number.wrapping_add(1);
            conn.send(&codec::encode_poll_request(invoke_id, poll_number))
                .await?;
            next_poll = now + proto.poll_interval;
        }
        let silent_at = conn.last_rx + ctx.silence;
        if now >= silent_at {
            return Err(DriverError::Silent(ctx.silence));
        }
        let Some(msg) = conn.next(ctx, next_poll.min(silent_at)).await? else {
            continue;
        };
        match msg {
            Message::Data(d) => match d.kind {
                RoKind::Result | RoKind::LinkedResult { .. }
                    if d.command_type == codec::CMD_CONFIRMED_ACTION =>
                {
                    match codec::parse_poll_reply(&d.body) {
                        Ok(reply) => {
                            let (readings, unknown) =
                                poll_reply_to_readings(&reply, proto.clock_offset, now_us());
                            if unknown > 0 {
                                ctx.stats.unknown_flags();
                            }
                            ctx.emit(readings, vec![]).await?;
                        }
                        Err(reason) => {
                            ctx.stats.frame_error(d.body.len().max(1));
                            tracing::warn!(device_id = %ctx.device_id, reason, "intellivue: bad poll result");
                        }
                    }
                }
                RoKind::Invoke if d.command_type == codec::CMD_CONFIRMED_EVENT_REPORT => {
                    if let Ok(ev) = codec::parse_event_report(&d.body) {
                        conn.send(&codec::encode_event_report_result(d.invoke_id, &ev))
                            .await?;
                    }
                }
                RoKind::Error { error_value } => {
                    tracing::warn!(device_id = %ctx.device_id, error_value, invoke_id = d.invoke_id, "intellivue: monitor returned an error");
                }
                _ => {}
            },
            Message::Session { spdu, .. } => match spdu {
                codec::SPDU_FN => {
                    conn.send(&codec::encode_release_result()).await?;
                    return Err(DriverError::Protocol(
                        "monitor released the association".into(),
                    ));
                }
                codec::SPDU_AB => {
                    return Err(DriverError::Protocol(
                        "monitor aborted the association".into(),
                    ));
                }
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;
    use crate::DriverStats;
    use bytes::Bytes;

    fn nu(physio: u16, state: u16, unit: u16, value: u32) -> NuObsValue {
        NuObsValue {
            physio_id: physio,
            state,
            unit_code: unit,
            value: FloatType(value),
        }
    }

    fn reply(values: Vec<Vec<NuObsValue>>) -> PollReply {
        PollReply {
            poll_number: 1,
            sequence_no: 1,
            rel_time_stamp: 0,
            abs_time_stamp: AbsoluteTime([0x20, 0x26, 0x11, 0x24, 0x10, 0x00, 0x00, 0x00]),
            partition: NOM_PART_OBJ,
            code: NOM_MOC_VMO_METRIC_NU,
            attr_group: 0,
            contexts: vec![(
                0,
                values
                    .into_iter()
                    .enumerate()
                    .map(|(i, values)| ObservationPoll {
                        handle: i as u16 + 1,
                        values,
                    })
                    .collect(),
            )],
        }
    }

    #[test]
    fn numerics_map_to_catalogue_codes_and_units() {
        let p = reply(vec![
            vec![nu(0x4182, 0, 0x0AA0, 72)], // HR 72 /min
            vec![nu(0x4822, 0, 0x0AA0, 71)], // pleth pulse
            vec![nu(0x4BB8, 0, 0x0220, 98)], // SpO2 98 %
            vec![nu(0x500A, 0, 0x0AE0, 16)], // RR
            vec![
                nu(0x4A05, 0, 0x0F20, 120),
                nu(0x4A06, 0, 0x0F20, 80),
                nu(0x4A07, 0, 0x0F20, 93),
            ], // NIBP compound
            vec![nu(0x4B48, 0, 0x17A0, 0xFF00_0175)], // Temp 37.3 °C
            vec![nu(0x50B0, 0, 0x0F20, 38)], // etCO2 38 mmHg
            vec![nu(0x1234, 0, 0x0000, 1)],  // unknown: skipped
        ]);
        let (r, unknown) = poll_reply_to_readings(&p, UtcOffset::UTC, 42);
        assert_eq!(unknown, 0);
        let got: Vec<(u32, u32, &str)> = r
            .iter()
            .map(|r| (r.mdc_code, r.mdc_unit, r.ucum_unit.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (codes::ECG_HEART_RATE, 264_864, "/min"),
                (codes::PULS_OXIM_PULS_RATE, 264_864, "/min"),
                (codes::PULS_OXIM_SAT_O2, 262_688, "%"),
                (codes::RESP_RATE, (4 << 16) | 2784, "/min"),
                (codes::PRESS_BLD_NONINV_SYS, 266_016, "mm[Hg]"),
                (codes::PRESS_BLD_NONINV_DIA, 266_016, "mm[Hg]"),
                (codes::PRESS_BLD_NONINV_MEAN, 266_016, "mm[Hg]"),
                (codes::TEMP_BODY, (4 << 16) | 6048, "Cel"),
                (codes::CONC_AWAY_CO2_ET, 266_016, "mm[Hg]"),
            ]
        );
        assert_eq!(r[0].value, Some(Value::Numeric(72.0)));
        assert_eq!(r[7].value, Some(Value::Numeric(37.300000000000004)));
        assert_eq!(r[0].validity, Validity::Valid as i32);
        // 2026-11-24T10:00:00Z device clock, unsynced.
        assert_eq!(r[0].device_time_us, 1_795_514_400_000_000);
        assert_eq!(r[0].time_source, TimeSource::DeviceClockUnsynced as i32);
        assert_eq!(r[0].gateway_time_us, 42);
    }

    #[test]
    fn invalid_states_and_special_values_never_become_numbers() {
        let p = reply(vec![
            vec![nu(0x4BB8, state::UNAVAILABLE, 0x0220, FloatType::NAN)],
            vec![nu(0x4182, state::INVALID, 0x0AA0, 300)],
            vec![nu(0x500A, 0, 0x0AE0, FloatType::POS_INF)],
            vec![nu(0x4A05, state::QUESTIONABLE, 0x0F20, 120)],
            vec![nu(0x4A06, state::DEMO_DATA, 0x0F20, 80)],
            vec![nu(
                0x4B48,
                state::CALIBRATION_ONGOING,
                0x17A0,
                FloatType::NRES,
            )],
        ]);
        let (r, _) = poll_reply_to_readings(&p, UtcOffset::UTC, 0);
        let f = |r: &Reading, q: QualityFlag| r.flags.contains(&(q as i32));
        assert_eq!(r[0].value, None);
        assert_eq!(r[0].validity, Validity::Invalid as i32);
        assert!(f(&r[0], QualityFlag::ValueMissing));
        // The device gave a value but flagged it: kept, marked invalid.
        assert_eq!(r[1].value, Some(Value::Numeric(300.0)));
        assert_eq!(r[1].validity, Validity::Invalid as i32);
        assert_eq!(r[2].value, None);
        assert!(f(&r[2], QualityFlag::OutOfDeviceRange));
        assert_eq!(r[3].validity, Validity::Questionable as i32);
        assert!(f(&r[4], QualityFlag::DemoMode));
        assert_eq!(r[4].validity, Validity::Invalid as i32);
        assert!(f(&r[5], QualityFlag::Calibrating));
        assert_eq!(r[5].value, None);
    }

    #[test]
    fn unset_device_time_falls_back_to_gateway_time() {
        let mut p = reply(vec![vec![nu(0x4182, 0, 0x0AA0, 60)]]);
        p.abs_time_stamp = AbsoluteTime([0xFF; 8]);
        let (r, _) = poll_reply_to_readings(&p, UtcOffset::UTC, 7);
        assert_eq!(r[0].device_time_us, 7);
        assert_eq!(r[0].time_source, TimeSource::GatewayReceive as i32);
    }

    #[test]
    fn concentration_code_is_not_taken_for_partial_pressure() {
        assert_eq!(mdc_for_physio(20636), None);
        assert_eq!(mdc_for_physio(0x4182), Some(codes::ECG_HEART_RATE));
    }

    #[test]
    fn options_validate() {
        assert!(Intellivue::new(IntellivueOptions::default()).is_ok());
        let o: IntellivueOptions = toml::from_str("poll_interval_ms = 100").unwrap();
        assert!(Intellivue::new(o).is_err());
        assert!(toml::from_str::<IntellivueOptions>("bogus = 1").is_err());
    }

    /// A scripted monitor on the far end of an in-memory link, speaking
    /// unframed (LAN-style) or serial-framed messages.
    async fn fake_monitor<F: Framing + Clone, L: AsyncRead + AsyncWrite + Unpin>(
        mut link: L,
        framing: F,
        polls: usize,
    ) -> Vec<Message> {
        let mut dec = IntellivueDecoder::new(framing.clone());
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        let send = |msg: Vec<u8>| {
            let mut out = BytesMut::new();
            framing.encode(&msg, &mut out);
            out
        };
        let mut answered = 0;
        loop {
            let m = loop {
                match dec.decode(&mut buf) {
                    Ok(Some(m)) => break Some(m),
                    Ok(None) => {
                        if link.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            break None;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            let Some(m) = m else { return seen };
            seen.push(m.clone());
            match m {
                Message::Session { spdu: SPDU_CN, .. } => {
                    // Association Result (accept): minimal AC SPDU.
                    link.write_all(&send(vec![SPDU_AC, 2, 0xC1, 0]))
                        .await
                        .unwrap();
                    // MDS Create Event Report, ROIV confirmed event report.
                    let mut body = vec![0x00, 0x21, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x0D, 0x06, 0, 4];
                    body.extend_from_slice(&[0, 0, 0, 0]); // empty attribute list
                    let mut m = vec![0xE1, 0, 0, 2, 0, 1];
                    m.extend_from_slice(&((body.len() + 6) as u16).to_be_bytes());
                    m.extend_from_slice(&[0, 9, 0, 1]);
                    m.extend_from_slice(&(body.len() as u16).to_be_bytes());
                    m.extend_from_slice(&body);
                    link.write_all(&send(m)).await.unwrap();
                }
                Message::Data(d) if d.command_type == CMD_CONFIRMED_ACTION => {
                    let p = PollReply {
                        poll_number: parse_poll_request(&d.body).unwrap().poll_number,
                        sequence_no: 0,
                        rel_time_stamp: 0,
                        abs_time_stamp: AbsoluteTime([0xFF; 8]),
                        partition: NOM_PART_OBJ,
                        code: NOM_MOC_VMO_METRIC_NU,
                        attr_group: 0,
                        contexts: vec![(
                            0,
                            vec![ObservationPoll {
                                handle: 1,
                                values: vec![NuObsValue {
                                    physio_id: 0x4182,
                                    state: 0,
                                    unit_code: 0x0AA0,
                                    value: FloatType(60 + answered as u32),
                                }],
                            }],
                        )],
                    };
                    link.write_all(&send(encode_poll_result(d.invoke_id, &p)))
                        .await
                        .unwrap();
                    answered += 1;
                    if answered == polls {
                        // Then the monitor releases the association.
                        link.write_all(&send(encode_release_request()))
                            .await
                            .unwrap();
                    }
                }
                Message::Session { spdu: SPDU_DN, .. } => return seen,
                _ => {}
            }
        }
    }

    async fn session_over<F: Framing + Clone + 'static>(framing: F) {
        let stats = DriverStats::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let (_keep, mut shutdown) = tokio::sync::watch::channel(false);
        let (host, dev) = tokio::io::duplex(64 * 1024);
        let monitor = tokio::spawn(fake_monitor(dev, framing.clone(), 3));
        let proto = Intellivue::new(IntellivueOptions {
            clock_offset_minutes: 0,
            poll_interval_ms: 250,
        })
        .unwrap();
        let mut ctx = SessionCtx::new("iv1", &stats, &tx, &mut shutdown, Duration::from_secs(5));
        let end = run_session(&proto, host, framing, &mut ctx)
            .await
            .unwrap_err();
        assert!(matches!(end, DriverError::Protocol(_)), "{end}");
        drop(ctx);
        let seen = monitor.await.unwrap();
        // The client sent: association request, MDS create result, 3 polls,
        // release result.
        assert!(matches!(seen[0], Message::Session { spdu: SPDU_CN, .. }));
        let Message::Data(ref r) = seen[1] else {
            panic!()
        };
        assert_eq!(r.kind, RoKind::Result);
        assert_eq!(r.invoke_id, 9, "MDS create result echoes the invoke id");
        assert!(matches!(
            seen.last(),
            Some(Message::Session { spdu: SPDU_DN, .. })
        ));
        let first = rx.recv().await.unwrap();
        assert_eq!(first.technical.len(), 1);
        let mut values = vec![];
        while let Ok(out) = rx.try_recv() {
            for r in out.readings {
                assert_eq!(r.mdc_code, codes::ECG_HEART_RATE);
                assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
                values.push(r.value);
            }
        }
        assert_eq!(
            values,
            vec![
                Some(Value::Numeric(60.0)),
                Some(Value::Numeric(61.0)),
                Some(Value::Numeric(62.0))
            ]
        );
        assert_eq!(stats.snapshot().frames_bad, 0);
    }

    #[tokio::test]
    async fn session_runs_over_unframed_lan_transport() {
        session_over(RawFraming).await;
    }

    /// The LAN protocol over real UDP datagrams on loopback, through the
    /// generic runner: association, polls, readings, then the monitor goes
    /// away and the runner reports it.
    #[tokio::test]
    async fn lan_protocol_runs_over_udp_through_run_link() {
        use crate::udp::UdpLink;
        let monitor_sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let monitor_addr = monitor_sock.local_addr().unwrap().to_string();
        let monitor = tokio::spawn(async move {
            // Learn the client's address from its first datagram (left queued).
            let mut peek = [0u8; 1];
            let (_, peer) = monitor_sock.peek_from(&mut peek).await.unwrap();
            monitor_sock.connect(peer).await.unwrap();
            fake_monitor(UdpLink::new(monitor_sock), RawFraming, 3).await
        });
        let stats = std::sync::Arc::new(DriverStats::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let proto = IntellivueLan::new(IntellivueOptions {
            clock_offset_minutes: 0,
            poll_interval_ms: 250,
        })
        .unwrap();
        let opts = crate::RunOptions {
            silence: Duration::from_secs(2),
            ..Default::default()
        };
        let addr = monitor_addr.clone();
        let runner = tokio::spawn(crate::run_link(
            proto,
            "iv-lan".into(),
            monitor_addr,
            move || {
                let a = addr.clone();
                async move { UdpLink::connect(&a).await }
            },
            opts,
            stats,
            tx,
            shutdown,
        ));
        let seen = monitor.await.unwrap();
        assert!(matches!(seen[0], Message::Session { spdu: SPDU_CN, .. }));
        let mut values = vec![];
        let mut technical = vec![];
        while values.len() < 3 || technical.len() < 2 {
            let out = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            values.extend(out.readings.into_iter().map(|r| r.value));
            technical.extend(out.technical.into_iter().map(|t| t.kind));
        }
        assert_eq!(
            values[..3],
            [
                Some(Value::Numeric(60.0)),
                Some(Value::Numeric(61.0)),
                Some(Value::Numeric(62.0))
            ]
        );
        use shared_protocol::v1::TechnicalKind;
        assert_eq!(technical[0], TechnicalKind::Connected as i32);
        assert_ne!(
            technical[1],
            TechnicalKind::Connected as i32,
            "the monitor's release is reported"
        );
        stop.send(true).unwrap();
        runner.await.unwrap();
    }

    #[tokio::test]
    async fn session_runs_over_serial_framing() {
        session_over(SerialFraming).await;
    }

    #[tokio::test]
    async fn refusal_is_reported_as_refused() {
        let stats = DriverStats::default();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let (_keep, mut shutdown) = tokio::sync::watch::channel(false);
        let (host, mut dev) = tokio::io::duplex(4096);
        let mut out = BytesMut::new();
        encode_serial_frame(&[SPDU_RF, 2, 0x32, 0], &mut out);
        dev.write_all(&out).await.unwrap();
        let mut ctx = SessionCtx::new("iv1", &stats, &tx, &mut shutdown, Duration::from_secs(5));
        let proto = Intellivue::new(IntellivueOptions::default()).unwrap();
        let end = proto.session(host, &mut ctx).await.unwrap_err();
        assert!(matches!(end, DriverError::Refused(_)), "{end}");
        let _ = Bytes::new();
    }
}
