//! Listeners: names, addresses, protocols and what each protocol allows (PROXY headers, TLS,
//! a TCP listener's service, Alt-Svc).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use yamlconf::{line_of as line, Collector};

use super::super::schema::{ListenerProtocol, RawConfig, UpstreamProtocol};
use super::super::{Listener, Service};
use super::*;
use serde_saphyr::Spanned;

/// Idle TCP connections are closed after this unless the listener says otherwise (Envoy's
/// `tcp_proxy` default is 1 h as well).
const DEFAULT_TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

pub(super) struct Listeners {
    pub list: Vec<Listener>,
    /// The `service:` each listener names (tcp listeners), resolved once services are known.
    services: Vec<Option<Spanned<String>>>,
    /// TCP addresses bound, and by which listener (the admin server must not take one).
    pub binds: HashMap<std::net::SocketAddr, String>,
}

pub(super) fn listeners(path: &Path, raw: &RawConfig, errs: &mut Collector) -> Listeners {
    if raw.listeners.is_empty() {
        errs.at(None, "at least one listener is required");
    }
    let mut listeners = Vec::new();
    let mut listener_services = Vec::new();
    let mut listener_names: HashMap<String, Option<u64>> = HashMap::new();
    let mut binds: HashMap<std::net::SocketAddr, String> = HashMap::new();
    let mut udp_binds: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for l in &raw.listeners {
        let name = &l.name.value;
        if !valid_name(name) {
            errs.at(
                line(&l.name),
                format!("invalid listener name {name:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        if let Some(prev) = listener_names.insert(name.clone(), line(&l.name)) {
            errs.at(
                line(&l.name),
                format!(
                    "duplicate listener name {name:?} (first defined on line {})",
                    prev.unwrap_or(0)
                ),
            );
        }
        // Port 0 asks the OS for a free port: never a clash. An h3 listener is UDP: it may
        // share its address with a TCP listener (HTTP/3 on 443/udp beside HTTP on 443/tcp).
        let fixed_port = l.bind.value.0.port() != 0;
        let binds = if l.protocol == ListenerProtocol::H3 {
            &mut udp_binds
        } else {
            &mut binds
        };
        // 0.0.0.0:P (or [::]:P) takes port P on every address: it clashes with any other
        // listener on P, as the bind itself would fail.
        let addr = l.bind.value.0;
        let clash = binds
            .iter()
            .find(|(a, _)| {
                fixed_port
                    && a.port() == addr.port()
                    && (**a == addr || a.ip().is_unspecified() || addr.ip().is_unspecified())
            })
            .map(|(_, other)| other.clone());
        if let Some(other) = clash {
            errs.at(
                line(&l.bind),
                format!(
                    "address {addr} is already bound by listener {other:?} (port {})",
                    addr.port()
                ),
            );
        }
        binds.insert(addr, name.clone());
        let mode = l.proxy_protocol.value;
        if mode != super::super::ProxyProtocolMode::Off && l.trusted_proxies.is_empty() {
            errs.at(
                line(&l.proxy_protocol),
                "proxy_protocol needs trusted_proxies: the load balancer addresses whose headers are believed",
            );
        }
        match (l.protocol, &l.service) {
            (ListenerProtocol::Tcp, None) => errs.at(
                line(&l.name),
                format!("listener {name:?} has protocol tcp but no service: name the service its connections go to"),
            ),
            (ListenerProtocol::Http | ListenerProtocol::H3 | ListenerProtocol::MeshInbound, Some(s)) => errs.at(
                line(s),
                "service: only tcp listeners have one (http and h3 listeners route by Host, mesh-inbound ones by SNI and Host)",
            ),
            _ => {}
        }
        if let (ListenerProtocol::Http | ListenerProtocol::H3, Some(t)) = (l.protocol, &l.idle_timeout) {
            errs.at(
                line(t),
                "idle_timeout: only for tcp listeners (http uses limits.header_read_timeout)",
            );
        }
        let tls = match (l.protocol, &l.tls) {
            (ListenerProtocol::H3, None) => {
                errs.at(
                    line(&l.name),
                    format!("listener {name:?} has protocol h3 but no tls: QUIC needs a server certificate (tls.cert_chain, tls.key)"),
                );
                None
            }
            (ListenerProtocol::H3, Some(t)) => {
                let cert = resolve_path(path, &t.value.cert_chain.value);
                let key = resolve_path(path, &t.value.key.value);
                match super::super::ListenerTls::load(&cert, &key) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let l = if e.contains("private key") {
                            line(&t.value.key)
                        } else {
                            line(&t.value.cert_chain)
                        };
                        errs.at(l, format!("listener {name:?} tls: {e}"));
                        None
                    }
                }
            }
            (_, Some(t)) => {
                errs.at(
                    line(t),
                    "tls: only h3 listeners have one (http and tcp listeners speak plain text to the VMs)",
                );
                None
            }
            (_, None) => None,
        };
        if l.protocol == ListenerProtocol::H3 && l.proxy_protocol.value != super::super::ProxyProtocolMode::Off {
            errs.at(
                line(&l.proxy_protocol),
                "proxy_protocol: not for h3 listeners (QUIC has no PROXY header)",
            );
        }
        let alt_svc = match &l.alt_svc {
            Some(a) if l.protocol != ListenerProtocol::Http => {
                errs.at(line(a), "alt_svc: only http listeners advertise one");
                None
            }
            Some(a) => match http::HeaderValue::from_str(&a.value) {
                Ok(v) if !a.value.trim().is_empty() => Some(v),
                _ => {
                    errs.at(line(a), format!("alt_svc {:?} is not a valid header value", a.value));
                    None
                }
            },
            None => None,
        };
        listener_services.push(l.service.clone());
        listeners.push(Listener {
            name: name.clone(),
            bind: l.bind.value.0,
            protocol: l.protocol,
            proxy_protocol: mode,
            trusted_proxies: l.trusted_proxies.iter().map(|c| c.0).collect(),
            max_connections: l.max_connections,
            service: None,
            idle_timeout: l.idle_timeout.as_ref().map_or(DEFAULT_TCP_IDLE_TIMEOUT, |t| t.value.0),
            tls,
            alt_svc,
        });
    }
    Listeners {
        list: listeners,
        services: listener_services,
        binds,
    }
}

