//! One export run: resume an interrupted chunk, apply new erasures, export
//! new readings and score history in chunks, rebuild the gold dates they
//! touched; the state object after each step (docs/lake.md, "How an export
//! runs").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use arrow_array::{Array, RecordBatch};
use hub_domain::privacy::{SubjectKey, Tombstone, subject_key};
use hub_storage::{LakeReading, LakeScore, LakeStore, ObservationStore, PrivacyStore};

use crate::LakeError;
use crate::gold::{Aggregator, GoldScore, gold_score};
use crate::key::LakeKey;
use crate::parquet_io::{
    self, SCHEMA_VERSION, Table, bronze_batch, gold_scores_batch, gold_vitals_batch, silver_batch,
    string_column, time_column, without,
};
use crate::rows::{BronzeRow, NotSilver, SilverRow, Skip, bronze_of, date_of, decode, silver_of};
use crate::sink::Sink;
use crate::state::{Pending, STATE_PATH, State, Stream};

/// What an export reads: the lake's reads, the privacy tables (subject
/// salt, tombstones) and the patients' identifier systems.
pub trait LakeSource: LakeStore + PrivacyStore + ObservationStore + Send + Sync {}
impl<T: LakeStore + PrivacyStore + ObservationStore + Send + Sync + ?Sized> LakeSource for T {}

/// How an export runs (from `[lake]`).
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub date_shift_max_days: u16,
    pub rows_per_chunk: usize,
    /// Rows younger than this (by receive / evaluation time) wait.
    pub settle_us: i64,
    /// Fault injection for the resume tests: fail before writing the
    /// (n+1)-th data file of this run. None in every real run.
    pub fail_after_files: Option<u64>,
}

impl ExportOptions {
    pub fn from_config(c: &crate::LakeConfig) -> Self {
        Self {
            date_shift_max_days: c.date_shift_max_days,
            rows_per_chunk: c.rows_per_chunk,
            settle_us: i64::try_from(c.settle_s)
                .unwrap_or(i64::MAX / 1_000_000)
                .saturating_mul(1_000_000),
            fail_after_files: None,
        }
    }
}

/// Progress of the readings (the bulk of a backfill).
pub trait Progress {
    /// The number of readings this run will look at (an estimate: rows
    /// stored meanwhile are counted when they are exported).
    fn start(&self, readings: u64);
    fn advance(&self, readings: u64);
}

/// No progress display.
#[derive(Debug, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Reading rows read (each is in bronze unless skipped).
    pub readings: u64,
    /// Silver rows written.
    pub silver_rows: u64,
    /// Score history rows written to gold.
    pub scores: u64,
    /// Rows without a wire payload (stored before schema v4) or whose
    /// payload does not decode: in no layer.
    pub skipped: u64,
    /// Readings in bronze but not silver: unattributed, not numeric, or of
    /// a metric outside the catalogue.
    pub not_silver: u64,
    /// Erasure tombstones applied, and the rows they removed.
    pub erasures: u64,
    pub erased_rows: u64,
    /// Data files written (or rewritten) and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Gold dates rebuilt.
    pub gold_dates: u64,
    /// Run time in ms.
    pub elapsed_ms: u64,
}

impl Summary {
    /// Readings per second of the run.
    pub fn readings_per_s(&self) -> f64 {
        self.readings as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }
}

