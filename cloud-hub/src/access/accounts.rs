//! Local users (Argon2id password hashes), API bearer tokens and browser
//! sessions, in the hub's store (SQLite schema v12, PostgreSQL migration 2).
//!
//! Secrets are never stored: passwords as Argon2id PHC strings, tokens and
//! session ids as their SHA-256. Every function is blocking (call it from
//! `spawn_blocking` in async code).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{OptionalExtension, params};

use super::Role;
use crate::store::{Store, StoreError};

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

impl From<rusqlite::Error> for AccountError {
    fn from(e: rusqlite::Error) -> Self {
        AccountError::Store(e.into())
    }
}

impl From<hub_postgres::DbError> for AccountError {
    fn from(e: hub_postgres::DbError) -> Self {
        AccountError::Store(e.into())
    }
}

impl From<postgres::Error> for AccountError {
    fn from(e: postgres::Error) -> Self {
        AccountError::Store(e.into())
    }
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

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

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
    let n = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            Ok(p.conn()?.execute(
                "INSERT INTO users (name, role, password_hash, created_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &role.as_str(), &hash, &now_us],
            )?)
        })?
    } else {
        store.lock()?.execute(
            "INSERT OR IGNORE INTO users (name, role, password_hash, created_us) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), hash, now_us],
        )? as u64
    };
    if n == 0 {
        return Err(AccountError::Exists(name.into()));
    }
    Ok(())
}

/// Sets `column` of user `name` to `value` and ends the user's sessions,
/// in one transaction; `NotFound` when there is no such user. `keep_first`
/// keeps an earlier non-NULL value (a disabling time).
fn update_user<T>(
    store: &Store,
    name: &str,
    column: &str,
    value: T,
    keep_first: bool,
) -> Result<(), AccountError>
where
    T: postgres::types::ToSql + rusqlite::ToSql + Sync + Send,
{
    let set = |v: &str| {
        if keep_first {
            format!("{column} = COALESCE({column}, {v})")
        } else {
            format!("{column} = {v}")
        }
    };
    let n = if let Some(p) = store.postgres() {
        let q = format!("UPDATE users SET {} WHERE name = $1", set("$2"));
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            let mut c = p.conn()?;
            let mut tx = c.transaction()?;
            let n = tx.execute(q.as_str(), &[&name, &value])?;
            tx.execute("DELETE FROM sessions WHERE user_name = $1", &[&name])?;
            tx.commit()?;
            Ok(n)
        })?
    } else {
        let q = format!("UPDATE users SET {} WHERE name = ?1", set("?2"));
        let mut conn = store.lock()?;
        let tx = conn.transaction()?;
        let n = tx.execute(&q, params![name, value])?;
        tx.execute("DELETE FROM sessions WHERE user_name = ?1", params![name])?;
        tx.commit()?;
        n as u64
    };
    if n == 0 {
        return Err(AccountError::NotFound(name.into()));
    }
    Ok(())
}

/// Sets a new password for `name` and ends all of its sessions.
pub fn set_password(store: &Store, name: &str, password: &str) -> Result<(), AccountError> {
    update_user(
        store,
        name,
        "password_hash",
        hash_password(password)?,
        false,
    )
}

/// Disables user `name` (it can no longer log in) and ends its sessions.
pub fn disable_user(store: &Store, name: &str, now_us: i64) -> Result<(), AccountError> {
    update_user(store, name, "disabled_us", now_us, true)
}

/// A user or token row: name, role, created, disabled/revoked (UTC µs).
type NamedRow = (String, Role, i64, Option<i64>);

/// `(name, role, created_us, ended_us)` rows of query `q` (users or tokens).
fn list_named(store: &Store, q: &str) -> Result<Vec<NamedRow>, AccountError> {
    if let Some(p) = store.postgres() {
        return crate::pg::off_runtime(|| -> Result<_, AccountError> {
            Ok(p.conn()?
                .query(q, &[])?
                .iter()
                .map(|r| (r.get(0), role_of(r.get(1)), r.get(2), r.get(3)))
                .collect())
        });
    }
    let conn = store.lock()?;
    let mut stmt = conn.prepare(q)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                role_of(&r.get::<_, String>(1)?),
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// All users, by name.
pub fn list_users(store: &Store) -> Result<Vec<UserRow>, AccountError> {
    let q = "SELECT name, role, created_us, disabled_us FROM users ORDER BY name";
    Ok(list_named(store, q)?
        .into_iter()
        .map(|(name, role, created_us, disabled_us)| UserRow {
            name,
            role,
            created_us,
            disabled_us,
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
    const Q: &str = "SELECT role, password_hash FROM users WHERE name = $1 AND disabled_us IS NULL";
    let row: Option<(String, String)> = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<_, AccountError> {
            Ok(p.conn()?
                .query_opt(Q, &[&name])?
                .map(|r| (r.get(0), r.get(1))))
        })?
    } else {
        store
            .lock()?
            .query_row(&Q.replace("$1", "?1"), params![name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
    };
    match row {
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
    let n = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            Ok(p.conn()?.execute(
                "INSERT INTO api_tokens (name, token_sha256, role, created_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &hash, &role.as_str(), &now_us],
            )?)
        })?
    } else {
        store.lock()?.execute(
            "INSERT OR IGNORE INTO api_tokens (name, token_sha256, role, created_us) VALUES (?1, ?2, ?3, ?4)",
            params![name, hash, role.as_str(), now_us],
        )? as u64
    };
    if n == 0 {
        return Err(AccountError::Exists(name.into()));
    }
    Ok(token)
}

/// Revokes API token `name` (401 from then on).
pub fn revoke_token(store: &Store, name: &str, now_us: i64) -> Result<(), AccountError> {
    const Q: &str = "UPDATE api_tokens SET revoked_us = COALESCE(revoked_us, $2) WHERE name = $1";
    let n = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            Ok(p.conn()?.execute(Q, &[&name, &now_us])?)
        })?
    } else {
        store.lock()?.execute(
            &Q.replace("$1", "?1").replace("$2", "?2"),
            params![name, now_us],
        )? as u64
    };
    if n == 0 {
        return Err(AccountError::NotFound(name.into()));
    }
    Ok(())
}

