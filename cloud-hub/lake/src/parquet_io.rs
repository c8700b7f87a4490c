//! The layers' Arrow schemas (version [`SCHEMA_VERSION`], documented in
//! docs/lake.md) and their Parquet encoding: rows → file bytes, file bytes
//! → record batches (pure: bytes in memory, no I/O).

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::gold::{GoldScore, GoldVital};
use crate::rows::{BronzeRow, SilverRow};

/// The version of the layers' schemas; written into every file's key-value
/// metadata (`vigil.lake.schema_version`) and the state manifest. Bump it
/// (and docs/lake.md) on any change of a column.
pub const SCHEMA_VERSION: u32 = 1;

/// A layer's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Bronze,
    Silver,
    GoldVitals,
    GoldScores,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Bronze => "bronze",
            Table::Silver => "silver",
            Table::GoldVitals => "gold/vitals",
            Table::GoldScores => "gold/scores",
        }
    }
}

/// Errors encoding or decoding a Parquet file.
#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("column `{0}` is missing or of another type")]
    Column(&'static str),
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn f(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

/// The schema of `table`.
pub fn schema(table: Table) -> SchemaRef {
    use DataType::{Boolean, Float64, Int64, UInt32, UInt64, Utf8};
    let fields = match table {
        Table::Bronze => vec![
            f("observation_id", Utf8, false),
            f("gateway_id", Utf8, false),
            f("device_id", Utf8, false),
            f("sequence", UInt64, false),
            f("mdc_code", UInt32, false),
            f("vendor_label", Utf8, false),
            f("value_numeric", Float64, true),
            f("value_text", Utf8, true),
            f("value_coded_system", Utf8, true),
            f("value_coded_code", Utf8, true),
            f("value_coded_display", Utf8, true),
            f("mdc_unit", UInt32, false),
            f("ucum_unit", Utf8, false),
            f("device_time", ts(), true),
            f("time_source", Utf8, false),
            f("gateway_time", ts(), true),
            f("validity", Utf8, false),
            f("quality_flags", Utf8, false),
            f("subject_system", Utf8, true),
            f("subject_value", Utf8, true),
            f("interpretation", Utf8, false),
            f("effective_time", ts(), false),
            f("received_time", ts(), false),
            f("patient_id", Utf8, true),
            f("patient_system", Utf8, true),
        ],
        Table::Silver => vec![
            f("pseudonym", Utf8, false),
            f("effective_time", ts(), false),
            f("loinc", Utf8, false),
            f("mdc_code", UInt32, false),
            f("metric", Utf8, false),
            f("ucum", Utf8, false),
            f("value", Float64, true),
            f("status", Utf8, false),
            f("validity", Utf8, false),
            f("quality_flags", Utf8, false),
            f("interpretation", Utf8, false),
            f("out_of_range", Boolean, false),
            f("time_source", Utf8, false),
        ],
        Table::GoldVitals => vec![
            f("pseudonym", Utf8, false),
            f("hour", ts(), false),
            f("loinc", Utf8, false),
            f("ucum", Utf8, false),
            f("count", Int64, false),
            f("min", Float64, false),
            f("max", Float64, false),
            f("mean", Float64, false),
        ],
        Table::GoldScores => vec![
            f("pseudonym", Utf8, false),
            f("time", ts(), false),
            f("kind", Utf8, false),
            f("total", Int64, true),
            f("band", Utf8, true),
            f("missing", Utf8, false),
            f("stale", Utf8, false),
            f("components", Utf8, true),
        ],
    };
    Arc::new(Schema::new(fields))
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish())
}

fn times(values: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish())
}

fn u32s(values: impl Iterator<Item = u32>) -> ArrayRef {
    let mut b = UInt32Builder::new();
    values.for_each(|v| b.append_value(v));
    Arc::new(b.finish())
}

fn f64s(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    let mut b = Float64Builder::new();
    values.for_each(|v| b.append_option(v));
    Arc::new(b.finish())
}

fn i64s(values: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    let mut b = Int64Builder::new();
    values.for_each(|v| b.append_option(v));
    Arc::new(b.finish())
}

/// A zero time (the wire's "not set") is stored as null.
fn set(t: i64) -> Option<i64> {
    (t != 0).then_some(t)
}

