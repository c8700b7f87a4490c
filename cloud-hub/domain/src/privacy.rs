//! Patients' rights: subject keys, erasure tombstones, legal hold and
//! retention by data class (docs/privacy.md).
//!
//! **Subject key.** An erased patient's identifier must not stay in the
//! database, yet the hub must still recognise the patient afterwards (a
//! late batch, an ADT replay, the lake's next export). The hub keeps a
//! random 32-byte *subject salt* per database and derives
//! `subject_key = HMAC-SHA256(salt, system ‖ 0x00 ‖ value)`; tombstones
//! hold that key and the device windows the patient's readings came from,
//! never the identifier. (Someone holding the database can still test a
//! guessed identifier against a tombstone: the salt is in the same
//! database. A tombstone says "this identifier was erased", nothing of the
//! erased data.) The lake derives its pseudonyms from the subject key
//! (`HMAC(lake key, subject_key)`), so it can find an erased patient's rows
//! without the identifier.

use ring::hmac;

/// Length of the subject salt and of a subject key.
pub const KEY_LEN: usize = 32;

/// A patient's subject key (see the module docs), hex in storage.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectKey(pub [u8; KEY_LEN]);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not secret, but no reason to print a linkable value in full.
        write!(f, "SubjectKey({}…)", &self.to_hex()[..8])
    }
}

impl SubjectKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

/// `HMAC-SHA256(salt, system ‖ 0x00 ‖ value)`: the NUL keeps
/// (`"a"`, `"bc"`) and (`"ab"`, `"c"`) apart (neither part holds a NUL:
/// identifiers are validated text).
pub fn subject_key(salt: &[u8; KEY_LEN], system: &str, value: &str) -> SubjectKey {
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(system.as_bytes());
    ctx.update(&[0]);
    ctx.update(value.as_bytes());
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(ctx.sign().as_ref());
    SubjectKey(out)
}

/// A device's time window whose readings belonged to an erased patient:
/// readings of the device with `from_us <= effective < to_us` arriving
/// after the erasure are dropped (and counted), never stored or attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceWindow {
    pub gateway_id: String,
    pub device_id: String,
    pub from_us: i64,
    /// Exclusive end.
    pub to_us: i64,
}

impl DeviceWindow {
    pub fn covers(&self, gateway_id: &str, device_id: &str, effective_us: i64) -> bool {
        self.gateway_id == gateway_id
            && self.device_id == device_id
            && (self.from_us..self.to_us).contains(&effective_us)
    }
}

/// An erasure's tombstone as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Store-assigned, increasing: a cursor for the lake export.
    pub id: i64,
    pub subject: SubjectKey,
    /// When the erasure was applied (UTC µs).
    pub erased_us: i64,
    /// The device windows of the erased readings.
    pub windows: Vec<DeviceWindow>,
}

/// Whether a stay or attribution of the patient `subject` dated
/// `from_us` would bring back erased data: it starts before the
/// patient's newest erasure. (A new admission after the erasure is new
/// data and is allowed.)
pub fn revives_erased(tombstones: &[Tombstone], subject: &SubjectKey, from_us: i64) -> bool {
    tombstones
        .iter()
        .any(|t| &t.subject == subject && from_us < t.erased_us)
}

/// Erased patients as ingest checks readings that carry their own
/// identifier: the database's salt and each tombstone's (subject, time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedSubjects {
    pub salt: [u8; KEY_LEN],
    pub erased: Vec<(SubjectKey, i64)>,
}

impl ErasedSubjects {
    /// Whether a reading of patient (`system`, `value`) at `at_us` is data
    /// from before that patient's erasure. The system as the reading gave
    /// it and as the hub stores it may differ (an HL7 authority mapped to
    /// a URI): both are tried by the caller's stored form; here, the given
    /// system and the empty one.
    pub fn covers(&self, system: &str, value: &str, at_us: i64) -> bool {
        if self.erased.is_empty() {
            return false;
        }
        let keys = [
            subject_key(&self.salt, system, value),
            subject_key(&self.salt, "", value),
        ];
        self.erased
            .iter()
            .any(|(k, erased_us)| at_us < *erased_us && keys.contains(k))
    }
}

/// A stay of the patient being erased: at `bed` during `[from, to)`
/// (`to` = the erasure time for a stay still open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedStay {
    pub bed: String,
    pub from_us: i64,
    pub to_us: i64,
}

/// A placement of a device at a bed during `[from, to)` (`to` = `i64::MAX`
/// when open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementSpan {
    pub gateway_id: String,
    pub device_id: String,
    pub bed: String,
    pub from_us: i64,
    pub to_us: i64,
}

/// A device's span of readings attributed to a patient: gateway, device,
/// first and last effective time.
pub type ObservedSpan = (String, String, i64, i64);

