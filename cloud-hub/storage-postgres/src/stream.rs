//! `StreamStore` on PostgreSQL (migration 6): partition offsets written in
//! the ingest transaction, partition leases and replica heartbeats. A lease
//! changes hands only through one conditional `INSERT … ON CONFLICT … DO
//! UPDATE … WHERE`, which PostgreSQL evaluates on the locked row: of two
//! replicas claiming at once, the second sees the first's lease.

use hub_domain::stream::lease::Lease;
use hub_storage::{Associations, IngestReport, StoreError, StreamPosition, StreamStore};
use shared_protocol::v1::Batch;
use tokio_postgres::Transaction;

use crate::{DbError, PgStore};

const WRITE_OFFSET: &str = "INSERT INTO stream_offsets (source, partition_id, next_offset)
     VALUES ($1, $2, $3)
     ON CONFLICT (source, partition_id)
     DO UPDATE SET next_offset = GREATEST(stream_offsets.next_offset, excluded.next_offset)";

/// Moves a partition's offset forward (never backwards), inside `tx`.
pub(crate) async fn write_offset(tx: &Transaction<'_>, p: &StreamPosition) -> Result<(), DbError> {
    tx.execute(WRITE_OFFSET, &[&p.source, &p.partition, &p.next_offset])
        .await?;
    Ok(())
}

impl PgStore {
    async fn db_commit_offset(&self, p: &StreamPosition) -> Result<(), DbError> {
        let c = self.conn().await?;
        c.execute(WRITE_OFFSET, &[&p.source, &p.partition, &p.next_offset])
            .await?;
        Ok(())
    }

    async fn db_committed_offsets(&self, source: &str) -> Result<Vec<(i32, i64)>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT partition_id, next_offset FROM stream_offsets WHERE source = $1
                 ORDER BY partition_id",
                &[&source],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn db_replica_heartbeat(
        &self,
        source: &str,
        replica: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), DbError> {
        let c = self.conn().await?;
        c.execute(
            "INSERT INTO stream_replicas (source, replica, expires_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (source, replica) DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
            &[&source, &replica, &expires_at_ms],
        )
        .await?;
        c.execute(
            "DELETE FROM stream_replicas WHERE source = $1 AND expires_at_ms <= $2",
            &[&source, &now_ms],
        )
        .await?;
        Ok(())
    }

    async fn db_live_replicas(&self, source: &str, now_ms: i64) -> Result<Vec<String>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT replica FROM stream_replicas WHERE source = $1 AND expires_at_ms > $2
                 ORDER BY replica",
                &[&source, &now_ms],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn db_leases(&self, source: &str) -> Result<Vec<Lease>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT partition_id, owner, expires_at_ms FROM stream_leases WHERE source = $1
                 ORDER BY partition_id",
                &[&source],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                partition: r.get(0),
                owner: r.get(1),
                expires_at_ms: r.get(2),
            })
            .collect())
    }

    async fn db_claim_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, DbError> {
        let c = self.conn().await?;
        let n = c
            .execute(
                "INSERT INTO stream_leases (source, partition_id, owner, expires_at_ms)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source, partition_id) DO UPDATE
                    SET owner = excluded.owner, expires_at_ms = excluded.expires_at_ms
                  WHERE stream_leases.owner = excluded.owner OR stream_leases.expires_at_ms <= $5",
                &[&source, &partition, &owner, &expires_at_ms, &now_ms],
            )
            .await?;
        Ok(n == 1)
    }

    async fn db_release_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
    ) -> Result<(), DbError> {
        let c = self.conn().await?;
        c.execute(
            "DELETE FROM stream_leases WHERE source = $1 AND partition_id = $2 AND owner = $3",
            &[&source, &partition, &owner],
        )
        .await?;
        Ok(())
    }
}

impl StreamStore for PgStore {
    fn ingest_at(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
        position: &StreamPosition,
    ) -> Result<IngestReport, StoreError> {
        self.run(self.db_ingest(
            gateway_id,
            batch,
            associations,
            received_us,
            now_us,
            Some(position),
        ))
    }
    fn commit_offset(&self, position: &StreamPosition) -> Result<(), StoreError> {
        self.run(self.db_commit_offset(position))
    }
    fn committed_offsets(&self, source: &str) -> Result<Vec<(i32, i64)>, StoreError> {
        self.run(self.db_committed_offsets(source))
    }
    fn replica_heartbeat(
        &self,
        source: &str,
        replica: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(self.db_replica_heartbeat(source, replica, now_ms, expires_at_ms))
    }
    fn live_replicas(&self, source: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.run(self.db_live_replicas(source, now_ms))
    }
    fn leases(&self, source: &str) -> Result<Vec<Lease>, StoreError> {
        self.run(self.db_leases(source))
    }
    fn claim_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError> {
        self.run(self.db_claim_lease(source, partition, owner, now_ms, expires_at_ms))
    }
    fn release_lease(&self, source: &str, partition: i32, owner: &str) -> Result<(), StoreError> {
        self.run(self.db_release_lease(source, partition, owner))
    }
}
