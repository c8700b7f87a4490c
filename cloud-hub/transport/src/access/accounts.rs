//! Local users (Argon2id password hashes), API bearer tokens and browser
//! sessions, kept through the store's `AccountStore` (SQLite schema v12,
//! PostgreSQL migration 2). The decisions are made here, once for both
//! backends: name rules, hashing and verification, the role mapping, the
//! session expiry and refresh rules; the backends only persist and load.
//!
//! Secrets are never stored: passwords as Argon2id PHC strings, tokens and
//! session ids as their SHA-256. Every function is blocking (call it from
//! `spawn_blocking` in async code).

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use hub_domain::login_throttle::{self, Decision};
use hub_storage::StoreError;
use ring::rand::{SecureRandom, SystemRandom};

use super::Role;
use crate::store::Store;

/// Prefix of API bearer tokens for people and scripts (`cloud-hub token create`).
pub const API_TOKEN_PREFIX: &str = "vgu_";

/// Shortest accepted password.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Errors of the account functions.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid name `{0}`: use 1-64 characters of A-Z a-z 0-9 . _ @ -")]
    InvalidName(String),
    #[error("the password must be at least {MIN_PASSWORD_LEN} characters")]
    WeakPassword,
    #[error("`{0}` already exists")]
    Exists(String),
    #[error("`{0}` not found")]
    NotFound(String),
    #[error("the system random number generator failed")]
    Rng,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Whether `name` is acceptable for a user or token (`[A-Za-z0-9._@-]{1,64}`).
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// 32 random bytes as 64 hex characters.
pub fn random_hex() -> Result<String, AccountError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AccountError::Rng)?;
    Ok(hex::encode(bytes))
}

/// Argon2id (the crate's default parameters: m = 19 MiB, t = 2, p = 1, the
/// OWASP minimum) with a 16-byte random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AccountError::WeakPassword);
    }
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| AccountError::Rng)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AccountError::Hash(e.to_string()))?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AccountError::Hash(e.to_string()))?
        .to_string())
}

/// A PHC hash of a random password, verified against when the user does not
/// exist, so that a login takes as long for an unknown name as for a wrong
/// password.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        hash_password(&random_hex().unwrap_or_else(|_| "x".repeat(64)))
            .unwrap_or_else(|_| String::new())
    })
}

/// Verifies `password` against a PHC string, computing Argon2id in memory
/// taken from [`ARGON2_MEMORY`] and given back afterwards: the ~19 MiB of
/// each check is allocated once per concurrent check and reused, instead
/// of a fresh allocation that the allocator keeps per thread (a login flood
/// through many threads grew the hub by that much per thread).
fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(h.algorithm),
        argon2::Params::try_from(&h),
    ) else {
        return false;
    };
    let version = match h.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; argon2::password_hash::Salt::MAX_LENGTH];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let mut memory = ARGON2_MEMORY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_default();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let ok = argon2::Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .is_ok()
        && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected);
    let mut pool = ARGON2_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < MAX_POOLED_MEMORY {
        pool.push(memory);
    }
    ok
}

/// Argon2 working memory of finished password checks, for the next ones
/// (as many as ran at once, bounded by `[auth] max_concurrent_logins`).
static ARGON2_MEMORY: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());
/// Most working memories kept (the largest `max_concurrent_logins`).
const MAX_POOLED_MEMORY: usize = 64;

/// A user as listed (never the hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub created_us: i64,
    pub disabled_us: Option<i64>,
}

/// An API token as listed (never the token).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenRow {
    pub name: String,
    pub role: Role,
    pub created_us: i64,
    pub revoked_us: Option<i64>,
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    pub created_us: i64,
    pub last_seen_us: i64,
}

fn role_of(s: &str) -> Role {
    // Only `Role::as_str` values are ever written; anything else (an edited
    // database) gets the least privilege there is: none of the roles' routes
    // but the operator's (no patient data).
    s.parse().unwrap_or(Role::Operator)
}

/// How often a live session's last-seen time is written at most.
const TOUCH_EVERY_US: i64 = 60_000_000;

