//! The audit log's chain, as pure functions.
//!
//! Each entry is chained to the one before it: an edited, inserted or
//! removed entry breaks the chain. Two kinds of link exist:
//!
//! - **keyed** (`key_id` set): HMAC-SHA256 under a key derived from the
//!   audit key (`[audit] key_file`, never stored in the database) over the
//!   previous link and the entry's fields, length-prefixed. Without the key
//!   nobody can compute a valid link, so an edit, an insertion or a rewrite
//!   of the rows after it is found by [`verify`].
//! - **unkeyed** (legacy, `key_id` unset): SHA-256 over the same fields
//!   (the chain of logs written before a key was configured, or by a hub
//!   without one). Anyone with the database can recompute it; once a keyed
//!   entry exists no unkeyed entry may follow it ([`next_link`] refuses,
//!   [`verify`] reports it), and the first keyed entry's MAC covers the last
//!   unkeyed link, so the legacy prefix is protected from then on.
//!
//! Signed [`Checkpoint`]s of the head, kept outside the database by the
//! operator, let [`verify`] find removed entries (a truncated or emptied
//! log). Backends persist entries and checkpoints (the link is computed
//! with [`next_link`] inside the backend's append transaction).

use std::collections::BTreeSet;

use ring::{digest, hkdf, hmac};
use serde::{Deserialize, Serialize};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `patient` of an entry whose response named several patients (the
/// list is [`Entry::patients`]).
pub const MULTIPLE: &str = "multiple: ";

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
    /// The patient whose data the request named or returned; `multiple: N`
    /// when there were several (listed in `patients`).
    pub patient: Option<String>,
    /// Every patient when there were several (else empty). Keyed entries
    /// only.
    pub patients: Vec<String>,
    /// HTTP status (CLI: 0 on success).
    pub outcome: u16,
    /// The query string, or what a CLI command changed (never a secret).
    pub detail: String,
}

impl Entry {
    /// Sets `patient` and `patients` from the patients whose data went out:
    /// one → its id; several → `multiple: N` and the list; none → unchanged.
    pub fn set_patients(&mut self, ids: BTreeSet<String>) {
        match ids.len() {
            0 => {}
            1 => {
                self.patient = ids.into_iter().next();
                self.patients.clear();
            }
            n => {
                self.patient = Some(format!("{MULTIPLE}{n}"));
                self.patients = ids.into_iter().collect();
            }
        }
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    pub entry: Entry,
    pub prev_hash: String,
    /// The link: HMAC-SHA256 (keyed) or SHA-256 (unkeyed), hex.
    pub hash: String,
    /// The [`AuditKey::id`] of the key whose MAC `hash` is; `None`: an
    /// unkeyed (legacy) link.
    pub key_id: Option<String>,
}

/// The chain head a backend reads before an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
    pub key_id: Option<String>,
}

/// Why an entry cannot be appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "the audit log is keyed (entry {0} carries a MAC): an entry can only be appended with \
         the audit key (set audit.key_file)"
    )]
    KeyRequired(i64),
}

/// Why an audit key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("an audit key must hold at least {min} bytes, this one holds {got}")]
    TooShort { min: usize, got: usize },
}

/// The audit key: two HMAC keys derived from the secret (HKDF-SHA256), one
/// for the chain, one for checkpoints, and its id (the first 8 bytes of the
/// secret's SHA-256, hex: names the key without revealing it).
pub struct AuditKey {
    id: String,
    chain: hmac::Key,
    checkpoint: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").field("id", &self.id).finish()
    }
}

/// What HKDF expands to an HMAC-SHA256 key.
struct HmacLen;

impl hkdf::KeyType for HmacLen {
    fn len(&self) -> usize {
        digest::SHA256_OUTPUT_LEN
    }
}

fn derive(prk: &hkdf::Prk, label: &[u8]) -> hmac::Key {
    let info = [label];
    let okm = prk
        .expand(&info, HmacLen)
        .expect("32 bytes are within HKDF-SHA256's output limit");
    let mut bytes = [0u8; digest::SHA256_OUTPUT_LEN];
    okm.fill(&mut bytes)
        .expect("the buffer has the requested length");
    hmac::Key::new(hmac::HMAC_SHA256, &bytes)
}

impl AuditKey {
    /// The least number of secret bytes accepted.
    pub const MIN_LEN: usize = 32;

