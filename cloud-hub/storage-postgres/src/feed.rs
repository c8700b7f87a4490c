//! The alert change feed across hubs: each alert commit sends a NOTIFY on
//! [`ALERTS_CHANNEL`] in its transaction; every hub keeps one LISTEN
//! connection of its own (outside the pool, driven by the store's I/O
//! runtime) and, on each notification, reads the transitions stored after
//! the last one it delivered (`alert_events.id`, in commit order since
//! alert writes are serialized by [`ALERTS_LOCK`](crate::alerts::ALERTS_LOCK))
//! and broadcasts them. A lost connection is reopened with backoff; the
//! transitions committed meanwhile are read then, so none is missed.

use std::time::Duration;

use hub_domain::alerts::engine::{Alert, Change, Transition};
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;

use crate::alerts::{ALERT_COLUMNS, ALERTS_CHANNEL, alert_row};
use crate::{DbError, PgStore};

/// What the LISTEN connection is opened with (the pool's settings).
pub(crate) struct Listen {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: tokio_postgres_rustls::MakeRustlsConnect,
}

/// Transitions read per query.
const PAGE: i64 = 500;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A read even without a notification, in case one was lost.
const POLL: Duration = Duration::from_secs(30);

impl PgStore {
    /// A receiver of the feed; the first call starts the listener, which
    /// delivers every transition committed after that call.
    pub(crate) fn alert_feed(&self) -> broadcast::Receiver<Change> {
        self.alert_feed
            .get_or_init(|| {
                let (tx, _) = broadcast::channel(1024);
                // Where the feed starts, read now rather than when the
                // listener has connected, so that nothing committed after
                // this call is missed. Unreadable now: the listener reads it.
                let last = self
                    .block(async {
                        let c = self.conn().await?;
                        let r = c
                            .query_one("SELECT COALESCE(MAX(id), 0) FROM alert_events", &[])
                            .await?;
                        Ok::<i64, DbError>(r.get(0))
                    })
                    .ok();
                let (listen, feed) = (self.listen.clone(), tx.clone());
                self.io
                    .handle()
                    .spawn(async move { run(&listen, &feed, last).await });
                tx
            })
            .subscribe()
    }
}

async fn run(listen: &Listen, feed: &broadcast::Sender<Change>, mut last: Option<i64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(listen, feed, &mut last, &mut backoff).await {
            Ok(()) => tracing::warn!("alert feed: LISTEN connection closed; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "alert feed: LISTEN connection failed; reconnecting")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One LISTEN connection, until it fails.
async fn listen_once(
    listen: &Listen,
    feed: &broadcast::Sender<Change>,
    last: &mut Option<i64>,
    backoff: &mut Duration,
) -> Result<(), DbError> {
    let (client, mut conn) = listen.config.connect(listen.tls.clone()).await?;
    let (wake, mut woken) = mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if wake.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "alert feed: LISTEN connection error");
                    return;
                }
                None => return,
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {ALERTS_CHANNEL}"))
            .await?;
        *backoff = Duration::from_millis(100);
        // First connection: from now on; a reconnection: from the last
        // transition delivered (those committed while disconnected too).
        if last.is_none() {
            let max: i64 = client
                .query_one("SELECT COALESCE(MAX(id), 0) FROM alert_events", &[])
                .await?
                .get(0);
            *last = Some(max);
        }
        loop {
            read_after(&client, feed, last).await?;
            tokio::select! {
                w = woken.recv() => {
                    if w.is_none() {
                        return Ok(());
                    }
                    // Coalesce notifications already queued.
                    while woken.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// Broadcasts the transitions after `last` (with their alert as stored
/// now), oldest first, and moves `last` on.
async fn read_after(
    client: &tokio_postgres::Client,
    feed: &broadcast::Sender<Change>,
    last: &mut Option<i64>,
) -> Result<(), DbError> {
    let sql = format!(
        "SELECT {ALERT_COLUMNS}, e.eid, e.transition, e.actor
           FROM (SELECT id AS eid, alert_id, transition, actor FROM alert_events
                  WHERE id > $1 ORDER BY id LIMIT $2) e
           JOIN alerts ON alerts.id = e.alert_id
          ORDER BY e.eid"
    );
    loop {
        let after = last.unwrap_or(0);
        let rows = client.query(sql.as_str(), &[&after, &PAGE]).await?;
        for r in &rows {
            let alert: Alert = alert_row(r);
            let transition = match r.get::<_, &str>(18) {
                "raised" => Transition::Raised,
                "acknowledged" => Transition::Acknowledged,
                "escalated" => Transition::Escalated,
                _ => Transition::Resolved,
            };
            *last = Some(r.get(17));
            // No receiver is not an error.
            let _ = feed.send(Change {
                transition,
                alert,
                actor: r.get(19),
            });
        }
        if (rows.len() as i64) < PAGE {
            return Ok(());
        }
    }
}
