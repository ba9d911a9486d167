//! `meshgate services import`: turns the Kubernetes `Service` and Istio `ServiceEntry` objects that
//! `kubectl get svc,serviceentries -A -o json` (or `-o yaml`) prints into a meshgate services file.
//!
//! Every port becomes one `services:` entry. Its `protocol` is chosen the way Istio chooses the
//! protocol of the same port, following Istio's documented protocol selection
//! (<https://istio.io/latest/docs/ops/configuration/traffic-management/protocol-selection/>) and
//! its implementation (`ConvertProtocol` in `pkg/config/kube`, `protocol.Parse`): a Service port's
//! `appProtocol` when set, otherwise the `<protocol>[-<suffix>]` prefix of its name; a ServiceEntry
//! port's `protocol` field. Where Istio would sniff the protocol, the entry gets `protocol: auto`
//! and meshgate mirrors the client. What meshgate cannot reach through the east-west gateway
//! (ExternalName and headless Services, MESH_EXTERNAL and wildcard entries, ports whose app speaks
//! TLS itself, UDP) is left out, each with a reason in the file, so it says what it does not cover.

// The same rule meshgate's config applies to `host`.
use crate::route::is_dns_name as valid_hostname;
use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// What to import and how to name the hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// Only these namespaces (empty: all but the excluded ones).
    pub namespaces: Vec<String>,
    /// Skipped namespaces; the CLI defaults this to kube-system, kube-public, kube-node-lease, istio-system.
    /// Not consulted when `namespaces` names some: asking for a namespace by name wins.
    pub exclude_namespaces: Vec<String>,
    /// Kubernetes cluster domain, default "cluster.local".
    pub cluster_domain: String,
}

/// The result of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The services file text (YAML), ready to write.
    pub yaml: String,
    /// How many services entries it holds.
    pub services: usize,
    /// One line per object or port left out, with why (also written as comments in `yaml`).
    pub skipped: Vec<String>,
}

/// The default `--exclude-namespace` list: the cluster's own machinery, never a VM's target.
pub const SYSTEM_NAMESPACES: [&str; 4] = ["kube-system", "kube-public", "kube-node-lease", "istio-system"];

/// `meshgate services import`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The kubectl output; standard input when left out or `-`.
    #[arg(short, long)]
    pub file: Option<std::path::PathBuf>,
    /// Where to write the services file (replaced whole); standard output when left out.
    #[arg(short, long)]
    pub output: Option<std::path::PathBuf>,
    /// Import only these namespaces (repeatable).
    #[arg(long = "namespace", short = 'n')]
    pub namespaces: Vec<String>,
    /// Skip these namespaces (repeatable; default: kube-system, kube-public, kube-node-lease,
    /// istio-system).
    #[arg(long = "exclude-namespace")]
    pub exclude_namespaces: Option<Vec<String>>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

/// The command: reads the input (a file, or standard input when none or `-`), writes the
/// services file to `--output` (replaced whole through a temporary file and a rename, so a
/// meshgate watching it never reads half a file) or to standard output, and returns the
/// summary for standard error.
pub fn command(args: &ImportArgs) -> Result<String, String> {
    use std::io::Read;
    let opts = ImportOptions {
        namespaces: args.namespaces.clone(),
        exclude_namespaces: args
            .exclude_namespaces
            .clone()
            .unwrap_or_else(|| SYSTEM_NAMESPACES.map(String::from).to_vec()),
        cluster_domain: args.cluster_domain.clone(),
    };
    let (input, output, opts) = (args.file.as_deref(), args.output.as_deref(), &opts);
    let text = match input {
        Some(p) if p != std::path::Path::new("-") => {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?
        }
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            s
        }
    };
    let imported = import(&text, opts)?;
    match output {
        Some(p) => {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, &imported.yaml).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, p).map_err(|e| format!("cannot replace {}: {e}", p.display()))?;
        }
        None => print!("{}", imported.yaml),
    }
    let mut summary = format!(
        "{} services written, {} left out",
        imported.services,
        imported.skipped.len()
    );
    for s in &imported.skipped {
        summary.push_str("\n  left out: ");
        summary.push_str(s);
    }
    Ok(summary)
}

/// Reads `kubectl get svc,serviceentries -A -o json` (or `-o yaml`) output: a List, several YAML
/// documents, or one Service or ServiceEntry. Errors are one line, for the user.
pub fn import(input: &str, opts: &ImportOptions) -> Result<Imported, String> {
    let cluster_domain = normalize_host(&opts.cluster_domain);
    if !valid_hostname(&cluster_domain) {
        return Err(format!(
            "invalid cluster domain {:?}: expected a DNS name such as cluster.local",
            opts.cluster_domain
        ));
    }
    let docs = parse_documents(input)?;
    let mut run = Run::new(opts, cluster_domain);
    if let [doc] = docs.as_slice() {
        // A lone object must be one we import: anything else is most likely the wrong command's output.
        if list_items(doc)?.is_none() {
            match classify(doc, None) {
                Kind::Service | Kind::ServiceEntry => {}
                Kind::Other { found, .. } => {
                    return Err(format!(
                        "expected a Kubernetes List or a Service/ServiceEntry object, found {found}"
                    ))
                }
            }
        }
    }
    let many = docs.len() > 1;
    for (i, doc) in docs.iter().enumerate() {
        if many && !doc.is_object() {
            run.skip(format!(
                "document {}: {}, not a Kubernetes object",
                i + 1,
                describe(doc)
            ));
            continue;
        }
        run.document(doc)?;
    }
    run.finish()
}

/// Ports whose name says nothing that Istio treats as TCP instead of sniffing, as sniffing breaks
/// them (SMTP and MySQL servers speak first): SMTP, DNS, MySQL, MongoDB.
const WELL_KNOWN_TCP_PORTS: [u16; 4] = [25, 53, 3306, 27017];

const MAX_NAME: usize = 63;
const HASH_HEX: usize = 6;

const TLS_REASON: &str =
    "meshgate originates the mesh's mTLS and speaks plaintext HTTP or TCP inside it, not the app's own TLS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    Tcp,
    Auto,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
            Protocol::Auto => "auto",
        }
    }
}

/// One `services:` entry before it has its final name.
struct Entry {
    /// The readable name, sanitized but possibly too long or shared with another entry.
    base: String,
    /// Unique per object and port: what the hash that tells cut or clashing names apart is made of.
    key: String,
    /// What it came from, for the line that leaves out a later entry with the same host and port.
    source: String,
    host: String,
    port: u16,
    protocol: Protocol,
}

enum Kind {
    Service,
    ServiceEntry,
    Other {
        /// For the error about a lone object: "kind Deployment", "a string".
        found: String,
        /// For a left-out line: "Deployment".
        label: String,
    },
}

