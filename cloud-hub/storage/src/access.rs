//! Accounts: local users, API tokens and browser sessions. Backends store
//! only what the hub gives them: Argon2id PHC strings, SHA-256 hex of tokens
//! and session ids, role names. Hashing, verification, the role mapping and
//! the session expiry rules are the hub's (`access::accounts`).

use crate::StoreError;

/// A user as stored (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// As written (`Role::as_str`); the hub maps it.
    pub role: String,
    pub created_us: i64,
    pub disabled_us: Option<i64>,
}

/// An API token as stored (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    pub role: String,
    pub created_us: i64,
    pub revoked_us: Option<i64>,
}

/// A session of an enabled user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: String,
    /// The user's role.
    pub role: String,
    pub csrf: String,
    pub created_us: i64,
    pub last_seen_us: i64,
}

/// Users, API tokens and sessions.
pub trait AccountStore {
    /// Creates a user; `false` (and nothing written) when the name exists.
    fn insert_user(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        created_us: i64,
    ) -> Result<bool, StoreError>;
    /// Replaces a user's password hash and deletes its sessions, in one
    /// transaction; `false` when there is no such user.
    fn set_password_hash(&self, name: &str, password_hash: &str) -> Result<bool, StoreError>;
    /// Disables a user at `now_us` (an earlier disabling time is kept) and
    /// deletes its sessions, in one transaction; `false` when there is no
    /// such user.
    fn disable_user(&self, name: &str, now_us: i64) -> Result<bool, StoreError>;
    /// All users, by name.
    fn users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// (role, password hash) of user `name` when it exists and is enabled.
    fn enabled_credentials(&self, name: &str) -> Result<Option<(String, String)>, StoreError>;
    /// Creates an API token (its SHA-256); `false` when the name exists.
    fn insert_api_token(
        &self,
        name: &str,
        token_sha256: &str,
        role: &str,
        created_us: i64,
    ) -> Result<bool, StoreError>;
    /// Revokes an API token at `now_us` (an earlier time is kept); `false`
    /// when there is no such token.
    fn revoke_api_token(&self, name: &str, now_us: i64) -> Result<bool, StoreError>;
    /// All API tokens, by name.
    fn api_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// (name, role) of the unrevoked token with this SHA-256.
    fn active_api_token(&self, token_sha256: &str) -> Result<Option<(String, String)>, StoreError>;
    /// Stores a session (its id's SHA-256), created and last seen at `now_us`.
    fn insert_session(
        &self,
        id_sha256: &str,
        user: &str,
        csrf: &str,
        now_us: i64,
    ) -> Result<(), StoreError>;
    /// The session with this id hash, when its user exists and is enabled.
    fn session(&self, id_sha256: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Sets a session's last-seen time.
    fn touch_session(&self, id_sha256: &str, now_us: i64) -> Result<(), StoreError>;
    /// Deletes a session (no error when there is none).
    fn delete_session(&self, id_sha256: &str) -> Result<(), StoreError>;
    /// Charges a login attempt to each of `counters`
    /// (`hub_domain::login_throttle`), atomically per counter (one upsert:
    /// hubs sharing the database count together, concurrent attempts each
    /// see their own count), and returns each counter as charged. A
    /// counter's count restarts when its window has passed or its lock has
    /// ended; a locked counter is returned unchanged; a counter whose count
    /// passes its `max` (with a `lock_us`) is locked until `now_us +
    /// lock_us`. Per-user counters are charged only when `user` names a
    /// user (`None` otherwise: random names store nothing per name).
    /// Counters idle for `login_throttle::STALE_US` are purged.
    fn charge_login(
        &self,
        user: Option<&str>,
        counters: &[hub_domain::login_throttle::Counter],
        now_us: i64,
    ) -> Result<Vec<Option<hub_domain::login_throttle::Count>>, StoreError>;
    /// Forgets one counter (a successful login clears its pair).
    fn clear_login_counter(&self, key: &str) -> Result<(), StoreError>;
}
