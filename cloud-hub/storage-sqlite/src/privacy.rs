//! Patients' rights on SQLite (schema v20): the subject salt, erasure
//! tombstones and their device windows, legal holds, a patient's record,
//! retention by data class. The erasure itself is
//! `hub_storage::privacy::erase`; this module is the SQL of
//! [`ErasureTx`].

use hub_domain::association::Interval;
use hub_storage::{
    DeviceWindow, Erased, ErasedCounts, ErasureError, ErasureTx, LegalHold, ManualRecord,
    PrivacyStore, PurgedByClass, RetentionCutoffs, RetentionStore, StayRecord, StoreError,
    StoredAuditEntry, SubjectKey, Tombstone, erase, new_salt,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::association::Tx;
use crate::{DbError, PURGE_CHUNK, SqliteStore};

/// Runs `f`, its error as the backend-neutral one.
fn db<T>(f: impl FnOnce() -> Result<T, DbError>) -> Result<T, StoreError> {
    Ok(f()?)
}

/// Reads the salt, creating it when missing (on the writer).
fn salt(c: &Connection) -> Result<[u8; 32], DbError> {
    if let Some(s) = read_salt(c)? {
        return Ok(s);
    }
    let fresh = new_salt()?;
    c.execute(
        "INSERT OR IGNORE INTO privacy_salt (id, salt) VALUES (1, ?1)",
        [fresh.as_slice()],
    )?;
    read_salt(c)?
        .ok_or_else(|| DbError::Store(StoreError::Corrupt("subject salt not stored".into())))
}

fn read_salt(c: &Connection) -> Result<Option<[u8; 32]>, DbError> {
    let raw: Option<Vec<u8>> = c
        .query_row("SELECT salt FROM privacy_salt WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()?;
    match raw {
        None => Ok(None),
        Some(v) => v.try_into().map(Some).map_err(|_| {
            DbError::Store(StoreError::Corrupt("subject salt is not 32 bytes".into()))
        }),
    }
}

fn hold_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LegalHold> {
    Ok(LegalHold {
        patient: r.get(0)?,
        reason: r.get(1)?,
        set_by: r.get(2)?,
        set_us: r.get(3)?,
    })
}

impl ErasureTx for Tx<'_, '_> {
    fn salt(&mut self) -> Result<[u8; 32], DbError> {
        salt(self.0)
    }

    fn patient_system(&mut self, value: &str) -> Result<Option<String>, DbError> {
        let c = self.0;
        let found: Option<String> = c
            .query_row(
                "SELECT patient_system FROM patient_stays WHERE patient_value = ?1
                  ORDER BY from_us DESC LIMIT 1",
                [value],
                |r| r.get(0),
            )
            .optional()?;
        if found.is_some() {
            return Ok(found);
        }
        let obs: Option<Option<String>> = c
            .query_row(
                "SELECT patient_system FROM observations WHERE patient_id = ?1
                  ORDER BY patient_system IS NULL LIMIT 1",
                [value],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(system) = obs {
            return Ok(Some(system.unwrap_or_default()));
        }
        // Data without readings or stays (manual inputs, scores, alerts).
        let other: Option<i64> = c
            .query_row(
                "SELECT 1 FROM manual_inputs WHERE patient_id = ?1
                 UNION ALL SELECT 1 FROM score_history WHERE patient_id = ?1
                 UNION ALL SELECT 1 FROM alerts WHERE patient_id = ?1
                 UNION ALL SELECT 1 FROM alert_rule_overrides WHERE patient_id = ?1
                 LIMIT 1",
                [value],
                |r| r.get(0),
            )
            .optional()?;
        Ok(other.map(|_| String::new()))
    }

    fn legal_hold(&mut self, value: &str) -> Result<Option<LegalHold>, DbError> {
        Ok(self
            .0
            .query_row(
                "SELECT patient_value, reason, set_by, set_us FROM legal_holds
                  WHERE patient_value = ?1",
                [value],
                hold_row,
            )
            .optional()?)
    }

    fn stays(&mut self, value: &str) -> Result<Vec<Interval>, DbError> {
        let mut st = self.0.prepare_cached(
            "SELECT id, bed_id, from_us, to_us, visit FROM patient_stays
              WHERE patient_value = ?1 ORDER BY from_us",
        )?;
        let rows = st
            .query_map([value], |r| {
                Ok(Interval {
                    id: r.get(0)?,
                    bed: r.get(1)?,
                    from: r.get(2)?,
                    to: r.get(3)?,
                    visit: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn observed(&mut self, value: &str) -> Result<Vec<hub_domain::privacy::ObservedSpan>, DbError> {
        let mut st = self.0.prepare_cached(
            "SELECT gateway_id, device_id, MIN(effective_us), MAX(effective_us)
               FROM observations WHERE patient_id = ?1
              GROUP BY gateway_id, device_id ORDER BY gateway_id, device_id",
        )?;
        let rows = st
            .query_map([value], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn delete_subject(
        &mut self,
        value: &str,
        windows: &[DeviceWindow],
    ) -> Result<ErasedCounts, DbError> {
        let c = self.0;
        let mut n = ErasedCounts {
            observations: c.execute("DELETE FROM observations WHERE patient_id = ?1", [value])?
                as u64,
            ..Default::default()
        };
        for w in windows {
            let (lo_min, hi_min) = crate::minutes::minutes_of(w.from_us, w.to_us);
            n.observations += c.execute(
                &format!(
                    "DELETE FROM observations WHERE rowid IN ({})",
                    crate::minutes::device_window("?1", "?2", "?3", "?4", "?5", "?6")
                ),
                params![
                    w.gateway_id,
                    w.device_id,
                    w.from_us,
                    w.to_us,
                    lo_min,
                    hi_min
                ],
            )? as u64;
        }
        n.chart_buckets =
            c.execute("DELETE FROM vital_rollups WHERE patient_id = ?1", [value])? as u64;
        n.scores = c.execute("DELETE FROM score_history WHERE patient_id = ?1", [value])? as u64;
        n.manual_inputs =
            c.execute("DELETE FROM manual_inputs WHERE patient_id = ?1", [value])? as u64;
        c.execute(
            "DELETE FROM alert_events WHERE alert_id IN (SELECT id FROM alerts WHERE patient_id = ?1)",
            [value],
        )?;
        n.alerts = c.execute("DELETE FROM alerts WHERE patient_id = ?1", [value])? as u64;
        n.rule_overrides = c.execute(
            "DELETE FROM alert_rule_overrides WHERE patient_id = ?1",
            [value],
        )? as u64;
        c.execute(
            "DELETE FROM alert_pending
              WHERE (alert_key LIKE 'physiological|%' OR alert_key LIKE 'score|%')
                AND instr(alert_key, '|' || ?1 || '|') > 0",
            [value],
        )?;
        c.execute(
            "UPDATE alert_devices SET patient_id = NULL WHERE patient_id = ?1",
            [value],
        )?;
        n.stays = c.execute(
            "DELETE FROM patient_stays WHERE patient_value = ?1",
            [value],
        )? as u64;
        Ok(n)
    }

    fn insert_tombstone(
        &mut self,
        subject: &SubjectKey,
        erased_us: i64,
        windows: &[DeviceWindow],
    ) -> Result<i64, DbError> {
        let c = self.0;
        c.execute(
            "INSERT INTO erasures (subject, erased_us) VALUES (?1, ?2)",
            params![subject.to_hex(), erased_us],
        )?;
        let id = c.last_insert_rowid();
        let mut st = c.prepare_cached(
            "INSERT INTO erased_windows (erasure_id, gateway_id, device_id, from_us, to_us)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for w in windows {
            st.execute(params![id, w.gateway_id, w.device_id, w.from_us, w.to_us])?;
        }
        Ok(id)
    }
}

/// When `patient` was last erased, if ever (by subject key with their
/// system or none).
pub(crate) fn erased_at(
    c: &Connection,
    patient: &hub_domain::association::PatientId,
) -> Result<Option<i64>, DbError> {
    let Some(salt) = read_salt(c)? else {
        return Ok(None);
    };
    let with = hub_domain::privacy::subject_key(&salt, &patient.system, &patient.value);
    let bare = hub_domain::privacy::subject_key(&salt, "", &patient.value);
    Ok(c.query_row(
        "SELECT MAX(erased_us) FROM erasures WHERE subject IN (?1, ?2)",
        params![with.to_hex(), bare.to_hex()],
        |r| r.get(0),
    )?)
}

/// The erased windows of device `(g, d)` overlapping `[lo, hi]` (ingest).
pub(crate) fn erased_windows(
    c: &Connection,
    gateway_id: &str,
    device_id: &str,
    lo: i64,
    hi: i64,
) -> Result<Vec<(i64, i64)>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT from_us, to_us FROM erased_windows
          WHERE gateway_id = ?1 AND device_id = ?2 AND from_us <= ?4 AND to_us > ?3",
    )?;
    let rows = st
        .query_map(params![gateway_id, device_id, lo, hi], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Erased patients for readings that carry their own identifier (ingest).
pub(crate) fn erased_subjects(
    c: &Connection,
) -> Result<Option<hub_storage::ErasedSubjects>, DbError> {
    let mut st = c.prepare_cached("SELECT subject, erased_us FROM erasures")?;
    let erased = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    if erased.is_empty() {
        return Ok(None);
    }
    let Some(salt) = read_salt(c)? else {
        return Err(DbError::Store(StoreError::Corrupt(
            "erasures without a subject salt".into(),
        )));
    };
    Ok(Some(hub_storage::ErasedSubjects {
        salt,
        erased: erased
            .into_iter()
            .filter_map(|(k, t)| SubjectKey::from_hex(&k).map(|k| (k, t)))
            .collect(),
    }))
}

/// `DELETE … WHERE rowid IN (SELECT … LIMIT chunk)` until done.
fn purge_chunked(c: &Connection, table: &str, cond: &str, cutoff: i64) -> Result<u64, DbError> {
    let mut total = 0u64;
    loop {
        let n = c.execute(
            &format!(
                "DELETE FROM {table} WHERE rowid IN
                   (SELECT rowid FROM {table} WHERE {cond} LIMIT ?2)"
            ),
            params![cutoff, PURGE_CHUNK],
        )?;
        total += n as u64;
        if (n as i64) < PURGE_CHUNK {
            return Ok(total);
        }
    }
}

const NOT_HELD: &str =
    "(patient_id IS NULL OR patient_id NOT IN (SELECT patient_value FROM legal_holds))";

impl SqliteStore {
    fn db_purge_classes(&self, k: &RetentionCutoffs) -> Result<PurgedByClass, DbError> {
        let mut p = PurgedByClass::default();
        if let Some(cut) = k.readings {
            p.observations = crate::minutes::purge_before(&*self.conn()?, cut, NOT_HELD)?;
            p.device_events = purge_chunked(&*self.conn()?, "device_events", "time_us < ?1", cut)?;
            p.rejected =
                purge_chunked(&*self.conn()?, "rejected_readings", "received_us < ?1", cut)?;
        }
        if let Some(cut) = k.aggregates {
            // A WITHOUT ROWID table: one statement (buckets are few).
            p.chart_buckets = self.conn()?.execute(
                &format!("DELETE FROM vital_rollups WHERE bucket_us < ?1 AND {NOT_HELD}"),
                [cut],
            )? as u64;
            p.scores = purge_chunked(
                &*self.conn()?,
                "score_history",
                &format!("time_us < ?1 AND {NOT_HELD}"),
                cut,
            )?;
        }
        if let Some(cut) = k.alerts {
            let mut conn = self.conn()?;
            let tx = conn.transaction()?;
            let old = format!("resolved_us IS NOT NULL AND resolved_us < ?1 AND {NOT_HELD}");
            tx.execute(
                &format!(
                    "DELETE FROM alert_events WHERE alert_id IN (SELECT id FROM alerts WHERE {old})"
                ),
                [cut],
            )?;
            p.alerts = tx.execute(&format!("DELETE FROM alerts WHERE {old}"), [cut])? as u64;
            tx.commit()?;
        }
        Ok(p)
    }
}

impl PrivacyStore for SqliteStore {
    fn subject_salt(&self) -> Result<[u8; 32], StoreError> {
        db(|| salt(&*self.conn()?))
    }

    fn tombstones_since(&self, after_id: i64) -> Result<Vec<Tombstone>, StoreError> {
        db(|| {
            let conn = self.reader()?;
            let mut st = conn.prepare_cached(
                "SELECT id, subject, erased_us FROM erasures WHERE id > ?1 ORDER BY id",
            )?;
            let heads = st
                .query_map([after_id], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut wst = conn.prepare_cached(
                "SELECT gateway_id, device_id, from_us, to_us FROM erased_windows
                  WHERE erasure_id = ?1 ORDER BY gateway_id, device_id, from_us",
            )?;
            let mut out = Vec::with_capacity(heads.len());
            for (id, subject, erased_us) in heads {
                let subject = SubjectKey::from_hex(&subject).ok_or_else(|| {
                    DbError::Store(StoreError::Corrupt(format!(
                        "tombstone {id}: bad subject key"
                    )))
                })?;
                let windows = wst
                    .query_map([id], |r| {
                        Ok(DeviceWindow {
                            gateway_id: r.get(0)?,
                            device_id: r.get(1)?,
                            from_us: r.get(2)?,
                            to_us: r.get(3)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                out.push(Tombstone {
                    id,
                    subject,
                    erased_us,
                    windows,
                });
            }
            Ok(out)
        })
    }

    fn erase_patient(&self, value: &str, now_us: i64) -> Result<Erased, ErasureError> {
        let store = |e: DbError| ErasureError::Store(e.into());
        let mut conn = self.conn().map_err(store)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| store(e.into()))?;
        let out = erase(&mut Tx(&tx), value, now_us).map_err(store)?;
        if out.is_ok() {
            tx.commit().map_err(|e| store(e.into()))?;
        }
        out
    }

    fn set_legal_hold(&self, value: &str, hold: Option<&LegalHold>) -> Result<bool, StoreError> {
        db(|| {
            let mut conn = self.conn()?;
            let tx = conn.transaction()?;
            let known = Tx(&tx).patient_system(value)?.is_some();
            match hold {
                Some(h) if known => {
                    tx.execute(
                        "INSERT INTO legal_holds (patient_value, reason, set_by, set_us)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (patient_value) DO UPDATE
                            SET reason = excluded.reason, set_by = excluded.set_by,
                                set_us = excluded.set_us",
                        params![value, h.reason, h.set_by, h.set_us],
                    )?;
                }
                Some(_) => return Ok(false),
                None => {
                    tx.execute("DELETE FROM legal_holds WHERE patient_value = ?1", [value])?;
                }
            }
            tx.commit()?;
            Ok(known)
        })
    }

    fn legal_holds(&self) -> Result<Vec<LegalHold>, StoreError> {
        db(|| {
            let conn = self.reader()?;
            let mut st = conn.prepare_cached(
                "SELECT patient_value, reason, set_by, set_us FROM legal_holds ORDER BY patient_value",
            )?;
            Ok(st.query_map([], hold_row)?.collect::<Result<_, _>>()?)
        })
    }

    fn stays_of(&self, value: &str) -> Result<Vec<StayRecord>, StoreError> {
        db(|| {
            let conn = self.reader()?;
            let mut st = conn.prepare_cached(
                "SELECT s.patient_system, s.bed_id, COALESCE(b.ward, ''), s.from_us, s.to_us, s.visit
                   FROM patient_stays s LEFT JOIN beds b ON b.id = s.bed_id
                  WHERE s.patient_value = ?1 ORDER BY s.from_us",
            )?;
            Ok(st
                .query_map([value], |r| {
                    Ok(StayRecord {
                        system: r.get(0)?,
                        bed: r.get(1)?,
                        ward: r.get(2)?,
                        from_us: r.get(3)?,
                        to_us: r.get(4)?,
                        visit: r.get(5)?,
                    })
                })?
                .collect::<Result<_, _>>()?)
        })
    }

    fn manual_inputs_of(&self, value: &str) -> Result<Vec<ManualRecord>, StoreError> {
        db(|| {
            let conn = self.reader()?;
            let mut st = conn.prepare_cached(
                "SELECT kind, value, effective_us, recorded_us FROM manual_inputs
                  WHERE patient_id = ?1 ORDER BY effective_us, recorded_us",
            )?;
            Ok(st
                .query_map([value], |r| {
                    Ok(ManualRecord {
                        kind: r.get(0)?,
                        value: r.get(1)?,
                        effective_us: r.get(2)?,
                        recorded_us: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?)
        })
    }

    fn audit_entries_of(&self, value: &str) -> Result<Vec<StoredAuditEntry>, StoreError> {
        db(|| {
            self.db_audit_entries_where(
                "patient_id = ?1 OR instr(char(10) || patients || char(10), char(10) || ?1 || char(10)) > 0",
                value,
            )
        })
    }
}

impl RetentionStore for SqliteStore {
    fn purge_classes(&self, cutoffs: &RetentionCutoffs) -> Result<PurgedByClass, StoreError> {
        Ok(self.db_purge_classes(cutoffs)?)
    }
}
