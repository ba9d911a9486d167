//! Services: names, hosts, ports, subsets, expected server identities, the Host routes they
//! claim (checked for clashes here; the route table is built from the services by `route`),
//! transports and transcoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use yamlconf::{line_of as line, Collector};

use super::super::schema::RawService;
use super::super::schema::{OrderedMap, RawConfig, UpstreamProtocol};
use super::super::{sni_for, HostPattern, PatternIdentity, Service};
use super::*;
use crate::identity::ExpectedServer;

/// The services of the config file and its `services_file:`, as validation gathers them.
#[derive(Default)]
pub(super) struct Services {
    pub list: Vec<Arc<Service>>,
    pub ids: HashMap<String, usize>,
    /// (host, port) → the service routed by it, across both files.
    route_names: HashMap<(String, u16), String>,
}

/// The `services_file:` as written by `meshgate services import` or by hand.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicesFile {
    #[serde(default)]
    services: OrderedMap<RawService>,
}

/// Loads `services_file:` into `acc`; its errors name that file and its lines.
pub(super) fn services_file(
    config: &Path,
    raw: &RawConfig,
    td: &str,
    acc: &mut Services,
    errs: &mut Collector,
) -> Option<std::path::PathBuf> {
    let f = raw.services_file.as_ref()?;
    let path = resolve_path(config, &f.value);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            errs.at(line(f), format!("cannot read services_file {}: {e}", path.display()));
            return Some(path);
        }
    };
    match serde_saphyr::from_str::<RawServicesFile>(&text) {
        Ok(file) => {
            let mut file_errs = Collector::new(&path);
            services(&path, &file.services, td, acc, &mut file_errs);
            errs.list.append(&mut file_errs.list);
        }
        Err(e) => errs.list.push(yamlconf::yaml_error(&path, &e)),
    }
    Some(path)
}