/// The device windows of an erasure: each placement at a bed of a stay,
/// cut to the stay, plus each device's span of readings attributed to the
/// patient (`observed`: gateway, device, first and last effective time;
/// readings with the patient's own identifier or a config association are
/// there too); overlapping or touching windows of a device merged, sorted.
pub fn erasure_windows(
    stays: &[ErasedStay],
    placements: &[PlacementSpan],
    observed: &[ObservedSpan],
) -> Vec<DeviceWindow> {
    let mut all: Vec<DeviceWindow> = Vec::new();
    for s in stays {
        for p in placements.iter().filter(|p| p.bed == s.bed) {
            let (from, to) = (s.from_us.max(p.from_us), s.to_us.min(p.to_us));
            if from < to {
                all.push(DeviceWindow {
                    gateway_id: p.gateway_id.clone(),
                    device_id: p.device_id.clone(),
                    from_us: from,
                    to_us: to,
                });
            }
        }
    }
    for (g, d, first, last) in observed {
        all.push(DeviceWindow {
            gateway_id: g.clone(),
            device_id: d.clone(),
            from_us: *first,
            to_us: last.saturating_add(1),
        });
    }
    all.sort_by(|a, b| {
        (&a.gateway_id, &a.device_id, a.from_us).cmp(&(&b.gateway_id, &b.device_id, b.from_us))
    });
    let mut merged: Vec<DeviceWindow> = Vec::with_capacity(all.len());
    for w in all {
        match merged.last_mut() {
            Some(m)
                if m.gateway_id == w.gateway_id
                    && m.device_id == w.device_id
                    && w.from_us <= m.to_us =>
            {
                m.to_us = m.to_us.max(w.to_us);
            }
            _ => merged.push(w),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_keys_separate_system_and_value_and_depend_on_the_salt() {
        let salt = [7u8; KEY_LEN];
        let a = subject_key(&salt, "a", "bc");
        let b = subject_key(&salt, "ab", "c");
        assert_ne!(a, b);
        assert_eq!(a, subject_key(&salt, "a", "bc"));
        assert_ne!(a, subject_key(&[8u8; KEY_LEN], "a", "bc"));
        assert_eq!(SubjectKey::from_hex(&a.to_hex()), Some(a));
        assert_eq!(SubjectKey::from_hex("abcd"), None);
    }

    #[test]
    fn subject_key_is_hmac_sha256_of_the_documented_message() {
        // The documented construction, checked against a one-shot HMAC of
        // the whole message.
        let salt = [0x0bu8; KEY_LEN];
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salt);
        let expected = hmac::sign(&key, b"urn:oid:1.2.3\x00MRN-1");
        assert_eq!(
            subject_key(&salt, "urn:oid:1.2.3", "MRN-1").0.as_slice(),
            expected.as_ref()
        );
    }

    #[test]
    fn windows_are_half_open_and_per_device() {
        let w = DeviceWindow {
            gateway_id: "gw".into(),
            device_id: "d".into(),
            from_us: 10,
            to_us: 20,
        };
        assert!(w.covers("gw", "d", 10));
        assert!(w.covers("gw", "d", 19));
        assert!(!w.covers("gw", "d", 20));
        assert!(!w.covers("gw", "e", 15));
    }

    fn w(g: &str, d: &str, from_us: i64, to_us: i64) -> DeviceWindow {
        DeviceWindow {
            gateway_id: g.into(),
            device_id: d.into(),
            from_us,
            to_us,
        }
    }

    #[test]
    fn windows_are_placements_cut_to_stays_plus_observed_spans_merged() {
        let stays = [
            ErasedStay {
                bed: "b1".into(),
                from_us: 100,
                to_us: 200,
            },
            ErasedStay {
                bed: "b2".into(),
                from_us: 200,
                to_us: 300,
            },
        ];
        let p = |g: &str, d: &str, bed: &str, from_us, to_us| PlacementSpan {
            gateway_id: g.into(),
            device_id: d.into(),
            bed: bed.into(),
            from_us,
            to_us,
        };
        let placements = [
            // Placed before the stay, still open: cut to [100, 200).
            p("gw", "mon", "b1", 0, i64::MAX),
            // At the second bed for part of that stay.
            p("gw", "spo2", "b2", 250, 400),
            // At b1 after the stay ended: not the patient's.
            p("gw", "bp", "b1", 200, 500),
            // Another bed: not the patient's.
            p("gw", "x", "b3", 0, i64::MAX),
        ];
        // A reading attributed to the patient by its own identifier just
        // after the first window, and one overlapping it.
        let observed = [
            ("gw".to_string(), "mon".to_string(), 150, 200),
            ("gw".to_string(), "oru".to_string(), 7, 7),
        ];
        assert_eq!(
            erasure_windows(&stays, &placements, &observed),
            vec![
                w("gw", "mon", 100, 201),
                w("gw", "oru", 7, 8),
                w("gw", "spo2", 250, 300),
            ]
        );
        assert!(erasure_windows(&[], &placements, &[]).is_empty());
    }

    #[test]
    fn erased_subjects_match_with_or_without_the_system_and_only_before_the_erasure() {
        let salt = [3u8; KEY_LEN];
        let e = ErasedSubjects {
            salt,
            erased: vec![(subject_key(&salt, "urn:oid:1.2", "MRN-1"), 1_000)],
        };
        assert!(e.covers("urn:oid:1.2", "MRN-1", 999));
        assert!(!e.covers("urn:oid:1.2", "MRN-1", 1_000));
        assert!(!e.covers("urn:oid:1.2", "MRN-2", 10));
        let bare = ErasedSubjects {
            salt,
            erased: vec![(subject_key(&salt, "", "MRN-1"), 1_000)],
        };
        assert!(bare.covers("urn:oid:9.9", "MRN-1", 10));
    }

    #[test]
    fn only_data_dated_before_the_erasure_is_blocked() {
        let s = SubjectKey([1; KEY_LEN]);
        let t = vec![Tombstone {
            id: 1,
            subject: s,
            erased_us: 100,
            windows: vec![],
        }];
        assert!(revives_erased(&t, &s, 99));
        assert!(!revives_erased(&t, &s, 100));
        assert!(!revives_erased(&t, &SubjectKey([2; KEY_LEN]), 0));
    }
}