    /// A key from its secret bytes (at least [`AuditKey::MIN_LEN`]).
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort {
                min: Self::MIN_LEN,
                got: secret.len(),
            });
        }
        let id = hex::encode(&digest::digest(&digest::SHA256, secret).as_ref()[..8]);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"vigil audit log v1").extract(secret);
        Ok(Self {
            id,
            chain: derive(&prk, b"chain"),
            checkpoint: derive(&prk, b"checkpoint"),
        })
    }

    /// The key's id (stored with each entry it links).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Length-prefixed fields: no two different field lists give the same
/// bytes.
fn canonical(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// The unkeyed (legacy) link of entry `e` stored as number `seq` after the
/// entry whose link is `prev` ([`GENESIS`] for the first).
pub fn chain_hash(prev: &str, seq: i64, e: &Entry) -> String {
    // Unit-separated fields (the format of logs written before keyed
    // links; kept so that they still verify).
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

/// The keyed link (HMAC-SHA256, hex) of entry `e` stored as number `seq`
/// after the link `prev`.
pub fn chain_mac(key: &AuditKey, prev: &str, seq: i64, e: &Entry) -> String {
    let seq = seq.to_be_bytes();
    let time = e.time_us.to_be_bytes();
    let outcome = e.outcome.to_be_bytes();
    let patients = e.patients.join("\n");
    let (has_patient, patient) = match &e.patient {
        Some(p) => (&b"1"[..], p.as_bytes()),
        None => (&b"0"[..], &b""[..]),
    };
    let bytes = canonical(&[
        b"vigil-audit-entry-v2",
        key.id.as_bytes(),
        prev.as_bytes(),
        &seq,
        &time,
        e.actor.as_bytes(),
        e.action.as_bytes(),
        e.resource.as_bytes(),
        has_patient,
        patient,
        patients.as_bytes(),
        &outcome,
        e.detail.as_bytes(),
    ]);
    hex::encode(hmac::sign(&key.chain, &bytes).as_ref())
}

/// What a backend's append stores: the entry's seq, the link it follows
/// and its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
    pub key_id: Option<String>,
}

/// The link of the entry that follows `last`, the newest stored entry, if
/// any: keyed with `key`, else unkeyed, which is refused once the log is
/// keyed.
pub fn next_link(
    last: Option<&Head>,
    e: &Entry,
    key: Option<&AuditKey>,
) -> Result<Link, ChainError> {
    let (seq, prev) = last.map_or((1, GENESIS.to_owned()), |h| (h.seq + 1, h.hash.clone()));
    match key {
        Some(k) => Ok(Link {
            seq,
            hash: chain_mac(k, &prev, seq, e),
            prev_hash: prev,
            key_id: Some(k.id.clone()),
        }),
        None => match last {
            Some(h) if h.key_id.is_some() => Err(ChainError::KeyRequired(h.seq)),
            _ => Ok(Link {
                seq,
                hash: chain_hash(&prev, seq, e),
                prev_hash: prev,
                key_id: None,
            }),
        },
    }
}

// ---- Checkpoints -----------------------------------------------------------

/// A signed statement that the log held `entries` entries, the newest
/// being `seq` with link `mac`, at `time_us`. The hub writes one now and
/// then (see [`CheckpointPolicy`]) to the database, to a file and to its
/// log; the operator ships them to storage the database's administrators
/// cannot change. Signed with HMAC-SHA256 under the audit key's checkpoint
/// key (so verifying one needs the key, like the chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: i64,
    pub mac: String,
    pub entries: i64,
    pub time_us: i64,
    pub key_id: String,
    pub sig: String,
}

fn checkpoint_bytes(seq: i64, mac: &str, entries: i64, time_us: i64, key_id: &str) -> Vec<u8> {
    canonical(&[
        b"vigil-audit-checkpoint-v1",
        key_id.as_bytes(),
        &seq.to_be_bytes(),
        mac.as_bytes(),
        &entries.to_be_bytes(),
        &time_us.to_be_bytes(),
    ])
}

impl Checkpoint {
    /// The signed checkpoint of `head` (the log then holding `head.seq`
    /// entries).
    pub fn sign(key: &AuditKey, head: &Head, time_us: i64) -> Self {
        let bytes = checkpoint_bytes(head.seq, &head.hash, head.seq, time_us, &key.id);
        Self {
            seq: head.seq,
            mac: head.hash.clone(),
            entries: head.seq,
            time_us,
            key_id: key.id.clone(),
            sig: hex::encode(hmac::sign(&key.checkpoint, &bytes).as_ref()),
        }
    }