/// All API tokens, by name (never the tokens).
pub fn list_tokens(store: &Store) -> Result<Vec<TokenRow>, AccountError> {
    let q = "SELECT name, role, created_us, revoked_us FROM api_tokens ORDER BY name";
    Ok(list_named(store, q)?
        .into_iter()
        .map(|(name, role, created_us, revoked_us)| TokenRow {
            name,
            role,
            created_us,
            revoked_us,
        })
        .collect())
}

/// The (name, role) of an active API token.
pub fn token_principal(store: &Store, token: &str) -> Result<Option<(String, Role)>, AccountError> {
    const Q: &str =
        "SELECT name, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_us IS NULL";
    let hash = crate::auth::hash_token(token);
    let row: Option<(String, String)> = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<_, AccountError> {
            Ok(p.conn()?
                .query_opt(Q, &[&hash])?
                .map(|r| (r.get(0), r.get(1))))
        })?
    } else {
        store
            .lock()?
            .query_row(&Q.replace("$1", "?1"), params![hash], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
    };
    Ok(row.map(|(n, r)| (n, role_of(&r))))
}

/// Starts a session for `user`: (session id for the cookie, CSRF token).
pub fn create_session(
    store: &Store,
    user: &str,
    now_us: i64,
) -> Result<(String, String), AccountError> {
    let (id, csrf) = (random_hex()?, random_hex()?);
    let hash = crate::auth::hash_token(&id);
    if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            Ok(p.conn()?.execute(
                "INSERT INTO sessions (id_sha256, user_name, csrf, created_us, last_seen_us)
                 VALUES ($1, $2, $3, $4, $4)",
                &[&hash, &user, &csrf, &now_us],
            )?)
        })?;
    } else {
        store.lock()?.execute(
            "INSERT INTO sessions (id_sha256, user_name, csrf, created_us, last_seen_us)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![hash, user, csrf, now_us],
        )?;
    }
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
    const Q: &str = "SELECT s.user_name, u.role, s.csrf, s.created_us, s.last_seen_us
          FROM sessions s JOIN users u ON u.name = s.user_name
         WHERE s.id_sha256 = $1 AND u.disabled_us IS NULL";
    const DEL: &str = "DELETE FROM sessions WHERE id_sha256 = $1";
    const TOUCH: &str = "UPDATE sessions SET last_seen_us = $2 WHERE id_sha256 = $1";
    let hash = crate::auth::hash_token(id);
    let row: Option<(String, String, String, i64, i64)> = if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<_, AccountError> {
            Ok(p.conn()?
                .query_opt(Q, &[&hash])?
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
        })?
    } else {
        store
            .lock()?
            .query_row(&Q.replace("$1", "?1"), params![hash], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?
    };
    let Some((user, role, csrf, created_us, last_seen_us)) = row else {
        return Ok(None);
    };
    let expired = now_us.saturating_sub(created_us) > max_age_us
        || now_us.saturating_sub(last_seen_us) > idle_us;
    let touch = !expired && now_us.saturating_sub(last_seen_us) > 60_000_000;
    if expired || touch {
        if let Some(p) = store.postgres() {
            crate::pg::off_runtime(|| -> Result<u64, AccountError> {
                let mut c = p.conn()?;
                Ok(if expired {
                    c.execute(DEL, &[&hash])?
                } else {
                    c.execute(TOUCH, &[&hash, &now_us])?
                })
            })?;
        } else {
            let conn = store.lock()?;
            if expired {
                conn.execute(&DEL.replace("$1", "?1"), params![hash])?;
            } else {
                conn.execute(
                    &TOUCH.replace("$1", "?1").replace("$2", "?2"),
                    params![hash, now_us],
                )?;
            }
        }
    }
    Ok((!expired).then(|| SessionRow {
        user,
        role: role_of(&role),
        csrf,
        created_us,
        last_seen_us,
    }))
}