pub fn bronze_batch(rows: &[BronzeRow]) -> Result<RecordBatch, ParquetError> {
    let s = |g: fn(&BronzeRow) -> &str| strings(rows.iter().map(|r| Some(g(r))));
    let o = |g: fn(&BronzeRow) -> Option<&str>| strings(rows.iter().map(g));
    let mut seq = UInt64Builder::new();
    rows.iter().for_each(|r| seq.append_value(r.sequence));
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.observation_id),
        s(|r| &r.gateway_id),
        s(|r| &r.device_id),
        Arc::new(seq.finish()),
        u32s(rows.iter().map(|r| r.mdc_code)),
        s(|r| &r.vendor_label),
        f64s(rows.iter().map(|r| r.value_numeric)),
        o(|r| r.value_text.as_deref()),
        o(|r| r.value_coded_system.as_deref()),
        o(|r| r.value_coded_code.as_deref()),
        o(|r| r.value_coded_display.as_deref()),
        u32s(rows.iter().map(|r| r.mdc_unit)),
        s(|r| &r.ucum_unit),
        times(rows.iter().map(|r| set(r.device_time_us))),
        s(|r| &r.time_source),
        times(rows.iter().map(|r| set(r.gateway_time_us))),
        s(|r| &r.validity),
        s(|r| &r.quality_flags),
        o(|r| r.subject_system.as_deref()),
        o(|r| r.subject_value.as_deref()),
        s(|r| &r.interpretation),
        times(rows.iter().map(|r| Some(r.effective_us))),
        times(rows.iter().map(|r| Some(r.received_us))),
        o(|r| r.patient_id.as_deref()),
        o(|r| r.patient_system.as_deref()),
    ];
    Ok(RecordBatch::try_new(schema(Table::Bronze), columns)?)
}

pub fn silver_batch(rows: &[SilverRow]) -> Result<RecordBatch, ParquetError> {
    let s = |g: fn(&SilverRow) -> &str| strings(rows.iter().map(|r| Some(g(r))));
    let mut oor = BooleanBuilder::new();
    rows.iter().for_each(|r| oor.append_value(r.out_of_range));
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.pseudonym),
        times(rows.iter().map(|r| Some(r.effective_us))),
        s(|r| &r.loinc),
        u32s(rows.iter().map(|r| r.mdc_code)),
        s(|r| &r.metric),
        s(|r| &r.ucum),
        f64s(rows.iter().map(|r| r.value)),
        s(|r| &r.status),
        s(|r| &r.validity),
        s(|r| &r.quality_flags),
        s(|r| &r.interpretation),
        Arc::new(oor.finish()),
        s(|r| &r.time_source),
    ];
    Ok(RecordBatch::try_new(schema(Table::Silver), columns)?)
}

pub fn gold_vitals_batch(rows: &[GoldVital]) -> Result<RecordBatch, ParquetError> {
    let s = |g: fn(&GoldVital) -> &str| strings(rows.iter().map(|r| Some(g(r))));
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.pseudonym),
        times(rows.iter().map(|r| Some(r.hour_us))),
        s(|r| &r.loinc),
        s(|r| &r.ucum),
        i64s(rows.iter().map(|r| Some(r.count))),
        f64s(rows.iter().map(|r| Some(r.min))),
        f64s(rows.iter().map(|r| Some(r.max))),
        f64s(rows.iter().map(|r| Some(r.mean))),
    ];
    Ok(RecordBatch::try_new(schema(Table::GoldVitals), columns)?)
}

pub fn gold_scores_batch(rows: &[GoldScore]) -> Result<RecordBatch, ParquetError> {
    let s = |g: fn(&GoldScore) -> &str| strings(rows.iter().map(|r| Some(g(r))));
    let o = |g: fn(&GoldScore) -> Option<&str>| strings(rows.iter().map(g));
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.pseudonym),
        times(rows.iter().map(|r| Some(r.time_us))),
        s(|r| &r.kind),
        i64s(rows.iter().map(|r| r.total)),
        o(|r| r.band.as_deref()),
        s(|r| &r.missing),
        s(|r| &r.stale),
        o(|r| r.components.as_deref()),
    ];
    Ok(RecordBatch::try_new(schema(Table::GoldScores), columns)?)
}

/// One Parquet file (zstd pages, schema version and layer in its
/// key-value metadata) holding `batches` of `table`'s schema.
pub fn encode(table: Table, batches: &[RecordBatch]) -> Result<Vec<u8>, ParquetError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("vigil.lake.layer".into(), table.name().to_owned()),
            KeyValue::new(
                "vigil.lake.schema_version".into(),
                SCHEMA_VERSION.to_string(),
            ),
        ]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema(table), Some(props))?;
    for b in batches {
        w.write(b)?;
    }
    w.close()?;
    Ok(out)
}

