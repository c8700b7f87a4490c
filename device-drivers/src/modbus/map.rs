//! Register maps: which Modbus registers or bits hold which metric, how the
//! value is encoded (type, word order, scale, offset, invalid sentinels), and
//! how often to poll it.
//!
//! A map is TOML, either in its own file (`points = [...]`, usually written
//! as `[[points]]` tables) or inline in the device options
//! (`[[device.options.points]]`). Parsing is typed (serde, unknown keys
//! refused) and every point is validated against the protocol limits and the
//! metric catalogue; errors name the entry (`points[3] ("PEEP"): …`).
//!
//! Addresses are the 0-based protocol addresses sent on the wire (Modbus
//! Application Protocol v1.1b3 §4.4: "data element numbered X is addressed
//! in the PDU X-1"), not the 1-based "40001"-style numbers of some manuals.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use shared_protocol::catalogue::{CATALOGUE, Metric, Unit};

/// Most points one device may have.
pub const MAX_POINTS: usize = 1024;
/// Fastest poll interval a point may ask for, ms.
pub const MIN_POLL_INTERVAL_MS: u64 = 50;
/// Slowest poll interval, ms (one hour).
pub const MAX_POLL_INTERVAL_MS: u64 = 3_600_000;
/// Longest label, bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Largest map file read, bytes.
pub const MAX_MAP_FILE_LEN: u64 = 1 << 20;

/// The four Modbus data tables (Modbus Application Protocol v1.1b3 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Holding registers, read with function 0x03.
    Holding,
    /// Input registers, read with function 0x04.
    Input,
    /// Coils, read with function 0x01.
    Coils,
    /// Discrete inputs, read with function 0x02.
    Discrete,
}

impl Table {
    /// Coils and discrete inputs hold single bits; the others 16-bit
    /// registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coils | Table::Discrete)
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Holding => "holding",
            Table::Input => "input",
            Table::Coils => "coils",
            Table::Discrete => "discrete",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the raw value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    /// IEEE 754 binary32 in two registers.
    F32,
    /// IEEE 754 binary64 in four registers.
    F64,
    /// A coil / discrete input, or bit `bit` (0 = least significant) of a
    /// holding / input register.
    Bit,
}

impl ValueType {
    /// Registers the value occupies (a bit-in-register occupies one; a
    /// coil / discrete input one bit).
    pub fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 | ValueType::Bit => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::F64 => 4,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, ValueType::F32 | ValueType::F64)
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
            ValueType::Bit => "bit",
        }
    }
}

/// Byte order of a multi-register value. The value's bytes, most
/// significant first, are A B C D (E F G H for 64 bits); the name is the
/// order in which they are transmitted (register 0 high byte first).
/// For 64-bit values the same rule extends: `ABCD` = big-endian, `DCBA` =
/// all bytes reversed, `BADC` = bytes swapped within each register,
/// `CDAB` = register order reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum WordOrder {
    /// Big-endian: the Modbus default (Application Protocol §4.2: "big-
    /// Endian representation … the most significant byte is sent first").
    #[default]
    ABCD,
    /// Little-endian (all bytes reversed).
    DCBA,
    /// Bytes swapped within each register.
    BADC,
    /// Registers in reverse order ("word swap"), e.g. many PLCs' floats.
    CDAB,
}

/// A metric named by its MDC code or by its `MDC_…` name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MdcRef {
    Code(u32),
    Name(String),
}

/// A raw sentinel value meaning "no valid value".
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Sentinel {
    /// An integer: the typed raw value (e.g. `-32768` for i16) or the
    /// register bit pattern (`0x8000`); for f32/f64, the bit pattern
    /// (`0x7FC00000`).
    Int(i64),
    /// A float (f32/f64 only); `nan` matches any NaN.
    Float(f64),
}

/// One point of a map, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    /// Device's name for the value (vendor label); default `table@address`.
    #[serde(default)]
    pub label: Option<String>,
    pub table: Table,
    /// 0-based protocol address.
    pub address: u16,
    #[serde(rename = "type")]
    pub ty: ValueType,
    /// Bit number 0..=15 for `type = "bit"` in a holding/input register.
    #[serde(default)]
    pub bit: Option<u8>,
    /// Byte order for u32/i32/f32/f64 (default ABCD).
    #[serde(default)]
    pub order: Option<WordOrder>,
    /// physical = raw × scale + offset. Default 1.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Default 0.
    #[serde(default)]
    pub offset: Option<f64>,
    /// UCUM unit of the physical value; must be a unit the catalogue
    /// accepts for the metric.
    pub unit: String,
    /// MDC code (number) or name (`"MDC_RESP_RATE"`).
    pub mdc: MdcRef,
    /// Raw values meaning "no valid value".
    #[serde(default)]
    pub invalid: Vec<Sentinel>,
    /// Poll interval of this point, ms (default: the device's).
    #[serde(default)]
    pub poll_interval_ms: Option<u64>,
}