struct Run<'a> {
    opts: &'a ImportOptions,
    cluster_domain: String,
    entries: Vec<Entry>,
    /// (host, port) → index into `entries`: meshgate refuses two services with the same host and port.
    taken: HashMap<(String, u16), usize>,
    skipped: Vec<String>,
    /// Namespace → (why, objects): one line per namespace rather than one per object.
    filtered: BTreeMap<String, (&'static str, usize)>,
    services_read: usize,
    entries_read: usize,
}

impl<'a> Run<'a> {
    fn new(opts: &'a ImportOptions, cluster_domain: String) -> Self {
        Run {
            opts,
            cluster_domain,
            entries: Vec::new(),
            taken: HashMap::new(),
            skipped: Vec::new(),
            filtered: BTreeMap::new(),
            services_read: 0,
            entries_read: 0,
        }
    }

    fn skip(&mut self, line: String) {
        self.skipped.push(one_line(&line));
    }

    fn document(&mut self, doc: &Value) -> Result<(), String> {
        let Some(items) = list_items(doc)? else {
            self.object(doc, None);
            return Ok(());
        };
        // The API server's own lists (`ServiceList`, read with curl) leave kind out of their items.
        let item_kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .and_then(|k| k.strip_suffix("List"));
        for (i, item) in items.iter().enumerate() {
            if list_items(item)?.is_some() {
                self.document(item)?;
            } else if item.is_object() {
                self.object(item, item_kind.filter(|k| !k.is_empty()));
            } else {
                self.skip(format!(
                    "List item {}: {}, not a Kubernetes object",
                    i + 1,
                    describe(item)
                ));
            }
        }
        Ok(())
    }

    fn object(&mut self, obj: &Value, default_kind: Option<&str>) {
        let kind = classify(obj, default_kind);
        match kind {
            Kind::Service => self.services_read += 1,
            Kind::ServiceEntry => self.entries_read += 1,
            Kind::Other { .. } => {}
        }
        let meta = obj.get("metadata");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if let Some(why) = self.namespace_filtered(namespace) {
            self.filtered.entry(namespace.to_string()).or_insert((why, 0)).1 += 1;
            return;
        }
        let kind_name = match &kind {
            Kind::Service => "Service".to_string(),
            Kind::ServiceEntry => "ServiceEntry".to_string(),
            Kind::Other { label, .. } => label.clone(),
        };
        let Some(name) = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            self.skip(format!("{kind_name} in namespace {namespace}: no metadata.name"));
            return;
        };
        let label = format!("{kind_name} {namespace}/{name}");
        let spec = obj.get("spec").unwrap_or(&Value::Null);
        match kind {
            Kind::Service => self.service(&label, name, namespace, spec),
            Kind::ServiceEntry => self.service_entry(&label, name, namespace, spec),
            Kind::Other { .. } => self.skip(format!("{label}: not a Service or ServiceEntry")),
        }
    }

    fn namespace_filtered(&self, namespace: &str) -> Option<&'static str> {
        if !self.opts.namespaces.is_empty() {
            return (!self.opts.namespaces.iter().any(|n| n == namespace))
                .then_some("not among the namespaces asked for");
        }
        self.opts
            .exclude_namespaces
            .iter()
            .any(|n| n == namespace)
            .then_some("excluded")
    }

    fn service(&mut self, label: &str, name: &str, namespace: &str, spec: &Value) {
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            let target = spec
                .get("externalName")
                .and_then(Value::as_str)
                .unwrap_or("another name");
            self.skip(format!(
                "{label}: type ExternalName (a DNS alias for {target}), not a mesh service behind a sidecar"
            ));
            return;
        }
        if spec.get("clusterIP").and_then(Value::as_str) == Some("None") {
            self.skip(format!(
                "{label}: headless (clusterIP: None); Istio sends to its pods by IP, \
                 not through the east-west gateway's SNI routes"
            ));
            return;
        }
        let ports = spec
            .get("ports")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if ports.is_empty() {
            self.skip(format!("{label}: no ports"));
            return;
        }
        let host = format!("{name}.{namespace}.svc.{}", self.cluster_domain).to_ascii_lowercase();
        if !valid_hostname(&host) {
            self.skip(format!("{label}: its host {host} is not a valid DNS name"));
            return;
        }
        for p in ports {
            let port_name = p.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
            let l4 = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            let number = match port_number(p.get("port")) {
                Ok(n) => n,
                Err(why) => {
                    self.skip(format!("{label} {}: {why}", port_label(port_name, None, None)));
                    continue;
                }
            };
            let plabel = port_label(port_name, Some(number), Some(l4));
            let app_protocol = p.get("appProtocol").and_then(Value::as_str);
            let protocol = match service_port_protocol(number, port_name, l4, app_protocol) {
                Ok(protocol) => protocol,
                Err(why) => {
                    self.skip(format!("{label} {plabel}: {why}"));
                    continue;
                }
            };
            // One port: the Service's name alone, so the common case reads like the Service.
            let base = match (ports.len() > 1, port_name) {
                (false, _) => format!("{name}-{namespace}"),
                (true, Some(pn)) => format!("{name}-{namespace}-{pn}"),
                (true, None) => format!("{name}-{namespace}-{number}"),
            };
            self.add(Entry {
                base: sanitize(&base),
                key: format!("Service/{namespace}/{name}/{number}"),
                source: format!("{label} {plabel}"),
                host: host.clone(),
                port: number,
                protocol,
            });
        }
    }

    fn service_entry(&mut self, label: &str, name: &str, namespace: &str, spec: &Value) {
        match spec.get("location").and_then(Value::as_str) {
            Some("MESH_INTERNAL") => {}
            location => {
                let said = match location {
                    Some(l) => format!("location {l}"),
                    None => "no location (Istio's default, MESH_EXTERNAL)".to_string(),
                };
                self.skip(format!(
                    "{label}: {said}: an external service, not behind a sidecar; \
                     meshgate does not reach it through the gateway"
                ));
                return;
            }
        }
        let hosts = spec
            .get("hosts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ports = spec
            .get("ports")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if hosts.is_empty() {
            self.skip(format!("{label}: no hosts"));
            return;
        }
        if ports.is_empty() {
            self.skip(format!("{label}: no ports"));
            return;
        }
        // Ports are judged once, not once per host, so a bad port gives one line.
        let mut usable = Vec::new();
        for p in ports {
            let port_name = p.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
            let number = match port_number(p.get("number")) {
                Ok(n) => n,
                Err(why) => {
                    self.skip(format!("{label} {}: {why}", port_label(port_name, None, None)));
                    continue;
                }
            };
            let plabel = port_label(port_name, Some(number), None);
            match entry_port_protocol(p.get("protocol").and_then(Value::as_str)) {
                Ok(protocol) => usable.push((port_name, number, protocol, plabel)),
                Err(why) => self.skip(format!("{label} {plabel}: {why}")),
            }
        }
        for h in hosts {
            let Some(given) = h.as_str() else {
                self.skip(format!("{label}: host {}, not a string", describe(h)));
                continue;
            };
            let host = normalize_host(given);
            if host.starts_with('*') {
                let numbers: Vec<String> = usable.iter().map(|(_, n, _, _)| n.to_string()).collect();
                self.skip(format!(
                    "{label} host {host}: a wildcard host; use a host pattern in meshgate's config instead \
                     (host: \"{host}\", ports: [{}])",
                    numbers.join(", ")
                ));
                continue;
            }
            if !valid_hostname(&host) {
                self.skip(format!("{label} host {given:?}: not a valid DNS name"));
                continue;
            }
            let first_label = host.split('.').next().unwrap_or(&host);
            for (port_name, number, protocol, plabel) in &usable {
                let base = match (ports.len() > 1, port_name) {
                    (false, _) => format!("se-{name}-{first_label}"),
                    (true, Some(pn)) => format!("se-{name}-{first_label}-{pn}"),
                    (true, None) => format!("se-{name}-{first_label}-{number}"),
                };
                self.add(Entry {
                    base: sanitize(&base),
                    key: format!("ServiceEntry/{namespace}/{name}/{host}/{number}"),
                    source: format!("{label} host {host} {plabel}"),
                    host: host.clone(),
                    port: *number,
                    protocol: *protocol,
                });
            }
        }
    }

    fn add(&mut self, entry: Entry) {
        let slot = (entry.host.clone(), entry.port);
        if let Some(&first) = self.taken.get(&slot) {
            let line = format!(
                "{}: {}:{} already comes from {}",
                entry.source, entry.host, entry.port, self.entries[first].source
            );
            self.skip(line);
            return;
        }
        self.taken.insert(slot, self.entries.len());
        self.entries.push(entry);
    }

    fn finish(self) -> Result<Imported, String> {
        let names = unique_names(&self.entries)?;
        let mut named: Vec<(String, Entry)> = names.into_iter().zip(self.entries).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut skipped: Vec<String> = self
            .filtered
            .iter()
            .map(|(ns, (why, n))| one_line(&format!("namespace {ns}: {why} ({})", plural(*n, "object", "objects"))))
            .collect();
        skipped.extend(self.skipped);

        let mut yaml = format!(
            "# Generated by `meshgate services import` from {} and {}: {}, {} left out.\n",
            plural(self.services_read, "Service", "Services"),
            plural(self.entries_read, "ServiceEntry", "ServiceEntries"),
            plural(named.len(), "service", "services"),
            skipped.len(),
        );
        for line in &skipped {
            yaml.push_str(&format!("# left out: {line}\n"));
        }
        if named.is_empty() {
            yaml.push_str("services: {}\n");
        } else {
            yaml.push_str("services:\n");
        }
        for (name, e) in &named {
            yaml.push_str(&format!(
                "  {}:\n    host: {}\n    port: {}\n    protocol: {}\n",
                yaml_scalar(name),
                yaml_scalar(&e.host),
                e.port,
                e.protocol.as_str()
            ));
        }
        Ok(Imported {
            yaml,
            services: named.len(),
            skipped,
        })
    }
}

