//! Patients' rights on PostgreSQL (migration 11): the subject salt,
//! erasure tombstones and their device windows, legal holds, a patient's
//! record, retention by data class. The erasure itself is
//! `hub_storage::privacy::erase`, run under the exclusive association
//! lock (ingest holds it shared: no batch is attributed to the patient
//! while the erasure runs); this module is the SQL of [`ErasureTx`].

use futures_executor::block_on;
use hub_domain::association::Interval;
use hub_storage::{
    DeviceWindow, Erased, ErasedCounts, ErasedSubjects, ErasureError, ErasureTx, LegalHold,
    ManualRecord, PrivacyStore, PurgedByClass, RetentionCutoffs, RetentionStore, StayRecord,
    StoreError, StoredAuditEntry, SubjectKey, Tombstone, erase, new_salt,
};
use tokio_postgres::Row;

use crate::association::Tx;
use crate::{ASSOC_LOCK, DbError, PgStore, RETENTION_LOCK};

fn salt_of(row: Option<Row>) -> Result<Option<[u8; 32]>, DbError> {
    match row {
        None => Ok(None),
        Some(r) => {
            let v: Vec<u8> = r.get(0);
            v.try_into().map(Some).map_err(|_| {
                DbError::Store(StoreError::Corrupt("subject salt is not 32 bytes".into()))
            })
        }
    }
}

fn hold_row(r: &Row) -> LegalHold {
    LegalHold {
        patient: r.get(0),
        reason: r.get(1),
        set_by: r.get(2),
        set_us: r.get(3),
    }
}

const SELECT_SALT: &str = "SELECT salt FROM privacy_salt WHERE id = 1";

impl ErasureTx for Tx<'_, '_> {
    fn salt(&mut self) -> Result<[u8; 32], DbError> {
        if let Some(s) = salt_of(self.query_opt(SELECT_SALT, &[])?)? {
            return Ok(s);
        }
        let fresh = new_salt()?.to_vec();
        self.execute(
            "INSERT INTO privacy_salt (id, salt) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&fresh],
        )?;
        salt_of(self.query_opt(SELECT_SALT, &[])?)?
            .ok_or_else(|| DbError::Store(StoreError::Corrupt("subject salt not stored".into())))
    }

    fn patient_system(&mut self, value: &str) -> Result<Option<String>, DbError> {
        if let Some(r) = self.query_opt(
            "SELECT patient_system FROM patient_stays WHERE patient_value = $1
              ORDER BY from_us DESC LIMIT 1",
            &[&value],
        )? {
            return Ok(Some(r.get(0)));
        }
        if let Some(r) = self.query_opt(
            "SELECT patient_system FROM observations WHERE patient_id = $1
              ORDER BY patient_system IS NULL LIMIT 1",
            &[&value],
        )? {
            let system: Option<String> = r.get(0);
            return Ok(Some(system.unwrap_or_default()));
        }
        let other = self.query_opt(
            "SELECT 1 FROM manual_inputs WHERE patient_id = $1
             UNION ALL SELECT 1 FROM score_history WHERE patient_id = $1
             UNION ALL SELECT 1 FROM alerts WHERE patient_id = $1
             UNION ALL SELECT 1 FROM alert_rule_overrides WHERE patient_id = $1
             LIMIT 1",
            &[&value],
        )?;
        Ok(other.map(|_| String::new()))
    }

    fn legal_hold(&mut self, value: &str) -> Result<Option<LegalHold>, DbError> {
        Ok(self
            .query_opt(
                "SELECT patient_value, reason, set_by, set_us FROM legal_holds
                  WHERE patient_value = $1",
                &[&value],
            )?
            .as_ref()
            .map(hold_row))
    }

    fn stays(&mut self, value: &str) -> Result<Vec<Interval>, DbError> {
        Ok(self
            .query(
                "SELECT id, bed_id, from_us, to_us, visit FROM patient_stays
                  WHERE patient_value = $1 ORDER BY from_us",
                &[&value],
            )?
            .iter()
            .map(|r| Interval {
                id: r.get(0),
                bed: r.get(1),
                from: r.get(2),
                to: r.get(3),
                visit: r.get(4),
            })
            .collect())
    }

