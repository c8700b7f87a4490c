//! `StreamStore` on SQLite (schema v16): partition offsets written in the
//! ingest transaction, partition leases and replica heartbeats, each lease
//! change one conditional upsert. SQLite has one writer, so the upsert's
//! condition is evaluated under the write lock.

use hub_domain::stream::lease::Lease;
use hub_storage::{Associations, IngestReport, StoreError, StreamPosition, StreamStore};
use rusqlite::{Transaction, params};
use shared_protocol::v1::Batch;

use crate::{DbError, SqliteStore};

/// Moves a partition's offset forward (never backwards), inside `tx`.
pub(crate) fn write_offset(tx: &Transaction<'_>, p: &StreamPosition) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO stream_offsets (source, partition_id, next_offset) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, partition_id)
         DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
    )?
    .execute(params![p.source, p.partition, p.next_offset])?;
    Ok(())
}

impl SqliteStore {
    fn db_commit_offset(&self, p: &StreamPosition) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        write_offset(&tx, p)?;
        tx.commit()?;
        Ok(())
    }

    fn db_committed_offsets(&self, source: &str) -> Result<Vec<(i32, i64)>, DbError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT partition_id, next_offset FROM stream_offsets WHERE source = ?1
             ORDER BY partition_id",
        )?;
        let rows = st
            .query_map([source], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn db_replica_heartbeat(
        &self,
        source: &str,
        replica: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO stream_replicas (source, replica, expires_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (source, replica) DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
        )?
        .execute(params![source, replica, expires_at_ms])?;
        tx.prepare_cached("DELETE FROM stream_replicas WHERE source = ?1 AND expires_at_ms <= ?2")?
            .execute(params![source, now_ms])?;
        tx.commit()?;
        Ok(())
    }

    fn db_live_replicas(&self, source: &str, now_ms: i64) -> Result<Vec<String>, DbError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT replica FROM stream_replicas WHERE source = ?1 AND expires_at_ms > ?2
             ORDER BY replica",
        )?;
        let rows = st
            .query_map(params![source, now_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn db_leases(&self, source: &str) -> Result<Vec<Lease>, DbError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT partition_id, owner, expires_at_ms FROM stream_leases WHERE source = ?1
             ORDER BY partition_id",
        )?;
        let rows = st
            .query_map([source], |r| {
                Ok(Lease {
                    partition: r.get(0)?,
                    owner: r.get(1)?,
                    expires_at_ms: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn db_claim_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, DbError> {
        let conn = self.conn()?;
        // One statement: taken when free, expired or already ours.
        let n = conn
            .prepare_cached(
                "INSERT INTO stream_leases (source, partition_id, owner, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, partition_id) DO UPDATE
                    SET owner = excluded.owner, expires_at_ms = excluded.expires_at_ms
                  WHERE stream_leases.owner = excluded.owner OR stream_leases.expires_at_ms <= ?5",
            )?
            .execute(params![source, partition, owner, expires_at_ms, now_ms])?;
        Ok(n == 1)
    }

    fn db_release_lease(&self, source: &str, partition: i32, owner: &str) -> Result<(), DbError> {
        let conn = self.conn()?;
        conn.prepare_cached(
            "DELETE FROM stream_leases WHERE source = ?1 AND partition_id = ?2 AND owner = ?3",
        )?
        .execute(params![source, partition, owner])?;
        Ok(())
    }
}

impl StreamStore for SqliteStore {
    fn ingest_at(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
        position: &StreamPosition,
    ) -> Result<IngestReport, StoreError> {
        Ok(self.db_ingest(
            gateway_id,
            batch,
            associations,
            received_us,
            now_us,
            Some(position),
        )?)
    }
    fn commit_offset(&self, position: &StreamPosition) -> Result<(), StoreError> {
        Ok(self.db_commit_offset(position)?)
    }
    fn committed_offsets(&self, source: &str) -> Result<Vec<(i32, i64)>, StoreError> {
        Ok(self.db_committed_offsets(source)?)
    }
    fn replica_heartbeat(
        &self,
        source: &str,
        replica: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        Ok(self.db_replica_heartbeat(source, replica, now_ms, expires_at_ms)?)
    }
    fn live_replicas(&self, source: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(self.db_live_replicas(source, now_ms)?)
    }
    fn leases(&self, source: &str) -> Result<Vec<Lease>, StoreError> {
        Ok(self.db_leases(source)?)
    }
    fn claim_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.db_claim_lease(source, partition, owner, now_ms, expires_at_ms)?)
    }
    fn release_lease(&self, source: &str, partition: i32, owner: &str) -> Result<(), StoreError> {
        Ok(self.db_release_lease(source, partition, owner)?)
    }
}