/// JSON first (one value, or several back to back as `jq -c` prints them), then YAML documents.
fn parse_documents(input: &str) -> Result<Vec<Value>, String> {
    const EMPTY: &str =
        "input is empty: expected the output of `kubectl get svc,serviceentries -A -o json` (or -o yaml)";
    if input.trim().is_empty() {
        return Err(EMPTY.to_string());
    }
    let json: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(input).into_iter::<Value>().collect();
    let json_err = match json {
        Ok(docs) => return Ok(docs),
        Err(e) => e,
    };
    match serde_saphyr::from_multiple::<Value>(input) {
        Ok(docs) if docs.is_empty() => Err(EMPTY.to_string()),
        Ok(docs) => Ok(docs),
        // Whichever parser the input was written for has the useful message.
        Err(_) if input.trim_start().starts_with(['{', '[']) => Err(format!(
            "input is neither JSON nor YAML: {}",
            one_line(&json_err.to_string())
        )),
        Err(e) => Err(format!("input is neither JSON nor YAML: {}", yaml_error(&e))),
    }
}

/// The message of a serde-saphyr error on one line: its line number in front, without the snippet
/// and the location suffix it appends.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    let rendered = e.without_snippet().to_string();
    let mut message = rendered.lines().next().unwrap_or("").trim().to_string();
    for cut in [" at line ", ", set DuplicateKeyPolicy"] {
        if let Some(at) = message.find(cut) {
            message.truncate(at);
        }
    }
    if message.is_empty() {
        message = "invalid YAML".to_string();
    }
    match e.location().map(|l| l.line()).filter(|l| *l > 0) {
        Some(line) => one_line(&format!("line {line}: {message}")),
        None => one_line(&message),
    }
}

/// A List's items (`kind: List`, `…List`, or any object with `items`); `None` for anything else.
fn list_items(doc: &Value) -> Result<Option<&[Value]>, String> {
    let Some(obj) = doc.as_object() else {
        return Ok(None);
    };
    let is_list = obj
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"));
    match obj.get("items") {
        Some(Value::Array(items)) => Ok(Some(items)),
        // kubectl prints `items: []`, but Go can marshal an empty list as null.
        Some(Value::Null) | None if is_list => Ok(Some(&[])),
        None => Ok(None),
        Some(other) => Err(format!(
            "expected a List's items to be an array, found {}",
            describe(other)
        )),
    }
}

