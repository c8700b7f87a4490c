//! Alerts, their transitions (`alerts`, `alert_events`) and patient rule
//! overrides (`alert_rule_overrides`) in SQLite (schema v9).

use hub_domain::alerts::decode_stored;
use hub_domain::alerts::engine::{Alert, Change, Tracked};
use hub_storage::{
    AlertFilter, AlertStore, AlertsLoaded, Evaluation, StoreError, StoredOverride, TrackedChanges,
    Tracking, Transitioned,
};
use rusqlite::{OptionalExtension, params};

use crate::{DbError, SqliteStore};

const ALERT_COLUMNS: &str = "id, kind, code, priority, state, message, patient_id, gateway_id,
    device_id, value, unit, condition_since_us, raised_us, acknowledged_us, acknowledged_by,
    escalated_us, resolved_us";

fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let (kind, priority, state) = decode_stored(&text(1)?, &text(3)?, &text(4)?);
    Ok(Alert {
        id: r.get(0)?,
        kind,
        code: text(2)?,
        priority,
        state,
        message: text(5)?,
        patient: r.get(6)?,
        gateway_id: r.get(7)?,
        device_id: r.get(8)?,
        value: r.get(9)?,
        unit: r.get(10)?,
        condition_since_us: r.get(11)?,
        raised_us: r.get(12)?,
        acknowledged_us: r.get(13)?,
        acknowledged_by: r.get(14)?,
        escalated_us: r.get(15)?,
        resolved_us: r.get(16)?,
    })
}

