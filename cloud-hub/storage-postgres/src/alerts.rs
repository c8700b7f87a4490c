//! Alerts, their transitions and patient rule overrides on PostgreSQL
//! (migration 4: `alerts`, `alert_events`, `alert_rule_overrides`), with
//! the SQLite store's semantics. The engine (`hub_domain::alerts`) decides;
//! this module persists and loads.

use futures_util::future::try_join_all;
use hub_domain::alerts::decode_stored;
use hub_domain::alerts::engine::{Alert, Change, Tracked};
use hub_storage::{
    AlertFilter, AlertStore, AlertsLoaded, Evaluation, StoreError, StoredOverride, TrackedChanges,
    Tracking, Transitioned,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row, Transaction};

use crate::{DbError, PgStore};

/// Advisory lock key serializing alert evaluations and writes across hubs.
pub(crate) const ALERTS_LOCK: i64 = 0x5649_4749_4c41_4c54; // "VIGILALT"
/// The NOTIFY channel of committed alert changes (the payload is empty: a
/// listener reads the transitions after the last it saw).
pub(crate) const ALERTS_CHANNEL: &str = "vigil_alerts";

pub(crate) const ALERT_COLUMNS: &str =
    "id, kind, code, priority, state, message, patient_id, gateway_id,
    device_id, value, unit, condition_since_us, raised_us, acknowledged_us, acknowledged_by,
    escalated_us, resolved_us";

pub(crate) fn alert_row(r: &Row) -> Alert {
    let (kind, priority, state) = decode_stored(r.get(1), r.get(3), r.get(4));
    Alert {
        id: r.get(0),
        kind,
        code: r.get(2),
        priority,
        state,
        message: r.get(5),
        patient: r.get(6),
        gateway_id: r.get(7),
        device_id: r.get(8),
        value: r.get(9),
        unit: r.get(10),
        condition_since_us: r.get(11),
        raised_us: r.get(12),
        acknowledged_us: r.get(13),
        acknowledged_by: r.get(14),
        escalated_us: r.get(15),
        resolved_us: r.get(16),
    }
}

impl PgStore {
    /// The open alerts, the next id and the overrides, from one snapshot.
    async fn db_load_alerts(&self) -> Result<AlertsLoaded, DbError> {
        let mut c = self.conn().await?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let open_sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE state <> 'resolved'");
        let (open, next, overrides) = futures_util::try_join!(
            tx.query(open_sql.as_str(), &[]),
            tx.query_one("SELECT COALESCE(MAX(id), 0) + 1 FROM alerts", &[]),
            tx.query(OVERRIDES_SQL, &[]),
        )?;
        tx.commit().await?;
        Ok(AlertsLoaded {
            open: open.iter().map(alert_row).collect(),
            next_id: next.get(0),
            overrides: overrides.iter().map(override_row).collect(),
        })
    }

