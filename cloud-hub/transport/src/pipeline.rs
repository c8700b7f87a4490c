//! The ingest pipeline shared by the HTTP and the MQTT ingest: a decoded
//! batch of an authenticated gateway is stored (one transaction, acked
//! when durable), counted and logged, then handed to the after-ingest
//! consumers (`after_ingest`).

use std::sync::Arc;

use hub_domain::identifiers::IdentifierSystems;
use shared_protocol::v1::Batch;

use crate::SharedMetrics;
use crate::TransportError;
use crate::after_ingest::AfterIngest;
use crate::metrics::Outcome;
use crate::store::{Associations, ReadFuture, Store, StoreError, StreamPosition, now_us};

/// What ingest needs, whichever transport the batch came by.
#[derive(Debug, Clone)]
pub struct Pipeline {
    store: Store,
    associations: Arc<Associations>,
    metrics: SharedMetrics,
    after_ingest: AfterIngest,
    /// `server.max_body_bytes`: the largest decoded batch.
    max_body_bytes: usize,
    /// `[identifiers]`: each reading's `subject.system` is stored as its URI.
    identifiers: Arc<IdentifierSystems>,
}

/// Runs blocking storage work off the async threads; a panicked task is an error.
pub(crate) async fn blocking<T: Send + 'static, E: Into<TransportError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, TransportError> {
    tokio::task::spawn_blocking(f).await?.map_err(Into::into)
}

/// Runs a point read of the hot API paths: on this async worker when the
/// store's reads are local and short (`Storage::reads_are_local`: SQLite),
/// saving the round trip through the blocking pool; else as [`blocking`].
pub(crate) async fn read<T: Send + 'static, E: Into<TransportError> + Send + 'static>(
    store: &Store,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, TransportError> {
    if store.reads_are_local() {
        f().map_err(Into::into)
    } else {
        blocking(f).await
    }
}

/// A point read: the store's own [`ReadFuture`] awaited on this worker
/// when it has one (a networked store: no thread waits on the network),
/// else `f` as [`read`] runs it.
pub(crate) async fn read_future<T: Send + 'static>(
    store: &Store,
    future: Option<ReadFuture<'_, T>>,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, TransportError> {
    match future {
        Some(future) => future.await.map_err(Into::into),
        None => read(store, f).await,
    }
}

