//! Buffer throughput: readings/s durably accepted into the encrypted buffer,
//! next to the raw limit measured in the same run (sled batch writes + flush
//! of the same number of bytes, plus AES-256-GCM sealing of the same
//! plaintexts, without the buffer's bookkeeping). Medians of 7 runs with
//! min/max. Run: `cargo bench -p edge-agent --bench buffer`.

use std::time::Instant;

use device_drivers::DriverOutput;
use edge_agent::buffer::{Buffer, Keyring, Limits};
use prost::Message;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use shared_protocol::v1::{Reading, reading::Value};

const OUTPUTS: usize = 20_000; // driver outputs per run
const READINGS_PER_OUTPUT: usize = 3; // e.g. SpO2, pulse rate, PI of one Masimo line
const GROUP: usize = 256; // the writer's group commit size

fn output(i: usize) -> DriverOutput {
    DriverOutput {
        device_id: format!("dev-{}", i % 16),
        serial_number: Some("0000056661".into()),
        readings: (0..READINGS_PER_OUTPUT)
            .map(|k| Reading {
                mdc_code: 150_456 + k as u32,
                vendor_label: "SPO2".into(),
                value: Some(Value::Numeric(97.0 + k as f64)),
                mdc_unit: 262_688,
                ucum_unit: "%".into(),
                device_time_us: 1_795_514_400_000_000 + i as i64,
                gateway_time_us: 1_795_514_400_000_000 + i as i64,
                validity: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outputs: Vec<DriverOutput> = (0..OUTPUTS).map(output).collect();
    let readings = (OUTPUTS * READINGS_PER_OUTPUT) as f64;
    let mut agent = vec![];
    let mut raw = vec![];
    let mut bytes_per_record = 0usize;
    for _ in 0..7 {
        // The buffer.
        let dir = tempfile::tempdir().unwrap();
        let buffer =
            Buffer::open_with(dir.path(), &Keyring::single([7u8; 32]), Limits::default()).unwrap();
        let t = Instant::now();
        rt.block_on(async {
            for chunk in outputs.chunks(GROUP) {
                buffer.append(chunk.to_vec()).await.unwrap();
            }
        });
        agent.push(readings / t.elapsed().as_secs_f64());
        bytes_per_record = (buffer.pending_bytes() as usize) / OUTPUTS;
        drop(buffer);

        // The raw limit: seal the same plaintexts, write them in the same
        // groups, flush once per group.
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("raw"))
            .mode(sled::Mode::HighThroughput)
            .open()
            .unwrap();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
        let plain: Vec<Vec<u8>> = outputs
            .iter()
            .map(|o| {
                shared_protocol::v1::DeviceData {
                    readings: o.readings.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        let t = Instant::now();
        let mut n = 0u64;
        rt.block_on(async {
            for chunk in plain.chunks(GROUP) {
                let mut batch = sled::Batch::default();
                for p in chunk {
                    let mut nonce = [0u8; 12];
                    nonce[4..].copy_from_slice(&n.to_be_bytes());
                    let mut ct = p.clone();
                    key.seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::empty(),
                        &mut ct,
                    )
                    .unwrap();
                    batch.insert(&n.to_be_bytes(), ct);
                    n += 1;
                }
                db.apply_batch(batch).unwrap();
                db.flush_async().await.unwrap();
            }
        });
        raw.push(readings / t.elapsed().as_secs_f64());
    }
    let (am, amin, amax) = stats(agent);
    let (rm, rmin, rmax) = stats(raw);
    println!(
        "encrypted buffer append: median {am:.0} readings/s (min {amin:.0}, max {amax:.0}); {bytes_per_record} bytes/record of {READINGS_PER_OUTPUT} readings"
    );
    println!("raw sled + AES-256-GCM:   median {rm:.0} readings/s (min {rmin:.0}, max {rmax:.0})");
    println!("ratio: {:.0} % of the raw limit", am / rm * 100.0);
}