/// A map file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    /// Free text: which device and firmware the map is for, and its source.
    #[serde(default)]
    pub description: Option<String>,
    pub points: Vec<PointSpec>,
}

/// A validated point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub table: Table,
    pub address: u16,
    pub ty: ValueType,
    /// Bit within the register (bit points in holding/input tables).
    pub bit: Option<u8>,
    pub order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    /// The metric in the point's unit (canonical or alternative variant).
    pub metric: Metric,
    pub unit: Unit,
    pub invalid: Vec<Sentinel>,
    pub poll_interval: Duration,
}

impl Point {
    /// Registers (or bits, for coils/discretes) the point occupies.
    pub fn width(&self) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            self.ty.width()
        }
    }

    /// Last address occupied (inclusive).
    pub fn last_address(&self) -> u16 {
        self.address + (self.width() - 1)
    }
}

/// A map error, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MapError(pub String);

/// Parse a map file's text.
pub fn parse_map(text: &str) -> Result<MapFile, MapError> {
    toml::from_str(text).map_err(|e| MapError(format!("register map: {}", e.message())))
}

/// Read and parse a map file (at most [`MAX_MAP_FILE_LEN`] bytes).
pub fn load_map_file(path: &Path) -> Result<MapFile, MapError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| MapError(format!("register map {}: {e}", path.display())))?;
    if meta.len() > MAX_MAP_FILE_LEN {
        return Err(MapError(format!(
            "register map {}: larger than {MAX_MAP_FILE_LEN} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| MapError(format!("register map {}: {e}", path.display())))?;
    parse_map(&text).map_err(|e| MapError(format!("{} ({})", e.0, path.display())))
}

/// Find a catalogue metric by code or name.
pub fn find_metric(r: &MdcRef) -> Option<&'static Metric> {
    match r {
        MdcRef::Code(c) => CATALOGUE.by_mdc(*c),
        MdcRef::Name(n) => CATALOGUE.all().iter().find(|m| m.mdc_name == n),
    }
}

/// Validate all points; `default_poll` is the device's interval.
pub fn validate(specs: &[PointSpec], default_poll: Duration) -> Result<Vec<Point>, MapError> {
    if specs.is_empty() {
        return Err(MapError("register map: no points".into()));
    }
    if specs.len() > MAX_POINTS {
        return Err(MapError(format!(
            "register map: {} points, at most {MAX_POINTS}",
            specs.len()
        )));
    }
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| validate_point(s, default_poll).map_err(|m| MapError(entry(i, s, &m))))
        .collect()
}

fn entry(i: usize, s: &PointSpec, msg: &str) -> String {
    match &s.label {
        Some(l) => format!("points[{i}] ({l:?}): {msg}"),
        None => format!("points[{i}] ({} {}): {msg}", s.table, s.address),
    }
}

fn validate_point(s: &PointSpec, default_poll: Duration) -> Result<Point, String> {
    let label = match &s.label {
        Some(l) if l.trim().is_empty() => return Err("label is empty".into()),
        Some(l) if l.len() > MAX_LABEL_LEN || l.chars().any(char::is_control) => {
            return Err(format!(
                "label must be at most {MAX_LABEL_LEN} bytes without control characters"
            ));
        }
        Some(l) => l.clone(),
        None => format!("{}@{}", s.table, s.address),
    };
    // Type vs table.
    match (s.table.is_bits(), s.ty) {
        (true, ValueType::Bit) => {
            if s.bit.is_some() {
                return Err(format!(
                    "`bit` is for bits of a register; a {} entry is one bit already",
                    s.table
                ));
            }
        }
        (true, t) => {
            return Err(format!(
                "table {} holds bits: type must be \"bit\", not {:?}",
                s.table,
                t.name()
            ));
        }
        (false, ValueType::Bit) => match s.bit {
            Some(b) if b <= 15 => {}
            Some(b) => return Err(format!("bit {b} is out of range 0..=15")),
            None => {
                return Err(format!(
                    "type \"bit\" in table {} needs `bit` (0..=15)",
                    s.table
                ));
            }
        },
        (false, _) => {
            if s.bit.is_some() {
                return Err("`bit` is only for type \"bit\"".into());
            }
        }
    }
    let width = if s.table.is_bits() { 1 } else { s.ty.width() };
    if u32::from(s.address) + u32::from(width) - 1 > u32::from(u16::MAX) {
        return Err(format!(
            "address {} + {width} registers runs past 65535",
            s.address
        ));
    }
    if s.order.is_some() && s.ty.width() < 2 {
        return Err(format!(
            "`order` is for multi-register types (u32, i32, f32, f64), not {:?}",
            s.ty.name()
        ));
    }
    let scale = s.scale.unwrap_or(1.0);
    let offset = s.offset.unwrap_or(0.0);
    if !scale.is_finite() || scale == 0.0 {
        return Err(format!("scale {scale} must be finite and non-zero"));
    }
    if !offset.is_finite() {
        return Err(format!("offset {offset} must be finite"));
    }
    let base = find_metric(&s.mdc).ok_or_else(|| match &s.mdc {
        MdcRef::Code(c) => format!("MDC code {c} is not in the metric catalogue"),
        MdcRef::Name(n) => format!("MDC name {n:?} is not in the metric catalogue"),
    })?;
    if s.unit.is_empty() {
        return Err("unit is empty".into());
    }
    let metric = base.in_unit(0, &s.unit).ok_or_else(|| {
        let accepted: Vec<&str> = base.variants().map(|v| v.unit.ucum).collect();
        format!(
            "unit {:?} is not a unit the catalogue accepts for {} (accepted: {}); values are never converted",
            s.unit,
            base.mdc_name,
            accepted.join(", ")
        )
    })?;
    for v in &s.invalid {
        check_sentinel(s.ty, v)?;
    }
    let poll_ms = s
        .poll_interval_ms
        .unwrap_or(default_poll.as_millis() as u64);
    if !(MIN_POLL_INTERVAL_MS..=MAX_POLL_INTERVAL_MS).contains(&poll_ms) {
        return Err(format!(
            "poll_interval_ms {poll_ms} is outside {MIN_POLL_INTERVAL_MS}..={MAX_POLL_INTERVAL_MS}"
        ));
    }
    Ok(Point {
        label,
        table: s.table,
        address: s.address,
        ty: s.ty,
        bit: s.bit,
        order: s.order.unwrap_or_default(),
        scale,
        offset,
        metric,
        unit: metric.unit,
        invalid: s.invalid.clone(),
        poll_interval: Duration::from_millis(poll_ms),
    })
}

/// Is the sentinel representable in the type?
fn check_sentinel(ty: ValueType, v: &Sentinel) -> Result<(), String> {
    let ok = match (ty, *v) {
        (ValueType::Bit, Sentinel::Int(i)) => (0..=1).contains(&i),
        (ValueType::U16, Sentinel::Int(i)) => (0..=0xFFFF).contains(&i),
        (ValueType::I16, Sentinel::Int(i)) => (-0x8000..=0xFFFF).contains(&i),
        (ValueType::U32 | ValueType::F32, Sentinel::Int(i)) => (0..=0xFFFF_FFFF).contains(&i),
        (ValueType::I32, Sentinel::Int(i)) => (-0x8000_0000..=0xFFFF_FFFF).contains(&i),
        // Any i64 is a 64-bit pattern.
        (ValueType::F64, Sentinel::Int(_)) => true,
        (ValueType::F32 | ValueType::F64, Sentinel::Float(_)) => true,
        (_, Sentinel::Float(_)) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid sentinel {v:?} does not fit type {:?}",
            ty.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::catalogue::{codes, units};

    const D: Duration = Duration::from_millis(1000);

    fn one(text: &str) -> Result<Vec<Point>, MapError> {
        let m = parse_map(text)?;
        validate(&m.points, D)
    }

    #[test]
    fn a_full_point_parses_and_resolves_metric_and_unit() {
        let p = one(r#"
            [[points]]
            label = "FiO2"
            table = "input"
            address = 10
            type = "f32"
            order = "CDAB"
            scale = 1.0
            unit = "%"
            mdc = "MDC_CONC_AWAY_O2_INSP"
            invalid = [nan, 0x7FC00000]
            poll_interval_ms = 500
        "#)
        .unwrap();
        let p = &p[0];
        assert_eq!(p.metric.mdc, codes::CONC_AWAY_O2_INSP);
        assert_eq!(p.unit, units::PERCENT);
        assert_eq!(p.order, WordOrder::CDAB);
        assert_eq!(p.poll_interval, Duration::from_millis(500));
        assert_eq!(p.last_address(), 11);
        // By number, default label and interval; /min resolves per metric.
        let p = one(
            "[[points]]\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\nunit = \"/min\"\nmdc = 151562\n",
        )
        .unwrap();
        assert_eq!(p[0].label, "holding@0");
        assert_eq!(p[0].unit, units::RESP_PER_MIN);
        assert_eq!(p[0].poll_interval, D);
    }

    #[test]
    fn alternative_units_resolve_to_their_variant() {
        let p = one(
            "[[points]]\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\nunit = \"kPa\"\nmdc = \"MDC_CONC_AWAY_CO2_ET\"\n",
        )
        .unwrap();
        assert_eq!(p[0].unit, units::KILO_PA);
        assert_eq!(p[0].metric.loinc, "19891-1");
    }

    #[test]
    fn errors_name_the_entry() {
        let base = "table = \"holding\"\naddress = 0\ntype = \"u16\"\nunit = \"%\"\nmdc = \"MDC_PULS_OXIM_SAT_O2\"\n";
        let bad = |extra: &str, want: &str| {
            let text = format!("[[points]]\n{base}\n[[points]]\nlabel = \"X\"\n{extra}");
            let err = one(&text).unwrap_err().0;
            assert!(err.contains("points[1] (\"X\")"), "{err}");
            assert!(err.contains(want), "{err} / {want}");
        };
        let with = |over: &str| {
            let mut lines: Vec<String> = base.lines().map(String::from).collect();
            for o in over.lines() {
                let key = o.split('=').next().unwrap().trim();
                lines.retain(|l| l.split('=').next().unwrap().trim() != key);
                lines.push(o.to_string());
            }
            lines.join("\n") + "\n"
        };
        bad(
            &with("unit = \"mm[Hg]\""),
            "not a unit the catalogue accepts",
        );
        bad(&with("mdc = \"MDC_NOPE\""), "not in the metric catalogue");
        bad(&with("mdc = 1"), "not in the metric catalogue");
        bad(&with("type = \"bit\""), "needs `bit`");
        bad(&with("type = \"bit\"\nbit = 16"), "out of range");
        bad(&with("bit = 3"), "only for type");
        bad(&with("order = \"CDAB\""), "multi-register");
        bad(&with("table = \"coils\""), "holds bits");
        bad(&with("type = \"f64\"\naddress = 65533"), "past 65535");
        bad(&with("scale = 0.0"), "non-zero");
        bad(&with("scale = nan"), "finite");
        bad(&with("invalid = [70000]"), "does not fit");
        bad(&with("invalid = [nan]"), "does not fit");
        bad(&with("poll_interval_ms = 10"), "poll_interval_ms");
        let err = one(&format!("[[points]]\nlabel = \"\"\n{base}"))
            .unwrap_err()
            .0;
        assert!(
            err.contains("points[0]") && err.contains("label is empty"),
            "{err}"
        );
        // Unknown keys and bad enum values are refused by the parser.
        let err = one(&format!("[[points]]\n{base}bogus = 1\n"))
            .unwrap_err()
            .0;
        assert!(err.contains("bogus"), "{err}");
        let err = one(&format!("[[points]]\n{}", with("order = \"ACBD\"")))
            .unwrap_err()
            .0;
        assert!(err.contains("order") || err.contains("ACBD"), "{err}");
        assert!(one("points = []").unwrap_err().0.contains("no points"));
    }

    #[test]
    fn coils_are_bits_without_a_bit_number() {
        let p = one(
            "[[points]]\ntable = \"coils\"\naddress = 7\ntype = \"bit\"\nunit = \"%\"\nmdc = \"MDC_PULS_OXIM_SAT_O2\"\n",
        )
        .unwrap();
        assert_eq!(p[0].width(), 1);
        let err = one(
            "[[points]]\ntable = \"discrete\"\naddress = 7\ntype = \"bit\"\nbit = 1\nunit = \"%\"\nmdc = \"MDC_PULS_OXIM_SAT_O2\"\n",
        )
        .unwrap_err();
        assert!(err.0.contains("one bit already"), "{err}");
    }

    #[test]
    fn shipped_example_maps_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge-agent/maps");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                let m = load_map_file(&path).unwrap();
                let pts =
                    validate(&m.points, D).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!pts.is_empty());
                assert!(
                    m.description.is_some(),
                    "{} has a description",
                    path.display()
                );
                n += 1;
            }
        }
        assert!(n >= 2, "example maps in {}", dir.display());
    }
}