    /// Whether the signature is `key`'s over the fields.
    pub fn signed_by(&self, key: &AuditKey) -> bool {
        let bytes = checkpoint_bytes(
            self.seq,
            &self.mac,
            self.entries,
            self.time_us,
            &self.key_id,
        );
        key.id == self.key_id
            && hex::decode(&self.sig)
                .is_ok_and(|sig| hmac::verify(&key.checkpoint, &bytes, &sig).is_ok())
    }

    /// One JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint serializes")
    }

    /// Parses a line written by [`Checkpoint::to_line`] (or the `checkpoint`
    /// field of the hub's log line).
    pub fn from_line(line: &str) -> Result<Self, String> {
        serde_json::from_str(line.trim()).map_err(|e| e.to_string())
    }
}

/// When the hub takes a checkpoint: after `every_entries` new entries or
/// `every_us` after the last checkpoint when there is any new entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every_entries: i64,
    pub every_us: i64,
}

impl CheckpointPolicy {
    /// Whether a checkpoint of `head_seq` is due at `now_us` after `last`.
    pub fn due(&self, last: Option<&Checkpoint>, head_seq: i64, now_us: i64) -> bool {
        match last {
            None => head_seq > 0,
            Some(c) => {
                head_seq > c.seq
                    && (head_seq - c.seq >= self.every_entries
                        || now_us.saturating_sub(c.time_us) >= self.every_us)
            }
        }
    }
}

// ---- Verification ----------------------------------------------------------

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: u64,
    /// (seq, link) of the newest entry.
    pub head: Option<(i64, String)>,
    /// The first entry (or checkpoint seq) that does not verify, and why.
    pub broken: Option<(i64, String)>,
    /// The first keyed entry (`None`: the log holds no keyed entry).
    pub keyed_from: Option<i64>,
    /// The checkpoints checked against the log.
    pub checkpoints: u64,
}

/// The `action` of the entry a retention purge of the audit log appends.
pub const PURGE_ACTION: &str = "audit-purge";

/// The entry recording that entries `1..=through.seq` were purged by
/// retention (`cutoff_us`: the audit retention's cut-off), anchored at
/// the signed checkpoint `through`.
pub fn purge_entry(through: &Checkpoint, cutoff_us: i64, now_us: i64) -> Entry {
    Entry {
        time_us: now_us,
        actor: "retention".into(),
        action: PURGE_ACTION.into(),
        resource: "audit_log".into(),
        patient: None,
        patients: Vec::new(),
        outcome: 0,
        detail: format!(
            "through={}; checkpoint={}; older_than={}",
            through.seq,
            through.mac,
            crate::clock::format_instant(cutoff_us)
        ),
    }
}

/// Where retention may purge the audit log up to at `cutoff_us`: the
/// newest checkpoint signed before the cut-off (every entry it covers is
/// older), when it is past `purged` (what is purged already).
pub fn purge_point(checkpoints: &[Checkpoint], cutoff_us: i64, purged: i64) -> Option<&Checkpoint> {
    checkpoints
        .iter()
        .filter(|c| c.time_us < cutoff_us && c.seq > purged)
        .max_by_key(|c| c.seq)
}

/// Checks a log purged through `purged`: a checkpoint of that entry signed
/// by a given key, the first remaining entry linked to it, and a keyed
/// purge entry in the log naming it (so a prefix cut by someone without
/// the key is found). Returns the link the chain continues from.
fn purged_prefix(
    all: &[Stored],
    keys: &[AuditKey],
    checkpoints: &[Checkpoint],
    purged: i64,
) -> Result<String, String> {
    let Some(c) = checkpoints
        .iter()
        .find(|c| c.seq == purged && keys.iter().any(|k| k.id == c.key_id && c.signed_by(k)))
    else {
        return Err(format!(
            "the log starts at entry {} without a signed checkpoint of entry {purged} \
             (entries were removed)",
            purged + 1
        ));
    };
    if all[0].prev_hash != c.mac {
        return Err(format!(
            "does not link to the checkpoint of entry {purged} it follows"
        ));
    }
    let named = format!("through={purged};");
    if !all.iter().any(|s| {
        s.entry.action == PURGE_ACTION && s.key_id.is_some() && s.entry.detail.starts_with(&named)
    }) {
        return Err(format!(
            "entries up to {purged} are missing and no purge entry records their removal"
        ));
    }
    Ok(c.mac.clone())
}

