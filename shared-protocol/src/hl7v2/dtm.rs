//! HL7 v2 times: DTM/TS parsing (HL7 v2.5 chapter 2A, "DTM - date/time")
//! and the `YYYYMMDDHHMMSS+0000` form used in MSH-7 of ACKs.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A time as HL7 writes it (DTM/TS), in UTC µs; `zoned` says whether the
/// text carried its own offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hl7Time {
    pub utc_us: i64,
    pub zoned: bool,
}

/// Parse an HL7 DTM (`YYYYMMDDHHMM[SS[.S…]][+/-ZZZZ]`; chapter 2A "DTM").
/// At least minute precision is required for a vital sign; a time without
/// a zone is taken in `offset`.
pub fn parse_time(text: &str, offset: UtcOffset) -> Result<Hl7Time, &'static str> {
    let text = text.trim();
    let (body, zone) = match text.find(['+', '-']) {
        Some(p) => (&text[..p], Some(&text[p..])),
        None => (text, None),
    };
    let (main, frac) = match body.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (body, None),
    };
    if !main.bytes().all(|b| b.is_ascii_digit()) {
        return Err("time is not digits");
    }
    if main.len() < 12 {
        return Err("time has less than minute precision");
    }
    if !matches!(main.len(), 12 | 14) {
        return Err("time has a bad length");
    }
    let n = |r: std::ops::Range<usize>| main[r].parse::<u32>().map_err(|_| "bad number in time");
    let month = Month::try_from(n(4..6)? as u8).map_err(|_| "bad month")?;
    let date =
        Date::from_calendar_date(n(0..4)? as i32, month, n(6..8)? as u8).map_err(|_| "bad date")?;
    let sec = if main.len() == 14 { n(12..14)? } else { 0 };
    let micros = match frac {
        None => 0,
        Some(f) if (1..=6).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
            f.parse::<u32>().map_err(|_| "bad fraction")? * 10u32.pow(6 - f.len() as u32)
        }
        Some(_) => return Err("bad fraction of a second"),
    };
    if main.len() == 12 && frac.is_some() {
        return Err("fraction without seconds");
    }
    let t = Time::from_hms_micro(n(8..10)? as u8, n(10..12)? as u8, sec as u8, micros)
        .map_err(|_| "bad time of day")?;
    let (off, zoned) = match zone {
        None => (offset, false),
        Some(z) => {
            let digits = &z[1..];
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err("bad time zone");
            }
            let h: i32 = digits[..2].parse().map_err(|_| "bad time zone")?;
            let m: i32 = digits[2..].parse().map_err(|_| "bad time zone")?;
            if h > 14 || m > 59 {
                return Err("bad time zone");
            }
            let secs = (h * 3600 + m * 60) * if z.starts_with('-') { -1 } else { 1 };
            (
                UtcOffset::from_whole_seconds(secs).map_err(|_| "bad time zone")?,
                true,
            )
        }
    };
    let dt = PrimitiveDateTime::new(date, t).assume_offset(off);
    Ok(Hl7Time {
        utc_us: (dt.unix_timestamp_nanos() / 1000) as i64,
        zoned,
    })
}

/// `YYYYMMDDHHMMSS+0000` (UTC).
pub fn format_ts(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
