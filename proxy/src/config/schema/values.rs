//! The value types of the schema: addresses, host:port lists, CIDRs, durations, one-or-many
//! lists and maps that keep their order and their keys' lines; each checked while parsing.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A socket address `IP:PORT`, checked while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(Addr).map_err(|_| {
            de::Error::custom(format!(
                "invalid address {s:?}: expected IP:PORT such as 0.0.0.0:8080 or [::]:8080"
            ))
        })
    }
}

/// One or more gateway `host:port`s; each name may resolve to several addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTarget(pub Vec<HostPort>);

impl fmt::Display for GatewayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, hp) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{hp}")?;
        }
        Ok(())
    }
}

/// `host:port` where host is a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(HostPort {
            host: sa.ip().to_string(),
            port: sa.port(),
        });
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid address {s:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid port in {s:?}: expected 1-65535"))?;
    if port == 0 {
        return Err(format!("invalid port in {s:?}: expected 1-65535"));
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid_host {
        return Err(format!("invalid host in {s:?}: expected a DNS name or IP"));
    }
    Ok(HostPort {
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_host_port(&s).map_err(de::Error::custom)
    }
}

/// An IP network in CIDR notation; a bare address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        // 10.20.0.5/16 is almost always a typo for 10.20.0.0/16; refuse rather than guess.
        if net.trunc() != net {
            return Err(format!(
                "invalid CIDR {s:?}: host bits are set (did you mean {}?)",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    Err(format!(
        "invalid CIDR {s:?}: expected e.g. 10.20.0.0/16 or 2001:db8::/32"
    ))
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_cidr(&s).map(Cidr).map_err(de::Error::custom)
    }
}

/// A duration such as `250ms`, `5s`, `2m` or `1h` (the shared syntax), which must be positive:
/// every duration in meshgate's config is a timeout or an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = yamlconf::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("invalid duration {:?}: must be positive", s.trim()));
    }
    Ok(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

/// A scalar or a list of scalars.
#[derive(Debug)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `#[serde(untagged)]`: that buffers the input and loses the YAML spans.
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let t = T::deserialize(de::value::StrDeserializer::<E>::new(v))?;
                Ok(OneOrMany(vec![t]))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A YAML mapping kept in file order, with the line of each key, so errors about an entry can
/// point at it. Duplicate keys are rejected by the YAML parser itself.
#[derive(Debug)]
pub struct OrderedMap<V>(pub Vec<(Spanned<String>, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapV<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapV<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Spanned<String>, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        d.deserialize_map(MapV(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.20.0.0/16").unwrap().to_string(), "10.20.0.0/16");
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("2001:db8::/32").unwrap().prefix_len(), 32);
        assert!(parse_cidr("10.20.0.5/16").unwrap_err().contains("10.20.0.0/16"));
        assert!(parse_cidr("10.20.0.0/33").is_err());
        assert!(parse_cidr("banana").is_err());
    }

    #[test]
    fn host_ports() {
        let hp = parse_host_port("EastWest.mesh.example.com:15443").unwrap();
        assert_eq!(hp.host, "eastwest.mesh.example.com");
        assert_eq!(hp.port, 15443);
        let hp = parse_host_port("[::1]:15443").unwrap();
        assert_eq!(hp.host, "::1");
        assert_eq!(hp.to_string(), "[::1]:15443");
        assert!(parse_host_port("gateway").is_err());
        assert!(parse_host_port("gateway:0").is_err());
        assert!(parse_host_port("bad host:1").is_err());
        assert!(parse_host_port("a..b:1").is_err());
    }
}