impl Pipeline {
    pub fn new(
        store: Store,
        associations: Arc<Associations>,
        metrics: SharedMetrics,
        after_ingest: AfterIngest,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            store,
            associations,
            metrics,
            after_ingest,
            max_body_bytes,
            identifiers: Arc::default(),
        }
    }

    /// Maps readings' identifier systems by `identifiers` (default: the
    /// `[identifiers]` defaults).
    pub fn with_identifiers(mut self, identifiers: Arc<IdentifierSystems>) -> Self {
        self.identifiers = identifiers;
        self
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &SharedMetrics {
        &self.metrics
    }

    pub fn associations(&self) -> &Arc<Associations> {
        &self.associations
    }

    /// Stores a decoded batch of an authenticated gateway in one transaction,
    /// counts and logs the outcome; shared by the HTTP and the MQTT ingest.
    /// Runs in an `ingest_batch` trace span, a child of the agent's send span
    /// when the batch carries its `traceparent` (see `vigil_io::telemetry`).
    pub async fn store_batch(
        &self,
        gateway_id: &str,
        batch: Batch,
    ) -> Result<shared_protocol::v1::BatchAck, TransportError> {
        self.store_batch_at(gateway_id, batch, None).await
    }

    /// [`Self::store_batch`], with a stream partition's next offset written
    /// in the same transaction when `position` is given (Kafka ingest).
    pub async fn store_batch_at(
        &self,
        gateway_id: &str,
        batch: Batch,
        position: Option<StreamPosition>,
    ) -> Result<shared_protocol::v1::BatchAck, TransportError> {
        use tracing::Instrument;
        use tracing::field::Empty;
        let span = tracing::info_span!(target: vigil_io::telemetry::TRACE_TARGET, "ingest_batch",
        gateway_id = %gateway_id, batch_sequence = batch.sequence,
        accepted = Empty, duplicates = Empty, rejected = Empty, duplicate_batch = Empty);
        let parent = vigil_io::telemetry::adopt_remote_parent(&span, &batch.traceparent);
        if parent == vigil_io::telemetry::RemoteParent::Invalid {
            self.metrics.trace_context_invalid();
            tracing::debug!(gateway_id = %gateway_id, batch_sequence = batch.sequence,
            "malformed traceparent ignored");
        }
        let r = self
            .store_batch_traced(gateway_id, batch, position)
            .instrument(span.clone())
            .await;
        if let Ok(ack) = &r {
            span.record("accepted", ack.accepted)
                .record("duplicates", ack.duplicates)
                .record("rejected", ack.rejected)
                .record("duplicate_batch", ack.duplicate_batch);
        }
        r
    }

    async fn store_batch_traced(
        &self,
        gateway_id: &str,
        mut batch: Batch,
        position: Option<StreamPosition>,
    ) -> Result<shared_protocol::v1::BatchAck, TransportError> {
        crate::identifiers::map_batch(&self.identifiers, &mut batch);
        let store = self.store.clone();
        let associations = self.associations.clone();
        let gw = gateway_id.to_owned();
        let batch_seq = batch.sequence;
        let now = now_us();
        let events = self
            .after_ingest
            .is_active()
            .then(|| crate::alerts::BatchEvents::of(&batch));
        let mut report = blocking(move || match &position {
            Some(p) => store.ingest_at(&gw, &batch, &associations, now, now, p),
            None => store.ingest(&gw, &batch, &associations, now, now),
        })
        .await?;
        // The consumers see what this batch newly stored, after it is durable;
        // their failures never fail the ingest (`after_ingest`).
        if let (Some(events), false) = (events, report.ack.duplicate_batch) {
            let (after, gw, live) = (
                self.after_ingest.clone(),
                gateway_id.to_owned(),
                std::mem::take(&mut report.live),
            );
            if let Err(e) =
                tokio::task::spawn_blocking(move || after.run(&gw, &events, &live, now)).await
            {
                tracing::error!(error = %e, "after-ingest task failed");
            }
        }
        if let Some(n) = report.new_incarnation {
            self.metrics.new_incarnation(n.previous.is_some());
            match n.previous {
                Some(previous) => tracing::warn!(
                    gateway_id = %gateway_id,
                    incarnation = format_args!("{:016x}", n.incarnation),
                    previous = format_args!("{previous:016x}"),
                    "new buffer incarnation: the gateway's buffer was created afresh (lost or \
                     wiped data directory, reinstall or replacement); its sequences restart at 1"
                ),
                None => tracing::info!(
                    gateway_id = %gateway_id,
                    incarnation = format_args!("{:016x}", n.incarnation),
                    "first buffer incarnation of the gateway"
                ),
            }
        }
        let ack = &report.ack;
        if ack.duplicate_batch {
            self.metrics.batch(Outcome::Duplicate);
            tracing::info!(gateway_id = %gateway_id, batch_sequence = batch_seq, "duplicate batch");
        } else {
            self.metrics.batch(Outcome::Accepted);
            self.metrics
                .readings(Outcome::Accepted, u64::from(ack.accepted));
            self.metrics
                .readings(Outcome::Duplicate, u64::from(ack.duplicates));
            self.metrics
                .readings(Outcome::Rejected, u64::from(ack.rejected));
            for r in &report.rejected_reasons {
                self.metrics.rejected(*r);
            }
            self.metrics.out_of_range(u64::from(report.out_of_range));
            self.metrics.erased(u64::from(report.erased));
            tracing::info!(
                gateway_id = %gateway_id,
                batch_sequence = batch_seq,
                accepted = ack.accepted,
                duplicates = ack.duplicates,
                rejected = ack.rejected,
                out_of_range = report.out_of_range,
                erased = report.erased,
                "batch ingested"
            );
        }
        Ok(report.ack)
    }
}