/// Runs [`export`] under the store's lake lock; None when another hub
/// holds it (nothing was done).
pub fn export_exclusive<S: LakeSource + ?Sized>(
    source: &S,
    sink: &Sink,
    key: &LakeKey,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<Option<Summary>, LakeError> {
    let mut result = None;
    let ran = source.lake_exclusive(&mut || {
        result = Some(export(source, sink, key, opts, progress));
    })?;
    match (ran, result) {
        (true, Some(r)) => r.map(Some),
        _ => Ok(None),
    }
}

/// One export run (see the module docs).
pub fn export<S: LakeSource + ?Sized>(
    source: &S,
    sink: &Sink,
    key: &LakeKey,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<Summary, LakeError> {
    let started = Instant::now();
    let (state, fresh) = match sink.get(STATE_PATH)? {
        Some(bytes) => {
            let s: State = serde_json::from_slice(&bytes).map_err(LakeError::State)?;
            check_state(&s, key, opts)?;
            (s, false)
        }
        None => (
            State::new(SCHEMA_VERSION, key.id(), opts.date_shift_max_days),
            true,
        ),
    };
    let mut x = Exporter {
        source,
        sink,
        key,
        opts,
        salt: source.subject_salt()?,
        state,
        patients: HashMap::new(),
        summary: Summary::default(),
    };
    if fresh {
        // A new lake records its schema version, key id and date shift at
        // once, even before it has data.
        x.save()?;
    }
    progress.start(source.lake_readings_count(x.state.readings_cursor)?);
    if let Some(p) = x.state.pending {
        tracing::info!(stream = ?p.stream, after = p.after, upto = p.upto, "lake export: resuming an interrupted chunk");
        x.chunk(p, progress)?;
    }
    for t in source.tombstones_since(x.state.tombstones_cursor)? {
        x.erase(&t)?;
        x.state.tombstones_cursor = t.id;
        x.save()?;
    }
    let now = hub_domain::clock::now_us();
    let horizon = now.saturating_sub(opts.settle_us);
    x.readings(horizon, progress)?;
    x.scores(horizon)?;
    x.rebuild_gold()?;
    x.summary.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        readings = x.summary.readings,
        silver_rows = x.summary.silver_rows,
        scores = x.summary.scores,
        erasures = x.summary.erasures,
        files = x.summary.files,
        bytes = x.summary.bytes,
        elapsed_ms = x.summary.elapsed_ms,
        "lake export done"
    );
    Ok(x.summary)
}

fn check_state(s: &State, key: &LakeKey, opts: &ExportOptions) -> Result<(), LakeError> {
    if s.format != crate::state::FORMAT {
        return Err(LakeError::Mismatch(format!(
            "{STATE_PATH} is not a Vigil lake state (format `{}`)",
            s.format
        )));
    }
    if s.schema_version != SCHEMA_VERSION {
        return Err(LakeError::Mismatch(format!(
            "the lake has schema version {}, this hub writes {SCHEMA_VERSION}; export to a new lake \
             (docs/lake.md, \"Schema versions\")",
            s.schema_version
        )));
    }
    if s.key_id != key.id() {
        return Err(LakeError::Mismatch(format!(
            "the lake was written under pseudonym key {}, lake.pseudonym_key_file holds key {}: \
             pseudonyms would not link; use the lake's key or a new lake",
            s.key_id,
            key.id()
        )));
    }
    if s.date_shift_max_days != opts.date_shift_max_days {
        return Err(LakeError::Mismatch(format!(
            "the lake was written with lake.date_shift_max_days = {}, the config says {}",
            s.date_shift_max_days, opts.date_shift_max_days
        )));
    }
    Ok(())
}

/// The file name of the chunk `after < cursor <= upto`: the same for a
/// chunk written again after a crash, so it replaces its partial files.
fn chunk_name(after: i64, upto: i64) -> String {
    format!("part-{:019}-{:019}.parquet", after.saturating_add(1), upto)
}

/// The dates `[from_us, to_us)` spans.
fn dates_between(from_us: i64, to_us: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut t = from_us.div_euclid(crate::key::DAY_US) * crate::key::DAY_US;
    while t < to_us {
        out.push(date_of(t));
        t = t.saturating_add(crate::key::DAY_US);
    }
    out
}

/// The `date=` partition of a lake path.
fn date_in(path: &str) -> Option<String> {
    path.split('/')
        .find_map(|seg| seg.strip_prefix("date="))
        .map(str::to_owned)
}

struct Exporter<'a, S: ?Sized> {
    source: &'a S,
    sink: &'a Sink,
    key: &'a LakeKey,
    opts: &'a ExportOptions,
    salt: [u8; hub_domain::privacy::KEY_LEN],
    state: State,
    /// Patient identifier value → (pseudonym, date shift in days).
    patients: HashMap<String, (String, i64)>,
    summary: Summary,
}