pub(super) fn services(
    path: &Path,
    raw_services: &OrderedMap<RawService>,
    td: &str,
    acc: &mut Services,
    errs: &mut Collector,
) {
    let Services {
        list: services,
        ids: service_ids,
        route_names,
    } = acc;
    for (name, s) in &raw_services.0 {
        let id = services.len();
        let n = &name.value;
        if !valid_name(n) {
            errs.at(
                line(name),
                format!("invalid service name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        if service_ids.insert(n.clone(), id).is_some() {
            errs.at(
                line(name),
                format!("service {n:?} is defined twice (in the config file and in its services_file)"),
            );
        }
        let host = s.host.value.trim_end_matches('.').to_ascii_lowercase();
        let suffix = host.strip_prefix("*.").map(str::to_string);
        if let Some(sfx) = &suffix {
            if sfx.split('.').count() < 2 || !valid_hostname(sfx) {
                errs.at(
                    line(&s.host),
                    format!(
                        "host pattern {:?} would match every name under a top-level domain, or is not `*.` and a DNS name: write one such as *.bookinfo.svc.cluster.local",
                        s.host.value
                    ),
                );
            }
        } else if host.contains('*') {
            errs.at(
                line(&s.host),
                format!(
                    "invalid host {:?}: a pattern has one leading `*.` and a DNS name after it, such as *.bookinfo.svc.cluster.local (`*` alone would match every service)",
                    s.host.value
                ),
            );
        } else if !valid_hostname(&host) {
            errs.at(
                line(&s.host),
                format!(
                    "invalid host {:?}: expected a DNS name such as reviews.bookinfo.svc.cluster.local",
                    s.host.value
                ),
            );
        }
        let ports: Vec<u16> = match (&s.port, &s.ports) {
            (Some(p), None) => vec![p.value],
            (None, Some(ps)) if suffix.is_some() => {
                if ps.value.is_empty() {
                    errs.at(line(ps), "ports: list at least one port");
                }
                ps.value.clone()
            }
            (None, Some(ps)) => {
                errs.at(
                    line(ps),
                    "ports: is for host patterns; for one host, write a service per port",
                );
                ps.value.clone()
            }
            (Some(p), Some(_)) => {
                errs.at(line(p), "give port: or ports:, not both");
                vec![p.value]
            }
            (None, None) => {
                errs.at(
                    line(name),
                    format!("service {n:?} needs a port: (or, for a host pattern, ports:)"),
                );
                vec![1]
            }
        };
        let port_line = s
            .port
            .as_ref()
            .map(line)
            .or_else(|| s.ports.as_ref().map(line))
            .unwrap_or(line(name));
        if ports.contains(&0) {
            errs.at(port_line, "invalid port 0: expected 1-65535");
        }
        let port = ports.first().copied().unwrap_or(1);
        let protocol = match &s.protocol {
            Some(p) => p.value,
            None if suffix.is_some() => UpstreamProtocol::Auto,
            None => {
                errs.at(
                    line(name),
                    format!("service {n:?} needs a protocol: http1, http2, tcp or auto"),
                );
                UpstreamProtocol::Http1
            }
        };
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
        let (expected_server, pattern_identity) = expected_server(s, td, suffix.as_deref(), errs);
        if suffix.is_some() {
            let not_with = [
                ("subset:", s.subset.as_ref().map(line)),
                ("aliases:", s.aliases.first().map(line)),
                ("transport:", s.transport.as_ref().map(line)),
                ("hbone:", s.hbone.as_ref().map(line)),
                ("transcode:", s.transcode.as_ref().map(line)),
            ];
            for (key, l) in not_with {
                if let Some(l) = l {
                    errs.at(l, format!("{key} is for one named service, not a host pattern"));
                }
            }
        }
        if protocol == UpstreamProtocol::Auto {
            let not_with = [
                ("transport:", s.transport.as_ref().map(line)),
                ("transcode:", s.transcode.as_ref().map(line)),
            ];
            for (key, l) in not_with {
                if let Some(l) = l {
                    errs.at(
                        l,
                        format!("{key} needs a declared protocol (http1 or http2), not protocol: auto"),
                    );
                }
            }
        }
        let mut aliases = Vec::new();
        // A subset service usually shares its host with the plain service; when it has aliases,
        // VMs reach it by those, and its host only names the mesh service in the SNI.
        let routes_host = suffix.is_none() && (subset.is_none() || s.aliases.is_empty());
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
        let names = if protocol == UpstreamProtocol::Tcp {
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
        if suffix.is_none() && rustls::pki_types::ServerName::try_from(sni.clone()).is_err() {
            errs.at(
                line(&s.host),
                format!("SNI {sni:?} built from this service is not a valid TLS server name"),
            );
        }
        let transport = super::super::hbone::transport(n, s.transport.as_ref(), s.hbone.as_ref(), &host, port, errs);
        let transcode = s
            .transcode
            .as_ref()
            .and_then(|t| super::super::transcode::transcoder(path, protocol, t, errs));
        // A pattern's own authority is never sent: each destination has its host's.
        let authority_text = if let Some(sfx) = &suffix {
            sfx.clone()
        } else if port == 80 {
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
            protocol,
            subset,
            aliases,
            routed,
            authority,
            expected_server,
            sni,
            transport,
            transcode,
            pattern: suffix.map(|suffix| HostPattern {
                suffix,
                ports: ports.clone(),
                identity: pattern_identity,
            }),
            via_pattern: false,
        }));
    }
}

/// Whom the server must be: `identity:` as a list of SPIFFE IDs, `any` (the trust domain), or
/// `namespace` (any service account of the namespace in the host; the default for patterns).
fn expected_server(
    s: &RawService,
    td: &str,
    suffix: Option<&str>,
    errs: &mut Collector,
) -> (ExpectedServer, PatternIdentity) {
    let keyword = s.identity.as_ref().and_then(|ids| match ids.value.0.as_slice() {
        [one] if one == "any" || one == "namespace" => Some(one.as_str()),
        _ => None,
    });
    let any = (ExpectedServer::TrustDomain(td.to_string()), PatternIdentity::Fixed);
    match (keyword, &s.identity, suffix) {
        (Some("any"), _, _) => any,
        (None, None, None) => any,
        (Some(_), _, None) => {
            errs.at(
                s.identity.as_ref().map(line).unwrap_or(None),
                "identity: namespace is for host patterns; for one host, list its SPIFFE IDs or say any",
            );
            any
        }
        (Some(_), _, Some(sfx)) | (None, None, Some(sfx)) => {
            let labels: Vec<&str> = sfx.split('.').collect();
            let rule = match labels.as_slice() {
                [ns, "svc", _, ..] => PatternIdentity::Namespace {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                },
                ["svc", _, ..] => PatternIdentity::HostNamespace {
                    trust_domain: td.to_string(),
                },
                _ => {
                    errs.at(
                        s.identity.as_ref().map(line).unwrap_or(line(&s.host)),
                        format!(
                            "the hosts *.{sfx} matches name no Kubernetes namespace (NAME.NAMESPACE.svc.DOMAIN), so the server's namespace cannot be checked: set identity: any, or list the SPIFFE IDs"
                        ),
                    );
                    PatternIdentity::Fixed
                }
            };
            (ExpectedServer::TrustDomain(td.to_string()), rule)
        }
        (None, Some(ids), _) => {
            if ids.value.0.is_empty() {
                errs.at(
                    line(ids),
                    "identity: list must not be empty (omit it, or say any, to accept any identity in the trust domain)",
                );
            }
            for id in &ids.value.0 {
                if crate::identity::spiffe_trust_domain(id).is_none() || id.contains(char::is_whitespace) {
                    errs.at(
                        line(ids),
                        format!("invalid identity {id:?}: expected a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA, or any"),
                    );
                }
            }
            (ExpectedServer::Exact(ids.value.0.clone()), PatternIdentity::Fixed)
        }
    }
}

/// Two host patterns a tenant allows must not both match a host and port: which one a request
/// takes (and with it the server identity checked) would depend on an order nobody wrote down.
pub(super) fn overlapping_patterns(
    raw: &RawConfig,
    services: &[Arc<Service>],
    tenants: &[super::super::Tenant],
    errs: &mut Collector,
) {
    let patterns: Vec<(&Service, &HostPattern)> = services
        .iter()
        .filter_map(|s| s.pattern.as_ref().map(|p| (&**s, p)))
        .collect();
    if patterns.len() < 2 {
        return;
    }
    for ((tname, traw), tenant) in raw.tenants.0.iter().zip(tenants) {
        let allowed: Vec<&(&Service, &HostPattern)> =
            patterns.iter().filter(|(s, _)| tenant.allow.allows(s.id)).collect();
        for (i, (a, pa)) in allowed.iter().enumerate() {
            for (b, pb) in &allowed[i + 1..] {
                let nested = label_suffix(&pa.suffix, &pb.suffix) || label_suffix(&pb.suffix, &pa.suffix);
                let same_kind = (a.protocol == UpstreamProtocol::Tcp) == (b.protocol == UpstreamProtocol::Tcp);
                let Some(port) = pa.ports.iter().find(|p| pb.ports.contains(p)) else {
                    continue;
                };
                if nested && same_kind {
                    let at = traw
                        .allow
                        .iter()
                        .find(|x| x.value == b.name)
                        .map(line)
                        .unwrap_or(line(tname));
                    errs.at(
                        at,
                        format!(
                            "tenant {:?} allows services {:?} ({}) and {:?} ({}), whose host patterns overlap on port {port}: a host could match either; narrow one pattern or its ports",
                            tname.value, a.name, a.host, b.name, b.host
                        ),
                    );
                }
            }
        }
    }
}

/// Whether `long` is `short` or ends in `.short`, label by label.
fn label_suffix(long: &str, short: &str) -> bool {
    long == short || long.strip_suffix(short).is_some_and(|rest| rest.ends_with('.'))
}
