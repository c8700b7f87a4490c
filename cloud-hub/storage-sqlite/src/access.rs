//! `AccountStore` on SQLite (schema v12: users, api_tokens, sessions).

use hub_domain::login_throttle::{Count, Counter, STALE_US};
use hub_storage::{AccountStore, SessionRecord, StoreError, TokenRecord, UserRecord};
use rusqlite::{OptionalExtension, params};

use crate::{DbError, SqliteStore};

/// A user or token row: name, role, created, disabled/revoked (UTC µs).
type NamedRow = (String, String, i64, Option<i64>);

impl SqliteStore {
    /// Sets `assignment` (`?2` is the value) on user `name` and deletes its
    /// sessions in one transaction; whether the user exists.
    fn db_update_user(
        &self,
        name: &str,
        assignment: &str,
        value: &dyn rusqlite::ToSql,
    ) -> Result<bool, DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.execute(
            &format!("UPDATE users SET {assignment} WHERE name = ?1"),
            params![name, value],
        )?;
        tx.execute("DELETE FROM sessions WHERE user_name = ?1", params![name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// `(name, role, created_us, ended_us)` rows of `q`.
    fn db_named(&self, q: &str) -> Result<Vec<NamedRow>, DbError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(q)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn db_pair(&self, q: &str, key: &str) -> Result<Option<(String, String)>, DbError> {
        Ok(self
            .conn()?
            .query_row(q, params![key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn db_execute(&self, q: &str, p: &[&dyn rusqlite::ToSql]) -> Result<usize, DbError> {
        Ok(self.conn()?.execute(q, p)?)
    }
}

impl AccountStore for SqliteStore {
    fn insert_user(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        created_us: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.db_execute(
            "INSERT OR IGNORE INTO users (name, role, password_hash, created_us)
             VALUES (?1, ?2, ?3, ?4)",
            params![name, role, password_hash, created_us],
        )? > 0)
    }

    fn set_password_hash(&self, name: &str, password_hash: &str) -> Result<bool, StoreError> {
        Ok(self.db_update_user(name, "password_hash = ?2", &password_hash)?)
    }

    fn disable_user(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        Ok(self.db_update_user(name, "disabled_us = COALESCE(disabled_us, ?2)", &now_us)?)
    }

    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        Ok(self
            .db_named("SELECT name, role, created_us, disabled_us FROM users ORDER BY name")?
            .into_iter()
            .map(|(name, role, created_us, disabled_us)| UserRecord {
                name,
                role,
                created_us,
                disabled_us,
            })
            .collect())
    }

    fn enabled_credentials(&self, name: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self.db_pair(
            "SELECT role, password_hash FROM users WHERE name = ?1 AND disabled_us IS NULL",
            name,
        )?)
    }

    fn insert_api_token(
        &self,
        name: &str,
        token_sha256: &str,
        role: &str,
        created_us: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.db_execute(
            "INSERT OR IGNORE INTO api_tokens (name, token_sha256, role, created_us)
             VALUES (?1, ?2, ?3, ?4)",
            params![name, token_sha256, role, created_us],
        )? > 0)
    }

    fn revoke_api_token(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        Ok(self.db_execute(
            "UPDATE api_tokens SET revoked_us = COALESCE(revoked_us, ?2) WHERE name = ?1",
            params![name, now_us],
        )? > 0)
    }

    fn api_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self
            .db_named("SELECT name, role, created_us, revoked_us FROM api_tokens ORDER BY name")?
            .into_iter()
            .map(|(name, role, created_us, revoked_us)| TokenRecord {
                name,
                role,
                created_us,
                revoked_us,
            })
            .collect())
    }

