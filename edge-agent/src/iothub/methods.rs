//! Direct methods over IoT Hub's MQTT topics.
//!
//! IoT Hub delivers a method call to the subscribed device on
//! `$iothub/methods/POST/{method name}/?$rid={request id}` (subscribed as
//! `$iothub/methods/POST/#`); the device answers on
//! `$iothub/methods/res/{status}/?$rid={request id}` with a JSON body.
//!
//! Methods the agent implements:
//! - `flush`: send what is buffered now, without waiting for a batch to fill
//!   or pacing (`uplink.batch_min_interval_ms`); backlog goes at full speed too.
//!   Answers 200 `{"flushRequested":true,"pendingItems":N,"pendingRecords":M}`
//!   at once (what was waiting when the call arrived); the sending happens
//!   afterwards, as usual.
//!
//! Any other method name is answered 404. A request topic that cannot be
//! parsed (no request id, wildcard characters) cannot be answered: it is
//! counted and ignored.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::buffer::Buffer;

/// Topic filter for method requests.
pub const REQUEST_FILTER: &str = "$iothub/methods/POST/#";
const REQUEST_PREFIX: &str = "$iothub/methods/POST/";

/// A method call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodRequest {
    pub name: String,
    pub rid: String,
}

/// Why a method request topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedMethod {
    #[error("not a method request topic")]
    NotAMethod,
    #[error("no method name")]
    NoName,
    #[error("no request id ($rid)")]
    NoRequestId,
    #[error("request id not usable in a response topic")]
    BadRequestId,
}

/// Parse `$iothub/methods/POST/{name}/?$rid={rid}`.
pub fn parse_request(topic: &str) -> Result<MethodRequest, MalformedMethod> {
    let rest = topic
        .strip_prefix(REQUEST_PREFIX)
        .ok_or(MalformedMethod::NotAMethod)?;
    let (name, query) = rest.split_once("/?").ok_or(MalformedMethod::NoRequestId)?;
    if name.is_empty() || name.contains('/') {
        return Err(MalformedMethod::NoName);
    }
    let rid = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("$rid="))
        .ok_or(MalformedMethod::NoRequestId)?;
    if rid.is_empty() {
        return Err(MalformedMethod::NoRequestId);
    }
    // The id is echoed into the response topic: no wildcards, no
    // separators, no control characters, bounded.
    if rid.len() > 128
        || rid
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '&' | '?') || c.is_control())
    {
        return Err(MalformedMethod::BadRequestId);
    }
    Ok(MethodRequest {
        name: name.to_string(),
        rid: rid.to_string(),
    })
}

/// The topic a method response is published to.
pub fn response_topic(status: u16, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={rid}")
}

/// Answer a method call: (status, JSON body).
pub fn handle(
    req: &MethodRequest,
    buffer: Option<&Buffer>,
    flush: Option<&Notify>,
) -> (u16, String) {
    match (req.name.as_str(), buffer, flush) {
        ("flush", Some(b), Some(f)) => {
            let body = json!({
                "flushRequested": true,
                "pendingItems": b.pending_readings(),
                "pendingRecords": b.pending_records(),
            });
            f.notify_one();
            (200, body.to_string())
        }
        ("flush", _, _) => (
            503,
            json!({"error": "the agent is not running its forwarder"}).to_string(),
        ),
        (name, _, _) => (
            404,
            json!({"error": "unknown method", "method": name}).to_string(),
        ),
    }
}

/// The forwarder's "send without waiting" signal (its `draining` input):
/// true for good once `shutdown` is true, and true from a flush request
/// until every record stored before the request has left the buffer.
/// The task ends when `stop` (the forwarder's stop) becomes true.
pub fn hurry_signal(
    mut shutdown: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    flush: Arc<Notify>,
    buffer: Weak<Buffer>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*shutdown.borrow());
    tokio::spawn(async move {
        // Records with ids below this were stored before the last flush
        // request and are still to be sent without waiting.
        let mut flush_until: Option<u64> = None;
        loop {
            if *shutdown.borrow() {
                let _ = tx.send(true);
                let _ = stop.wait_for(|s| *s).await;
                return;
            }
            // Weak, and never held across an await: the buffer closes when
            // the agent stops, whatever this task is doing.
            if let Some(until) = flush_until {
                let Some(buf) = buffer.upgrade() else {
                    return;
                };
                if buf.items_in(0, until, 1).unwrap_or(0) == 0 {
                    flush_until = None;
                    let _ = tx.send(false);
                }
            }
            let poll = if flush_until.is_some() {
                Duration::from_millis(50)
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = flush.notified() => {
                    let Some(buf) = buffer.upgrade() else {
                        return;
                    };
                    if let Ok(next) = buf.next_record_id()
                        && buf.pending_records() > 0
                    {
                        flush_until = Some(next);
                        let _ = tx.send(true);
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() {
                        // The agent is gone.
                        let _ = tx.send(true);
                        return;
                    }
                }
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_malformed_ones_refused() {
        assert_eq!(
            parse_request("$iothub/methods/POST/flush/?$rid=42"),
            Ok(MethodRequest {
                name: "flush".into(),
                rid: "42".into()
            })
        );
        assert_eq!(
            parse_request("$iothub/methods/POST/reboot/?$rid=a1&x=y")
                .unwrap()
                .rid,
            "a1"
        );
        let bad = |t: &str| parse_request(t).unwrap_err();
        assert_eq!(
            bad("$iothub/twin/res/204/?$rid=1"),
            MalformedMethod::NotAMethod
        );
        assert_eq!(
            bad("$iothub/methods/POST/flush/"),
            MalformedMethod::NoRequestId
        );
        assert_eq!(
            bad("$iothub/methods/POST/flush/?x=1"),
            MalformedMethod::NoRequestId
        );
        assert_eq!(
            bad("$iothub/methods/POST/flush/?$rid="),
            MalformedMethod::NoRequestId
        );
        assert_eq!(
            bad("$iothub/methods/POST//?$rid=1"),
            MalformedMethod::NoName
        );
        assert_eq!(
            bad("$iothub/methods/POST/a/b/?$rid=1"),
            MalformedMethod::NoName
        );
        assert_eq!(
            bad("$iothub/methods/POST/flush/?$rid=1/#"),
            MalformedMethod::BadRequestId
        );
        assert_eq!(
            bad(&format!(
                "$iothub/methods/POST/flush/?$rid={}",
                "9".repeat(200)
            )),
            MalformedMethod::BadRequestId
        );
        assert_eq!(
            response_topic(200, "42"),
            "$iothub/methods/res/200/?$rid=42"
        );
    }

    #[test]
    fn unknown_methods_are_404_and_flush_needs_the_forwarder() {
        let req = |n: &str| MethodRequest {
            name: n.into(),
            rid: "1".into(),
        };
        let (status, body) = handle(&req("reboot"), None, None);
        assert_eq!(status, 404);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["method"], "reboot");
        assert_eq!(handle(&req("flush"), None, None).0, 503);
    }
}
