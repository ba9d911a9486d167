//! Services: names, hosts, ports, subsets, expected server identities, the Host routes they
//! claim (checked for clashes here; the route table is built from the services by `route`),
//! transports and transcoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use yamlconf::{line_of as line, Collector};

use super::super::schema::{RawConfig, UpstreamProtocol};
use super::super::{sni_for, Service};
use super::*;
use crate::identity::ExpectedServer;

pub(super) fn services(
    path: &Path,
    raw: &RawConfig,
    td: &str,
    errs: &mut Collector,
) -> (Vec<Arc<Service>>, HashMap<String, usize>) {
    let mut services: Vec<Arc<Service>> = Vec::new();
    let mut service_ids: HashMap<String, usize> = HashMap::new();
    let mut route_names: HashMap<(String, u16), String> = HashMap::new();
    for (name, s) in &raw.services.0 {
        let id = services.len();
        let n = &name.value;
        if !valid_name(n) {
            errs.at(
                line(name),
                format!("invalid service name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        service_ids.insert(n.clone(), id);
        let host = s.host.value.trim_end_matches('.').to_ascii_lowercase();
        if !valid_hostname(&host) {
            errs.at(
                line(&s.host),
                format!(
                    "invalid host {:?}: expected a DNS name such as reviews.bookinfo.svc.cluster.local",
                    s.host.value
                ),
            );
        }
        let port = s.port.value;
        if port == 0 {
            errs.at(line(&s.port), "invalid port 0: expected 1-65535");
        }
        let subset = s.subset.as_ref().map(|sub| {
            let ok = !sub.value.is_empty()
                && sub.value.len() <= 63
                && sub
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                errs.at(
                    line(sub),
                    format!("invalid subset {:?}: expected a DestinationRule subset name", sub.value),
                );
            }
            sub.value.clone()
        });
        let expected_server = match &s.identity {
            None => ExpectedServer::TrustDomain(td.to_string()),
            Some(ids) => {
                if ids.value.0.is_empty() {
                    errs.at(
                        line(ids),
                        "identity: list must not be empty (omit it to accept any identity in the trust domain)",
                    );
                }
                for id in &ids.value.0 {
                    if crate::identity::spiffe_trust_domain(id).is_none() || id.contains(char::is_whitespace) {
                        errs.at(line(ids), format!("invalid identity {id:?}: expected a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA"));
                    }
                }
                ExpectedServer::Exact(ids.value.0.clone())
            }
        };
        let mut aliases = Vec::new();
        // A subset service usually shares its host with the plain service; when it has aliases,
        // VMs reach it by those, and its host only names the mesh service in the SNI.
        let routes_host = subset.is_none() || s.aliases.is_empty();
        let mut names: Vec<(String, Option<u64>)> = Vec::new();
        if routes_host {
            names.push((host.clone(), line(&s.host)));
        }
        for a in &s.aliases {
            let alias = a.value.trim_end_matches('.').to_ascii_lowercase();
            if !valid_hostname(&alias) {
                errs.at(line(a), format!("invalid alias {:?}: expected a DNS name", a.value));
            }
            aliases.push(alias.clone());
            names.push((alias, line(a)));
        }
        // TCP services are reached through their tcp listeners, never by HTTP Host routing.
        let names = if s.protocol == UpstreamProtocol::Tcp {
            Vec::new()
        } else {
            names
        };
        let routed: Vec<String> = names.iter().map(|(nm, _)| nm.clone()).collect();
        for (nm, l) in names {
            if let Some(other) = route_names.insert((nm.clone(), port), n.clone()) {
                errs.at(
                    l,
                    format!("host {nm} port {port} is already routed to service {other:?}"),
                );
            }
        }
        let sni = sni_for(&host, port, subset.as_deref());
        if rustls::pki_types::ServerName::try_from(sni.clone()).is_err() {
            errs.at(
                line(&s.host),
                format!("SNI {sni:?} built from this service is not a valid TLS server name"),
            );
        }
        let transport = super::super::hbone::transport(n, s.transport.as_ref(), s.hbone.as_ref(), &host, port, errs);
        let transcode = s
            .transcode
            .as_ref()
            .and_then(|t| super::super::transcode::transcoder(path, s.protocol, t, errs));
        let authority_text = if port == 80 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let authority = http::uri::Authority::try_from(authority_text.as_str()).unwrap_or_else(|_| {
            errs.at(line(&s.host), format!("{authority_text:?} is not a valid authority"));
            http::uri::Authority::from_static("invalid")
        });
        services.push(Arc::new(Service {
            id,
            name: n.clone(),
            host,
            port,
            protocol: s.protocol,
            subset,
            aliases,
            routed,
            authority,
            expected_server,
            sni,
            transport,
            transcode,
        }));
    }
    (services, service_ids)
}
