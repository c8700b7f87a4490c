//! Which partitions of a stream a hub replica should hold.
//!
//! Replicas share a stream's partitions through leases kept in the hub's
//! store: a lease names its owner and an expiry, and the store takes or
//! renews one only with a single conditional write (free, expired, or
//! already ours), so two replicas never both hold a live lease. No
//! consensus of our own: each replica, every renewal period, reads the
//! leases and the live replicas (each replica's own heartbeat row) and
//! applies [`plan`]:
//!
//! - its **quota** is an even share: with `n` partitions and `r` live
//!   replicas sorted by id, the first `n % r` take `n / r + 1`, the others
//!   `n / r` (the quotas add up to `n`);
//! - it **renews** what it holds up to its quota and **releases** the rest
//!   (its highest partitions), so a replica that joins finds partitions
//!   freed for it;
//! - it **claims** free or expired partitions up to its quota; a dead
//!   replica's leases expire and are claimed by the others.

use std::collections::BTreeSet;

/// One partition's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: i32,
    pub owner: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// What a replica should do this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeasePlan {
    /// Free or expired partitions to take (the store may refuse any of
    /// them if another replica was quicker).
    pub claim: Vec<i32>,
    /// Partitions this replica holds and keeps.
    pub renew: Vec<i32>,
    /// Partitions this replica holds beyond its quota: stop consuming,
    /// then release.
    pub release: Vec<i32>,
}

/// The number of partitions `me` should hold: an even share among the
/// live replicas (`me` counted even if missing from `live`).
pub fn quota(partitions: usize, live: &[String], me: &str) -> usize {
    let mut ids: BTreeSet<&str> = live.iter().map(String::as_str).collect();
    ids.insert(me);
    let r = ids.len();
    let index = ids.iter().position(|id| *id == me).unwrap_or(0);
    partitions / r + usize::from(index < partitions % r)
}

