//! Patient identifier systems as absolute URIs.
//!
//! FHIR `Identifier.system` is a URI; HL7 v2 gives an *assigning authority*
//! instead (CX.4, an HD: namespace id `&` universal id `&` universal id
//! type), and the ADT sending facility (MSH-4, also an HD). Copying the
//! namespace (`HOSP`) as the system would be invalid FHIR, and two
//! hospitals' `HOSP` would name the same patient. [`IdentifierSystems`]
//! (the hub's `[identifiers]` section) turns what a source gave into the
//! system URI the hub stores and serves, in this order:
//!
//! 1. empty: no system (`""`), unless the caller supplies a fallback (ADT:
//!    the sending facility's configured URI, then `[adt] patient_id_system`);
//! 2. a configured `[identifiers.authorities]` entry (looked up by the whole
//!    text, then by the HD namespace id, then by the HD universal id);
//! 3. an absolute URI (`scheme:…`, RFC 3986 §3.1): kept as is;
//! 4. an OID, or an HD whose universal id type is `ISO`: `urn:oid:<oid>`;
//!    an HD of type `UUID`: `urn:uuid:<uuid>`; of type `URI`: the URI;
//! 5. otherwise `base_uri` + the authority (HD namespace id, else universal
//!    id) percent-encoded (RFC 3986 unreserved characters kept), e.g.
//!    `HOSP` → `urn:vigil:authority:HOSP`.
//!
//! Mapping a mapped system returns it unchanged (table keys cannot be
//! absolute URIs), so stored systems can be migrated any number of times.

use std::collections::BTreeMap;

/// The default `[identifiers] base_uri`.
pub const DEFAULT_BASE_URI: &str = "urn:vigil:authority:";

/// Longest system the hub stores (as `PatientId::validate`).
pub const MAX_SYSTEM_LEN: usize = 256;

/// The `[identifiers]` mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierSystems {
    /// Prefix of systems made from an authority without a table entry.
    pub base_uri: String,
    /// Assigning authority (as given, its HD namespace id or universal id)
    /// → system URI.
    pub authorities: BTreeMap<String, String>,
    /// ADT sending facility (MSH-4 namespace id or universal id) → system
    /// URI of PID-3 identifiers without an assigning authority.
    pub facilities: BTreeMap<String, String>,
}

impl Default for IdentifierSystems {
    fn default() -> Self {
        Self {
            base_uri: DEFAULT_BASE_URI.into(),
            authorities: BTreeMap::new(),
            facilities: BTreeMap::new(),
        }
    }
}

/// A configuration error: the field (relative to `identifiers.`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidMapping {
    pub field: String,
    pub message: String,
}

/// Whether `s` is an absolute URI: an RFC 3986 scheme (a letter, then
/// letters, digits, `+`, `-`, `.`), `:`, and a non-empty rest without
/// whitespace or control characters.
pub fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut b = scheme.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
        && !rest.is_empty()
        && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Whether `s` is an ISO OID in dot notation (`1.2.840.10008`): at least
/// two numeric arcs, no leading zeros, first arc 0-2.
pub fn is_oid(s: &str) -> bool {
    let arcs: Vec<&str> = s.split('.').collect();
    arcs.len() >= 2
        && matches!(arcs[0], "0" | "1" | "2")
        && arcs.iter().all(|a| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && (a.len() == 1 || !a.starts_with('0'))
        })
}

/// Percent-encodes every byte but the RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An HL7 HD split into (namespace id, universal id, universal id type),
/// each trimmed; text without `&` is a namespace id alone.
fn hd(raw: &str) -> (&str, &str, &str) {
    let mut parts = raw.split('&').map(str::trim);
    (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    )
}