impl SqliteStore {
    fn db_load_alerts(&self) -> Result<AlertsLoaded, DbError> {
        let conn = self.conn()?;
        let open = conn
            .prepare(&format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE state <> 'resolved'"
            ))?
            .query_map([], alert_row)?
            .collect::<Result<_, _>>()?;
        let next_id = conn.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM alerts", [], |r| {
            r.get(0)
        })?;
        let overrides = load_overrides(&conn)?;
        Ok(AlertsLoaded {
            open,
            next_id,
            overrides,
        })
    }

    fn db_commit_alerts(&self, changes: &[Change], now_us: i64) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        write_changes(&tx, changes, now_us)?;
        tx.commit()?;
        drop(conn);
        self.announce(changes);
        Ok(())
    }

    /// The single writer serializes evaluations: the open alerts, the
    /// next id and the tracked state are read, the changes and the tracked
    /// state written, in one transaction.
    fn db_evaluate_alerts(
        &self,
        now_us: i64,
        tracking: Tracking<'_>,
        evaluate: &mut dyn FnMut(Evaluation) -> (Vec<Change>, Tracked),
    ) -> Result<Vec<Change>, DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let open = tx
            .prepare_cached(&format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE state <> 'resolved'"
            ))?
            .query_map([], alert_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let next_id: i64 =
            tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM alerts", [], |r| {
                r.get(0)
            })?;
        let tracked = load_tracked(&tx, tracking)?;
        let overrides = match tracking {
            Tracking::Nothing => None,
            _ => Some(load_overrides(&tx)?),
        };
        let (changes, after) = evaluate(Evaluation {
            open,
            next_id,
            tracked: tracked.clone(),
            overrides,
        });
        let written = match &tracked {
            Some(before) => write_tracked(&tx, &TrackedChanges::between(before, &after))?,
            None => false,
        };
        if changes.is_empty() && !written {
            return Ok(changes);
        }
        write_changes(&tx, &changes, now_us)?;
        tx.commit()?;
        drop(conn);
        self.announce(&changes);
        Ok(changes)
    }

    fn announce(&self, changes: &[Change]) {
        for c in changes {
            // No receiver is not an error.
            let _ = self.alert_feed.send(c.clone());
        }
    }

    fn db_list_alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>, DbError> {
        let conn = self.reader()?;
        let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1");
        if f.open {
            sql.push_str(" AND state <> 'resolved'");
        }
        if f.patient.is_some() {
            sql.push_str(" AND patient_id = ?2");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?1");
        let mut stmt = conn.prepare(&sql)?;
        let limit = i64::from(f.limit);
        let rows = match &f.patient {
            Some(p) => stmt
                .query_map(params![limit, p], alert_row)?
                .collect::<Result<Vec<_>, _>>()?,
            None => stmt
                .query_map([limit], alert_row)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    fn db_alert(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, DbError> {
        let conn = self.reader()?;
        let Some(a) = conn
            .query_row(
                &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"),
                [id],
                alert_row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let events = conn
            .prepare(
                "SELECT time_us, transition, actor FROM alert_events WHERE alert_id = ?1 ORDER BY id",
            )?
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(Some((a, events)))
    }

    fn db_set_alert_overrides(
        &self,
        patient: &str,
        overrides: &[(String, String)],
        actor: &str,
        now_us: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM alert_rule_overrides WHERE patient_id = ?1",
            [patient],
        )?;
        for (rule_id, body) in overrides {
            tx.execute(
                "INSERT INTO alert_rule_overrides (patient_id, rule_id, body, updated_us, updated_by)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![patient, rule_id, body, now_us, actor],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Every patient's rule overrides, by patient then rule id.
fn load_overrides(conn: &rusqlite::Connection) -> Result<Vec<StoredOverride>, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT patient_id, rule_id, body FROM alert_rule_overrides
             ORDER BY patient_id, rule_id",
        )?
        .query_map([], |r| {
            Ok(StoredOverride {
                patient: r.get(0)?,
                rule_id: r.get(1)?,
                body: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// The tracked state `tracking` names (`None` for nothing).
fn load_tracked(
    tx: &rusqlite::Transaction<'_>,
    tracking: Tracking<'_>,
) -> Result<Option<Tracked>, DbError> {
    let gateway = match tracking {
        Tracking::Nothing => return Ok(None),
        Tracking::Gateway(g) => Some(g),
        Tracking::Everything => None,
    };
    let pending = tx
        .prepare_cached("SELECT alert_key, since_us FROM alert_pending")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let devices = tx
        .prepare_cached(
            "SELECT gateway_id, device_id, last_us, patient_id FROM alert_devices
              WHERE ?1 IS NULL OR gateway_id = ?1",
        )?
        .query_map([gateway], |r| {
            Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?)))
        })?
        .collect::<Result<_, _>>()?;
    let gateways = tx
        .prepare_cached(
            "SELECT gateway_id, last_us FROM alert_gateways WHERE ?1 IS NULL OR gateway_id = ?1",
        )?
        .query_map([gateway], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(Some(Tracked {
        pending,
        devices,
        gateways,
    }))
}

/// Writes what an evaluation changed in the tracked state; whether there
/// was anything.
fn write_tracked(tx: &rusqlite::Transaction<'_>, t: &TrackedChanges) -> Result<bool, DbError> {
    for k in &t.pending_gone {
        tx.prepare_cached("DELETE FROM alert_pending WHERE alert_key = ?1")?
            .execute([k])?;
    }
    for (k, v) in &t.pending {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO alert_pending (alert_key, since_us) VALUES (?1, ?2)",
        )?
        .execute(params![k, v])?;
    }
    for (g, d, last, p) in &t.devices {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO alert_devices (gateway_id, device_id, last_us, patient_id)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![g, d, last, p])?;
    }
    for (g, last) in &t.gateways {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO alert_gateways (gateway_id, last_us) VALUES (?1, ?2)",
        )?
        .execute(params![g, last])?;
    }
    Ok(!t.is_empty())
}

fn write_changes(
    tx: &rusqlite::Transaction<'_>,
    changes: &[Change],
    now_us: i64,
) -> Result<(), DbError> {
    for c in changes {
        let a = &c.alert;
        tx.prepare_cached(&format!(
            "INSERT OR REPLACE INTO alerts ({ALERT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ))?
        .execute(params![
            a.id,
            a.kind.as_str(),
            a.code,
            a.priority.as_str(),
            a.state.as_str(),
            a.message,
            a.patient,
            a.gateway_id,
            a.device_id,
            a.value,
            a.unit,
            a.condition_since_us,
            a.raised_us,
            a.acknowledged_us,
            a.acknowledged_by,
            a.escalated_us,
            a.resolved_us
        ])?;
        tx.prepare_cached(
            "INSERT INTO alert_events (alert_id, time_us, transition, actor) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![a.id, now_us, c.transition.as_str(), c.actor])?;
    }
    Ok(())
}

impl AlertStore for SqliteStore {
    fn load_alerts(&self) -> Result<AlertsLoaded, StoreError> {
        Ok(self.db_load_alerts()?)
    }
    fn commit_alerts(&self, changes: &[Change], now_us: i64) -> Result<(), StoreError> {
        Ok(self.db_commit_alerts(changes, now_us)?)
    }
    fn evaluate_alerts(
        &self,
        now_us: i64,
        tracking: Tracking<'_>,
        evaluate: &mut dyn FnMut(Evaluation) -> (Vec<Change>, Tracked),
    ) -> Result<Vec<Change>, StoreError> {
        Ok(self.db_evaluate_alerts(now_us, tracking, evaluate)?)
    }
    fn alert_changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.alert_feed.subscribe()
    }
    fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        Ok(self.db_list_alerts(filter)?)
    }
    fn alert(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, StoreError> {
        Ok(self.db_alert(id)?)
    }
    fn set_alert_overrides(
        &self,
        patient: &str,
        overrides: &[(String, String)],
        actor: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        Ok(self.db_set_alert_overrides(patient, overrides, actor, now_us)?)
    }
}