/// Decides which of `partitions` replica `me` claims, renews and releases,
/// given the stored `leases` (leases of other partitions are ignored), the
/// ids of the live replicas and the time `now_ms`.
pub fn plan(
    partitions: &[i32],
    leases: &[Lease],
    me: &str,
    live: &[String],
    now_ms: i64,
) -> LeasePlan {
    let partitions: BTreeSet<i32> = partitions.iter().copied().collect();
    let q = quota(partitions.len(), live, me);
    let lease_of = |p: i32| leases.iter().find(|l| l.partition == p);
    // Ours even if expired: nobody took it over, so the conditional renewal
    // still succeeds (and fails harmlessly if someone did meanwhile).
    let held: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|&p| lease_of(p).is_some_and(|l| l.owner == me))
        .collect();
    let mut out = LeasePlan::default();
    if held.len() > q {
        out.renew = held[..q].to_vec();
        out.release = held[q..].to_vec();
        return out;
    }
    out.renew = held.clone();
    let free: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|&p| lease_of(p).is_none_or(|l| l.owner != me && l.expires_at_ms <= now_ms))
        .collect();
    if free.is_empty() {
        return out;
    }
    // Start at a replica-specific place so replicas claiming at the same
    // time mostly go for different partitions.
    let start = {
        let mut ids: BTreeSet<&str> = live.iter().map(String::as_str).collect();
        ids.insert(me);
        let index = ids.iter().position(|id| *id == me).unwrap_or(0);
        index * free.len() / ids.len()
    };
    out.claim = free
        .iter()
        .cycle()
        .skip(start)
        .take(free.len())
        .copied()
        .take(q - held.len())
        .collect();
    out.claim.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn lease(p: i32, owner: &str, exp: i64) -> Lease {
        Lease {
            partition: p,
            owner: owner.into(),
            expires_at_ms: exp,
        }
    }

    #[test]
    fn quotas_add_up_and_differ_by_at_most_one() {
        let live = ids(&["a", "b", "c"]);
        assert_eq!(quota(4, &live, "a"), 2);
        assert_eq!(quota(4, &live, "b"), 1);
        assert_eq!(quota(4, &live, "c"), 1);
        assert_eq!(quota(2, &live, "c"), 0);
        // `me` counts even when its heartbeat is not stored yet.
        assert_eq!(quota(4, &ids(&["a"]), "b"), 2);
        assert_eq!(quota(0, &live, "a"), 0);
    }

    #[test]
    fn alone_claims_everything() {
        let p = plan(&[0, 1, 2], &[], "a", &ids(&["a"]), 0);
        assert_eq!(p.claim, vec![0, 1, 2]);
        assert!(p.renew.is_empty() && p.release.is_empty());
    }

    #[test]
    fn live_leases_of_others_are_left_alone_expired_ones_taken() {
        let leases = [lease(0, "b", 1_000), lease(1, "b", 500)];
        let p = plan(&[0, 1], &leases, "a", &ids(&["a"]), 600);
        // b is not live any more: a's quota is both, but 0 is still leased.
        assert_eq!(p.claim, vec![1]);
    }

    #[test]
    fn a_joining_replica_gets_partitions_released_for_it() {
        let leases: Vec<Lease> = (0..4).map(|p| lease(p, "a", 10_000)).collect();
        let live = ids(&["a", "b"]);
        let pa = plan(&[0, 1, 2, 3], &leases, "a", &live, 0);
        assert_eq!(pa.renew, vec![0, 1]);
        assert_eq!(pa.release, vec![2, 3]);
        let pb = plan(&[0, 1, 2, 3], &leases, "b", &live, 0);
        assert!(pb.claim.is_empty(), "nothing free yet");
        let after: Vec<Lease> = leases[..2].to_vec();
        assert_eq!(plan(&[0, 1, 2, 3], &after, "b", &live, 0).claim, vec![2, 3]);
    }

    #[test]
    fn own_expired_leases_are_renewed() {
        let p = plan(&[0], &[lease(0, "a", 5)], "a", &ids(&["a"]), 100);
        assert_eq!(p.renew, vec![0]);
        assert!(p.claim.is_empty());
    }

    /// The store's conditional write, as the storage crates implement it.
    fn apply(store: &mut BTreeMap<i32, Lease>, me: &str, p: &LeasePlan, now: i64, ttl: i64) {
        for part in &p.release {
            if store.get(part).is_some_and(|l| l.owner == me) {
                store.remove(part);
            }
        }
        for part in p.renew.iter().chain(&p.claim) {
            let ok = store
                .get(part)
                .is_none_or(|l| l.owner == me || l.expires_at_ms <= now);
            if ok {
                store.insert(*part, lease(*part, me, now + ttl));
            }
        }
    }

    fn rounds(
        store: &mut BTreeMap<i32, Lease>,
        parts: &[i32],
        live: &[String],
        now: i64,
        ttl: i64,
        n: usize,
    ) {
        for _ in 0..n {
            for me in live {
                let leases: Vec<Lease> = store.values().cloned().collect();
                let p = plan(parts, &leases, me, live, now);
                apply(store, me, &p, now, ttl);
            }
        }
    }

    fn check_balanced(
        store: &BTreeMap<i32, Lease>,
        parts: &[i32],
        live: &[String],
    ) -> Result<(), TestCaseError> {
        for p in parts {
            let owner = &store.get(p).map(|l| l.owner.clone());
            prop_assert!(
                owner.as_ref().is_some_and(|o| live.contains(o)),
                "partition {} owned by {:?}",
                p,
                owner
            );
        }
        for me in live {
            let n = store.values().filter(|l| &l.owner == me).count();
            prop_assert_eq!(n, quota(parts.len(), live, me), "replica {}", me);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn replicas_converge_to_a_balanced_exclusive_assignment(
            n_parts in 1usize..40,
            n_live in 1usize..6,
            order_seed in any::<u64>(),
        ) {
            let parts: Vec<i32> = (0..n_parts as i32).collect();
            let mut live: Vec<String> = (0..n_live).map(|i| format!("hub-{i}")).collect();
            // Any turn order.
            live.rotate_left((order_seed as usize) % n_live);
            let ttl = 1_000;
            let mut store = BTreeMap::new();
            rounds(&mut store, &parts, &live, 0, ttl, 2);
            check_balanced(&store, &parts, &live)?;

            // One more replica joins.
            live.push("hub-new".into());
            rounds(&mut store, &parts, &live, 10, ttl, 2);
            check_balanced(&store, &parts, &live)?;

            // The first one dies (kill -9: it releases nothing); the others
            // keep renewing, and take its partitions once its leases expire.
            let dead = live.remove(0);
            rounds(&mut store, &parts, &live, 20, ttl, 1);
            prop_assert!(store.values().all(|l| l.owner != dead || l.expires_at_ms > 20));
            rounds(&mut store, &parts, &live, 15 + ttl, ttl, 2);
            check_balanced(&store, &parts, &live)?;
        }

        #[test]
        fn never_claims_a_live_lease_of_another(
            owners in proptest::collection::vec((0u8..4, 0i64..100), 0..16),
            now in 0i64..100,
            me in 0u8..4,
        ) {
            let leases: Vec<Lease> = owners
                .iter()
                .enumerate()
                .map(|(p, (o, exp))| lease(p as i32, &format!("r{o}"), *exp))
                .collect();
            let parts: Vec<i32> = (0..16).collect();
            let live: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
            let me = format!("r{me}");
            let p = plan(&parts, &leases, &me, &live, now);
            let q = quota(parts.len(), &live, &me);
            prop_assert!(p.renew.len() + p.claim.len() <= q);
            for c in &p.claim {
                if let Some(l) = leases.iter().find(|l| l.partition == *c) {
                    prop_assert!(l.owner != me && l.expires_at_ms <= now);
                }
            }
            for r in p.renew.iter().chain(&p.release) {
                prop_assert!(leases.iter().any(|l| l.partition == *r && l.owner == me));
            }
        }
    }
}