fn classify(obj: &Value, default_kind: Option<&str>) -> Kind {
    let Some(map) = obj.as_object() else {
        return Kind::Other {
            found: describe(obj),
            label: "object".to_string(),
        };
    };
    let Some(kind) = map.get("kind").and_then(Value::as_str).or(default_kind) else {
        return Kind::Other {
            found: "an object without kind".to_string(),
            label: "object without kind".to_string(),
        };
    };
    let api = map.get("apiVersion").and_then(Value::as_str);
    // Other APIs have kinds of the same name (Knative's serving.knative.dev/v1 Service).
    match kind {
        "Service" if api.is_none_or(|a| a == "v1") => Kind::Service,
        "ServiceEntry" if api.is_none_or(|a| a.starts_with("networking.istio.io/")) => Kind::ServiceEntry,
        _ => match api {
            Some(api) if kind == "Service" || kind == "ServiceEntry" => Kind::Other {
                found: format!("kind {kind} of {api}"),
                label: format!("{kind} ({api})"),
            },
            _ => Kind::Other {
                found: format!("kind {kind}"),
                label: kind.to_string(),
            },
        },
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
    .to_string()
}

fn port_number(v: Option<&Value>) -> Result<u16, String> {
    match v {
        None | Some(Value::Null) => Err("no port number".to_string()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("port number {n} is outside 1-65535")),
        Some(other) => Err(format!("port number {other} is not a number")),
    }
}

/// `port http (9080)`, `port 9080`, `port dns (53/UDP)`.
fn port_label(name: Option<&str>, number: Option<u16>, l4: Option<&str>) -> String {
    let l4 = l4.filter(|p| !p.eq_ignore_ascii_case("TCP"));
    let number = match (number, l4) {
        (Some(n), Some(p)) => Some(format!("{n}/{p}")),
        (Some(n), None) => Some(n.to_string()),
        (None, _) => None,
    };
    match (name, number) {
        (Some(name), Some(number)) => format!("port {name} ({number})"),
        (Some(name), None) => format!("port {name}"),
        (None, Some(number)) => format!("port {number}"),
        (None, None) => "a port".to_string(),
    }
}

/// Istio's `ConvertProtocol`: `appProtocol` replaces the port name entirely when set (an unknown
/// appProtocol is sniffed, the name is not consulted), matching ignores case, and unknown names on
/// well-known server-first ports are plain TCP.
fn service_port_protocol(
    number: u16,
    name: Option<&str>,
    l4: &str,
    app_protocol: Option<&str>,
) -> Result<Protocol, String> {
    if !l4.eq_ignore_ascii_case("TCP") {
        return Err(format!("protocol {l4}: Istio's sidecars proxy TCP only"));
    }
    let (said, spec) = match (app_protocol, name) {
        (Some(app), _) => (format!("appProtocol {app}"), app.to_ascii_lowercase()),
        (None, Some(name)) => (format!("port name {name}"), name.to_ascii_lowercase()),
        (None, None) => (String::new(), String::new()),
    };
    // Kubernetes' own appProtocol names, only meaningful as appProtocol.
    if app_protocol.is_some() {
        match spec.as_str() {
            "kubernetes.io/h2c" => return Ok(Protocol::Http2),
            "kubernetes.io/ws" => return Ok(Protocol::Http1),
            "kubernetes.io/wss" => return Err(format!("the app speaks TLS itself ({said}); {TLS_REASON}")),
            _ => {}
        }
    }
    let prefix = spec.split('-').next().unwrap_or_default();
    match prefix {
        "http" => Ok(Protocol::Http1),
        // `grpc-web…` lands here too: Istio carries gRPC-Web between sidecars as HTTP/2, like gRPC.
        "http2" | "grpc" => Ok(Protocol::Http2),
        // Istio's Mongo, MySQL and Redis filters are off by default: these are plain TCP.
        "tcp" | "mongo" | "mysql" | "redis" => Ok(Protocol::Tcp),
        "https" | "tls" => Err(format!("the app speaks TLS itself ({said}); {TLS_REASON}")),
        "udp" => Err(format!("{said} declares UDP, and Istio's sidecars proxy TCP only")),
        _ if WELL_KNOWN_TCP_PORTS.contains(&number) => Ok(Protocol::Tcp),
        _ => Ok(Protocol::Auto),
    }
}

/// Istio's `protocol.Parse` of a ServiceEntry port's `protocol` (no name prefix rules there).
fn entry_port_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    let Some(given) = protocol.filter(|p| !p.is_empty()) else {
        return Ok(Protocol::Auto);
    };
    match given.to_ascii_uppercase().as_str() {
        "HTTP" => Ok(Protocol::Http1),
        "HTTP2" | "GRPC" | "GRPC-WEB" => Ok(Protocol::Http2),
        "TCP" | "MONGO" | "MYSQL" | "REDIS" => Ok(Protocol::Tcp),
        "HTTPS" | "TLS" => Err(format!("the app speaks TLS itself (protocol {given}); {TLS_REASON}")),
        "UDP" => Err("protocol UDP: Istio's sidecars proxy TCP only".to_string()),
        _ => Ok(Protocol::Auto),
    }
}

/// Readable names where they fit and are unique; a name cut to fit, or shared by several entries,
/// ends in a hash of its object and port instead, so it stays the same from one import to the next.
fn unique_names(entries: &[Entry]) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = entries
        .iter()
        .map(|e| {
            if e.base.len() > MAX_NAME {
                hashed_name(&e.base, &e.key, 0)
            } else {
                e.base.clone()
            }
        })
        .collect();
    // A hashed name could in theory meet another name: rehash with a salt until none do.
    for salt in 0..8 {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for n in &names {
            *seen.entry(n.as_str()).or_default() += 1;
        }
        let clashing: Vec<usize> = (0..names.len()).filter(|&i| seen[names[i].as_str()] > 1).collect();
        if clashing.is_empty() {
            return Ok(names);
        }
        for i in clashing {
            names[i] = hashed_name(&entries[i].base, &entries[i].key, salt);
        }
    }
    Err("could not give every service a unique name".to_string())
}

fn hashed_name(base: &str, key: &str, salt: u32) -> String {
    let hash = if salt == 0 {
        fnv1a(key.as_bytes())
    } else {
        fnv1a(format!("{key}#{salt}").as_bytes())
    };
    // Names are ASCII by now, so cutting at a byte count cuts at a character.
    let head = base[..base.len().min(MAX_NAME - 1 - HASH_HEX)].trim_end_matches('-');
    format!("{head}-{:06x}", hash & 0xff_ffff)
}

/// 64-bit FNV-1a: tiny, stable across releases and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lower-case `[a-z0-9-]`, runs of anything else as one `-`, none at the ends.
fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("service");
    }
    out
}

fn normalize_host(s: &str) -> String {
    let s = s.trim();
    s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase()
}