/// Ends session `id` (logout).
pub fn end_session(store: &Store, id: &str) -> Result<(), AccountError> {
    let hash = crate::auth::hash_token(id);
    if let Some(p) = store.postgres() {
        crate::pg::off_runtime(|| -> Result<u64, AccountError> {
            Ok(p.conn()?
                .execute("DELETE FROM sessions WHERE id_sha256 = $1", &[&hash])?)
        })?;
    } else {
        store
            .lock()?
            .execute("DELETE FROM sessions WHERE id_sha256 = ?1", params![hash])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("a.sqlite")).unwrap();
        (d, s)
    }

    #[test]
    fn passwords_are_argon2id_and_checked() {
        let (_d, s) = store();
        add_user(&s, "alice", Role::Clinician, "correct horse battery", 1).unwrap();
        let stored: String = s
            .lock()
            .unwrap()
            .query_row("SELECT password_hash FROM users", [], |r| r.get(0))
            .unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("correct horse"));
        assert_eq!(
            check_password(&s, "alice", "correct horse battery").unwrap(),
            Some(Role::Clinician)
        );
        assert_eq!(
            check_password(&s, "alice", "wrong password!!").unwrap(),
            None
        );
        assert_eq!(
            check_password(&s, "bob", "correct horse battery").unwrap(),
            None
        );
        assert!(matches!(
            add_user(&s, "alice", Role::Admin, "another long password", 2),
            Err(AccountError::Exists(_))
        ));
        assert!(matches!(
            add_user(&s, "carol", Role::Admin, "short", 2),
            Err(AccountError::WeakPassword)
        ));
        assert!(matches!(
            add_user(&s, "no spaces", Role::Admin, "long enough password", 2),
            Err(AccountError::InvalidName(_))
        ));
        disable_user(&s, "alice", 3).unwrap();
        assert_eq!(
            check_password(&s, "alice", "correct horse battery").unwrap(),
            None
        );
    }

    #[test]
    fn sessions_expire_and_end_with_the_user() {
        let (_d, s) = store();
        add_user(&s, "alice", Role::Clinician, "correct horse battery", 0).unwrap();
        let (id, csrf) = create_session(&s, "alice", 0).unwrap();
        let idle = 30 * 60_000_000;
        let max = 12 * 3600 * 1_000_000;
        let live = session(&s, &id, 10, idle, max).unwrap().unwrap();
        assert_eq!((live.user.as_str(), live.role), ("alice", Role::Clinician));
        assert_eq!(live.csrf, csrf);
        assert!(
            session(&s, "not-a-session", 10, idle, max)
                .unwrap()
                .is_none()
        );
        // Touched at 20 and 45 min; idle out 30 min after the last touch.
        assert!(
            session(&s, &id, 20 * 60_000_000, idle, max)
                .unwrap()
                .is_some()
        );
        assert!(
            session(&s, &id, 45 * 60_000_000, idle, max)
                .unwrap()
                .is_some()
        );
        assert!(
            session(&s, &id, 76 * 60_000_000 + 1, idle, max)
                .unwrap()
                .is_none()
        );
        // Gone for good once expired.
        assert!(
            session(&s, &id, 46 * 60_000_000, idle, max)
                .unwrap()
                .is_none()
        );
        // Absolute lifetime, logout, and disabling end sessions too.
        let (id2, _) = create_session(&s, "alice", 0).unwrap();
        assert!(session(&s, &id2, max + 1, i64::MAX, max).unwrap().is_none());
        let (id3, _) = create_session(&s, "alice", 0).unwrap();
        end_session(&s, &id3).unwrap();
        assert!(session(&s, &id3, 1, idle, max).unwrap().is_none());
        let (id4, _) = create_session(&s, "alice", 0).unwrap();
        set_password(&s, "alice", "a new long password").unwrap();
        assert!(session(&s, &id4, 1, idle, max).unwrap().is_none());
        let (id5, _) = create_session(&s, "alice", 0).unwrap();
        disable_user(&s, "alice", 1).unwrap();
        assert!(session(&s, &id5, 1, idle, max).unwrap().is_none());
    }

    #[test]
    fn api_tokens_are_stored_hashed_and_revocable() {
        let (_d, s) = store();
        let t = create_token(&s, "ward-script", Role::Clinician, 0).unwrap();
        assert!(t.starts_with(API_TOKEN_PREFIX) && t.len() == 68);
        let stored: String = s
            .lock()
            .unwrap()
            .query_row("SELECT token_sha256 FROM api_tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, t);
        assert_eq!(
            token_principal(&s, &t).unwrap(),
            Some(("ward-script".into(), Role::Clinician))
        );
        revoke_token(&s, "ward-script", 5).unwrap();
        assert_eq!(token_principal(&s, &t).unwrap(), None);
        assert_eq!(list_tokens(&s).unwrap()[0].revoked_us, Some(5));
        assert!(matches!(
            revoke_token(&s, "nope", 5),
            Err(AccountError::NotFound(_))
        ));
    }
}