/// Recomputes the chain over `all` (every stored entry, by seq) with
/// `keys` (the current audit key and any retired ones; keyed entries need
/// the key they name, unkeyed ones may only precede the first keyed one;
/// with a key given, a non-empty log must hold a keyed entry). `anchor`: a
/// (seq, link) the chain must still contain. `checkpoints`: each must be
/// signed by one of `keys` and its (seq, link) still be in the log, so an
/// emptied or truncated log fails.
pub fn verify(
    all: &[Stored],
    keys: &[AuditKey],
    anchor: Option<(i64, &str)>,
    checkpoints: &[Checkpoint],
) -> Verification {
    let key = |id: &str| keys.iter().find(|k| k.id == id);
    let mut prev = GENESIS.to_owned();
    let mut broken = None;
    let mut keyed_from = None;
    // A log whose oldest entries were purged by retention starts after a
    // signed checkpoint, and holds the keyed purge entry naming it.
    let purged = all.first().map_or(0, |s| s.seq - 1);
    if purged > 0 {
        match purged_prefix(all, keys, checkpoints, purged) {
            Ok(mac) => prev = mac,
            Err(why) => {
                return Verification {
                    entries: all.len() as u64,
                    head: all.last().map(|s| (s.seq, s.hash.clone())),
                    broken: Some((purged + 1, why)),
                    keyed_from: None,
                    checkpoints: checkpoints.len() as u64,
                };
            }
        }
    }
    for (expected_seq, s) in (purged + 1..).zip(all.iter()) {
        let why = if s.seq != expected_seq {
            Some(format!(
                "sequence jumps from {} to {}",
                expected_seq - 1,
                s.seq
            ))
        } else if s.prev_hash != prev {
            Some("does not link to the entry before it".to_owned())
        } else {
            match &s.key_id {
                None if keyed_from.is_some() => Some(
                    "is unkeyed after keyed entries (written without the audit key)".to_owned(),
                ),
                None if !s.entry.patients.is_empty() => {
                    Some("is unkeyed but lists patients (only keyed entries do)".to_owned())
                }
                None => (chain_hash(&prev, s.seq, &s.entry) != s.hash)
                    .then(|| "its content does not match its hash".to_owned()),
                Some(id) => match key(id) {
                    None => Some(format!(
                        "is keyed with key {id}, which was not given (audit.key_file or \
                         audit.retired_key_files)"
                    )),
                    Some(k) => {
                        keyed_from.get_or_insert(s.seq);
                        (chain_mac(k, &prev, s.seq, &s.entry) != s.hash).then(|| {
                            "its content does not match its MAC (edited or inserted without \
                             the key)"
                                .to_owned()
                        })
                    }
                },
            }
        };
        if let Some(w) = why {
            broken = Some((s.seq, w));
            break;
        }
        prev = s.hash.clone();
    }
    if broken.is_none() && !keys.is_empty() && !all.is_empty() && keyed_from.is_none() {
        broken = Some((
            all[all.len() - 1].seq,
            "no entry is keyed although a key was given: the log was rewritten without the \
             key, or no hub has written to it with audit.key_file yet"
                .to_owned(),
        ));
    }
    if broken.is_none() {
        for c in checkpoints {
            let why = match key(&c.key_id) {
                None => Some(format!(
                    "checkpoint of entry {} is signed with key {}, which was not given",
                    c.seq, c.key_id
                )),
                Some(k) if !c.signed_by(k) => Some(format!(
                    "checkpoint of entry {} has a bad signature (forged or altered)",
                    c.seq
                )),
                // Entries purged by retention: the signature is all there is.
                Some(_) if c.seq <= purged => None,
                Some(_) => match all.iter().find(|s| s.seq == c.seq) {
                    None if all.is_empty() => Some(format!(
                        "the log is empty but a checkpoint recorded {} entries (entries were removed)",
                        c.entries
                    )),
                    None => Some(format!(
                        "the log ends at entry {} but a checkpoint recorded entry {} (entries were removed)",
                        all[all.len() - 1].seq,
                        c.seq
                    )),
                    Some(s) if s.hash != c.mac => Some(format!(
                        "entry {} differs from its checkpoint (the log was rewritten)",
                        c.seq
                    )),
                    Some(_) => None,
                },
            };
            if let Some(w) = why {
                broken = Some((c.seq, w));
                break;
            }
        }
    }
    if broken.is_none()
        && let Some((seq, hash)) = anchor
    {
        match all.iter().find(|s| s.seq == seq) {
            None if seq <= purged => {}
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
        keyed_from,
        checkpoints: checkpoints.len() as u64,
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
            patients: Vec::new(),
            outcome: 200,
            detail: "patient=p&_count=10".into(),
        }
    }

    fn key(b: u8) -> AuditKey {
        AuditKey::new(&[b; 32]).unwrap()
    }

    /// `n` entries, the first `unkeyed` of them without a key.
    fn chain(n: i64, unkeyed: i64, k: &AuditKey) -> Vec<Stored> {
        let mut out: Vec<Stored> = Vec::new();
        for i in 0..n {
            let last = out.last().map(|s| Head {
                seq: s.seq,
                hash: s.hash.clone(),
                key_id: s.key_id.clone(),
            });
            let l = next_link(last.as_ref(), &e(i), (i >= unkeyed).then_some(k)).unwrap();
            out.push(Stored {
                seq: l.seq,
                entry: e(i),
                prev_hash: l.prev_hash,
                hash: l.hash,
                key_id: l.key_id,
            });
        }
        out
    }

    fn head(s: &Stored) -> Head {
        Head {
            seq: s.seq,
            hash: s.hash.clone(),
            key_id: s.key_id.clone(),
        }
    }

    #[test]
    fn an_unkeyed_chain_verifies_and_each_kind_of_tampering_is_found() {
        let k = key(1);
        let all = chain(5, 5, &k);
        assert_eq!(all[0].prev_hash, GENESIS);
        let v = verify(&all, &[], None, &[]);
        assert_eq!((v.entries, v.broken, v.keyed_from), (5, None, None));
        let head = v.head.unwrap();
        assert_eq!(head.0, 5);
        let mut edited = all.clone();
        edited[2].entry.patient = Some("p-other".into());
        let b = verify(&edited, &[], None, &[]).broken.unwrap();
        assert_eq!(b.0, 3);
        assert!(b.1.contains("content"), "{b:?}");
        let mut gap = all.clone();
        gap.remove(1);
        assert_eq!(verify(&gap, &[], None, &[]).broken.map(|b| b.0), Some(3));
        let mut relinked = all.clone();
        relinked[1].entry.actor = "anonymous".into();
        relinked[1].hash = chain_hash(&relinked[1].prev_hash, 2, &relinked[1].entry);
        let b = verify(&relinked, &[], None, &[]).broken.unwrap();
        assert_eq!(b.0, 3);
        assert!(b.1.contains("link"), "{b:?}");
        let short = &all[..4];
        assert_eq!(verify(short, &[], None, &[]).broken, None);
        assert_eq!(
            verify(short, &[], Some((head.0, &head.1)), &[])
                .broken
                .map(|b| b.0),
            Some(5)
        );
        assert_eq!(verify(&all, &[], Some((head.0, &head.1)), &[]).broken, None);
        assert_eq!(
            verify(&all, &[], Some((2, GENESIS)), &[])
                .broken
                .map(|b| b.1),
            Some("differs from the anchor".into())
        );
        let mut none = e(0);
        none.patient = None;
        assert_ne!(chain_hash(GENESIS, 1, &none), chain_hash(GENESIS, 1, &e(0)));
        // With a key given, a log without a keyed entry fails.
        assert_eq!(
            verify(&all, &[key(1)], None, &[]).broken.map(|b| b.0),
            Some(5)
        );
    }

    /// Appends `e` chained to the last of `all` under `k`.
    fn push(all: &mut Vec<Stored>, e: Entry, k: &AuditKey) {
        let l = next_link(all.last().map(head).as_ref(), &e, Some(k)).unwrap();
        all.push(Stored {
            seq: l.seq,
            entry: e,
            prev_hash: l.prev_hash,
            hash: l.hash,
            key_id: l.key_id,
        });
    }

    #[test]
    fn a_log_purged_at_a_signed_checkpoint_verifies_and_a_cut_without_one_does_not() {
        let k = key(9);
        let mut all = chain(10, 0, &k);
        let at5 = Checkpoint::sign(&k, &head(&all[4]), 100);
        let at8 = Checkpoint::sign(&k, &head(&all[7]), 300);
        let cps = vec![at5.clone(), at8.clone()];
        // The newest checkpoint signed before the cut-off, past what is purged.
        assert_eq!(purge_point(&cps, 200, 0), Some(&at5));
        assert_eq!(purge_point(&cps, 301, 0), Some(&at8));
        assert_eq!(purge_point(&cps, 200, 5), None);
        assert_eq!(purge_point(&cps, 100, 0), None);
        // Retention: the purge entry is chained at the head, then 1..=5 go.
        push(&mut all, purge_entry(&at5, 200, 400), &k);
        let purged: Vec<Stored> = all[5..].to_vec();
        let v = verify(&purged, std::slice::from_ref(&k), None, &cps);
        assert_eq!(v.broken, None);
        assert_eq!((v.entries, v.head.unwrap().0), (6, 11));
        // An anchor among the purged entries is no longer checkable.
        assert_eq!(
            verify(&purged, std::slice::from_ref(&k), Some((3, "x")), &cps).broken,
            None
        );
        // Without its checkpoint, or with a forged one: entries were removed.
        let b = verify(
            &purged,
            std::slice::from_ref(&k),
            None,
            std::slice::from_ref(&at8),
        )
        .broken
        .unwrap();
        assert_eq!(b.0, 6);
        assert!(b.1.contains("without a signed checkpoint"), "{b:?}");
        let mut forged = at5.clone();
        forged.entries += 1;
        assert!(
            verify(&purged, std::slice::from_ref(&k), None, &[forged])
                .broken
                .is_some()
        );
        // A prefix cut at the checkpoint without the keyed purge entry.
        let cut: Vec<Stored> = chain(10, 0, &k)[5..].to_vec();
        let b = verify(&cut, std::slice::from_ref(&k), None, &cps)
            .broken
            .unwrap();
        assert!(b.1.contains("no purge entry"), "{b:?}");
        // A cut at an entry without a checkpoint.
        let b = verify(&all[3..], std::slice::from_ref(&k), None, &cps)
            .broken
            .unwrap();
        assert_eq!(b.0, 4);
    }

    /// An attacker with the database but not the key: every edit,
    /// insertion or rewrite (recomputing the unkeyed hashes) is found.
    #[test]
    fn a_keyed_chain_cannot_be_forged_without_the_key() {
        let k = key(7);
        let all = chain(6, 2, &k);
        let keys = [key(7)];
        let v = verify(&all, &keys, None, &[]);
        assert_eq!((v.broken, v.keyed_from), (None, Some(3)));
        // Without the key the keyed entries cannot be checked.
        let b = verify(&all, &[], None, &[]).broken.unwrap();
        assert!(b.0 == 3 && b.1.contains("not given"), "{b:?}");
        // An edit, with the MACs after it recomputed under a guessed key.
        let mut forged = all.clone();
        forged[3].entry.patient = Some("p-other".into());
        let guess = key(8);
        for i in 3..6 {
            let prev = forged[i - 1].hash.clone();
            forged[i].hash = chain_mac(&guess, &prev, forged[i].seq, &forged[i].entry);
            forged[i].prev_hash = prev;
        }
        let b = verify(&forged, &keys, None, &[]).broken.unwrap();
        assert_eq!(b.0, 4);
        assert!(b.1.contains("MAC"), "{b:?}");
        // A row inserted at the end with a recomputed unkeyed hash.
        let mut appended = all.clone();
        let last = head(&appended[5]);
        let l = next_link(
            Some(&Head {
                key_id: None,
                ..last
            }),
            &e(9),
            None,
        )
        .unwrap();
        appended.push(Stored {
            seq: l.seq,
            entry: e(9),
            prev_hash: l.prev_hash,
            hash: l.hash,
            key_id: None,
        });
        let b = verify(&appended, &keys, None, &[]).broken.unwrap();
        assert_eq!(b.0, 7);
        assert!(b.1.contains("unkeyed after keyed"), "{b:?}");
        // The whole log rewritten as an unkeyed chain.
        let rewritten = chain(6, 6, &k);
        assert!(verify(&rewritten, &keys, None, &[]).broken.is_some());
        // A legacy entry edited and the legacy prefix rehashed: the first
        // keyed MAC covers the last unkeyed link.
        let mut legacy = all.clone();
        legacy[0].entry.actor = "anonymous".into();
        legacy[0].hash = chain_hash(GENESIS, 1, &legacy[0].entry);
        legacy[1].prev_hash = legacy[0].hash.clone();
        legacy[1].hash = chain_hash(&legacy[1].prev_hash, 2, &legacy[1].entry);
        legacy[2].prev_hash = legacy[1].hash.clone();
        assert_eq!(
            verify(&legacy, &keys, None, &[]).broken.map(|b| b.0),
            Some(3)
        );
        // Appending unkeyed after a keyed entry is refused.
        assert_eq!(
            next_link(Some(&head(&all[5])), &e(9), None),
            Err(ChainError::KeyRequired(6))
        );
        // Every field is covered, the patient list included.
        let mut listed = e(0);
        listed.set_patients(["a".to_owned(), "b".to_owned()].into());
        assert_eq!(listed.patient.as_deref(), Some("multiple: 2"));
        assert_eq!(listed.patients, ["a", "b"]);
        assert_ne!(
            chain_mac(&k, GENESIS, 1, &listed),
            chain_mac(&k, GENESIS, 1, &e(0))
        );
        // An unkeyed entry cannot carry a list.
        let mut l0 = chain(1, 1, &k);
        l0[0].entry.patients = vec!["x".into()];
        assert!(verify(&l0, &[], None, &[]).broken.is_some());
        assert!(AuditKey::new(&[0; 31]).is_err());
        assert_ne!(key(1).id(), key(2).id());
        assert_eq!(key(1).id().len(), 16);
    }

    #[test]
    fn rotation_keeps_older_entries_verifiable_with_the_retired_key() {
        let (old, new) = (key(1), key(2));
        let mut all = chain(3, 0, &old);
        let l = next_link(Some(&head(&all[2])), &e(3), Some(&new)).unwrap();
        all.push(Stored {
            seq: l.seq,
            entry: e(3),
            prev_hash: l.prev_hash,
            hash: l.hash,
            key_id: l.key_id,
        });
        assert_eq!(verify(&all, &[key(2), key(1)], None, &[]).broken, None);
        let b = verify(&all, &[key(2)], None, &[]).broken.unwrap();
        assert_eq!(b.0, 1);
    }

    #[test]
    fn checkpoints_find_a_truncated_emptied_or_rewritten_log() {
        let k = key(3);
        let all = chain(8, 0, &k);
        let keys = [key(3)];
        let cp = Checkpoint::sign(&k, &head(&all[5]), 1_000);
        assert!(cp.signed_by(&k) && !cp.signed_by(&key(4)));
        assert_eq!(Checkpoint::from_line(&cp.to_line()).unwrap(), cp);
        let v = verify(&all, &keys, None, std::slice::from_ref(&cp));
        assert_eq!((v.broken, v.checkpoints), (None, 1));
        // Emptied.
        let b = verify(&[], &keys, None, std::slice::from_ref(&cp))
            .broken
            .unwrap();
        assert!(b.1.contains("empty"), "{b:?}");
        // Truncated below the checkpoint (the rest still chains).
        let b = verify(&all[..5], &keys, None, std::slice::from_ref(&cp))
            .broken
            .unwrap();
        assert!(b.0 == 6 && b.1.contains("ends at entry 5"), "{b:?}");
        // Truncated after it: the checkpoint passes (that window is what
        // the checkpoint interval leaves open).
        assert_eq!(
            verify(&all[..7], &keys, None, std::slice::from_ref(&cp)).broken,
            None
        );
        // A checkpoint altered or signed with another key.
        let mut bad = cp.clone();
        bad.seq = 7;
        bad.mac = all[6].hash.clone();
        assert!(
            verify(&all, &keys, None, &[bad])
                .broken
                .unwrap()
                .1
                .contains("signature")
        );
        let other = Checkpoint::sign(&key(4), &head(&all[5]), 1_000);
        assert!(verify(&all, &keys, None, &[other]).broken.is_some());
        // The policy.
        let p = CheckpointPolicy {
            every_entries: 5,
            every_us: 60_000_000,
        };
        assert!(p.due(None, 1, 0) && !p.due(None, 0, 0));
        assert!(!p.due(Some(&cp), 6, 1_000 + 59_000_000));
        assert!(p.due(Some(&cp), 7, 1_000 + 60_000_000));
        assert!(p.due(Some(&cp), 11, 1_000));
        assert!(!p.due(Some(&cp), 10, 1_000));
    }
}