/// Plain when it cannot be read as anything but this string, double-quoted otherwise (e.g. a
/// name starting with a digit, which YAML could read as a number).
fn yaml_scalar(s: &str) -> String {
    const KEYWORDS: [&str; 9] = ["true", "false", "null", "yes", "no", "on", "off", "y", "n"];
    let plain = s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !KEYWORDS.contains(&s);
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Names in the input end up in comments: a line break in one must not end the comment.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("import_testdata/kubectl.json");
    const FIXTURE_YAML: &str = include_str!("import_testdata/kubectl.yaml");

    fn defaults() -> ImportOptions {
        ImportOptions {
            namespaces: vec![],
            exclude_namespaces: ["kube-system", "kube-public", "kube-node-lease", "istio-system"]
                .map(String::from)
                .to_vec(),
            cluster_domain: "cluster.local".to_string(),
        }
    }

    /// The entries as meshgate will read them: the YAML parsed back, in file order.
    fn entries(imported: &Imported) -> Vec<(String, String, u64, String)> {
        let doc: Value = serde_saphyr::from_str(&imported.yaml).expect("the output is YAML");
        let services = doc.get("services").and_then(Value::as_object).expect("a services map");
        services
            .iter()
            .map(|(name, s)| {
                assert_eq!(
                    s.as_object().map(|o| o.len()),
                    Some(3),
                    "{name}: host, port, protocol only"
                );
                (
                    name.clone(),
                    s["host"].as_str().expect("host").to_string(),
                    s["port"].as_u64().expect("port"),
                    s["protocol"].as_str().expect("protocol").to_string(),
                )
            })
            .collect()
    }

    fn e(name: &str, host: &str, port: u64, protocol: &str) -> (String, String, u64, String) {
        (name.to_string(), host.to_string(), port, protocol.to_string())
    }

    #[test]
    fn kubectl_list_with_default_options() {
        let got = import(FIXTURE, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e("details-bookinfo", "details.bookinfo.svc.cluster.local", 9080, "http1"),
                e("grpc-api-shop-grpc", "grpc-api.shop.svc.cluster.local", 50051, "http2"),
                e(
                    "grpc-api-shop-http-metrics",
                    "grpc-api.shop.svc.cluster.local",
                    9090,
                    "http1"
                ),
                e("grpc-api-shop-web", "grpc-api.shop.svc.cluster.local", 8080, "http2"),
                e("inventory-db-shop", "inventory-db.shop.svc.cluster.local", 3306, "tcp"),
                e(
                    "notifications-shop",
                    "notifications.shop.svc.cluster.local",
                    8080,
                    "auto"
                ),
                e(
                    "productpage-bookinfo",
                    "productpage.bookinfo.svc.cluster.local",
                    9080,
                    "http1"
                ),
                e("ratings-bookinfo", "ratings.bookinfo.svc.cluster.local", 9080, "http1"),
                e("redis-shop", "redis.shop.svc.cluster.local", 6379, "tcp"),
                e("reviews-bookinfo", "reviews.bookinfo.svc.cluster.local", 9080, "http1"),
                e("se-ledger-ledger-http", "ledger.shop.mesh.internal", 8080, "http1"),
                e(
                    "se-ledger-ledger-replica-http",
                    "ledger-replica.shop.mesh.internal",
                    8080,
                    "http1"
                ),
                e(
                    "se-ledger-ledger-replica-tcp-db",
                    "ledger-replica.shop.mesh.internal",
                    5432,
                    "tcp"
                ),
                e("se-ledger-ledger-tcp-db", "ledger.shop.mesh.internal", 5432, "tcp"),
                e(
                    "se-partner-apis-registry",
                    "registry.partners.mesh.internal",
                    80,
                    "http1"
                ),
                e("statsd-shop-admin", "statsd.shop.svc.cluster.local", 8126, "auto"),
            ]
        );
        assert_eq!(got.services, 16);
        let tls =
            "meshgate originates the mesh's mTLS and speaks plaintext HTTP or TCP inside it, not the app's own TLS";
        assert_eq!(
            got.skipped,
            vec![
                "namespace istio-system: excluded (1 object)".to_string(),
                "namespace kube-system: excluded (1 object)".to_string(),
                format!("Service default/kubernetes port https (443): the app speaks TLS itself (port name https); {tls}"),
                "Service shop/cart-db: headless (clusterIP: None); Istio sends to its pods by IP, not through the \
                 east-west gateway's SNI routes"
                    .to_string(),
                format!(
                    "Service shop/grpc-api port tls-admin (8443): the app speaks TLS itself (port name tls-admin); {tls}"
                ),
                "Service shop/payments-legacy: type ExternalName (a DNS alias for payments.legacy.example.com), not a \
                 mesh service behind a sidecar"
                    .to_string(),
                "Service shop/statsd port statsd (8125/UDP): protocol UDP: Istio's sidecars proxy TCP only".to_string(),
                "ServiceEntry bookinfo/partner-apis host *.partners.mesh.internal: a wildcard host; use a host pattern \
                 in meshgate's config instead (host: \"*.partners.mesh.internal\", ports: [80])"
                    .to_string(),
                "ServiceEntry shop/stripe: location MESH_EXTERNAL: an external service, not behind a sidecar; \
                 meshgate does not reach it through the gateway"
                    .to_string(),
            ]
        );
        let mut lines = got.yaml.lines();
        assert_eq!(
            lines.next(),
            Some("# Generated by `meshgate services import` from 14 Services and 3 ServiceEntries: 16 services, 9 left out.")
        );
        for want in &got.skipped {
            assert_eq!(lines.next(), Some(format!("# left out: {want}").as_str()));
        }
        assert_eq!(lines.next(), Some("services:"));
        assert_eq!(lines.next(), Some("  details-bookinfo:"));
        assert_eq!(lines.next(), Some("    host: details.bookinfo.svc.cluster.local"));
        assert_eq!(lines.next(), Some("    port: 9080"));
        assert_eq!(lines.next(), Some("    protocol: http1"));
    }

    #[test]
    fn namespace_filter_keeps_only_the_namespaces_asked_for() {
        let opts = ImportOptions {
            namespaces: vec!["bookinfo".to_string()],
            ..defaults()
        };
        let got = import(FIXTURE, &opts).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e("details-bookinfo", "details.bookinfo.svc.cluster.local", 9080, "http1"),
                e(
                    "productpage-bookinfo",
                    "productpage.bookinfo.svc.cluster.local",
                    9080,
                    "http1"
                ),
                e("ratings-bookinfo", "ratings.bookinfo.svc.cluster.local", 9080, "http1"),
                e("reviews-bookinfo", "reviews.bookinfo.svc.cluster.local", 9080, "http1"),
                e(
                    "se-partner-apis-registry",
                    "registry.partners.mesh.internal",
                    80,
                    "http1"
                ),
            ]
        );
        assert_eq!(
            got.skipped,
            vec![
                "namespace default: not among the namespaces asked for (1 object)",
                "namespace istio-system: not among the namespaces asked for (1 object)",
                "namespace kube-system: not among the namespaces asked for (1 object)",
                "namespace shop: not among the namespaces asked for (9 objects)",
                "ServiceEntry bookinfo/partner-apis host *.partners.mesh.internal: a wildcard host; use a host \
                 pattern in meshgate's config instead (host: \"*.partners.mesh.internal\", ports: [80])",
            ]
        );
        assert!(got.yaml.starts_with(
            "# Generated by `meshgate services import` from 14 Services and 3 ServiceEntries: 5 services, 5 left out.\n"
        ));
    }

    #[test]
    fn naming_an_excluded_namespace_imports_it() {
        let opts = ImportOptions {
            namespaces: vec!["kube-system".to_string()],
            ..defaults()
        };
        let got = import(FIXTURE, &opts).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e(
                    "kube-dns-kube-system-dns-tcp",
                    "kube-dns.kube-system.svc.cluster.local",
                    53,
                    "tcp"
                ),
                e(
                    "kube-dns-kube-system-metrics",
                    "kube-dns.kube-system.svc.cluster.local",
                    9153,
                    "auto"
                ),
            ]
        );
        assert!(got.skipped.contains(
            &"Service kube-system/kube-dns port dns (53/UDP): protocol UDP: Istio's sidecars proxy TCP only"
                .to_string()
        ));
    }

    #[test]
    fn kubectl_yaml_gives_the_same_file_as_json() {
        let from_json = import(FIXTURE, &defaults()).expect("json imports");
        let from_yaml = import(FIXTURE_YAML, &defaults()).expect("yaml imports");
        assert_eq!(from_yaml, from_json);
    }

    #[test]
    fn single_yaml_object_gives_exact_file() {
        let input = "\
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {\"apiVersion\":\"v1\",\"kind\":\"Service\"}
  creationTimestamp: \"2025-03-11T09:14:27Z\"
  name: reviews
  namespace: bookinfo
  resourceVersion: \"412411\"
  uid: 4b1f3c1e-1a2b-4c3d-8e9f-0a1b2c3d4e5f
spec:
  clusterIP: 10.96.33.118
  ports:
  - name: http
    port: 9080
    protocol: TCP
    targetPort: 9080
  selector:
    app: reviews
  type: ClusterIP
status:
  loadBalancer: {}
";
        let opts = ImportOptions {
            cluster_domain: "Mesh.Example.".to_string(),
            ..defaults()
        };
        let got = import(input, &opts).expect("imports");
        assert_eq!(
            got.yaml,
            "# Generated by `meshgate services import` from 1 Service and 0 ServiceEntries: 1 service, 0 left out.
services:
  reviews-bookinfo:
    host: reviews.bookinfo.svc.mesh.example
    port: 9080
    protocol: http1
"
        );
        assert_eq!(got.services, 1);
        assert!(got.skipped.is_empty());
    }

    #[test]
    fn single_json_object_and_other_kinds() {
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ratings","namespace":"bookinfo"},
            "spec":{"clusterIP":"10.96.201.7","ports":[{"name":"grpc-web","port":9090,"protocol":"TCP"}]}}"#;
        let got = import(svc, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![e(
                "ratings-bookinfo",
                "ratings.bookinfo.svc.cluster.local",
                9090,
                "http2"
            )]
        );

        let deployment =
            r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"reviews-v1","namespace":"bookinfo"}}"#;
        assert_eq!(
            import(deployment, &defaults()),
            Err("expected a Kubernetes List or a Service/ServiceEntry object, found kind Deployment".to_string())
        );
        let knative = r#"{"apiVersion":"serving.knative.dev/v1","kind":"Service","metadata":{"name":"hello"}}"#;
        assert_eq!(
            import(knative, &defaults()),
            Err(
                "expected a Kubernetes List or a Service/ServiceEntry object, found kind Service of serving.knative.dev/v1"
                    .to_string()
            )
        );

        let list = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{deployment},{svc},42]}}"#);
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![e(
                "ratings-bookinfo",
                "ratings.bookinfo.svc.cluster.local",
                9090,
                "http2"
            )]
        );
        assert_eq!(
            got.skipped,
            vec![
                "Deployment bookinfo/reviews-v1: not a Service or ServiceEntry",
                "List item 3: a number, not a Kubernetes object",
            ]
        );
    }

    #[test]
    fn api_server_list_items_without_kind() {
        let list = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[
            {"metadata":{"name":"details","namespace":"bookinfo"},"spec":{"clusterIP":"10.96.148.21",
             "ports":[{"name":"http","port":9080,"protocol":"TCP"}]}}]}"#;
        let got = import(list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![e(
                "details-bookinfo",
                "details.bookinfo.svc.cluster.local",
                9080,
                "http1"
            )]
        );
    }

    #[test]
    fn several_yaml_documents() {
        let input = "\
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: vm-billing
  namespace: billing
spec:
  hosts: [Billing.VMs.Internal.]
  location: MESH_INTERNAL
  ports:
  - {name: grpc, number: 7070, protocol: GRPC}
  - {name: legacy, number: 7071}
  - {name: tls, number: 7443, protocol: TLS}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: billing, namespace: billing}
