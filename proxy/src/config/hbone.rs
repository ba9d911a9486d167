//! `transport:` and `hbone:` of a service: how requests reach it. `sidecar` (the default) is
//! mTLS through the AUTO_PASSTHROUGH gateway; `hbone` and `double-hbone` are Istio ambient's
//! HTTP/2 CONNECT over mTLS (istio-wire.md §5), straight to the destination's ztunnel or through
//! an ambient east-west gateway. Documented in docs/config.md "HBONE (ambient)".

use std::net::SocketAddr;

use serde::Deserialize;
use serde_saphyr::Spanned;
use yamlconf::{line_of as line, Collector};

use super::schema::{parse_host_port, HostPort};
use crate::identity::ExpectedServer;

/// `transport:` values. Parsed from a spanned string rather than by serde, so that its errors
/// name the line of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    Sidecar,
    Hbone,
    DoubleHbone,
}

/// `hbone:` as written; which keys apply depends on `transport`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHbone {
    /// `hbone`: the destination's HBONE listener, `POD_IP:15008`.
    #[serde(default)]
    pub address: Option<Spanned<String>>,
    /// `hbone`: the CONNECT `:authority`, `POD_IP:PORT`; default the address's IP and the
    /// service's port.
    #[serde(default)]
    pub target: Option<Spanned<String>>,
    /// `double-hbone`: the ambient east-west gateway, `host:15008`.
    #[serde(default)]
    pub gateway: Option<Spanned<String>>,
    /// `double-hbone`: the SPIFFE ID the gateway must present.
    #[serde(default)]
    pub gateway_identity: Option<Spanned<String>>,
    /// `double-hbone`: this side's network name, sent as `x-forwarded-network`.
    #[serde(default)]
    pub network: Option<Spanned<String>>,
}

/// How requests reach a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// mTLS to the pod's sidecar through `mesh.gateway` (AUTO_PASSTHROUGH, SNI routed).
    Sidecar,
    /// HBONE: HTTP/2 CONNECT over mTLS, the app's bytes inside the CONNECT stream.
    Hbone(HboneRoute),
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Sidecar => "sidecar",
            Transport::Hbone(h) if h.gateway.is_some() => "double-hbone",
            Transport::Hbone(_) => "hbone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HboneRoute {
    /// Where the outer mTLS connection goes: the destination's HBONE listener, or the ambient
    /// east-west gateway.
    pub dial: HostPort,
    /// `:authority` of the CONNECT (of both CONNECTs for double HBONE): `IP:PORT` for single
    /// HBONE, `HOST:PORT` of the service through a gateway (istio-wire.md §5.2).
    pub authority: String,
    pub gateway: Option<HboneGateway>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HboneGateway {
    /// Who the gateway must be; the destination is checked against the service's `identity`
    /// on the inner TLS.
    pub identity: ExpectedServer,
    /// `x-forwarded-network` on the inner CONNECT.
    pub network: String,
}

/// `IP:PORT` as an HTTP authority: IPv6 in brackets (`[v6]:port`), as ztunnel writes it.
pub fn ip_authority(addr: SocketAddr) -> String {
    // SocketAddr's Display already brackets IPv6; drop any zone/flow info a caller could not
    // have meant (a scope id is meaningless to the remote side).
    SocketAddr::new(addr.ip(), addr.port()).to_string()
}