    fn observed(&mut self, value: &str) -> Result<Vec<hub_domain::privacy::ObservedSpan>, DbError> {
        Ok(self
            .query(
                "SELECT gateway_id, device_id, MIN(effective_us), MAX(effective_us)
                   FROM observations WHERE patient_id = $1
                  GROUP BY gateway_id, device_id ORDER BY gateway_id, device_id",
                &[&value],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    fn delete_subject(
        &mut self,
        value: &str,
        windows: &[DeviceWindow],
    ) -> Result<ErasedCounts, DbError> {
        let by_patient = |table: &str, column: &str| {
            self.execute(
                &format!("DELETE FROM {table} WHERE {column} = $1"),
                &[&value],
            )
        };
        let mut n = ErasedCounts {
            observations: by_patient("observations", "patient_id")?,
            chart_buckets: by_patient("vital_rollups", "patient_id")?,
            scores: by_patient("score_history", "patient_id")?,
            manual_inputs: by_patient("manual_inputs", "patient_id")?,
            ..Default::default()
        };
        self.execute(
            "DELETE FROM alert_events WHERE alert_id IN (SELECT id FROM alerts WHERE patient_id = $1)",
            &[&value],
        )?;
        n.alerts = by_patient("alerts", "patient_id")?;
        n.rule_overrides = by_patient("alert_rule_overrides", "patient_id")?;
        self.execute(
            "DELETE FROM alert_pending
              WHERE (alert_key LIKE 'physiological|%' OR alert_key LIKE 'score|%')
                AND position('|' || $1 || '|' in alert_key) > 0",
            &[&value],
        )?;
        self.execute(
            "UPDATE alert_devices SET patient_id = NULL WHERE patient_id = $1",
            &[&value],
        )?;
        n.stays = by_patient("patient_stays", "patient_value")?;
        for w in windows {
            // The device's rows of the window, through its device minutes.
            let (lo_min, hi_min) = crate::minutes::minutes_of(w.from_us, w.to_us);
            let rids: Vec<i64> = self
                .query(
                    &crate::minutes::window_rows(
                        "o.rid",
                        ("$1", "$2"),
                        ("$3", "$4"),
                        ("$5", "$6"),
                        "TRUE",
                    ),
                    &[
                        &w.gateway_id,
                        &w.device_id,
                        &w.from_us,
                        &w.to_us,
                        &lo_min,
                        &hi_min,
                    ],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // By `rid` (its index in each partition), within the window's
            // partitions.
            n.observations += self.execute(
                "DELETE FROM observations WHERE rid = ANY($1) AND gateway_id = $2
                   AND device_id = $3 AND effective_us >= $4 AND effective_us < $5",
                &[&rids, &w.gateway_id, &w.device_id, &w.from_us, &w.to_us],
            )?;
        }
        Ok(n)
    }

    fn insert_tombstone(
        &mut self,
        subject: &SubjectKey,
        erased_us: i64,
        windows: &[DeviceWindow],
    ) -> Result<i64, DbError> {
        let id: i64 = self
            .query_one(
                "INSERT INTO erasures (subject, erased_us) VALUES ($1, $2) RETURNING id",
                &[&subject.to_hex(), &erased_us],
            )?
            .get(0);
        for w in windows {
            self.execute(
                "INSERT INTO erased_windows (erasure_id, gateway_id, device_id, from_us, to_us)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&id, &w.gateway_id, &w.device_id, &w.from_us, &w.to_us],
            )?;
        }
        Ok(id)
    }
}

/// When `patient` was last erased, if ever (by subject key with their
/// system or none).
pub(crate) fn erased_at(
    tx: &Tx<'_, '_>,
    patient: &hub_domain::association::PatientId,
) -> Result<Option<i64>, DbError> {
    let Some(salt) = salt_of(tx.query_opt(SELECT_SALT, &[])?)? else {
        return Ok(None);
    };
    let with = hub_domain::privacy::subject_key(&salt, &patient.system, &patient.value).to_hex();
    let bare = hub_domain::privacy::subject_key(&salt, "", &patient.value).to_hex();
    Ok(tx
        .query_one(
            "SELECT MAX(erased_us) FROM erasures WHERE subject IN ($1, $2)",
            &[&with, &bare],
        )?
        .get(0))
}

/// The erased windows query of ingest: the windows of each device `$2[i]`
/// of gateway `$1` overlapping `[$3[i], $4[i]]`, each row led by `i`
/// (1-based).
pub(crate) const ERASED_WINDOWS: &str = "SELECT q.i, w.from_us, w.to_us
  FROM unnest($2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS q(device_id, lo, hi, i)
  JOIN erased_windows w ON w.gateway_id = $1 AND w.device_id = q.device_id
   AND w.from_us <= q.hi AND w.to_us > q.lo";

/// Erased patients for readings that carry their own identifier (ingest).
pub(crate) async fn erased_subjects(
    c: &deadpool_postgres::Transaction<'_>,
) -> Result<Option<ErasedSubjects>, DbError> {
    let rows = c
        .query("SELECT subject, erased_us FROM erasures", &[])
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let salt = salt_of(c.query_opt(SELECT_SALT, &[]).await?)?.ok_or_else(|| {
        DbError::Store(StoreError::Corrupt(
            "erasures without a subject salt".into(),
        ))
    })?;
    Ok(Some(ErasedSubjects {
        salt,
        erased: rows
            .iter()
            .filter_map(|r| {
                SubjectKey::from_hex(r.get::<_, &str>(0)).map(|k| (k, r.get::<_, i64>(1)))
            })
            .collect(),
    }))
}

const NOT_HELD: &str =
    "(patient_id IS NULL OR patient_id NOT IN (SELECT patient_value FROM legal_holds))";

impl PgStore {
    /// One transaction under the exclusive association lock, on the
    /// calling thread.
    fn erasure_tx<T>(
        &self,
        f: impl for<'a, 'b> FnOnce(&mut Tx<'a, 'b>) -> Result<Result<T, ErasureError>, DbError>,
    ) -> Result<T, ErasureError> {
        let store = |e: DbError| ErasureError::Store(e.into());
        let _entered = self.io.handle().enter();
        let mut c = block_on(self.conn()).map_err(store)?;
        let tx = block_on(c.transaction()).map_err(|e| store(e.into()))?;
        let mut t = Tx(&tx);
        t.execute("SELECT pg_advisory_xact_lock($1)", &[&ASSOC_LOCK])
            .map_err(store)?;
        let out = f(&mut t).map_err(store)?;
        if out.is_ok() {
            block_on(tx.commit()).map_err(|e| store(e.into()))?;
        }
        out
    }

    async fn db_purge_classes(&self, k: &RetentionCutoffs) -> Result<PurgedByClass, DbError> {
        let c = self.conn().await?;
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !got {
            tracing::info!("retention: another hub is applying it");
            return Ok(PurgedByClass::default());
        }
        let purged = async {
            let mut p = PurgedByClass::default();
            let del = |table: &'static str, cond: String, cut: i64| {
                let c = &c;
                async move {
                    c.execute(&format!("DELETE FROM {table} WHERE {cond}"), &[&cut])
                        .await
                }
            };
            if let Some(cut) = k.readings {
                p.observations = del(
                    "observations",
                    format!("effective_us < $1 AND {NOT_HELD}"),
                    cut,
                )
                .await?;
                // The device minutes left without rows (on a connection
                // of its own: a transaction per gateway).
                crate::minutes::forget_empty_before(&mut self.conn().await?, cut).await?;
                p.device_events = del("device_events", "time_us < $1".into(), cut).await?;
                p.rejected = del("rejected_readings", "received_us < $1".into(), cut).await?;
            }
            if let Some(cut) = k.aggregates {
                p.chart_buckets = del(
                    "vital_rollups",
                    format!("bucket_us < $1 AND {NOT_HELD}"),
                    cut,
                )
                .await?;
                p.scores =
                    del("score_history", format!("time_us < $1 AND {NOT_HELD}"), cut).await?;
            }
            if let Some(cut) = k.alerts {
                let old = format!("resolved_us IS NOT NULL AND resolved_us < $1 AND {NOT_HELD}");
                del(
                    "alert_events",
                    format!("alert_id IN (SELECT id FROM alerts WHERE {old})"),
                    cut,
                )
                .await?;
                p.alerts = del("alerts", old, cut).await?;
            }
            Ok::<_, DbError>(p)
        }
        .await;
        let unlocked = c
            .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
            .await;
        let purged = purged?;
        unlocked?;
        Ok(purged)
    }
}

impl PrivacyStore for PgStore {
    fn subject_salt(&self) -> Result<[u8; 32], StoreError> {
        // Read without a lock; only its creation (once per database) takes
        // the erasure's transaction.
        let stored = self.run(async {
            let c = self.conn().await?;
            salt_of(c.query_opt(SELECT_SALT, &[]).await?)
        })?;
        if let Some(s) = stored {
            return Ok(s);
        }
        self.erasure_tx(|tx| tx.salt().map(Ok))
            .map_err(|e| match e {
                ErasureError::Store(e) => e,
                other => StoreError::Corrupt(other.to_string()),
            })
    }

    fn tombstones_since(&self, after_id: i64) -> Result<Vec<Tombstone>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            let heads = c
                .query(
                    "SELECT id, subject, erased_us FROM erasures WHERE id > $1 ORDER BY id",
                    &[&after_id],
                )
                .await?;
            let mut out = Vec::with_capacity(heads.len());
            for h in heads {
                let id: i64 = h.get(0);
                let subject = SubjectKey::from_hex(h.get::<_, &str>(1)).ok_or_else(|| {
                    DbError::Store(StoreError::Corrupt(format!(
                        "tombstone {id}: bad subject key"
                    )))
                })?;
                let windows = c
                    .query(
                        "SELECT gateway_id, device_id, from_us, to_us FROM erased_windows
                          WHERE erasure_id = $1 ORDER BY gateway_id, device_id, from_us",
                        &[&id],
                    )
                    .await?
                    .iter()
                    .map(|r| DeviceWindow {
                        gateway_id: r.get(0),
                        device_id: r.get(1),
                        from_us: r.get(2),
                        to_us: r.get(3),
                    })
                    .collect();
                out.push(Tombstone {
                    id,
                    subject,
                    erased_us: h.get(2),
                    windows,
                });
            }
            Ok(out)
        })
    }

    fn erase_patient(&self, value: &str, now_us: i64) -> Result<Erased, ErasureError> {
        self.erasure_tx(|tx| erase(tx, value, now_us))
    }

    fn set_legal_hold(&self, value: &str, hold: Option<&LegalHold>) -> Result<bool, StoreError> {
        let out = self.erasure_tx(|tx| {
            let known = tx.patient_system(value)?.is_some();
            match hold {
                Some(h) if known => {
                    tx.execute(
                        "INSERT INTO legal_holds (patient_value, reason, set_by, set_us)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (patient_value) DO UPDATE
                            SET reason = excluded.reason, set_by = excluded.set_by,
                                set_us = excluded.set_us",
                        &[&value, &h.reason, &h.set_by, &h.set_us],
                    )?;
                }
                Some(_) => {}
                None => {
                    tx.execute(
                        "DELETE FROM legal_holds WHERE patient_value = $1",
                        &[&value],
                    )?;
                }
            }
            Ok(Ok(known))
        });
        out.map_err(|e| match e {
            ErasureError::Store(e) => e,
            other => StoreError::Corrupt(other.to_string()),
        })
    }

    fn legal_holds(&self) -> Result<Vec<LegalHold>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            Ok(c.query(
                "SELECT patient_value, reason, set_by, set_us FROM legal_holds ORDER BY patient_value",
                &[],
            )
            .await?
            .iter()
            .map(hold_row)
            .collect())
        })
    }

    fn stays_of(&self, value: &str) -> Result<Vec<StayRecord>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            Ok(c.query(
                "SELECT s.patient_system, s.bed_id, COALESCE(b.ward, ''), s.from_us, s.to_us, s.visit
                   FROM patient_stays s LEFT JOIN beds b ON b.id = s.bed_id
                  WHERE s.patient_value = $1 ORDER BY s.from_us",
                &[&value],
            )
            .await?
            .iter()
            .map(|r| StayRecord {
                system: r.get(0),
                bed: r.get(1),
                ward: r.get(2),
                from_us: r.get(3),
                to_us: r.get(4),
                visit: r.get(5),
            })
            .collect())
        })
    }

    fn manual_inputs_of(&self, value: &str) -> Result<Vec<ManualRecord>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            Ok(c.query(
                "SELECT kind, value, effective_us, recorded_us FROM manual_inputs
                  WHERE patient_id = $1 ORDER BY effective_us, recorded_us",
                &[&value],
            )
            .await?
            .iter()
            .map(|r| ManualRecord {
                kind: r.get(0),
                value: r.get(1),
                effective_us: r.get(2),
                recorded_us: r.get(3),
            })
            .collect())
        })
    }

    fn audit_entries_of(&self, value: &str) -> Result<Vec<StoredAuditEntry>, StoreError> {
        self.run(self.db_audit_entries_where(
            "patient_id = $1 OR position(E'\\n' || $1 || E'\\n' in E'\\n' || patients || E'\\n') > 0",
            &value,
        ))
    }
}

impl RetentionStore for PgStore {
    fn purge_classes(&self, cutoffs: &RetentionCutoffs) -> Result<PurgedByClass, StoreError> {
        self.run(self.db_purge_classes(cutoffs))
    }
}
