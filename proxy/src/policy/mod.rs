//! Who is the client, and may it reach a service: tenants by API key or by source subnet.
//!
//! Rules (the config contract): a request that presents a key belongs to the tenant holding that
//! key, and if that tenant lists `sources` the client address must be in them. A request without a
//! key belongs to the key-less tenant with the longest matching source prefix. Nothing matches →
//! denied. Keys are stored and compared only as SHA-256 digests: the lookup is by digest, so
//! timing reveals nothing about the key itself, and a config file never holds a usable secret.

pub mod keys;
pub mod limits;

use std::collections::HashMap;
use std::net::IpAddr;

pub use keys::{hash_key, PresentedKey};

pub type TenantId = usize;

pub use crate::config::{Allow, Tenant};

/// Why a client was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Deny {
    #[error("client address is not in any tenant")]
    UnknownClient,
    #[error("invalid API key")]
    BadKey,
    #[error("API key not accepted from this client address")]
    KeyWrongSource,
    #[error("service not allowed for tenant")]
    ServiceNotAllowed,
}

#[derive(Debug, Clone, Default)]
pub struct Tenants {
    tenants: Vec<Tenant>,
    by_key: HashMap<[u8; 32], TenantId>,
    /// Key-less tenants' sources by prefix length, longest first, so the first hit is the best
    /// one: a client costs one hash lookup per distinct prefix length, however many tenants.
    keyless: Vec<PrefixBucket>,
}

#[derive(Debug, Clone)]
struct PrefixBucket {
    v4: bool,
    len: u8,
    /// Network address (as bits) → tenants with that exact network, in config order.
    nets: HashMap<u128, Vec<TenantId>>,
}

/// The address bits of `ip` with everything past `len` cleared, and whether it is IPv4.
fn masked(ip: IpAddr, len: u8) -> (bool, u128) {
    let (v4, bits, width) = match ip {
        IpAddr::V4(a) => (true, u128::from(u32::from(a)), 32u8),
        IpAddr::V6(a) => (false, u128::from(a), 128u8),
    };
    let len = len.min(width);
    if len == 0 {
        return (v4, 0);
    }
    (v4, bits & (u128::MAX << (width - len)))
}