    fn active_api_token(&self, token_sha256: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self.db_pair(
            "SELECT name, role FROM api_tokens WHERE token_sha256 = ?1 AND revoked_us IS NULL",
            token_sha256,
        )?)
    }

    fn insert_session(
        &self,
        id_sha256: &str,
        user: &str,
        csrf: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.db_execute(
            "INSERT INTO sessions (id_sha256, user_name, csrf, created_us, last_seen_us)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![id_sha256, user, csrf, now_us],
        )?;
        Ok(())
    }

    fn session(&self, id_sha256: &str) -> Result<Option<SessionRecord>, StoreError> {
        let conn = self.reader()?;
        conn.query_row(
            "SELECT s.user_name, u.role, s.csrf, s.created_us, s.last_seen_us
               FROM sessions s JOIN users u ON u.name = s.user_name
              WHERE s.id_sha256 = ?1 AND u.disabled_us IS NULL",
            params![id_sha256],
            |r| {
                Ok(SessionRecord {
                    user: r.get(0)?,
                    role: r.get(1)?,
                    csrf: r.get(2)?,
                    created_us: r.get(3)?,
                    last_seen_us: r.get(4)?,
                })
            },
        )
        .optional()
        .map_err(|e| DbError::from(e).into())
    }

    fn touch_session(&self, id_sha256: &str, now_us: i64) -> Result<(), StoreError> {
        self.db_execute(
            "UPDATE sessions SET last_seen_us = ?2 WHERE id_sha256 = ?1",
            params![id_sha256, now_us],
        )?;
        Ok(())
    }

    fn delete_session(&self, id_sha256: &str) -> Result<(), StoreError> {
        self.db_execute(
            "DELETE FROM sessions WHERE id_sha256 = ?1",
            params![id_sha256],
        )?;
        Ok(())
    }
    fn charge_login(
        &self,
        user: Option<&str>,
        counters: &[Counter],
        now_us: i64,
    ) -> Result<Vec<Option<Count>>, StoreError> {
        let f = || -> Result<Vec<Option<Count>>, DbError> {
            let mut conn = self.conn()?;
            let tx = conn.transaction()?;
            let is_user = match user {
                Some(name) => tx
                    .query_row("SELECT 1 FROM users WHERE name = ?1", params![name], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some(),
                None => false,
            };
            let mut out = Vec::with_capacity(counters.len());
            for c in counters {
                if c.per_user && !is_user {
                    out.push(None);
                    continue;
                }
                let (failures, locked_until_us): (i64, Option<i64>) = tx.query_row(
                    CHARGE_SQL,
                    params![c.key, now_us, c.window_us, c.max, c.lock_us],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                out.push(Some(Count {
                    failures: u32::try_from(failures).unwrap_or(u32::MAX),
                    locked_until_us,
                }));
            }
            tx.execute(
                "DELETE FROM login_throttle WHERE window_start_us < ?1
                    AND (locked_until_us IS NULL OR locked_until_us < ?2)",
                params![now_us - STALE_US, now_us],
            )?;
            tx.commit()?;
            Ok(out)
        };
        Ok(f()?)
    }
    fn clear_login_counter(&self, key: &str) -> Result<(), StoreError> {
        self.db_execute("DELETE FROM login_throttle WHERE key = ?1", params![key])?;
        Ok(())
    }
}

/// One login-throttle counter charged (`?1` key, `?2` now, `?3` window,
/// `?4` max, `?5` lock or NULL): a locked counter stays as it is; an
/// expired window or lock restarts the count at 1; past `max` with a lock
/// the counter locks. The SET expressions read the row as it was.
const CHARGE_SQL: &str = "
INSERT INTO login_throttle (key, failures, window_start_us, locked_until_us)
VALUES (?1, 1, ?2, CASE WHEN 1 > ?4 THEN ?2 + ?5 END)
ON CONFLICT (key) DO UPDATE SET
    failures = CASE
        WHEN login_throttle.locked_until_us > ?2 THEN login_throttle.failures
        WHEN login_throttle.locked_until_us IS NOT NULL
          OR login_throttle.window_start_us <= ?2 - ?3 THEN 1
        ELSE login_throttle.failures + 1 END,
    window_start_us = CASE
        WHEN login_throttle.locked_until_us > ?2 THEN login_throttle.window_start_us
        WHEN login_throttle.locked_until_us IS NOT NULL
          OR login_throttle.window_start_us <= ?2 - ?3 THEN ?2
        ELSE login_throttle.window_start_us END,
    locked_until_us = CASE
        WHEN login_throttle.locked_until_us > ?2 THEN login_throttle.locked_until_us
        WHEN login_throttle.locked_until_us IS NULL
         AND login_throttle.window_start_us > ?2 - ?3
         AND login_throttle.failures + 1 > ?4 THEN ?2 + ?5
        END
RETURNING failures, locked_until_us";

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("a.sqlite")).unwrap();
        (d, s)
    }

    #[test]
    fn only_the_hashes_given_are_stored() {
        let (_d, s) = store();
        assert!(
            s.insert_user("alice", "clinician", "$argon2id$x", 1)
                .unwrap()
        );
        assert!(!s.insert_user("alice", "admin", "$argon2id$y", 2).unwrap());
        assert!(s.insert_api_token("script", "ab12", "biomed", 3).unwrap());
        s.insert_session("cd34", "alice", "csrf-1", 4).unwrap();
        let conn = s.conn().unwrap();
        let stored: (String, String, String) = conn
            .query_row(
                "SELECT u.password_hash, t.token_sha256, s.id_sha256
                   FROM users u, api_tokens t, sessions s",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(stored, ("$argon2id$x".into(), "ab12".into(), "cd34".into()));
    }
}
