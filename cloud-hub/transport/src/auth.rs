//! Gateway bearer tokens: `vgt_` + 64 hex characters (32 random bytes from
//! the system CSPRNG). Only the SHA-256 of a token is stored.

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Prefix of every gateway token.
pub const TOKEN_PREFIX: &str = "vgt_";

/// Errors creating a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the system random number generator failed")]
    Rng,
}

/// A fresh random token.
pub fn generate_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Rng)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// Prefix of one-time enrolment tokens (`cloud-hub enrollment create`).
pub const ENROLLMENT_PREFIX: &str = "vge_";

/// A fresh random enrolment token.
pub fn generate_enrollment_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Rng)?;
    Ok(format!("{ENROLLMENT_PREFIX}{}", hex::encode(bytes)))
}

/// Whether `s` has the form of an enrolment token.
pub fn is_enrollment_token(s: &str) -> bool {
    s.strip_prefix(ENROLLMENT_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The stored form of a token: hex SHA-256 of its UTF-8 bytes.
pub fn hash_token(token: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, token.as_bytes()))
}

/// Extracts the token from an `Authorization: Bearer <token>` header value.
/// Returns `None` when the header is not a well-formed Vigil bearer token.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    let hex_part = token.strip_prefix(TOKEN_PREFIX)?;
    (hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit())).then_some(token)
}

/// Whether `id` is an acceptable gateway id (`[A-Za-z0-9._-]{1,64}`).
pub fn is_valid_gateway_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_well_formed() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(bearer_token(&format!("Bearer {a}")), Some(a.as_str()));
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer vgt_xyz"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn gateway_ids() {
        assert!(is_valid_gateway_id("gw-demo_1.a"));
        assert!(!is_valid_gateway_id(""));
        assert!(!is_valid_gateway_id("gw demo"));
    }
}
