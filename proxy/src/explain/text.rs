//! The text form of an explanation (`meshgate explain` without `--json`).

use std::fmt;

use super::{Decision, Explanation};

pub(super) fn row(f: &mut fmt::Formatter<'_>, label: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(f, "{:<17}{value}", format!("{label}:"))
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        row(f, "config", &self.config)?;
        let mut client = format!(
            "{}, {}",
            self.client,
            if self.api_key { "with an API key" } else { "no API key" }
        );
        if let Some(v) = &self.vpce {
            client.push_str(&format!(", through VPC endpoint {v}"));
        }
        row(f, "client", client)?;
        match &self.authority {
            Some(a) if *a != self.target => row(f, "target", format!("{} (authority {a})", self.target))?,
            _ => row(f, "target", &self.target)?,
        }
        match self.decision {
            Decision::Forward => row(f, "decision", format!("forward ({} {})", self.status, self.reason))?,
            Decision::Refuse => row(
                f,
                "decision",
                format!(
                    "refuse ({} {}: {})",
                    self.status,
                    self.reason,
                    self.message.as_deref().unwrap_or("")
                ),
            )?,
        }
        if let Some(why) = &self.why {
            row(f, "why", why)?;
        }
        match &self.tenant {
            None => row(f, "tenant", "none")?,
            Some(t) => {
                row(f, "tenant", format!("{} (matched by {})", t.name, t.matched_by))?;
                row(f, "tenant allows", t.allow.join(", "))?;
                let mut limits = Vec::new();
                if let Some(r) = &t.rate_limit {
                    limits.push(format!("rate {} requests/s, burst {}", r.requests_per_second, r.burst));
                }
                if let Some(m) = t.max_concurrent_requests {
                    limits.push(format!("at most {m} concurrent requests"));
                }
                if limits.is_empty() {
                    limits.push("none configured".into());
                }
                row(f, "tenant limits", limits.join("; "))?;
            }
        }
        match &self.route {
            None => row(f, "service", "none")?,
            Some(r) => {
                let subset = r.subset.as_ref().map(|s| format!(", subset {s}")).unwrap_or_default();
                row(
                    f,
                    "service",
                    format!("{} ({} port {}, {}{subset})", r.service, r.host, r.port, r.protocol),
                )?;
                if let Some(p) = &r.pattern {
                    row(f, "matched pattern", p)?;
                }
                match &r.hbone {
                    None => {
                        row(f, "gateway", r.gateway.join(", "))?;
                        row(f, "sni", &r.sni)?;
                    }
                    Some(h) => {
                        row(f, "transport", &h.transport)?;
                        match (&h.gateway_identity, &h.network) {
                            (Some(id), Some(net)) => {
                                row(f, "hbone gateway", format!("{} ({id})", r.gateway.join(", ")))?;
                                row(f, "hbone network", net)?;
                            }
                            _ => row(f, "hbone address", r.gateway.join(", "))?,
                        }
                        row(f, "connect", format!(":authority {}, no SNI", h.authority))?;
                    }
                }
                // `auto` has one list per kind of client, each already joined with commas.
                let sep = if r.protocol == "auto" { "; " } else { ", " };
                row(f, "alpn", r.alpn.join(sep))?;
                row(f, "server identity", &r.expected_server)?;
            }
        }
        row(
            f,
            "client identity",
            self.client_identity.as_deref().unwrap_or("none (no tenant)"),
        )
    }
}