/// What to do with a stored session at `now_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    /// Older than `max_age_us` or unused for `idle_us`: delete it.
    Expired,
    /// Live; its last-seen time is over a minute old: refresh it.
    Touch,
    Live,
}

fn session_state(
    now_us: i64,
    created_us: i64,
    last_seen_us: i64,
    idle_us: i64,
    max_age_us: i64,
) -> SessionState {
    if now_us.saturating_sub(created_us) > max_age_us
        || now_us.saturating_sub(last_seen_us) > idle_us
    {
        SessionState::Expired
    } else if now_us.saturating_sub(last_seen_us) > TOUCH_EVERY_US {
        SessionState::Touch
    } else {
        SessionState::Live
    }
}

/// Creates user `name` with `role` and `password`.
pub fn add_user(
    store: &Store,
    name: &str,
    role: Role,
    password: &str,
    now_us: i64,
) -> Result<(), AccountError> {
    if !is_valid_name(name) {
        return Err(AccountError::InvalidName(name.into()));
    }
    let hash = hash_password(password)?;
    if !store.insert_user(name, role.as_str(), &hash, now_us)? {
        return Err(AccountError::Exists(name.into()));
    }
    Ok(())
}

fn found(name: &str, exists: bool) -> Result<(), AccountError> {
    if exists {
        Ok(())
    } else {
        Err(AccountError::NotFound(name.into()))
    }
}

/// Sets a new password for `name` and ends all of its sessions.
pub fn set_password(store: &Store, name: &str, password: &str) -> Result<(), AccountError> {
    let hash = hash_password(password)?;
    found(name, store.set_password_hash(name, &hash)?)
}

/// Disables user `name` (it can no longer log in) and ends its sessions.
pub fn disable_user(store: &Store, name: &str, now_us: i64) -> Result<(), AccountError> {
    found(name, store.disable_user(name, now_us)?)
}

/// All users, by name.
pub fn list_users(store: &Store) -> Result<Vec<UserRow>, AccountError> {
    Ok(store
        .users()?
        .into_iter()
        .map(|u| UserRow {
            name: u.name,
            role: role_of(&u.role),
            created_us: u.created_us,
            disabled_us: u.disabled_us,
        })
        .collect())
}

/// The role of `name` when `password` is right and the user is enabled.
/// Takes as long for an unknown user as for a wrong password.
pub fn check_password(
    store: &Store,
    name: &str,
    password: &str,
) -> Result<Option<Role>, AccountError> {
    match store.enabled_credentials(name)? {
        Some((role, hash)) => Ok(verify_password(password, &hash).then(|| role_of(&role))),
        None => {
            verify_password(password, dummy_hash());
            Ok(None)
        }
    }
}

/// Creates API token `name` with `role`; returns the token (shown once).
pub fn create_token(
    store: &Store,
    name: &str,
    role: Role,
    now_us: i64,
) -> Result<String, AccountError> {
    if !is_valid_name(name) {
        return Err(AccountError::InvalidName(name.into()));
    }
    let token = format!("{API_TOKEN_PREFIX}{}", random_hex()?);
    let hash = crate::auth::hash_token(&token);
    if !store.insert_api_token(name, &hash, role.as_str(), now_us)? {
        return Err(AccountError::Exists(name.into()));
    }
    Ok(token)
}

/// Revokes API token `name` (401 from then on).
pub fn revoke_token(store: &Store, name: &str, now_us: i64) -> Result<(), AccountError> {
    found(name, store.revoke_api_token(name, now_us)?)
}

/// All API tokens, by name (never the tokens).
pub fn list_tokens(store: &Store) -> Result<Vec<TokenRow>, AccountError> {
    Ok(store
        .api_tokens()?
        .into_iter()
        .map(|t| TokenRow {
            name: t.name,
            role: role_of(&t.role),
            created_us: t.created_us,
            revoked_us: t.revoked_us,
        })
        .collect())
}

/// The (name, role) of an active API token.
pub fn token_principal(store: &Store, token: &str) -> Result<Option<(String, Role)>, AccountError> {
    let hash = crate::auth::hash_token(token);
    Ok(store
        .active_api_token(&hash)?
        .map(|(n, r)| (n, role_of(&r))))
}