impl<S: LakeSource + ?Sized> Exporter<'_, S> {
    fn save(&mut self) -> Result<(), LakeError> {
        self.state.updated_us = hub_domain::clock::now_us();
        let text = serde_json::to_vec_pretty(&self.state).map_err(LakeError::State)?;
        self.sink.put(STATE_PATH, text)
    }

    fn write(&mut self, rel: &str, table: Table, batch: &RecordBatch) -> Result<(), LakeError> {
        if self
            .opts
            .fail_after_files
            .is_some_and(|n| self.summary.files >= n)
        {
            return Err(LakeError::Injected);
        }
        let bytes = parquet_io::encode(table, std::slice::from_ref(batch))?;
        self.summary.bytes += bytes.len() as u64;
        self.summary.files += 1;
        self.sink.put(rel, bytes)
    }

    /// The pseudonym and date shift of patient `value`. Its identifier
    /// system is the one the hub's erasure uses (the store's
    /// `ObservationStore::patient`: from the stays, else the readings), so
    /// a tombstone's subject key finds the same pseudonym.
    fn patient(&mut self, value: &str) -> Result<(String, i64), LakeError> {
        if let Some(v) = self.patients.get(value) {
            return Ok(v.clone());
        }
        let system = self.source.patient(value)?.unwrap_or_default();
        let subject: SubjectKey = subject_key(&self.salt, &system, value);
        let p = self.key.pseudonym(&subject);
        let d = self.key.date_shift_days(&p, self.opts.date_shift_max_days);
        self.patients.insert(value.to_owned(), (p.clone(), d));
        Ok((p, d))
    }

    /// Writes chunk `p` again after an interruption: exactly the rows of
    /// its cursor range, under the same file names.
    fn chunk(&mut self, p: Pending, progress: &dyn Progress) -> Result<(), LakeError> {
        match p.stream {
            Stream::Readings => {
                let rows = self
                    .source
                    .lake_readings(p.after, Some(p.upto), usize::MAX)?;
                self.readings_chunk(p, rows, progress)
            }
            Stream::Scores => {
                let rows = self.source.lake_scores(p.after, Some(p.upto), usize::MAX)?;
                self.scores_chunk(p, rows)
            }
        }
    }

    /// Records chunk `p` as pending, writes its files, then advances the
    /// readings cursor (one state write each side).
    fn readings_chunk(
        &mut self,
        p: Pending,
        rows: Vec<LakeReading>,
        progress: &dyn Progress,
    ) -> Result<(), LakeError> {
        self.state.pending = Some(p);
        self.save()?;
        let n = rows.len() as u64;
        self.readings_files(rows, &chunk_name(p.after, p.upto))?;
        self.state.readings_cursor = p.upto;
        self.state.pending = None;
        self.save()?;
        progress.advance(n);
        Ok(())
    }

    fn scores_chunk(&mut self, p: Pending, rows: Vec<LakeScore>) -> Result<(), LakeError> {
        self.state.pending = Some(p);
        self.save()?;
        self.scores_files(rows, &chunk_name(p.after, p.upto))?;
        self.state.scores_cursor = p.upto;
        self.state.pending = None;
        self.save()
    }

    fn readings(&mut self, horizon: i64, progress: &dyn Progress) -> Result<(), LakeError> {
        loop {
            let after = self.state.readings_cursor;
            let mut rows = self
                .source
                .lake_readings(after, None, self.opts.rows_per_chunk)?;
            // Stop at the first row too young to be exported (a lower
            // cursor may still be committing).
            if let Some(cut) = rows.iter().position(|r| r.row.received_us > horizon) {
                rows.truncate(cut);
            }
            let Some(last) = rows.last() else {
                return Ok(());
            };
            let upto = last.cursor;
            self.readings_chunk(
                Pending {
                    stream: Stream::Readings,
                    after,
                    upto,
                },
                rows,
                progress,
            )?;
        }
    }

    fn scores(&mut self, horizon: i64) -> Result<(), LakeError> {
        loop {
            let after = self.state.scores_cursor;
            let mut rows = self
                .source
                .lake_scores(after, None, self.opts.rows_per_chunk)?;
            if let Some(cut) = rows.iter().position(|r| r.point.0 > horizon) {
                rows.truncate(cut);
            }
            let Some(last) = rows.last() else {
                return Ok(());
            };
            let upto = last.cursor;
            self.scores_chunk(
                Pending {
                    stream: Stream::Scores,
                    after,
                    upto,
                },
                rows,
            )?;
        }
    }

    fn readings_files(&mut self, rows: Vec<LakeReading>, name: &str) -> Result<(), LakeError> {
        let mut bronze: BTreeMap<String, Vec<BronzeRow>> = BTreeMap::new();
        let mut silver: BTreeMap<(String, String), Vec<SilverRow>> = BTreeMap::new();
        self.summary.readings += rows.len() as u64;
        for r in rows {
            let d = match decode(r.row) {
                Ok(d) => d,
                Err(Skip::NoPayload | Skip::Corrupt) => {
                    self.summary.skipped += 1;
                    continue;
                }
            };
            let b = bronze_of(&d);
            bronze.entry(date_of(b.effective_us)).or_default().push(b);
            let Some(pid) = d.row.patient_id.as_deref() else {
                self.summary.not_silver += 1;
                continue;
            };
            let (pseudonym, shift) = self.patient(pid)?;
            match silver_of(&d, &pseudonym, shift) {
                Ok(s) => silver
                    .entry((date_of(s.effective_us), s.loinc.clone()))
                    .or_default()
                    .push(s),
                Err(NotSilver::Unattributed | NotSilver::NotNumeric | NotSilver::UnknownMetric) => {
                    self.summary.not_silver += 1;
                }
            }
        }
        for (date, rows) in bronze {
            let batch = bronze_batch(&rows)?;
            self.write(&format!("bronze/date={date}/{name}"), Table::Bronze, &batch)?;
        }
        for ((date, loinc), rows) in silver {
            self.summary.silver_rows += rows.len() as u64;
            let batch = silver_batch(&rows)?;
            self.write(
                &format!("silver/date={date}/loinc={loinc}/{name}"),
                Table::Silver,
                &batch,
            )?;
            self.state.gold_dirty.insert(date);
        }
        Ok(())
    }

    fn scores_files(&mut self, rows: Vec<LakeScore>, name: &str) -> Result<(), LakeError> {
        let mut by_date: BTreeMap<String, Vec<GoldScore>> = BTreeMap::new();
        for s in &rows {
            let (pseudonym, shift) = self.patient(&s.patient_id)?;
            let g = gold_score(s, &pseudonym, shift);
            by_date.entry(date_of(g.time_us)).or_default().push(g);
        }
        self.summary.scores += rows.len() as u64;
        for (date, rows) in by_date {
            let batch = gold_scores_batch(&rows)?;
            self.write(
                &format!("gold/scores/date={date}/{name}"),
                Table::GoldScores,
                &batch,
            )?;
        }
        Ok(())
    }

    /// Rewrites `rel` without the rows `drop` marks (deletes it when none
    /// is left). Returns the rows removed.
    fn filter_file(
        &mut self,
        rel: &str,
        table: Table,
        drop: &dyn Fn(&RecordBatch) -> Result<Vec<bool>, LakeError>,
    ) -> Result<u64, LakeError> {
        let Some(bytes) = self.sink.get(rel)? else {
            return Ok(0);
        };
        let batches = parquet_io::decode(bytes)?;
        let mut kept = Vec::with_capacity(batches.len());
        let mut removed = 0u64;
        for b in &batches {
            let mask = drop(b)?;
            let n = mask.iter().filter(|d| **d).count() as u64;
            removed += n;
            kept.push(if n == 0 {
                b.clone()
            } else {
                without(b, &mask)?
            });
        }
        if removed == 0 {
            return Ok(0);
        }
        if kept.iter().all(|b| b.num_rows() == 0) {
            self.sink.delete(rel)?;
        } else {
            let bytes = parquet_io::encode(table, &kept)?;
            self.summary.bytes += bytes.len() as u64;
            self.summary.files += 1;
            self.sink.put(rel, bytes)?;
        }
        Ok(removed)
    }

    /// Applies one erasure: the patient's pseudonymized rows leave silver
    /// and gold, the rows of its device windows leave bronze.
    fn erase(&mut self, t: &Tombstone) -> Result<(), LakeError> {
        let pseudonym = self.key.pseudonym(&t.subject);
        let by_pseudonym = |b: &RecordBatch| -> Result<Vec<bool>, LakeError> {
            let p = string_column(b, "pseudonym")?;
            Ok((0..b.num_rows()).map(|i| p.value(i) == pseudonym).collect())
        };
        let mut removed = 0;
        for (rel, _) in self.sink.list("silver/")? {
            let n = self.filter_file(&rel, Table::Silver, &by_pseudonym)?;
            if n > 0
                && let Some(date) = date_in(&rel)
            {
                self.state.gold_dirty.insert(date);
            }
            removed += n;
        }
        for (rel, _) in self.sink.list("gold/")? {
            let table = if rel.starts_with("gold/scores/") {
                Table::GoldScores
            } else {
                Table::GoldVitals
            };
            removed += self.filter_file(&rel, table, &by_pseudonym)?;
        }
        for w in &t.windows {
            let in_window = |b: &RecordBatch| -> Result<Vec<bool>, LakeError> {
                let g = string_column(b, "gateway_id")?;
                let d = string_column(b, "device_id")?;
                let e = time_column(b, "effective_time")?;
                Ok((0..b.num_rows())
                    .map(|i| w.covers(g.value(i), d.value(i), e.value(i)))
                    .collect())
            };
            for date in dates_between(w.from_us, w.to_us) {
                for (rel, _) in self.sink.list(&format!("bronze/date={date}/"))? {
                    removed += self.filter_file(&rel, Table::Bronze, &in_window)?;
                }
            }
        }
        tracing::info!(
            tombstone = t.id,
            rows = removed,
            "lake export: erasure applied"
        );
        self.summary.erasures += 1;
        self.summary.erased_rows += removed;
        Ok(())
    }

    /// Rebuilds `gold/vitals/date=D/part-0.parquet` of every dirty date
    /// from that date's silver files.
    fn rebuild_gold(&mut self) -> Result<(), LakeError> {
        let dates: BTreeSet<String> = self.state.gold_dirty.clone();
        for date in dates {
            let mut agg = Aggregator::default();
            for (rel, _) in self.sink.list(&format!("silver/date={date}/"))? {
                let Some(bytes) = self.sink.get(&rel)? else {
                    continue;
                };
                for b in parquet_io::decode(bytes)? {
                    let p = string_column(&b, "pseudonym")?;
                    let t = time_column(&b, "effective_time")?;
                    let loinc = string_column(&b, "loinc")?;
                    let ucum = string_column(&b, "ucum")?;
                    let status = string_column(&b, "status")?;
                    let value = b
                        .column_by_name("value")
                        .and_then(|c| c.as_any().downcast_ref::<arrow_array::Float64Array>())
                        .ok_or(parquet_io::ParquetError::Column("value"))?;
                    for i in 0..b.num_rows() {
                        agg.add(
                            p.value(i),
                            t.value(i),
                            loinc.value(i),
                            ucum.value(i),
                            (!value.is_null(i)).then(|| value.value(i)),
                            status.value(i),
                        );
                    }
                }
            }
            let rows = agg.finish();
            let rel = format!("gold/vitals/date={date}/part-0.parquet");
            if rows.is_empty() {
                self.sink.delete(&rel)?;
            } else {
                let batch = gold_vitals_batch(&rows)?;
                self.write(&rel, Table::GoldVitals, &batch)?;
            }
            self.summary.gold_dates += 1;
            self.state.gold_dirty.remove(&date);
            self.save()?;
        }
        Ok(())
    }
}

