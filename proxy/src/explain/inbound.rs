//! `meshgate explain --principal`: what a `mesh-inbound` listener would do with a call from a
//! mesh workload, worked out with the data path's own routes and allow lists
//! (`inbound::Routes`): which VM service the SNI or Host names, whether the caller's principal
//! may call it (and by which `allow:` entry), and where the request would go.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::text::row;
use super::Decision;
use crate::config::Snapshot;
use crate::inbound::{Refusal, Routes};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundExplanation {
    pub config: String,
    /// The caller's SPIFFE ID, as its client certificate would carry it.
    pub principal: String,
    /// An SNI (`outbound_.PORT_.SUBSET_.HOST` or a name) or a `host[:port]` Host header.
    pub target: String,
    pub decision: Decision,
    pub status: u16,
    pub reason: String,
    pub why: Option<String>,
    pub vm_service: Option<VmServiceInfo>,
    /// The `allow:` entry that let the caller in.
    pub matched_rule: Option<String>,
    /// The identity meshgate presents: what the caller's DestinationRule must expect.
    pub server_identity: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmServiceInfo {
    pub name: String,
    pub hosts: Vec<String>,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<String>,
    pub load_balancing: String,
    pub allow: Vec<String>,
}

impl InboundExplanation {
    pub fn forwarded(&self) -> bool {
        self.decision == Decision::Forward
    }
}

pub fn explain_inbound(snapshot: &Snapshot, principal: &str, target: &str) -> InboundExplanation {
    let routes = Routes::new(snapshot);
    let target = target.trim();
    // Sidecars send the outbound_ SNI; a bare name is taken as the Host header.
    let (sni, authority) = if target.starts_with("outbound_.") {
        (Some(target), None)
    } else {
        (None, Some(target))
    };
    let d = routes.decide(Some(principal), sni, authority);
    let vm_service = d.service.map(|i| {
        let s = &routes.services[i];
        VmServiceInfo {
            name: s.name.clone(),
            hosts: s.hosts.clone(),
            port: s.port,
            protocol: format!("{:?}", s.protocol).to_lowercase(),
            backends: s.backends.iter().map(|b| b.to_string()).collect(),
            load_balancing: format!("{:?}", s.load_balancing),
            allow: crate::inbound::allow_list(s),
        }
    });
    let (decision, status, reason, why) = match d.refusal {
        None => (Decision::Forward, 200, "forwarded".to_string(), None),
        Some(r) => {
            let why = match r {
                Refusal::UnknownVmService => format!(
                    "no vm_service has {target} as a host (with its port); vm_services: {}",
                    routes
                        .services
                        .iter()
                        .map(|s| format!("{} ({}:{})", s.name, s.hosts.join(","), s.port))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Refusal::UntrustedCaller => format!(
                    "{principal} is not a SPIFFE ID of an accepted trust domain ({})",
                    routes.trust_domains.join(", ")
                ),
                Refusal::PrincipalNotAllowed => format!(
                    "{principal} matches none of {}'s allow list",
                    vm_service.as_ref().map_or("", |v| v.name.as_str())
                ),
            };
            let status = if r == Refusal::UnknownVmService { 404 } else { 403 };
            (Decision::Refuse, status, r.reason().to_string(), Some(why))
        }
    };
    InboundExplanation {
        config: snapshot.path.display().to_string(),
        principal: principal.to_string(),
        target: target.to_string(),
        decision,
        status,
        reason,
        why,
        vm_service,
        matched_rule: d.rule,
        server_identity: snapshot.identity.spiffe_id.clone(),
    }
}

impl fmt::Display for InboundExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        row(f, "config", &self.config)?;
        row(f, "caller", &self.principal)?;
        row(f, "target", &self.target)?;
        match self.decision {
            Decision::Forward => row(f, "decision", format!("forward ({} {})", self.status, self.reason))?,
            Decision::Refuse => row(f, "decision", format!("refuse ({} {})", self.status, self.reason))?,
        }
        if let Some(w) = &self.why {
            row(f, "why", w)?;
        }
        if let Some(r) = &self.matched_rule {
            row(f, "allowed by", r)?;
        }
        match &self.vm_service {
            None => row(f, "vm service", "none")?,
            Some(v) => {
                row(
                    f,
                    "vm service",
                    format!("{} ({} port {}, {})", v.name, v.hosts.join(", "), v.port, v.protocol),
                )?;
                row(
                    f,
                    "backends",
                    format!("{} ({})", v.backends.join(", "), v.load_balancing),
                )?;
                row(f, "allow", v.allow.join(", "))?;
            }
        }
        row(f, "server identity", &self.server_identity)
    }
}
