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
