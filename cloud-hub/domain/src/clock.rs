//! The hub clock and how its instants are written.

use time::OffsetDateTime;

/// The hub clock, UTC microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Formats UTC microseconds as an RFC 3339 instant with `Z`, with
/// microsecond precision only when the fraction is non-zero.
pub fn format_instant(us: i64) -> String {
    match instant_digits(us) {
        // Only ASCII digits and separators were written.
        Some((b, len)) => String::from_utf8_lossy(&b[..len]).into_owned(),
        None => format_with_time(us.div_euclid(1_000_000), us.rem_euclid(1_000_000)),
    }
}

/// Appends [`format_instant`]'s text to `out` (without allocating for
/// years 0001 to 9999).
pub fn write_instant(out: &mut Vec<u8>, us: i64) {
    match instant_digits(us) {
        Some((b, len)) => out.extend_from_slice(&b[..len]),
        None => out.extend_from_slice(format_instant(us).as_bytes()),
    }
}

/// [`format_instant`]'s bytes and their length for years 0001 to 9999
/// (this runs three times for every Observation served): written digit by
/// digit. `None` for other years, which go through `time`.
fn instant_digits(us: i64) -> Option<([u8; 27], usize)> {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    const FIRST: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(FIRST..=LAST).contains(&secs) {
        return None;
    }
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let mut b = [0u8; 27];
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, t / 3600, 2);
    put(14, t / 60 % 60, 2);
    put(17, t % 60, 2);
    put(20, frac, 6);
    b[4] = b'-';
    b[7] = b'-';
    b[10] = b'T';
    b[13] = b':';
    b[16] = b':';
    b[19] = b'.';
    let end = if frac == 0 { 19 } else { 26 };
    b[end] = b'Z';
    Some((b, end + 1))
}

/// Year, month and day of a day count since 1970-01-01 in the proleptic
/// Gregorian calendar (the days-to-civil algorithm of H. Hinnant,
/// "chrono-Compatible Low-Level Date Algorithms").
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn format_with_time(secs: i64, frac: i64) -> String {
    let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let base = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    if frac == 0 {
        format!("{base}Z")
    } else {
        format!("{base}.{frac:06}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn instants_are_rfc3339_utc() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_instant(1_764_000_000_123_456),
            "2025-11-24T16:00:00.123456Z"
        );
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(format_instant(951_782_400_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(
            format_instant(253_402_300_799_000_000),
            "9999-12-31T23:59:59Z"
        );
    }

    proptest! {
        /// The digit-by-digit path writes what `time` writes, over the
        /// whole range it handles and across its edges, appended to a
        /// buffer as well as returned.
        #[test]
        fn the_fast_path_matches_time(secs in -62_135_596_900i64..253_402_300_900, frac in 0i64..1_000_000) {
            let us = secs.saturating_mul(1_000_000).saturating_add(frac);
            let (secs, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
            prop_assert_eq!(format_instant(us), format_with_time(secs, frac));
            let mut out = b"x".to_vec();
            write_instant(&mut out, us);
            prop_assert_eq!(String::from_utf8_lossy(&out[1..]), format_with_time(secs, frac));
        }
    }
}