fn valid_network(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks `transport:` / `hbone:` of one service (named `svc`, on `host:port`) and builds its
/// transport. Errors go to `errs` with their line; the result is then unused.
pub(super) fn transport(
    svc: &str,
    kind: Option<&Spanned<String>>,
    raw: Option<&Spanned<RawHbone>>,
    host: &str,
    port: u16,
    errs: &mut Collector,
) -> Transport {
    let kind_line = kind.and_then(line);
    let kind_v = match kind.map(|k| k.value.as_str()) {
        None | Some("sidecar") => TransportKind::Sidecar,
        Some("hbone") => TransportKind::Hbone,
        Some("double-hbone") => TransportKind::DoubleHbone,
        Some(other) => {
            errs.at(
                kind_line,
                format!("invalid transport {other:?}: expected sidecar, hbone or double-hbone"),
            );
            return Transport::Sidecar;
        }
    };
    let Some(raw) = raw else {
        match kind_v {
            TransportKind::Sidecar => {}
            TransportKind::Hbone => errs.at(
                kind_line,
                format!("service {svc:?} has transport hbone but no hbone.address (the destination's POD_IP:15008)"),
            ),
            TransportKind::DoubleHbone => errs.at(
                kind_line,
                format!(
                    "service {svc:?} has transport double-hbone but no hbone section (gateway, gateway_identity, network)"
                ),
            ),
        }
        return Transport::Sidecar;
    };
    let h = &raw.value;
    let misplaced = |errs: &mut Collector, field: &Option<Spanned<String>>, key: &str, only: &str| {
        if let Some(f) = field {
            errs.at(line(f), format!("hbone.{key}: only for transport {only}"));
        }
    };
    match kind_v {
        TransportKind::Sidecar => {
            errs.at(
                line(raw),
                format!(
                    "service {svc:?}: hbone: needs transport hbone or double-hbone (the default transport is sidecar)"
                ),
            );
            Transport::Sidecar
        }
        TransportKind::Hbone => {
            misplaced(errs, &h.gateway, "gateway", "double-hbone");
            misplaced(errs, &h.gateway_identity, "gateway_identity", "double-hbone");
            misplaced(errs, &h.network, "network", "double-hbone");
            let Some(a) = &h.address else {
                errs.at(
                    line(raw),
                    "hbone.address is required for transport hbone: the destination's POD_IP:15008",
                );
                return Transport::Sidecar;
            };
            // ztunnel checks the authority IP against the address it was dialed on, so both
            // must be literal addresses, never names.
            let Ok(dial) = a.value.parse::<SocketAddr>() else {
                errs.at(
                    line(a),
                    format!(
                        "invalid hbone.address {:?}: expected IP:PORT such as 10.1.2.3:15008",
                        a.value
                    ),
                );
                return Transport::Sidecar;
            };
            let target = match &h.target {
                None => SocketAddr::new(dial.ip(), port),
                Some(t) => match t.value.parse::<SocketAddr>() {
                    Ok(t) => t,
                    Err(_) => {
                        errs.at(
                            line(t),
                            format!(
                                "invalid hbone.target {:?}: expected POD_IP:PORT such as 10.1.2.3:9080",
                                t.value
                            ),
                        );
                        return Transport::Sidecar;
                    }
                },
            };
            if dial.port() == 0 || target.port() == 0 {
                errs.at(line(a), "hbone: port 0 is not a valid destination");
            }
            Transport::Hbone(HboneRoute {
                dial: HostPort {
                    host: dial.ip().to_string(),
                    port: dial.port(),
                },
                authority: ip_authority(target),
                gateway: None,
            })
        }
        TransportKind::DoubleHbone => {
            misplaced(errs, &h.address, "address", "hbone");
            misplaced(errs, &h.target, "target", "hbone");
            let mut missing = Vec::new();
            for (v, k) in [
                (&h.gateway, "gateway"),
                (&h.gateway_identity, "gateway_identity"),
                (&h.network, "network"),
            ] {
                if v.is_none() {
                    missing.push(k);
                }
            }
            if !missing.is_empty() {
                errs.at(
                    line(raw),
                    format!("transport double-hbone needs hbone.{}", missing.join(", hbone.")),
                );
                return Transport::Sidecar;
            }
            let (gw, id, net) = (
                h.gateway.as_ref().expect("checked"),
                h.gateway_identity.as_ref().expect("checked"),
                h.network.as_ref().expect("checked"),
            );
            let dial = match parse_host_port(&gw.value) {
                Ok(d) => d,
                Err(e) => {
                    errs.at(line(gw), format!("hbone.gateway: {e}"));
                    return Transport::Sidecar;
                }
            };
            if crate::identity::spiffe_trust_domain(&id.value).is_none() || id.value.contains(char::is_whitespace) {
                errs.at(
                    line(id),
                    format!(
                        "invalid hbone.gateway_identity {:?}: expected a SPIFFE ID such as spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway",
                        id.value
                    ),
                );
            }
            if !valid_network(&net.value) {
                errs.at(
                    line(net),
                    format!(
                        "invalid hbone.network {:?}: expected a network name such as network1",
                        net.value
                    ),
                );
            }
            Transport::Hbone(HboneRoute {
                dial,
                authority: format!("{host}:{port}"),
                gateway: Some(HboneGateway {
                    identity: ExpectedServer::Exact(vec![id.value.clone()]),
                    network: net.value.clone(),
                }),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_authorities_bracket_v6() {
        assert_eq!(ip_authority("10.1.2.3:9080".parse().unwrap()), "10.1.2.3:9080");
        assert_eq!(ip_authority("[fd00::1]:9080".parse().unwrap()), "[fd00::1]:9080");
        assert_eq!(ip_authority("[fe80::1%3]:9080".parse().unwrap()), "[fe80::1]:9080");
    }

    #[test]
    fn network_names() {
        assert!(valid_network("network1"));
        assert!(valid_network("vm-net.a_b"));
        assert!(!valid_network(""));
        assert!(!valid_network("a b"));
        assert!(!valid_network("a\r\nx: y"));
    }
}
