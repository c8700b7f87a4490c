//! `AccountStore` on PostgreSQL (migration 2: users, api_tokens, sessions).

use hub_domain::login_throttle::{Count, Counter, STALE_US};
use hub_storage::{AccountStore, SessionRecord, StoreError, TokenRecord, UserRecord};
use tokio_postgres::types::ToSql;

use crate::{DbError, PgStore};

/// A user or token row: name, role, created, disabled/revoked (UTC µs).
type NamedRow = (String, String, i64, Option<i64>);

impl PgStore {
    /// Sets `assignment` (`$2` is the value) on user `name` and deletes its
    /// sessions in one transaction; whether the user exists.
    async fn db_update_user(
        &self,
        name: &str,
        assignment: &str,
        value: &(dyn ToSql + Sync),
    ) -> Result<bool, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                format!("UPDATE users SET {assignment} WHERE name = $1").as_str(),
                &[&name, value],
            )
            .await?;
        tx.execute("DELETE FROM sessions WHERE user_name = $1", &[&name])
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// `(name, role, created_us, ended_us)` rows of `q`.
    async fn db_named(&self, q: &str) -> Result<Vec<NamedRow>, DbError> {
        Ok(self
            .conn()
            .await?
            .query(q, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn db_pair(&self, q: &str, key: &str) -> Result<Option<(String, String)>, DbError> {
        Ok(self
            .conn()
            .await?
            .query_opt(q, &[&key])
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    async fn db_execute(&self, q: &str, p: &[&(dyn ToSql + Sync)]) -> Result<u64, DbError> {
        Ok(self.conn().await?.execute(q, p).await?)
    }

    async fn db_session(&self, id_sha256: &str) -> Result<Option<SessionRecord>, DbError> {
        Ok(self
            .conn()
            .await?
            .query_opt(
                "SELECT s.user_name, u.role, s.csrf, s.created_us, s.last_seen_us
                   FROM sessions s JOIN users u ON u.name = s.user_name
                  WHERE s.id_sha256 = $1 AND u.disabled_us IS NULL",
                &[&id_sha256],
            )
            .await?
            .map(|r| SessionRecord {
                user: r.get(0),
                role: r.get(1),
                csrf: r.get(2),
                created_us: r.get(3),
                last_seen_us: r.get(4),
            }))
    }
}

impl AccountStore for PgStore {
    fn insert_user(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        created_us: i64,
    ) -> Result<bool, StoreError> {
        self.run(async {
            Ok(self.db_execute(
                "INSERT INTO users (name, role, password_hash, created_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &role, &password_hash, &created_us],
            ).await? > 0)
        })
    }

    fn set_password_hash(&self, name: &str, password_hash: &str) -> Result<bool, StoreError> {
        self.run(self.db_update_user(name, "password_hash = $2", &password_hash))
    }

    fn disable_user(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        self.run(self.db_update_user(name, "disabled_us = COALESCE(disabled_us, $2)", &now_us))
    }

    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = self.run(async {
            self.db_named("SELECT name, role, created_us, disabled_us FROM users ORDER BY name")
                .await
        })?;
        Ok(rows
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
        self.run(async {
            self.db_pair(
                "SELECT role, password_hash FROM users WHERE name = $1 AND disabled_us IS NULL",
                name,
            )
            .await
        })
    }

    fn insert_api_token(
        &self,
        name: &str,
        token_sha256: &str,
        role: &str,
        created_us: i64,
    ) -> Result<bool, StoreError> {
        self.run(async {
            Ok(self
                .db_execute(
                    "INSERT INTO api_tokens (name, token_sha256, role, created_us)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                    &[&name, &token_sha256, &role, &created_us],
                )
                .await?
                > 0)
        })
    }

    fn revoke_api_token(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        self.run(async {
            Ok(self
                .db_execute(
                    "UPDATE api_tokens SET revoked_us = COALESCE(revoked_us, $2) WHERE name = $1",
                    &[&name, &now_us],
                )
                .await?
                > 0)
        })
    }

    fn api_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.run(async {
            self.db_named("SELECT name, role, created_us, revoked_us FROM api_tokens ORDER BY name")
                .await
        })?;
        Ok(rows
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
        self.run(async {
            self.db_pair(
                "SELECT name, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_us IS NULL",
                token_sha256,
            )
            .await
        })
    }

    fn insert_session(
        &self,
        id_sha256: &str,
        user: &str,
        csrf: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.run(async {
            self.db_execute(
                "INSERT INTO sessions (id_sha256, user_name, csrf, created_us, last_seen_us)
                 VALUES ($1, $2, $3, $4, $4)",
                &[&id_sha256, &user, &csrf, &now_us],
            )
            .await
            .map(drop)
        })
    }

    fn session(&self, id_sha256: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.run(self.db_session(id_sha256))
    }

    fn touch_session(&self, id_sha256: &str, now_us: i64) -> Result<(), StoreError> {
        self.run(async {
            self.db_execute(
                "UPDATE sessions SET last_seen_us = $2 WHERE id_sha256 = $1",
                &[&id_sha256, &now_us],
            )
            .await
            .map(drop)
        })
    }

    fn delete_session(&self, id_sha256: &str) -> Result<(), StoreError> {
        self.run(async {
            self.db_execute("DELETE FROM sessions WHERE id_sha256 = $1", &[&id_sha256])
                .await
                .map(drop)
        })
    }
    fn charge_login(
        &self,
        user: Option<&str>,
        counters: &[Counter],
        now_us: i64,
    ) -> Result<Vec<Option<Count>>, StoreError> {
        self.run(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await?;
            let is_user = match user {
                Some(name) => tx
                    .query_opt("SELECT 1 FROM users WHERE name = $1", &[&name])
                    .await?
                    .is_some(),
                None => false,
            };
            let stmt = tx.prepare_cached(CHARGE_SQL).await?;
            let mut out = Vec::with_capacity(counters.len());
            for ctr in counters {
                if ctr.per_user && !is_user {
                    out.push(None);
                    continue;
                }
                let max = i64::from(ctr.max);
                let row = tx
                    .query_one(
                        &stmt,
                        &[&ctr.key, &now_us, &ctr.window_us, &max, &ctr.lock_us],
                    )
                    .await?;
                out.push(Some(Count {
                    failures: u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX),
                    locked_until_us: row.get(1),
                }));
            }
            tx.execute(
                "DELETE FROM login_throttle WHERE window_start_us < $1
                    AND (locked_until_us IS NULL OR locked_until_us < $2)",
                &[&(now_us - STALE_US), &now_us],
            )
            .await?;
            tx.commit().await?;
            Ok(out)
        })
    }
    fn clear_login_counter(&self, key: &str) -> Result<(), StoreError> {
        self.run(async {
            self.db_execute("DELETE FROM login_throttle WHERE key = $1", &[&key])
                .await
                .map(drop)
        })
    }
}

/// One login-throttle counter charged (`$1` key, `$2` now, `$3` window,
/// `$4` max, `$5` lock or NULL): as on SQLite (the SET expressions read the
/// row as it was; the upsert takes the row's lock, so concurrent charges
/// of one counter from several hubs are counted one after the other).
const CHARGE_SQL: &str = "
INSERT INTO login_throttle AS t (key, failures, window_start_us, locked_until_us)
VALUES ($1, 1, $2, CASE WHEN 1 > $4::bigint THEN $2::bigint + $5::bigint END)
ON CONFLICT (key) DO UPDATE SET
    failures = CASE
        WHEN t.locked_until_us > $2 THEN t.failures
        WHEN t.locked_until_us IS NOT NULL OR t.window_start_us <= $2 - $3 THEN 1
        ELSE t.failures + 1 END,
    window_start_us = CASE
        WHEN t.locked_until_us > $2 THEN t.window_start_us
        WHEN t.locked_until_us IS NOT NULL OR t.window_start_us <= $2 - $3 THEN $2
        ELSE t.window_start_us END,
    locked_until_us = CASE
        WHEN t.locked_until_us > $2 THEN t.locked_until_us
        WHEN t.locked_until_us IS NULL AND t.window_start_us > $2 - $3
         AND t.failures + 1 > $4 THEN $2::bigint + $5::bigint
        END
RETURNING failures, locked_until_us";