/// Charges a login attempt by `name` from `source` to its throttling
/// counters (before the password is checked) and decides what to do.
pub fn charge_login(
    store: &Store,
    name: &str,
    source: &str,
    now_us: i64,
) -> Result<(Decision, String), AccountError> {
    let counters = login_throttle::counters(name, source);
    let user = is_valid_name(name).then_some(name);
    let counts = store.charge_login(user, &counters, now_us)?;
    let at = |i: usize| counts.get(i).copied().flatten();
    let counts = [at(0), at(1), at(2)];
    let [pair, ..] = counters;
    Ok((login_throttle::decide(&counts, now_us), pair.key))
}

/// A successful login: forgets its (account, source) pair's counter.
pub fn login_succeeded(store: &Store, pair_key: &str) -> Result<(), AccountError> {
    Ok(store.clear_login_counter(pair_key)?)
}

pub fn create_session(
    store: &Store,
    user: &str,
    now_us: i64,
) -> Result<(String, String), AccountError> {
    let (id, csrf) = (random_hex()?, random_hex()?);
    store.insert_session(&crate::auth::hash_token(&id), user, &csrf, now_us)?;
    Ok((id, csrf))
}

/// The live session with id `id`: not older than `max_age_us`, used within
/// `idle_us`, of an enabled user. Expired sessions are deleted; the
/// last-seen time is refreshed at most once a minute.
pub fn session(
    store: &Store,
    id: &str,
    now_us: i64,
    idle_us: i64,
    max_age_us: i64,
) -> Result<Option<SessionRow>, AccountError> {
    let hash = crate::auth::hash_token(id);
    let Some(s) = store.session(&hash)? else {
        return Ok(None);
    };
    match session_state(now_us, s.created_us, s.last_seen_us, idle_us, max_age_us) {
        SessionState::Expired => {
            store.delete_session(&hash)?;
            return Ok(None);
        }
        SessionState::Touch => store.touch_session(&hash, now_us)?,
        SessionState::Live => {}
    }
    Ok(Some(SessionRow {
        user: s.user,
        role: role_of(&s.role),
        csrf: s.csrf,
        created_us: s.created_us,
        last_seen_us: s.last_seen_us,
    }))
}

/// Ends session `id` (logout).
pub fn end_session(store: &Store, id: &str) -> Result<(), AccountError> {
    store.delete_session(&crate::auth::hash_token(id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_passwords_are_checked_before_anything_is_stored() {
        assert!(is_valid_name("ward-3.script@icu_1"));
        assert!(
            !is_valid_name("no spaces") && !is_valid_name("") && !is_valid_name(&"a".repeat(65))
        );
        assert!(matches!(
            hash_password("short"),
            Err(AccountError::WeakPassword)
        ));
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains("correct horse"));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password(
            "correct horse battery",
            "not a PHC string"
        ));
    }

    #[test]
    fn roles_map_back_and_an_unknown_one_gets_the_least_privilege() {
        for r in [Role::Clinician, Role::Biomed, Role::Operator, Role::Admin] {
            assert_eq!(role_of(r.as_str()), r);
        }
        assert_eq!(role_of("superuser"), Role::Operator);
    }

    #[test]
    fn sessions_expire_when_idle_or_old_and_are_touched_once_a_minute() {
        let (idle, max) = (30 * 60_000_000, 12 * 3600 * 1_000_000);
        let st = |now, created, seen| session_state(now, created, seen, idle, max);
        assert_eq!(st(10, 0, 0), SessionState::Live);
        assert_eq!(st(TOUCH_EVERY_US, 0, 0), SessionState::Live);
        assert_eq!(st(TOUCH_EVERY_US + 1, 0, 0), SessionState::Touch);
        assert_eq!(st(idle, 0, 0), SessionState::Touch);
        assert_eq!(st(idle + 1, 0, 0), SessionState::Expired);
        // Used recently but past the absolute lifetime.
        assert_eq!(st(max + 1, 0, max), SessionState::Expired);
        assert_eq!(st(max, 0, max), SessionState::Live);
    }
}
