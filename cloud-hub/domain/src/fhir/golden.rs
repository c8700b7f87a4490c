//! Rendering regression vectors: a fixed, varied set of stored reading rows
//! and the exact bytes each one rendered to when the vectors were blessed
//! (`testdata/observation-renderings.ndjson`, one JSON document per line).
//! Both ways of rendering (the `Value` of [`render_observation`] and the
//! bytes of [`write_observation`]) must reproduce them byte for byte.
//!
//! To bless after an intended change of the rendered resources:
//! `VIGIL_BLESS=1 cargo test -p vigil-hub-domain golden` (then review the
//! diff of the data file).

use prost::Message;
use shared_protocol::CATALOGUE;
use shared_protocol::v1::{CodedValue, Identifier, Reading, reading};

use super::render::{
    ObservationRow, ObservationWriter, RowKind, render_observation, write_observation,
};

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/observation-renderings.ndjson"
);

/// A deterministic generator (SplitMix64), so the rows never change.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn pick<T: Clone>(&mut self, options: &[T]) -> T {
        options[(self.next() % options.len() as u64) as usize].clone()
    }
}

/// Every catalogue metric in each of its units, several times over, with
/// the value, quality, subject, device and version fields varied.
fn rows() -> Vec<ObservationRow> {
    let mut g = Gen(0x5eed_f00d);
    let metrics: Vec<_> = CATALOGUE.all().iter().flat_map(|m| m.variants()).collect();
    let mut rows = Vec::new();
    for round in 0..3 {
        for m in &metrics {
            let (lo, hi) = m.possible_range;
            let value = match g.next() % 9 {
                0 => None,
                1 => Some(reading::Value::Numeric(hi + 1.0 + (g.next() % 50) as f64)),
                2 => Some(reading::Value::Numeric(lo - 1.0)),
                3 => Some(reading::Value::Text(
                    g.pick(&["ok", "sensor \"off\"\n", "\u{e9}l\u{e8}ve"])
                        .to_owned(),
                )),
                4 => Some(reading::Value::Coded(CodedValue {
                    system: g.pick(&["", "http://snomed.info/sct"]).to_owned(),
                    code: "12345".to_owned(),
                    display: g.pick(&["", "Some finding"]).to_owned(),
                })),
                _ => Some(reading::Value::Numeric(
                    lo + (hi - lo) * (g.next() % 1000) as f64 / 1000.0,
                )),
            };
            let patient: Option<&str> =
                g.pick(&[None, Some("p-1"), Some("MRN 0042/7"), Some("p-2")]);
            let subject = match g.next() % 3 {
                0 => None,
                1 => patient.map(|p| Identifier {
                    system: g.pick(&["", "urn:oid:1.2.3"]).to_owned(),
                    value: p.to_owned(),
                }),
                _ => Some(Identifier {
                    system: "urn:oid:9.9".to_owned(),
                    value: "someone-else".to_owned(),
                }),
            };
            let device_time_us = g.pick(&[0, 1_764_000_000_000_000, 1_764_000_000_123_456]);
            let r = Reading {
                mdc_code: m.mdc,
                vendor_label: "label".to_owned(),
                mdc_unit: m.unit.mdc,
                ucum_unit: m.unit.ucum.to_owned(),
                device_time_us,
                time_source: (g.next() % 5) as i32,
                gateway_time_us: g.pick(&[0, 1_764_000_001_000_000]),
                validity: (g.next() % 5) as i32,
                flags: (0..g.next() % 4).map(|_| (g.next() % 13) as i32).collect(),
                sequence: g.next() % 100_000,
                subject,
                interpretation: (g.next() % 11) as i32,
                value,
            };
            let serial = g.pick(&["", "SN-9"]);
            rows.push(ObservationRow {
                id: format!("{:032x}", rows.len() + 1000 * round),
                kind: RowKind::Reading.as_str().to_owned(),
                gateway_id: "gw-1".to_owned(),
                device_id: g.pick(&["dev-1", "mon 2"]).to_owned(),
                patient_id: patient.map(str::to_owned),
                patient_system: g
                    .pick(&[None, Some(""), Some("urn:vigil:mrn")])
                    .map(str::to_owned),
                received_us: 1_764_000_002_000_000,
                payload: Some(r.encode_to_vec()),
                resource: String::new(),
                manufacturer: g.pick(&["", "Acme"]).to_owned(),
                model: g.pick(&["", "M-1"]).to_owned(),
                serial_number: serial.to_owned(),
                version: g.pick(&[0, 1, 3]),
                updated_us: g.pick(&[0, 1_764_000_003_000_000]),
            });
        }
    }
    rows
}

#[test]
fn golden_renderings_are_reproduced_byte_for_byte() {
    let rows = rows();
    let rendered: Vec<String> = rows
        .iter()
        .map(|row| serde_json::to_string(&render_observation(row).unwrap()).unwrap())
        .collect();
    if std::env::var_os("VIGIL_BLESS").is_some() {
        std::fs::write(DATA, rendered.join("\n") + "\n").unwrap();
    }
    let blessed = std::fs::read_to_string(DATA).unwrap();
    let blessed: Vec<&str> = blessed.lines().collect();
    assert_eq!(blessed.len(), rows.len(), "one vector per row");
    for (i, (row, want)) in rows.iter().zip(&blessed).enumerate() {
        assert_eq!(rendered[i], *want, "render_observation, vector {i}");
        let mut direct = Vec::new();
        write_observation(row, &mut direct).unwrap();
        assert_eq!(
            String::from_utf8(direct).unwrap(),
            *want,
            "write_observation, vector {i}"
        );
    }
    // One writer over a page: rows of the same device one after another
    // (each vector twice) and changes of device, model or serial between
    // them (the vectors in order, then backwards) are written as alone.
    let mut writer = ObservationWriter::default();
    let order = (0..rows.len()).chain((0..rows.len()).rev());
    for i in order.flat_map(|i| [i, i]) {
        let mut out = Vec::new();
        writer.write(&rows[i], &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            blessed[i],
            "ObservationWriter, vector {i}"
        );
    }
}