---
just some text
---
";
        let got = import(input, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e("se-vm-billing-billing-grpc", "billing.vms.internal", 7070, "http2"),
                e("se-vm-billing-billing-legacy", "billing.vms.internal", 7071, "auto"),
            ]
        );
        assert_eq!(
            got.skipped,
            vec![
                "ServiceEntry billing/vm-billing port tls (7443): the app speaks TLS itself (protocol TLS); \
                 meshgate originates the mesh's mTLS and speaks plaintext HTTP or TCP inside it, not the app's own TLS",
                "Deployment billing/billing: not a Service or ServiceEntry",
                "document 3: a string, not a Kubernetes object",
            ]
        );
    }

    #[test]
    fn bad_input_errors() {
        let opts = defaults();
        let empty = "input is empty: expected the output of `kubectl get svc,serviceentries -A -o json` (or -o yaml)";
        assert_eq!(import("", &opts), Err(empty.to_string()));
        assert_eq!(import(" \n# just a comment\n", &opts), Err(empty.to_string()));
        let err = import(r#"{"kind": "List", "items": [}"#, &opts).expect_err("broken JSON");
        assert!(err.starts_with("input is neither JSON nor YAML: "), "{err}");
        assert!(err.contains("line 1 column"), "the JSON parser's message: {err}");
        assert_eq!(
            import(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  name: b\n",
                &opts
            ),
            Err("input is neither JSON nor YAML: line 5: duplicate mapping key: name".to_string())
        );
        let err = import("kind: List\nitems: [\n  - a\n", &opts).expect_err("broken YAML");
        assert!(err.starts_with("input is neither JSON nor YAML: line "), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert_eq!(
            import("hello", &opts),
            Err("expected a Kubernetes List or a Service/ServiceEntry object, found a string".to_string())
        );
        assert_eq!(
            import("[1, 2]", &opts),
            Err("expected a Kubernetes List or a Service/ServiceEntry object, found an array".to_string())
        );
        assert_eq!(
            import(r#"{"metadata": {"name": "x"}}"#, &opts),
            Err(
                "expected a Kubernetes List or a Service/ServiceEntry object, found an object without kind".to_string()
            )
        );
        assert_eq!(
            import(r#"{"kind": "List", "items": "none"}"#, &opts),
            Err("expected a List's items to be an array, found a string".to_string())
        );
        let bad_domain = ImportOptions {
            cluster_domain: "cluster local".to_string(),
            ..defaults()
        };
        assert_eq!(
            import(FIXTURE, &bad_domain),
            Err("invalid cluster domain \"cluster local\": expected a DNS name such as cluster.local".to_string())
        );
    }

    #[test]
    fn empty_list_gives_an_empty_services_map() {
        let got = import(
            r#"{"apiVersion":"v1","items":[],"kind":"List","metadata":{"resourceVersion":""}}"#,
            &defaults(),
        )
        .expect("imports");
        assert_eq!(
            got.yaml,
            "# Generated by `meshgate services import` from 0 Services and 0 ServiceEntries: 0 services, 0 left out.\n\
             services: {}\n"
        );
        assert_eq!(entries(&got), vec![]);
    }

    fn service(name: &str, namespace: &str, ports: &str) -> String {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{namespace}"}},
               "spec":{{"clusterIP":"10.96.0.50","ports":{ports}}}}}"#
        )
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn long_names_are_cut_with_a_stable_hash() {
        let name = "recommendation-engine-feature-store-online-serving";
        let ns = "data-platform-production";
        let list = format!(
            r#"{{"kind":"List","items":[{}]}}"#,
            service(name, ns, r#"[{"name":"http","port":8080,"protocol":"TCP"}]"#)
        );
        let got = import(&list, &defaults()).expect("imports");
        // 56 characters of the name (its trailing '-' dropped), '-', 6 hex digits of FNV-1a of the key.
        let want = "recommendation-engine-feature-store-online-serving-data-13841b";
        assert_eq!(
            entries(&got),
            vec![e(want, &format!("{name}.{ns}.svc.cluster.local"), 8080, "http1")]
        );
        assert_eq!(import(&list, &defaults()), Ok(got), "the same name every time");
    }

    #[test]
    fn clashing_names_all_get_a_hash() {
        // "a-b" in "c" and "a" in "b-c" both read "a-b-c".
        let list = format!(
            r#"{{"kind":"List","items":[{},{}]}}"#,
            service("a-b", "c", r#"[{"name":"http","port":80}]"#),
            service("a", "b-c", r#"[{"name":"http","port":80}]"#),
        );
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e("a-b-c-0f7d72", "a-b.c.svc.cluster.local", 80, "http1"),
                e("a-b-c-1c0116", "a.b-c.svc.cluster.local", 80, "http1"),
            ]
        );
    }

    #[test]
    fn a_service_whose_host_is_not_a_dns_name_is_left_out() {
        let list = format!(
            r#"{{"kind":"List","items":[{}]}}"#,
            service(
                "Cache_Front",
                "edge",
                r#"[{"port":11211,"protocol":"TCP"},{"name":"http-admin","port":8080,"protocol":"TCP"}]"#
            )
        );
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(entries(&got), vec![]);
        assert_eq!(
            got.skipped,
            vec!["Service edge/Cache_Front: its host cache_front.edge.svc.cluster.local is not a valid DNS name"]
        );
    }

    #[test]
    fn multi_port_names_use_the_port_name_or_number() {
        // Kubernetes requires names on several ports; a hand-written file may not have them.
        let list = format!(
            r#"{{"kind":"List","items":[{}]}}"#,
            service(
                "cache-front",
                "edge",
                r#"[{"port":11211,"protocol":"TCP"},{"name":"http-admin","port":8080,"protocol":"TCP"}]"#
            )
        );
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![
                e(
                    "cache-front-edge-11211",
                    "cache-front.edge.svc.cluster.local",
                    11211,
                    "auto"
                ),
                e(
                    "cache-front-edge-http-admin",
                    "cache-front.edge.svc.cluster.local",
                    8080,
                    "http1"
                ),
            ]
        );
    }

    #[test]
    fn ports_outside_the_range_are_left_out() {
        let list = format!(
            r#"{{"kind":"List","items":[{}]}}"#,
            service(
                "odd",
                "shop",
                r#"[{"name":"http-zero","port":0},{"name":"http-big","port":70000},{"name":"http-text","port":"80"},
                    {"name":"http-neg","port":-1},{"name":"http-none"},{"name":"http","port":65535}]"#
            )
        );
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![e("odd-shop-http", "odd.shop.svc.cluster.local", 65535, "http1")]
        );
        assert_eq!(
            got.skipped,
            vec![
                "Service shop/odd port http-zero: port number 0 is outside 1-65535",
                "Service shop/odd port http-big: port number 70000 is outside 1-65535",
                "Service shop/odd port http-text: port number \"80\" is not a number",
                "Service shop/odd port http-neg: port number -1 is outside 1-65535",
                "Service shop/odd port http-none: no port number",
            ]
        );
    }

    #[test]
    fn same_host_and_port_twice_keeps_the_first() {
        let list = format!(
            r#"{{"kind":"List","items":[{},{}]}}"#,
            service("reviews", "bookinfo", r#"[{"name":"http","port":9080}]"#),
            r#"{"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry","metadata":{"name":"reviews-alias","namespace":"bookinfo"},
               "spec":{"hosts":["reviews.bookinfo.svc.cluster.local"],"location":"MESH_INTERNAL",
                       "ports":[{"name":"http","number":9080,"protocol":"HTTP"}]}}"#
        );
        let got = import(&list, &defaults()).expect("imports");
        assert_eq!(
            entries(&got),
            vec![e(
                "reviews-bookinfo",
                "reviews.bookinfo.svc.cluster.local",
                9080,
                "http1"
            )]
        );
        assert_eq!(
            got.skipped,
            vec![
                "ServiceEntry bookinfo/reviews-alias host reviews.bookinfo.svc.cluster.local port http (9080): \
                 reviews.bookinfo.svc.cluster.local:9080 already comes from Service bookinfo/reviews port http (9080)"
            ]
        );
    }

    #[test]
    fn service_entry_without_location_is_external() {
        let se = r#"{"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry","metadata":{"name":"httpbin","namespace":"default"},
            "spec":{"hosts":["httpbin.org"],"ports":[{"name":"http","number":80,"protocol":"HTTP"}]}}"#;
        let got = import(se, &defaults()).expect("imports");
        assert_eq!(got.services, 0);
        assert_eq!(
            got.skipped,
            vec![
                "ServiceEntry default/httpbin: no location (Istio's default, MESH_EXTERNAL): an external service, \
                 not behind a sidecar; meshgate does not reach it through the gateway"
            ]
        );
    }

    #[test]
    fn service_port_protocols_follow_istio() {
        use Protocol::*;
        let tls = |said: &str| Err(format!("the app speaks TLS itself ({said}); {TLS_REASON}"));
        // Port number, name, protocol field, appProtocol, what meshgate should do.
        type Case = (
            u16,
            Option<&'static str>,
            &'static str,
            Option<&'static str>,
            Result<Protocol, String>,
        );
        let cases: Vec<Case> = vec![
            (80, Some("http"), "TCP", None, Ok(Http1)),
            (80, Some("http-web"), "TCP", None, Ok(Http1)),
            (80, Some("HTTP-Web"), "TCP", None, Ok(Http1)),
            (80, Some("http2"), "TCP", None, Ok(Http2)),
            (80, Some("http2-api"), "TCP", None, Ok(Http2)),
            (80, Some("grpc"), "TCP", None, Ok(Http2)),
            (80, Some("grpc-api"), "TCP", None, Ok(Http2)),
            (80, Some("grpc-web"), "TCP", None, Ok(Http2)),
            (80, Some("grpc-web-x"), "TCP", None, Ok(Http2)),
            (80, Some("grpcweb-x"), "TCP", None, Ok(Auto)),
            (80, Some("httpx"), "TCP", None, Ok(Auto)),
            (80, Some("web-http"), "TCP", None, Ok(Auto)),
            (80, Some("tcp"), "TCP", None, Ok(Tcp)),
            (80, Some("tcp-db"), "TCP", None, Ok(Tcp)),
            (80, Some("mongo"), "TCP", None, Ok(Tcp)),
            (80, Some("mysql-primary"), "TCP", None, Ok(Tcp)),
            (80, Some("redis"), "TCP", None, Ok(Tcp)),
            // Istio matches the whole prefix, not the start of it.
            (80, Some("mongodb"), "TCP", None, Ok(Auto)),
            (27017, Some("mongodb"), "TCP", None, Ok(Tcp)),
            (3306, None, "TCP", None, Ok(Tcp)),
            (25, Some("smtp"), "TCP", None, Ok(Tcp)),
            (8080, None, "TCP", None, Ok(Auto)),
            (443, Some("https"), "TCP", None, tls("port name https")),
            (443, Some("tls-admin"), "TCP", None, tls("port name tls-admin")),
            (
                53,
                Some("dns"),
                "UDP",
                None,
                Err("protocol UDP: Istio's sidecars proxy TCP only".to_string()),
            ),
            (
                9,
                Some("http"),
                "SCTP",
                None,
                Err("protocol SCTP: Istio's sidecars proxy TCP only".to_string()),
            ),
            (
                80,
                Some("udp-x"),
                "TCP",
                None,
                Err("port name udp-x declares UDP, and Istio's sidecars proxy TCP only".to_string()),
            ),
            // appProtocol wins over the name, whatever each says.
            (80, Some("http"), "TCP", Some("http2"), Ok(Http2)),
            (80, Some("tcp"), "TCP", Some("http"), Ok(Http1)),
            (80, Some("http"), "TCP", Some("grpc"), Ok(Http2)),
            (80, Some("http"), "TCP", Some("grpc-web"), Ok(Http2)),
            (80, Some("http"), "TCP", Some("tcp"), Ok(Tcp)),
            (80, Some("http"), "TCP", Some("mongo"), Ok(Tcp)),
            (80, Some("http"), "TCP", Some("mysql"), Ok(Tcp)),
            (80, Some("http"), "TCP", Some("redis"), Ok(Tcp)),
            (80, Some("http"), "TCP", Some("kubernetes.io/h2c"), Ok(Http2)),
            (80, Some("web"), "TCP", Some("kubernetes.io/ws"), Ok(Http1)),
            (80, Some("http"), "TCP", Some("nats.io/client"), Ok(Auto)),
            (443, Some("http"), "TCP", Some("https"), tls("appProtocol https")),
            (
                443,
                Some("http"),
                "TCP",
                Some("kubernetes.io/wss"),
                tls("appProtocol kubernetes.io/wss"),
            ),
        ];
        for (number, name, l4, app, want) in cases {
            assert_eq!(
                service_port_protocol(number, name, l4, app),
                want,
                "{number} {name:?} {l4} {app:?}"
            );
        }
    }

    #[test]
    fn service_entry_port_protocols_follow_istio() {
        use Protocol::*;
        let tls = |p: &str| Err(format!("the app speaks TLS itself (protocol {p}); {TLS_REASON}"));
        let cases: Vec<(Option<&str>, Result<Protocol, String>)> = vec![
            (Some("HTTP"), Ok(Http1)),
            (Some("http"), Ok(Http1)),
            (Some("HTTP2"), Ok(Http2)),
            (Some("GRPC"), Ok(Http2)),
            (Some("GRPC-WEB"), Ok(Http2)),
            (Some("TCP"), Ok(Tcp)),
            (Some("MONGO"), Ok(Tcp)),
            (Some("MYSQL"), Ok(Tcp)),
            (Some("REDIS"), Ok(Tcp)),
            (Some("HTTPS"), tls("HTTPS")),
            (Some("TLS"), tls("TLS")),
            (
                Some("UDP"),
                Err("protocol UDP: Istio's sidecars proxy TCP only".to_string()),
            ),
            (None, Ok(Auto)),
            (Some(""), Ok(Auto)),
        ];
        for (given, want) in cases {
            assert_eq!(entry_port_protocol(given), want, "{given:?}");
        }
    }

    #[test]
    fn names_and_hosts_are_written_as_yaml_strings() {
        assert_eq!(yaml_scalar("reviews-bookinfo"), "reviews-bookinfo");
        assert_eq!(yaml_scalar("api.example.com"), "api.example.com");
        assert_eq!(yaml_scalar("3scale-gw"), "\"3scale-gw\"");
        assert_eq!(yaml_scalar("10.0.0.1"), "\"10.0.0.1\"");
        assert_eq!(yaml_scalar("no"), "\"no\"");
        assert_eq!(sanitize("Se-My.Entry--x_"), "se-my-entry-x");
        assert_eq!(sanitize("__"), "service");
        let list = format!(
            r#"{{"kind":"List","items":[{}]}}"#,
            service("9lives", "n", r#"[{"name":"http","port":80}]"#)
        );
        let got = import(&list, &defaults()).expect("imports");
        assert!(got.yaml.contains("\n  \"9lives-n\":\n"), "{}", got.yaml);
        assert_eq!(
            entries(&got),
            vec![e("9lives-n", "9lives.n.svc.cluster.local", 80, "http1")]
        );
    }

    #[test]
    fn a_line_break_in_a_name_stays_in_its_comment() {
        let list = r#"{"kind":"List","items":[{"apiVersion":"v1","kind":"Service",
            "metadata":{"name":"evil\nservices:\n  x: 1","namespace":"default"},"spec":{"type":"ExternalName"}}]}"#;
        let got = import(list, &defaults()).expect("imports");
        assert_eq!(
            got.skipped,
            vec![
                "Service default/evil services:   x: 1: type ExternalName (a DNS alias for another name), not a mesh \
                 service behind a sidecar"
            ]
        );
        assert_eq!(entries(&got), vec![]);
    }

    #[test]
    fn output_parses_back_as_a_services_map() {
        let got = import(FIXTURE, &defaults()).expect("imports");
        let doc: Value = serde_saphyr::from_str(&got.yaml).expect("YAML");
        let map = doc.as_object().expect("a mapping");
        assert_eq!(map.keys().collect::<Vec<_>>(), vec!["services"]);
        let names: Vec<&String> = map["services"].as_object().expect("services map").keys().collect();
        assert_eq!(names.len(), got.services);
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "sorted by name");
        for name in names {
            assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
                "{name}"
            );
        }
    }
}