impl IdentifierSystems {
    /// Checks every URI; errors name the field (`base_uri`,
    /// `authorities."<key>"`, `facilities."<key>"`).
    pub fn validate(&self) -> Result<(), InvalidMapping> {
        let bad = |field: String, message: &str| InvalidMapping {
            field,
            message: message.into(),
        };
        if !is_absolute_uri(&self.base_uri) || self.base_uri.len() > MAX_SYSTEM_LEN / 2 {
            return Err(bad(
                "base_uri".into(),
                "must be an absolute URI (scheme:…) of at most 128 characters, e.g. \
                 `urn:vigil:authority:` or `https://hospital.example/id/`",
            ));
        }
        for (table, map) in [
            ("authorities", &self.authorities),
            ("facilities", &self.facilities),
        ] {
            for (key, uri) in map {
                let field = format!("{table}.\"{key}\"");
                if key.trim().is_empty() || key.chars().any(char::is_control) {
                    return Err(bad(field, "the key must be a non-empty name"));
                }
                if is_absolute_uri(key) {
                    return Err(bad(
                        field,
                        "the key is already an absolute URI (it is kept as is; list \
                         authorities, not URIs)",
                    ));
                }
                if !is_absolute_uri(uri) || uri.len() > MAX_SYSTEM_LEN {
                    return Err(bad(
                        field,
                        "must be an absolute URI (scheme:…) of at most 256 characters, \
                         e.g. `urn:oid:1.2.3.4` or `https://hospital.example/mrn`",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The system URI of a source's `raw` system (an assigning authority,
    /// an HD `ns&uid&type`, an OID or already a URI); `""` for an empty one.
    /// A non-empty `raw` always gives an absolute URI, and
    /// `system_uri(system_uri(x)) == system_uri(x)`.
    pub fn system_uri(&self, raw: &str) -> String {
        let raw = raw.trim();
        if raw.is_empty() {
            return String::new();
        }
        // Table keys are never absolute URIs (see `validate`), so looking
        // the whole text up first is the same as "table first".
        if let Some(uri) = self.authorities.get(raw) {
            return uri.clone();
        }
        if is_absolute_uri(raw) {
            return raw.to_owned();
        }
        let (ns, uid, kind) = hd(raw);
        for key in [ns, uid] {
            if let Some(uri) = self.authorities.get(key).filter(|_| !key.is_empty()) {
                return uri.clone();
            }
        }
        if is_oid(raw) {
            return format!("urn:oid:{raw}");
        }
        if !uid.is_empty() {
            let uri = match kind.to_ascii_uppercase().as_str() {
                "ISO" if is_oid(uid) => format!("urn:oid:{uid}"),
                "UUID" => format!("urn:uuid:{}", uid.to_ascii_lowercase()),
                "URI" => uid.to_owned(),
                _ if ns.is_empty() && is_oid(uid) => format!("urn:oid:{uid}"),
                _ => String::new(),
            };
            if is_absolute_uri(&uri) {
                return uri;
            }
        }
        let name = if ns.is_empty() { uid } else { ns };
        let name = if name.is_empty() { raw } else { name };
        format!("{}{}", self.base_uri, encode(name))
    }

    /// The system of a PID-3 identifier: its assigning authority mapped;
    /// without one, the sending facility's (MSH-4 namespace id, else
    /// universal id) configured URI, else `default` (`[adt]
    /// patient_id_system`) mapped, else `""`.
    pub fn patient_system(
        &self,
        authority: &str,
        facility: (&str, &str),
        default: Option<&str>,
    ) -> String {
        if !authority.trim().is_empty() {
            return self.system_uri(authority);
        }
        for key in [facility.0.trim(), facility.1.trim()] {
            if let Some(uri) = self.facilities.get(key).filter(|_| !key.is_empty()) {
                return uri.clone();
            }
        }
        default.map(|d| self.system_uri(d)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> IdentifierSystems {
        let mut c = IdentifierSystems::default();
        c.authorities
            .insert("HOSP".into(), "https://hosp.example/mrn".into());
        c.facilities
            .insert("WARDS".into(), "urn:oid:1.2.3.9".into());
        c
    }

    #[test]
    fn byte_level_examples() {
        let d = IdentifierSystems::default();
        let cases = [
            ("", ""),
            ("  ", ""),
            ("HOSP", "urn:vigil:authority:HOSP"),
            ("VIGILSIM", "urn:vigil:authority:VIGILSIM"),
            (
                "GOOD HEALTH HOSPITAL",
                "urn:vigil:authority:GOOD%20HEALTH%20HOSPITAL",
            ),
            (
                "St. Mary's/ü",
                "urn:vigil:authority:St.%20Mary%27s%2F%C3%BC",
            ),
            ("1.2.840.1", "urn:oid:1.2.840.1"),
            ("HOSP&1.2.3.4&ISO", "urn:oid:1.2.3.4"),
            ("&1.2.3.4&ISO", "urn:oid:1.2.3.4"),
            ("&1.2.3.4", "urn:oid:1.2.3.4"),
            ("HOSP&1.2.3.4&L", "urn:vigil:authority:HOSP"),
            ("HOSP&1.2.3.4", "urn:vigil:authority:HOSP"),
            ("X&https://a.example/id&URI", "https://a.example/id"),
            (
                "&6B29FC40-CA47-1067-B31D-00DD010662DA&UUID",
                "urn:uuid:6b29fc40-ca47-1067-b31d-00dd010662da",
            ),
            ("urn:oid:1.2.3", "urn:oid:1.2.3"),
            ("https://hosp.example/mrn", "https://hosp.example/mrn"),
            ("1.02.3", "urn:vigil:authority:1.02.3"),
            ("3.1", "urn:vigil:authority:3.1"),
        ];
        for (raw, want) in cases {
            assert_eq!(d.system_uri(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn table_first_then_facility_then_default() {
        let c = config();
        assert_eq!(c.system_uri("HOSP"), "https://hosp.example/mrn");
        assert_eq!(c.system_uri("HOSP&1.2.3.4&ISO"), "https://hosp.example/mrn");
        assert_eq!(c.system_uri("OTHER"), "urn:vigil:authority:OTHER");
        assert_eq!(
            c.patient_system("HOSP", ("WARDS", ""), None),
            "https://hosp.example/mrn"
        );
        assert_eq!(
            c.patient_system("", ("WARDS", ""), Some("X")),
            "urn:oid:1.2.3.9"
        );
        assert_eq!(c.patient_system("", ("", "WARDS"), None), "urn:oid:1.2.3.9");
        assert_eq!(
            c.patient_system("", ("LAB", ""), Some("X")),
            "urn:vigil:authority:X"
        );
        assert_eq!(
            c.patient_system("", ("LAB", ""), Some("urn:oid:1.2.3.4")),
            "urn:oid:1.2.3.4"
        );
        assert_eq!(c.patient_system("", ("LAB", ""), None), "");
        let based = IdentifierSystems {
            base_uri: "https://ids.example/authority/".into(),
            ..Default::default()
        };
        assert_eq!(
            based.system_uri("HOSP"),
            "https://ids.example/authority/HOSP"
        );
    }

    #[test]
    fn uri_and_oid_recognition() {
        for s in ["urn:oid:1.2", "https://a.example", "a+b-c.d:x", "urn:x"] {
            assert!(is_absolute_uri(s), "{s}");
        }
        for s in [
            "",
            "HOSP",
            ":x",
            "1a:x",
            "urn:",
            "urn:a b",
            "ur n:x",
            "HOSP&1.2&ISO",
        ] {
            assert!(!is_absolute_uri(s), "{s}");
        }
        for s in ["1.2", "2.16.840.1.113883", "0.0"] {
            assert!(is_oid(s), "{s}");
        }
        for s in ["1", "3.1", "1..2", "1.02", "1.2.", "1.a", ""] {
            assert!(!is_oid(s), "{s}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = config();
        assert_eq!(c.validate(), Ok(()));
        c.base_uri = "vigil".into();
        assert_eq!(c.validate().unwrap_err().field, "base_uri");
        let mut c = config();
        c.authorities.insert("LAB".into(), "LAB".into());
        assert_eq!(c.validate().unwrap_err().field, "authorities.\"LAB\"");
        let mut c = config();
        c.facilities.insert("F".into(), "not a uri".into());
        assert_eq!(c.validate().unwrap_err().field, "facilities.\"F\"");
        let mut c = config();
        c.authorities
            .insert("urn:oid:1.2".into(), "urn:oid:1.3".into());
        assert_eq!(
            c.validate().unwrap_err().field,
            "authorities.\"urn:oid:1.2\""
        );
    }

    fn arb_config() -> impl Strategy<Value = IdentifierSystems> {
        (
            prop::sample::select(vec![DEFAULT_BASE_URI, "https://ids.example/a/", "urn:x:"]),
            prop::collection::btree_map("[A-Z&.0-9]{1,6}", "urn:[a-z]{1,4}:[a-z0-9.]{1,6}", 0..4),
        )
            .prop_map(|(base, authorities)| IdentifierSystems {
                base_uri: base.into(),
                authorities,
                facilities: BTreeMap::new(),
            })
    }

    proptest! {
        #[test]
        fn always_absolute_and_idempotent(
            c in arb_config(),
            raw in prop_oneof![
                "\\PC{0,20}",
                "[A-Z]{1,5}(&[0-9.]{0,8}(&(ISO|UUID|URI|L)?)?)?",
                "[0-2](\\.[0-9]{1,3}){1,5}",
                "(urn|https):[a-z0-9./:]{1,12}",
            ],
        ) {
            prop_assume!(c.validate().is_ok());
            let once = c.system_uri(&raw);
            if raw.trim().is_empty() {
                prop_assert_eq!(&once, "");
            } else {
                prop_assert!(is_absolute_uri(&once), "{:?} → {:?}", raw, once);
            }
            prop_assert_eq!(c.system_uri(&once), once.clone());
        }
    }
}