    /// Each change's alert inserted or replaced by id, and its transition,
    /// in one transaction. The upserts are pipelined (an alert changed twice
    /// in one commit is written once, in its last state); the transitions
    /// follow in one statement whose ids keep the changes' order.
    async fn db_commit_alerts(&self, changes: &[Change], now_us: i64) -> Result<(), DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ALERTS_LOCK])
            .await?;
        write_changes(&tx, changes, now_us).await?;
        tx.execute("SELECT pg_notify($1, '')", &[&ALERTS_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One evaluation at a time across every hub on the database (a
    /// transaction advisory lock): the open alerts, the next id and the
    /// tracked state read under the lock, the changes and what changed in
    /// the tracked state written and announced (NOTIFY, delivered at
    /// commit) in the same transaction.
    async fn db_evaluate_alerts(
        &self,
        now_us: i64,
        tracking: Tracking<'_>,
        evaluate: &mut dyn FnMut(Evaluation) -> (Vec<Change>, Tracked),
    ) -> Result<Vec<Change>, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ALERTS_LOCK])
            .await?;
        let open_sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE state <> 'resolved'");
        let (open, next, tracked, overrides) = futures_util::try_join!(
            tx.query(open_sql.as_str(), &[]),
            tx.query_one("SELECT COALESCE(MAX(id), 0) + 1 FROM alerts", &[]),
            load_tracked(&tx, tracking),
            async {
                if tracking == Tracking::Nothing {
                    return Ok(None);
                }
                tx.query(OVERRIDES_SQL, &[]).await.map(Some)
            },
        )?;
        let (changes, after) = evaluate(Evaluation {
            open: open.iter().map(alert_row).collect(),
            next_id: next.get(0),
            tracked: tracked.clone(),
            overrides: overrides.map(|rows| rows.iter().map(override_row).collect()),
        });
        if let Some(before) = &tracked {
            write_tracked(&tx, &TrackedChanges::between(before, &after)).await?;
        }
        if !changes.is_empty() {
            write_changes(&tx, &changes, now_us).await?;
            tx.execute("SELECT pg_notify($1, '')", &[&ALERTS_CHANNEL])
                .await?;
        }
        tx.commit().await?;
        Ok(changes)
    }

    async fn db_list_alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>, DbError> {
        let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE true");
        let limit = i64::from(f.limit);
        let mut args: Vec<&(dyn ToSql + Sync)> = vec![&limit];
        if f.open {
            sql.push_str(" AND state <> 'resolved'");
        }
        if let Some(p) = &f.patient {
            args.push(p);
            sql.push_str(" AND patient_id = $2");
        }
        sql.push_str(" ORDER BY id DESC LIMIT $1");
        let c = self.conn().await?;
        Ok(c.query(&sql, &args).await?.iter().map(alert_row).collect())
    }

    async fn db_alert(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, DbError> {
        let c = self.conn().await?;
        let alert_sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1");
        let (alert, events) = futures_util::try_join!(
            async { c.query_opt(alert_sql.as_str(), &[&id]).await },
            async {
                c.query(
                    "SELECT time_us, transition, actor FROM alert_events WHERE alert_id = $1
                      ORDER BY id",
                    &[&id],
                )
                .await
            },
        )?;
        Ok(alert.map(|a| {
            (
                alert_row(&a),
                events
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect(),
            )
        }))
    }

    async fn db_set_alert_overrides(
        &self,
        patient: &str,
        overrides: &[(String, String)],
        actor: &str,
        now_us: i64,
    ) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "DELETE FROM alert_rule_overrides WHERE patient_id = $1",
            &[&patient],
        )
        .await?;
        if !overrides.is_empty() {
            let rules: Vec<&str> = overrides.iter().map(|(r, _)| r.as_str()).collect();
            let bodies: Vec<&str> = overrides.iter().map(|(_, b)| b.as_str()).collect();
            tx.execute(
                "INSERT INTO alert_rule_overrides (patient_id, rule_id, body, updated_us, updated_by)
                 SELECT $1, r, b, $4, $5 FROM unnest($2::text[], $3::text[]) AS o (r, b)",
                &[&patient, &rules, &bodies, &now_us, &actor],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

const OVERRIDES_SQL: &str = "SELECT patient_id, rule_id, body FROM alert_rule_overrides
    ORDER BY patient_id, rule_id";

fn override_row(r: &Row) -> StoredOverride {
    StoredOverride {
        patient: r.get(0),
        rule_id: r.get(1),
        body: r.get(2),
    }
}

/// The tracked state `tracking` names (`None` for nothing).
async fn load_tracked(
    tx: &Transaction<'_>,
    tracking: Tracking<'_>,
) -> Result<Option<Tracked>, tokio_postgres::Error> {
    let gateway = match tracking {
        Tracking::Nothing => return Ok(None),
        Tracking::Gateway(g) => Some(g),
        Tracking::Everything => None,
    };
    let (pending, devices, gateways) = futures_util::try_join!(
        tx.query("SELECT alert_key, since_us FROM alert_pending", &[]),
        async {
            tx.query(
                "SELECT gateway_id, device_id, last_us, patient_id FROM alert_devices
                  WHERE $1::text IS NULL OR gateway_id = $1",
                &[&gateway],
            )
            .await
        },
        async {
            tx.query(
                "SELECT gateway_id, last_us FROM alert_gateways
                  WHERE $1::text IS NULL OR gateway_id = $1",
                &[&gateway],
            )
            .await
        },
    )?;
    Ok(Some(Tracked {
        pending: pending.iter().map(|r| (r.get(0), r.get(1))).collect(),
        devices: devices
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect(),
        gateways: gateways.iter().map(|r| (r.get(0), r.get(1))).collect(),
    }))
}

/// Writes what an evaluation changed in the tracked state (one statement
/// per kind of row that changed, pipelined).
async fn write_tracked(tx: &Transaction<'_>, t: &TrackedChanges) -> Result<(), DbError> {
    let keys: Vec<&str> = t.pending.iter().map(|(k, _)| k.as_str()).collect();
    let since: Vec<i64> = t.pending.iter().map(|(_, v)| *v).collect();
    let dev_g: Vec<&str> = t.devices.iter().map(|d| d.0.as_str()).collect();
    let dev_d: Vec<&str> = t.devices.iter().map(|d| d.1.as_str()).collect();
    let dev_t: Vec<i64> = t.devices.iter().map(|d| d.2).collect();
    let dev_p: Vec<Option<&str>> = t.devices.iter().map(|d| d.3.as_deref()).collect();
    let gw: Vec<&str> = t.gateways.iter().map(|(g, _)| g.as_str()).collect();
    let gw_t: Vec<i64> = t.gateways.iter().map(|(_, v)| *v).collect();
    let gone = async {
        if t.pending_gone.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "DELETE FROM alert_pending WHERE alert_key = ANY($1)",
            &[&t.pending_gone],
        )
        .await
    };
    let pending = async {
        if keys.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO alert_pending (alert_key, since_us)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (alert_key) DO UPDATE SET since_us = excluded.since_us",
            &[&keys, &since],
        )
        .await
    };
    let devices = async {
        if dev_g.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO alert_devices (gateway_id, device_id, last_us, patient_id)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
             ON CONFLICT (gateway_id, device_id) DO UPDATE
                 SET last_us = excluded.last_us, patient_id = excluded.patient_id",
            &[&dev_g, &dev_d, &dev_t, &dev_p],
        )
        .await
    };
    let gateways = async {
        if gw.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO alert_gateways (gateway_id, last_us)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (gateway_id) DO UPDATE SET last_us = excluded.last_us",
            &[&gw, &gw_t],
        )
        .await
    };
    futures_util::try_join!(gone, pending, devices, gateways)?;
    Ok(())
}

