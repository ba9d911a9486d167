//! Pools made on demand, one per destination: a host a pattern matched (or an `auto`
//! service) with its port, the protocol the client's request calls for and the identity the
//! tenant presents. At most `upstream.max_dynamic_destinations` exist; making one more closes
//! the least recently used (its in-flight requests keep their own handles and finish).
//!
//! Eviction scans for the oldest entry: O(n) with n at most the cap, paid only when a new
//! destination arrives at a full table, never on a request to a known one.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::UpstreamProtocol;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub service: usize,
    pub host: String,
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub identity: usize,
}

struct Entry<P> {
    pool: P,
    used: u64,
}

struct Table<P> {
    tick: u64,
    entries: HashMap<DestKey, Entry<P>>,
}

/// Generic over the pool so the eviction order can be tested without connections.
pub struct Destinations<P> {
    cap: usize,
    table: Mutex<Table<P>>,
}

impl<P: Clone> Destinations<P> {
    pub fn new(cap: usize) -> Destinations<P> {
        Destinations {
            cap: cap.max(1),
            table: Mutex::new(Table {
                tick: 0,
                entries: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<P>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool of `key`, made by `make` if there is none (`None` from `make`: no pool, and
    /// nothing is evicted).
    pub fn get_or_make(&self, key: &DestKey, make: impl FnOnce() -> Option<P>) -> Option<P> {
        let mut t = self.lock();
        t.tick += 1;
        let tick = t.tick;
        if let Some(e) = t.entries.get_mut(key) {
            e.used = tick;
            return Some(e.pool.clone());
        }
        let pool = make()?;
        self.insert_locked(&mut t, key.clone(), pool.clone());
        Some(pool)
    }

    /// Adds a pool taken over from the previous config, as if just used.
    pub fn insert(&self, key: DestKey, pool: P) {
        let mut t = self.lock();
        self.insert_locked(&mut t, key, pool);
    }

    fn insert_locked(&self, t: &mut Table<P>, key: DestKey, pool: P) {
        t.tick += 1;
        let used = t.tick;
        while t.entries.len() >= self.cap {
            let oldest = t.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    tracing::debug!(host = %k.host, port = k.port, "closing the least recently used dynamic destination");
                    t.entries.remove(&k);
                }
                None => break,
            }
        }
        t.entries.insert(key, Entry { pool, used });
    }

    /// Every destination and its pool, most recently used first.
    pub fn list(&self) -> Vec<(DestKey, P)> {
        let t = self.lock();
        let mut v: Vec<(u64, DestKey, P)> = t
            .entries
            .iter()
            .map(|(k, e)| (e.used, k.clone(), e.pool.clone()))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.0));
        v.into_iter().map(|(_, k, p)| (k, p)).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str) -> DestKey {
        DestKey {
            service: 0,
            host: host.into(),
            port: 9080,
            protocol: UpstreamProtocol::Http1,
            identity: 0,
        }
    }

    #[test]
    fn least_recently_used_goes_first() {
        let d: Destinations<u32> = Destinations::new(2);
        assert_eq!(d.get_or_make(&key("a"), || Some(1)), Some(1));
        assert_eq!(d.get_or_make(&key("b"), || Some(2)), Some(2));
        // `a` used again: `b` is now the oldest, and the third destination replaces it.
        assert_eq!(d.get_or_make(&key("a"), || panic!("a exists")), Some(1));
        assert_eq!(d.get_or_make(&key("c"), || Some(3)), Some(3));
        assert_eq!(d.len(), 2);
        let hosts: Vec<String> = d.list().into_iter().map(|(k, _)| k.host).collect();
        assert_eq!(hosts, ["c", "a"]);
        // `b` comes back as a new pool.
        assert_eq!(d.get_or_make(&key("b"), || Some(4)), Some(4));
        assert_eq!(
            d.list().into_iter().map(|(k, _)| k.host).collect::<Vec<_>>(),
            ["b", "c"]
        );
    }

    #[test]
    fn a_refused_destination_takes_no_slot() {
        let d: Destinations<u32> = Destinations::new(1);
        d.get_or_make(&key("a"), || Some(1));
        assert_eq!(d.get_or_make(&key("b"), || None), None);
        assert_eq!(d.list().len(), 1);
        // Protocol and identity are part of the key: one host, two pools.
        let mut h2 = key("a");
        h2.protocol = UpstreamProtocol::Http2;
        let d: Destinations<u32> = Destinations::new(4);
        d.get_or_make(&key("a"), || Some(1));
        assert_eq!(d.get_or_make(&h2, || Some(2)), Some(2));
        assert_eq!(d.len(), 2);
    }
}
