//! Login throttling: the policy (pure; the counters live in the store,
//! charged atomically by `AccessStore::charge_login`, so every replica and
//! a restarted hub see the same counts).
//!
//! An attempt is charged to three counters **before** its password is
//! checked (so concurrent guesses cannot race past a limit: each sees the
//! count its own charge produced):
//! - the **(account, source) pair**: [`PAIR_MAX_FAILURES`] attempts per
//!   [`PAIR_WINDOW_US`], then that pair is locked for [`PAIR_LOCK_US`].
//!   Only the pair: an anonymous flood against `nurse` from one address does
//!   not lock the real nurse out from hers;
//! - the **account** from any source: past [`ACCOUNT_FREE_FAILURES`] in the
//!   window each attempt waits a step-up delay (doubling, at most
//!   [`MAX_STEP_UP_MS`]) before its check: never a hard lock, so the real
//!   user still gets in, only slower, while a distributed guesser is slowed
//!   to a crawl;
//! - the **source** over all accounts (spraying one password over many
//!   names): the same step-up past [`SOURCE_FREE_FAILURES`]; a delay, not a
//!   lock, since a hospital's workstations may share one address.
//!
//! A successful login clears its pair's counter only (the account and
//! source counters fall back at the end of their window), so a success does
//! not hand a guesser a fresh allowance. Names that are not users charge
//! only the source counter (random names store nothing per name).

/// Attempts per (account, source) pair within the window before the pair
/// is locked.
pub const PAIR_MAX_FAILURES: u32 = 5;
/// The counting window of every counter: 15 minutes.
pub const PAIR_WINDOW_US: i64 = 15 * 60 * 1_000_000;
/// How long a locked pair is refused: 5 minutes.
pub const PAIR_LOCK_US: i64 = 5 * 60 * 1_000_000;
/// Attempts on one account (any source) within the window without delay.
pub const ACCOUNT_FREE_FAILURES: u32 = 10;
/// Attempts from one source (any account) within the window without delay.
pub const SOURCE_FREE_FAILURES: u32 = 30;
/// The longest step-up delay.
pub const MAX_STEP_UP_MS: u64 = 8_000;
/// The first step-up delay (doubling with each further attempt).
pub const FIRST_STEP_UP_MS: u64 = 500;
/// Counters idle this long are purged by the store.
pub const STALE_US: i64 = 24 * 3600 * 1_000_000;

/// One counter an attempt is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Store key (`pair`/`account`/`source` + the name and/or address).
    pub key: String,
    /// Charged only when the user name is a user.
    pub per_user: bool,
    pub window_us: i64,
    /// Attempts in the window before the counter locks (only with
    /// `lock_us`).
    pub max: u32,
    /// `None`: never locks (step-up only).
    pub lock_us: Option<i64>,
}

/// A counter after its charge, as the store returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Attempts in the current window, this one included.
    pub failures: u32,
    /// Refused until then (UTC µs), when locked.
    pub locked_until_us: Option<i64>,
}

/// The three counters of an attempt by `user` from `source` (an IP
/// address as text), in the order pair, account, source.
pub fn counters(user: &str, source: &str) -> [Counter; 3] {
    [
        Counter {
            key: format!("pair {user} {source}"),
            per_user: true,
            window_us: PAIR_WINDOW_US,
            max: PAIR_MAX_FAILURES,
            lock_us: Some(PAIR_LOCK_US),
        },
        Counter {
            key: format!("account {user}"),
            per_user: true,
            window_us: PAIR_WINDOW_US,
            max: ACCOUNT_FREE_FAILURES,
            lock_us: None,
        },
        Counter {
            key: format!("source {source}"),
            per_user: false,
            window_us: PAIR_WINDOW_US,
            max: SOURCE_FREE_FAILURES,
            lock_us: None,
        },
    ]
}

/// What to do with a charged attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Refuse without checking the password: the pair is locked.
    Locked { retry_after_s: u64 },
    /// Check the password after waiting `delay_ms` (0: at once).
    Check { delay_ms: u64 },
}

/// The step-up delay of a counter at `failures` with `free` attempts
/// without delay: 0 up to `free`, then 0.5 s doubling, at most 8 s.
pub fn step_up_ms(failures: u32, free: u32) -> u64 {
    match failures.checked_sub(free) {
        None | Some(0) => 0,
        Some(over) => {
            let doublings = (over - 1).min(16);
            (FIRST_STEP_UP_MS << doublings).min(MAX_STEP_UP_MS)
        }
    }
}

/// Decides from the charged counts (`None`: a per-user counter of a name
/// that is not a user, not charged).
pub fn decide(counts: &[Option<Count>; 3], now_us: i64) -> Decision {
    if let Some(Count {
        locked_until_us: Some(until),
        ..
    }) = counts[0]
        && until > now_us
    {
        let secs = (until - now_us).unsigned_abs().div_ceil(1_000_000);
        return Decision::Locked {
            retry_after_s: secs.max(1),
        };
    }
    let delay = |c: &Option<Count>, free| c.map_or(0, |c| step_up_ms(c.failures, free));
    Decision::Check {
        delay_ms: delay(&counts[1], ACCOUNT_FREE_FAILURES)
            .max(delay(&counts[2], SOURCE_FREE_FAILURES)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000;

    fn c(failures: u32, locked_until_us: Option<i64>) -> Option<Count> {
        Some(Count {
            failures,
            locked_until_us,
        })
    }

    #[test]
    fn a_locked_pair_is_refused_with_the_seconds_left() {
        let d = decide(
            &[c(6, Some(NOW + 299_000_001)), c(6, None), c(6, None)],
            NOW,
        );
        assert_eq!(d, Decision::Locked { retry_after_s: 300 });
        // An expired lock refuses nothing.
        let d = decide(&[c(1, Some(NOW)), c(1, None), c(1, None)], NOW);
        assert_eq!(d, Decision::Check { delay_ms: 0 });
    }

    #[test]
    fn the_account_and_source_step_up_and_never_lock() {
        assert_eq!(step_up_ms(10, ACCOUNT_FREE_FAILURES), 0);
        assert_eq!(step_up_ms(11, ACCOUNT_FREE_FAILURES), 500);
        assert_eq!(step_up_ms(12, ACCOUNT_FREE_FAILURES), 1_000);
        assert_eq!(step_up_ms(14, ACCOUNT_FREE_FAILURES), 4_000);
        assert_eq!(step_up_ms(15, ACCOUNT_FREE_FAILURES), 8_000);
        assert_eq!(step_up_ms(10_000, ACCOUNT_FREE_FAILURES), 8_000);
        assert_eq!(step_up_ms(u32::MAX, 0), 8_000);
        // A flood on the account from elsewhere delays the real user (a
        // fresh pair) but does not refuse her.
        let d = decide(&[c(1, None), c(500, None), c(1, None)], NOW);
        assert_eq!(d, Decision::Check { delay_ms: 8_000 });
        // A spraying source is slowed on every account it tries.
        let d = decide(&[None, None, c(31, None)], NOW);
        assert_eq!(d, Decision::Check { delay_ms: 500 });
    }

    #[test]
    fn counters_name_pair_account_and_source() {
        let [pair, account, source] = counters("nurse", "203.0.113.7");
        assert_eq!(pair.key, "pair nurse 203.0.113.7");
        assert_eq!(pair.lock_us, Some(PAIR_LOCK_US));
        assert!(pair.per_user && account.per_user && !source.per_user);
        assert_eq!(account.lock_us, None);
        assert_eq!(source.lock_us, None);
        assert_eq!(source.key, "source 203.0.113.7");
    }
}