/// Each change's alert inserted or replaced by id, and its transition. The
/// upserts are pipelined (an alert changed twice in one commit is written
/// once, in its last state); the transitions follow in one statement whose
/// ids keep the changes' order.
async fn write_changes(
    tx: &Transaction<'_>,
    changes: &[Change],
    now_us: i64,
) -> Result<(), DbError> {
    let upsert = tx
        .prepare(&format!(
            "INSERT INTO alerts ({ALERT_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, code = excluded.code,
                 priority = excluded.priority, state = excluded.state,
                 message = excluded.message, patient_id = excluded.patient_id,
                 gateway_id = excluded.gateway_id, device_id = excluded.device_id,
                 value = excluded.value, unit = excluded.unit,
                 condition_since_us = excluded.condition_since_us,
                 raised_us = excluded.raised_us, acknowledged_us = excluded.acknowledged_us,
                 acknowledged_by = excluded.acknowledged_by,
                 escalated_us = excluded.escalated_us, resolved_us = excluded.resolved_us"
        ))
        .await?;
    let last: Vec<&Alert> = changes
        .iter()
        .enumerate()
        .filter(|(i, ch)| !changes[i + 1..].iter().any(|l| l.alert.id == ch.alert.id))
        .map(|(_, ch)| &ch.alert)
        .collect();
    let (t, upsert) = (tx, &upsert);
    try_join_all(last.into_iter().map(|a| async move {
        let (kind, priority, state) = (a.kind.as_str(), a.priority.as_str(), a.state.as_str());
        t.execute(
            upsert,
            &[
                &a.id,
                &kind,
                &a.code,
                &priority,
                &state,
                &a.message,
                &a.patient,
                &a.gateway_id,
                &a.device_id,
                &a.value,
                &a.unit,
                &a.condition_since_us,
                &a.raised_us,
                &a.acknowledged_us,
                &a.acknowledged_by,
                &a.escalated_us,
                &a.resolved_us,
            ],
        )
        .await
    }))
    .await?;
    let ids: Vec<i64> = changes.iter().map(|ch| ch.alert.id).collect();
    let transitions: Vec<&str> = changes.iter().map(|ch| ch.transition.as_str()).collect();
    let actors: Vec<Option<&str>> = changes.iter().map(|ch| ch.actor.as_deref()).collect();
    tx.execute(
        "INSERT INTO alert_events (alert_id, time_us, transition, actor)
         SELECT a, $4, t, w FROM unnest($1::bigint[], $2::text[], $3::text[])
             WITH ORDINALITY AS e (a, t, w, n)
          ORDER BY n",
        &[&ids, &transitions, &actors, &now_us],
    )
    .await?;
    Ok(())
}

impl AlertStore for PgStore {
    fn load_alerts(&self) -> Result<AlertsLoaded, StoreError> {
        self.run(self.db_load_alerts())
    }
    fn commit_alerts(&self, changes: &[Change], now_us: i64) -> Result<(), StoreError> {
        self.run(self.db_commit_alerts(changes, now_us))
    }
    fn evaluate_alerts(
        &self,
        now_us: i64,
        tracking: Tracking<'_>,
        evaluate: &mut dyn FnMut(Evaluation) -> (Vec<Change>, Tracked),
    ) -> Result<Vec<Change>, StoreError> {
        self.run(self.db_evaluate_alerts(now_us, tracking, evaluate))
    }
    fn alert_changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.alert_feed()
    }
    fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        self.run(self.db_list_alerts(filter))
    }
    fn alert(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, StoreError> {
        self.run(self.db_alert(id))
    }
    fn set_alert_overrides(
        &self,
        patient: &str,
        overrides: &[(String, String)],
        actor: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.run(self.db_set_alert_overrides(patient, overrides, actor, now_us))
    }
}