/// TCP listeners' services, now that services are known.
pub(super) fn attach_services(
    listeners: &mut Listeners,
    services: &[Arc<Service>],
    service_ids: &HashMap<String, usize>,
    errs: &mut Collector,
) {
    for (l, svc) in listeners.list.iter_mut().zip(&listeners.services) {
        let Some(svc) = svc else { continue };
        match service_ids.get(&svc.value) {
            Some(&id) if services[id].pattern.is_some() => errs.at(
                line(svc),
                format!(
                    "service {:?} is a host pattern: a tcp listener needs one destination (reach a pattern with CONNECT)",
                    svc.value
                ),
            ),
            Some(&id) if services[id].protocol == UpstreamProtocol::Tcp => l.service = Some(id),
            Some(_) => errs.at(
                line(svc),
                format!(
                    "service {:?} is not protocol tcp, so a tcp listener cannot carry it",
                    svc.value
                ),
            ),
            None => errs.at(line(svc), format!("unknown service {:?}", svc.value)),
        }
    }
}

/// `mesh-inbound` listeners and `vm_services:` come together: either alone does nothing.
pub(super) fn inbound(raw: &RawConfig, has_vm_services: bool, errs: &mut Collector) {
    let inbound = raw
        .listeners
        .iter()
        .find(|l| l.protocol == ListenerProtocol::MeshInbound);
    match (inbound, has_vm_services) {
        (Some(l), false) => errs.at(
            line(&l.name),
            format!(
                "listener {:?} has protocol mesh-inbound but there are no vm_services for it to serve",
                l.name.value
            ),
        ),
        (None, true) => errs.at(
            None,
            "vm_services: need a listener with protocol: mesh-inbound (where mesh workloads connect)",
        ),
        _ => {}
    }
}