/// The record batches of a Parquet file.
pub fn decode(bytes: Bytes) -> Result<Vec<RecordBatch>, ParquetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?
        .with_batch_size(64 * 1024)
        .build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// A string column of a batch.
pub fn string_column<'a>(
    b: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a StringArray, ParquetError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or(ParquetError::Column(name))
}

/// A µs timestamp column of a batch.
pub fn time_column<'a>(
    b: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a arrow_array::TimestampMicrosecondArray, ParquetError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref())
        .ok_or(ParquetError::Column(name))
}

/// `batch` without the rows where `drop` is true.
pub fn without(batch: &RecordBatch, drop: &[bool]) -> Result<RecordBatch, ParquetError> {
    let keep = BooleanArray::from(drop.iter().map(|d| !d).collect::<Vec<_>>());
    Ok(arrow_select::filter::filter_record_batch(batch, &keep)?)
}

/// The silver rows of decoded silver batches.
pub fn silver_rows(batches: &[RecordBatch]) -> Result<Vec<SilverRow>, ParquetError> {
    let mut out = Vec::new();
    for b in batches {
        let p = string_column(b, "pseudonym")?;
        let t = time_column(b, "effective_time")?;
        let loinc = string_column(b, "loinc")?;
        let mdc = b
            .column_by_name("mdc_code")
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::UInt32Array>())
            .ok_or(ParquetError::Column("mdc_code"))?;
        let metric = string_column(b, "metric")?;
        let ucum = string_column(b, "ucum")?;
        let value = b
            .column_by_name("value")
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::Float64Array>())
            .ok_or(ParquetError::Column("value"))?;
        let status = string_column(b, "status")?;
        let validity = string_column(b, "validity")?;
        let flags = string_column(b, "quality_flags")?;
        let interp = string_column(b, "interpretation")?;
        let oor = b
            .column_by_name("out_of_range")
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
            .ok_or(ParquetError::Column("out_of_range"))?;
        let source = string_column(b, "time_source")?;
        for i in 0..b.num_rows() {
            out.push(SilverRow {
                pseudonym: p.value(i).to_owned(),
                effective_us: t.value(i),
                loinc: loinc.value(i).to_owned(),
                mdc_code: mdc.value(i),
                metric: metric.value(i).to_owned(),
                ucum: ucum.value(i).to_owned(),
                value: (!value.is_null(i)).then(|| value.value(i)),
                status: status.value(i).to_owned(),
                validity: validity.value(i).to_owned(),
                quality_flags: flags.value(i).to_owned(),
                interpretation: interp.value(i).to_owned(),
                out_of_range: oor.value(i),
                time_source: source.value(i).to_owned(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silver(p: &str, v: Option<f64>) -> SilverRow {
        SilverRow {
            pseudonym: p.into(),
            effective_us: 1_700_000_000_000_000,
            loinc: "59408-5".into(),
            mdc_code: 150456,
            metric: "MDC_PULS_OXIM_SAT_O2".into(),
            ucum: "%".into(),
            value: v,
            status: "final".into(),
            validity: "VALIDITY_VALID".into(),
            quality_flags: String::new(),
            interpretation: "INTERPRETATION_UNSPECIFIED".into(),
            out_of_range: false,
            time_source: "TIME_SOURCE_DEVICE_CLOCK_SYNCED".into(),
        }
    }

    #[test]
    fn silver_round_trips_through_parquet_and_rows_can_be_dropped() {
        let rows = vec![
            silver("a", Some(97.5)),
            silver("b", None),
            silver("a", Some(90.0)),
        ];
        let bytes = encode(Table::Silver, &[silver_batch(&rows).unwrap()]).unwrap();
        let batches = decode(Bytes::from(bytes)).unwrap();
        assert_eq!(silver_rows(&batches).unwrap(), rows);
        let b = &batches[0];
        let p = string_column(b, "pseudonym").unwrap();
        let drop: Vec<bool> = (0..b.num_rows()).map(|i| p.value(i) == "a").collect();
        let left = without(b, &drop).unwrap();
        assert_eq!(silver_rows(&[left]).unwrap(), vec![rows[1].clone()]);
    }

    #[test]
    fn files_carry_the_layer_and_schema_version() {
        let bytes = encode(Table::GoldVitals, &[gold_vitals_batch(&[]).unwrap()]).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
        let kv = r.metadata().file_metadata().key_value_metadata().unwrap();
        let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
        assert_eq!(get("vigil.lake.layer").as_deref(), Some("gold/vitals"));
        assert_eq!(get("vigil.lake.schema_version").as_deref(), Some("1"));
    }
}