/// Files and bytes per layer of a lake (bronze, silver, gold/vitals,
/// gold/scores), from a listing.
pub fn layer_sizes(sink: &Sink) -> Result<Vec<(&'static str, u64, u64)>, LakeError> {
    let mut out = Vec::new();
    for table in [
        Table::Bronze,
        Table::Silver,
        Table::GoldVitals,
        Table::GoldScores,
    ] {
        let files = sink.list(&format!("{}/", table.name()))?;
        out.push((
            table.name(),
            files.len() as u64,
            files.iter().map(|(_, n)| n).sum(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_names_are_fixed_by_the_range_and_sort_by_it() {
        assert_eq!(
            chunk_name(0, 100),
            "part-0000000000000000001-0000000000000000100.parquet"
        );
        assert!(chunk_name(100, 200) > chunk_name(0, 100));
    }

    #[test]
    fn windows_map_to_the_dates_they_span() {
        let day = crate::key::DAY_US;
        assert_eq!(dates_between(0, 1), vec!["1970-01-01"]);
        assert_eq!(
            dates_between(day - 1, day + 1),
            vec!["1970-01-01", "1970-01-02"]
        );
        assert_eq!(dates_between(day, day), Vec::<String>::new());
        assert_eq!(
            date_in("silver/date=2026-01-02/loinc=1-1/part-1.parquet").as_deref(),
            Some("2026-01-02")
        );
    }
}
