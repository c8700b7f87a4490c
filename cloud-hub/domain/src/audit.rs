//! The audit log's hash chain, as pure functions: each entry's SHA-256
//! covers its fields and the previous entry's hash, so an edited, inserted
//! or removed entry breaks the chain. Backends persist the entries (append
//! computes the hash with [`chain_hash`] inside the backend's transaction);
//! [`verify`] recomputes the chain over the stored entries.

use ring::digest;

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry (before it is chained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub time_us: i64,
    /// The principal: `user:…`, `token:…`, `oidc:…`, `admin-token`,
    /// `bearer:<first 16 hex of the token's SHA-256>`, `anonymous`, `cli`
    /// or `system` (the hub itself, e.g. a migration at start; never a
    /// credential).
    pub actor: String,
    /// read, create, update, delete, execute.
    pub action: String,
    /// The request path (no query string) or the CLI command.
    pub resource: String,
    pub patient: Option<String>,
    /// HTTP status (CLI: 0 on success).
    pub outcome: u16,
    /// The query string, or what a CLI command changed (never a secret).
    pub detail: String,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    pub entry: Entry,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of entry `e` stored as number `seq` after the entry whose hash
/// is `prev` ([`GENESIS`] for the first).
pub fn chain_hash(prev: &str, seq: i64, e: &Entry) -> String {
    // Unit-separated fields; a field cannot contain U+001F unnoticed
    // because the separator count would change the digest input.
    let text = format!(
        "{prev}\u{1f}{seq}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        e.time_us,
        e.actor,
        e.action,
        e.resource,
        e.patient.as_deref().unwrap_or("\u{0}"),
        e.outcome,
        e.detail
    );
    hex::encode(digest::digest(&digest::SHA256, text.as_bytes()))
}

/// The (seq, prev_hash, hash) of the entry that follows `last`, the newest
/// stored (seq, hash), if any: what a backend's append stores.
pub fn next_link(last: Option<(i64, String)>, e: &Entry) -> (i64, String, String) {
    let (seq, prev) = last.map_or((1, GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let hash = chain_hash(&prev, seq, e);
    (seq, prev, hash)
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: u64,
    /// (seq, hash) of the newest entry.
    pub head: Option<(i64, String)>,
    /// The first entry that does not chain, and why.
    pub broken: Option<(i64, String)>,
}

/// Recomputes the chain over `all` (every stored entry, by seq). `anchor`:
/// a (seq, hash) the chain must still contain (detects removal of the
/// newest entries).
pub fn verify(all: &[Stored], anchor: Option<(i64, &str)>) -> Verification {
    let mut prev = GENESIS.to_owned();
    let mut broken = None;
    for (expected_seq, s) in (1..).zip(all.iter()) {
        let why = if s.seq != expected_seq {
            Some(format!(
                "sequence jumps from {} to {}",
                expected_seq - 1,
                s.seq
            ))
        } else if s.prev_hash != prev {
            Some("does not link to the entry before it".to_owned())
        } else if chain_hash(&prev, s.seq, &s.entry) != s.hash {
            Some("its content does not match its hash".to_owned())
        } else {
            None
        };
        if let Some(w) = why {
            broken = Some((s.seq, w));
            break;
        }
        prev = s.hash.clone();
    }
    if broken.is_none()
        && let Some((seq, hash)) = anchor
    {
        match all.iter().find(|s| s.seq == seq) {
            Some(s) if s.hash == hash => {}
            Some(_) => broken = Some((seq, "differs from the anchor".into())),
            None => {
                broken = Some((
                    seq,
                    "the anchor entry is missing (entries were removed)".into(),
                ))
            }
        }
    }
    Verification {
        entries: all.len() as u64,
        head: all.last().map(|s| (s.seq, s.hash.clone())),
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(i: i64) -> Entry {
        Entry {
            time_us: 1_795_514_400_000_000 + i,
            actor: "token:ward-script".into(),
            action: "read".into(),
            resource: "/fhir/Observation".into(),
            patient: Some(format!("p-{i}")),
            outcome: 200,
            detail: "patient=p&_count=10".into(),
        }
    }

    fn chain(n: i64) -> Vec<Stored> {
        let mut out: Vec<Stored> = Vec::new();
        for i in 0..n {
            let last = out.last().map(|s| (s.seq, s.hash.clone()));
            let (seq, prev_hash, hash) = next_link(last, &e(i));
            out.push(Stored {
                seq,
                entry: e(i),
                prev_hash,
                hash,
            });
        }
        out
    }

    #[test]
    fn a_chain_verifies_and_each_kind_of_tampering_is_found() {
        let all = chain(5);
        assert_eq!(all[0].prev_hash, GENESIS);
        let v = verify(&all, None);
        assert_eq!((v.entries, v.broken), (5, None));
        let head = v.head.unwrap();
        assert_eq!(head.0, 5);
        // Edited content.
        let mut edited = all.clone();
        edited[2].entry.patient = Some("p-other".into());
        let b = verify(&edited, None).broken.unwrap();
        assert_eq!(b.0, 3);
        assert!(b.1.contains("content"), "{b:?}");
        // A middle entry removed: the sequence jumps.
        let mut gap = all.clone();
        gap.remove(1);
        assert_eq!(verify(&gap, None).broken.map(|b| b.0), Some(3));
        // An entry rehashed on its own no longer links to the next.
        let mut relinked = all.clone();
        relinked[1].entry.actor = "anonymous".into();
        relinked[1].hash = chain_hash(&relinked[1].prev_hash, 2, &relinked[1].entry);
        let b = verify(&relinked, None).broken.unwrap();
        assert_eq!(b.0, 3);
        assert!(b.1.contains("link"), "{b:?}");
        // The newest removed: valid but shorter; the anchor finds it.
        let short = &all[..4];
        assert_eq!(verify(short, None).broken, None);
        assert_eq!(
            verify(short, Some((head.0, &head.1))).broken.map(|b| b.0),
            Some(5)
        );
        assert_eq!(verify(&all, Some((head.0, &head.1))).broken, None);
        assert_eq!(
            verify(&all, Some((2, GENESIS))).broken.map(|b| b.1),
            Some("differs from the anchor".into())
        );
        // Any field change changes the hash, the unset patient included.
        let mut none = e(0);
        none.patient = None;
        assert_ne!(chain_hash(GENESIS, 1, &none), chain_hash(GENESIS, 1, &e(0)));
    }
}