/// IPv4 clients reach a dual-stack listener as `::ffff:a.b.c.d`; match them as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Tenants {
    /// Builds the lookup tables. Callers validate uniqueness of keys and of key-less sources.
    pub fn new(tenants: &[Tenant]) -> Tenants {
        let tenants = tenants.to_vec();
        let mut by_key = HashMap::new();
        let mut keyless: Vec<PrefixBucket> = Vec::new();
        for (id, t) in tenants.iter().enumerate() {
            for k in &t.key_hashes {
                by_key.insert(*k, id);
            }
            if t.key_hashes.is_empty() {
                for net in &t.sources {
                    let (v4, bits) = masked(net.network(), net.prefix_len());
                    let len = net.prefix_len();
                    let i = match keyless.iter().position(|b| b.v4 == v4 && b.len == len) {
                        Some(i) => i,
                        None => {
                            keyless.push(PrefixBucket {
                                v4,
                                len,
                                nets: HashMap::new(),
                            });
                            keyless.len() - 1
                        }
                    };
                    keyless[i].nets.entry(bits).or_default().push(id);
                }
            }
        }
        keyless.sort_by_key(|b| std::cmp::Reverse(b.len));
        Tenants {
            tenants,
            by_key,
            keyless,
        }
    }

    pub fn get(&self, id: TenantId) -> &Tenant {
        &self.tenants[id]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.iter()
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Decides the tenant of a request from its client address, the SHA-256 digest of the API
    /// key it presented (if any) and the VPC endpoint it came through (if known).
    pub fn authorize(&self, client: IpAddr, key_hash: Option<&[u8; 32]>, vpce: Option<&str>) -> Result<TenantId, Deny> {
        let client = canonical_ip(client);
        let vpce_ok = |t: &Tenant| t.vpce.is_empty() || vpce.is_some_and(|v| t.vpce.iter().any(|x| x == v));
        match key_hash {
            Some(h) => {
                let id = *self.by_key.get(h).ok_or(Deny::BadKey)?;
                let t = &self.tenants[id];
                if (t.sources.is_empty() || t.sources.iter().any(|n| n.contains(&client))) && vpce_ok(t) {
                    Ok(id)
                } else {
                    Err(Deny::KeyWrongSource)
                }
            }
            None => self
                .keyless
                .iter()
                .filter(|b| b.v4 == client.is_ipv4())
                .find_map(|b| {
                    let ids = b.nets.get(&masked(client, b.len).1)?;
                    ids.iter().copied().find(|id| vpce_ok(&self.tenants[*id]))
                })
                .ok_or(Deny::UnknownClient),
        }
    }

    pub fn allows(&self, tenant: TenantId, service: usize) -> bool {
        self.tenants[tenant].allow.allows(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> Tenants {
        Tenants::new(&[
            Tenant {
                name: "wide".into(),
                sources: vec![net("10.0.0.0/8")],
                vpce: vec![],
                key_hashes: vec![],
                allow: Allow::Services(vec![true, false]),
                rate_limit: None,
                max_concurrent_requests: None,
                identity: 0,
                telemetry: None,
            },
            Tenant {
                name: "billing".into(),
                sources: vec![net("10.20.0.0/16"), net("2001:db8::/32")],
                vpce: vec![],
                key_hashes: vec![],
                allow: Allow::Services(vec![false, true]),
                rate_limit: None,
                max_concurrent_requests: None,
                identity: 0,
                telemetry: None,
            },
            Tenant {
                name: "laptops".into(),
                sources: vec![],
                vpce: vec![],
                key_hashes: vec![hash_key("k1")],
                allow: Allow::All,
                rate_limit: None,
                max_concurrent_requests: None,
                identity: 0,
                telemetry: None,
            },
            Tenant {
                name: "ci".into(),
                sources: vec![net("192.168.1.0/24")],
                vpce: vec![],
                key_hashes: vec![hash_key("k2")],
                allow: Allow::All,
                rate_limit: None,
                max_concurrent_requests: None,
                identity: 0,
                telemetry: None,
            },
        ])
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(t.authorize(ip("10.20.3.4"), None, None), Ok(1));
        assert_eq!(t.authorize(ip("10.21.3.4"), None, None), Ok(0));
        assert_eq!(t.authorize(ip("2001:db8::5"), None, None), Ok(1));
    }

    #[test]
    fn mapped_ipv4_matches_ipv4_cidrs() {
        let t = table();
        assert_eq!(t.authorize(ip("::ffff:10.20.3.4"), None, None), Ok(1));
    }

    #[test]
    fn unknown_client_denied() {
        let t = table();
        assert_eq!(t.authorize(ip("172.16.0.1"), None, None), Err(Deny::UnknownClient));
        // A keyed tenant's sources never admit key-less requests.
        assert_eq!(t.authorize(ip("192.168.1.7"), None, None), Err(Deny::UnknownClient));
    }

    #[test]
    fn keys_pick_their_tenant_from_anywhere() {
        let t = table();
        assert_eq!(t.authorize(ip("172.16.0.1"), Some(&hash_key("k1")), None), Ok(2));
        // The key decides even inside another tenant's subnet.
        assert_eq!(t.authorize(ip("10.20.0.1"), Some(&hash_key("k1")), None), Ok(2));
    }

    #[test]
    fn bad_key_is_not_downgraded_to_source_match() {
        let t = table();
        assert_eq!(
            t.authorize(ip("10.20.0.1"), Some(&hash_key("nope")), None),
            Err(Deny::BadKey)
        );
    }

    #[test]
    fn key_with_sources_requires_both() {
        let t = table();
        assert_eq!(t.authorize(ip("192.168.1.9"), Some(&hash_key("k2")), None), Ok(3));
        assert_eq!(
            t.authorize(ip("192.168.2.9"), Some(&hash_key("k2")), None),
            Err(Deny::KeyWrongSource)
        );
    }

    #[test]
    fn vpce_restricts_a_tenant_to_its_endpoints() {
        let mut tenants = table().tenants;
        tenants.push(Tenant {
            name: "privatelink".into(),
            sources: vec![net("10.20.5.0/24")],
            vpce: vec!["vpce-1".into()],
            key_hashes: vec![],
            allow: Allow::All,
            rate_limit: None,
            max_concurrent_requests: None,
            identity: 0,
            telemetry: None,
        });
        let t = Tenants::new(&tenants);
        assert_eq!(t.authorize(ip("10.20.5.1"), None, Some("vpce-1")), Ok(4));
        // Not through the endpoint: the next best (shorter) prefix wins instead.
        assert_eq!(t.authorize(ip("10.20.5.1"), None, Some("vpce-2")), Ok(1));
        assert_eq!(t.authorize(ip("10.20.5.1"), None, None), Ok(1));
    }

    #[test]
    fn allow_lists() {
        let t = table();
        assert!(t.allows(0, 0));
        assert!(!t.allows(0, 1));
        assert!(t.allows(2, 1));
        assert!(!t.allows(1, 7));
    }

    #[test]
    fn prefix_index_matches_a_longest_prefix_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        let mut tenants = Vec::new();
        while tenants.len() < 300 {
            let len = rng.random_range(8..=32u8);
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (rng.random::<u32>() & 0x00ff_ffff));
            let n = IpNet::new(IpAddr::V4(addr), len).unwrap().trunc();
            if seen.insert(n) {
                tenants.push(Tenant {
                    name: format!("t{}", tenants.len()),
                    sources: vec![n],
                    vpce: vec![],
                    key_hashes: vec![],
                    allow: Allow::All,
                    rate_limit: None,
                    max_concurrent_requests: None,
                    identity: 0,
                    telemetry: None,
                });
            }
        }
        let t = Tenants::new(&tenants);
        for _ in 0..20_000 {
            let client = IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 | (rng.random::<u32>() & 0x00ff_ffff),
            ));
            let expected = tenants
                .iter()
                .enumerate()
                .filter(|(_, x)| x.sources[0].contains(&client))
                .max_by_key(|(_, x)| x.sources[0].prefix_len())
                .map(|(id, _)| id);
            assert_eq!(t.authorize(client, None, None).ok(), expected, "{client}");
        }
        assert_eq!(t.authorize(ip("11.0.0.1"), None, None), Err(Deny::UnknownClient));
        assert_eq!(
            t.authorize(ip("::ffff:10.0.0.1"), None, None),
            t.authorize(ip("10.0.0.1"), None, None)
        );
    }
}
