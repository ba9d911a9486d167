//! gRPC-JSON transcoding: a service's `transcode:` descriptor set turns REST/JSON requests that
//! match a method's `google.api.http` binding into unary (or streaming) gRPC calls, and the
//! answers back into JSON. Documented in docs/config.md "gRPC-JSON transcoding".
//!
//! Owns: reading the bindings from a descriptor set at config load (`Transcoder::load`),
//! matching a request to one (`Transcoder::route`), building the request message from the
//! path, the query and the body (`Call::encode`), and the response side (`response.rs`). The
//! request then travels the normal forward path (tenant policy, pools, identity, metrics);
//! requests that match no binding, and native gRPC, pass through untouched.

mod message;
mod response;
pub mod template;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, MethodDescriptor};

pub use response::{respond, TranscodedBody};
use template::{Capture, PathTemplate};

/// A transcoded request body is read whole before anything goes upstream (so a bad one is a
/// 400 with nothing sent); this bounds it, as gRPC's default message size limit does.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// The largest response message converted.
const MAX_RESPONSE_MESSAGE: usize = 16 << 20;

/// The bindings of the services listed under one service's `transcode:`.
pub struct Transcoder {
    services: Vec<String>,
    bindings: Vec<Binding>,
}

impl std::fmt::Debug for Transcoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcoder")
            .field("services", &self.services)
            .field("bindings", &self.bindings.len())
            .finish()
    }
}

#[derive(Debug)]
enum BodyRule {
    None,
    /// `body: "*"`: the JSON body is the whole request message.
    All,
    /// `body: "field"`: the JSON body is that top-level field.
    Field(FieldDescriptor),
}

struct Binding {
    method: MethodDescriptor,
    /// `/pkg.Service/Method`.
    grpc_path: String,
    /// `None` for a `custom` pattern of kind `*`.
    http_method: Option<Method>,
    template: PathTemplate,
    body: BodyRule,
    response_body: Option<FieldDescriptor>,
}

/// A load error; `service` indexes the `services` list it came from, when one is to blame.
#[derive(Debug, PartialEq, Eq)]
pub struct LoadError {
    pub service: Option<usize>,
    pub message: String,
}

fn err(service: Option<usize>, message: impl Into<String>) -> LoadError {
    LoadError {
        service,
        message: message.into(),
    }
}

impl Transcoder {
    /// Reads a `FileDescriptorSet` (built with its imports: `protoc --include_imports`) and the
    /// HTTP bindings of `services` (full names such as `bookstore.Bookstore`).
    pub fn load(descriptor_set: &[u8], services: &[&str]) -> Result<Transcoder, Vec<LoadError>> {
        let pool = DescriptorPool::decode(descriptor_set)
            .map_err(|e| vec![err(None, format!("not a valid descriptor set: {e}"))])?;
        if services.is_empty() {
            return Err(vec![err(None, "services: list at least one gRPC service to transcode")]);
        }
        let Some(http) = pool.get_extension_by_name("google.api.http") else {
            return Err(vec![err(
                None,
                "the descriptor set has no google.api.http option: build it from protos that import \
                 google/api/annotations.proto, with --include_imports",
            )]);
        };
        let mut errors = Vec::new();
        let mut bindings = Vec::new();
        for (i, name) in services.iter().enumerate() {
            // Counts before this service: its own errors, not an earlier service's, decide below.
            let (bindings_before, errors_before) = (bindings.len(), errors.len());
            let Some(svc) = pool.get_service_by_name(name) else {
                let known: Vec<String> = pool.services().map(|s| s.full_name().to_string()).collect();
                errors.push(err(
                    Some(i),
                    format!(
                        "gRPC service {name:?} is not in the descriptor set (it has: {})",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
                continue;
            };
            for method in svc.methods() {
                let opts = method.options();
                if !opts.has_extension(&http) {
                    continue;
                }
                let rule = opts.get_extension(&http);
                let Some(rule) = rule.as_message() else { continue };
                let mut rules = vec![rule.clone()];
                if let Some(extra) = rule.get_field_by_name("additional_bindings") {
                    rules.extend(
                        extra
                            .as_list()
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|v| v.as_message().cloned()),
                    );
                }
                for r in &rules {
                    match Binding::new(&method, r) {
                        Ok(b) => bindings.push(b),
                        Err(e) => errors.push(err(Some(i), format!("{}: {e}", method.full_name()))),
                    }
                }
            }
            // A service whose bindings were all invalid has its errors already; one with none
            // at all gets this one.
            if bindings.len() == bindings_before && errors.len() == errors_before {
                errors.push(err(
                    Some(i),
                    format!("gRPC service {name:?} has no google.api.http bindings: nothing to transcode"),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Transcoder {
            services: services.iter().map(|s| s.to_string()).collect(),
            bindings,
        })
    }

    /// The binding a REST request matches (the most specific one when several do), or None:
    /// the request then passes through as it came.
    pub fn route<'a>(&'a self, method: &Method, uri: &'a Uri) -> Option<Call<'a>> {
        let mut best: Option<(&Binding, Vec<Capture<'a>>)> = None;
        for b in &self.bindings {
            if b.http_method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            if best
                .as_ref()
                .is_some_and(|(x, _)| x.template.literals() >= b.template.literals())
            {
                continue;
            }
            if let Some(c) = b.template.matches(uri.path()) {
                best = Some((b, c));
            }
        }
        best.map(|(binding, captures)| Call {
            binding,
            captures,
            query: uri.query(),
        })
    }
}

impl Binding {
    fn new(method: &MethodDescriptor, rule: &DynamicMessage) -> Result<Binding, String> {
        let text = |name: &str| {
            rule.get_field_by_name(name)
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        };
        let mut pattern = None;
        for (name, m) in [
            ("get", Method::GET),
            ("put", Method::PUT),
            ("post", Method::POST),
            ("delete", Method::DELETE),
            ("patch", Method::PATCH),
        ] {
            if rule.has_field_by_name(name) {
                pattern = Some((Some(m), text(name)));
            }
        }
        if rule.has_field_by_name("custom") {
            let custom = rule.get_field_by_name("custom");
            let c = custom.as_ref().and_then(|v| v.as_message());
            let field = |n: &str| {
                c.and_then(|c| c.get_field_by_name(n))
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            };
            let kind = field("kind");
            let m = if kind == "*" {
                None
            } else {
                Some(Method::from_bytes(kind.as_bytes()).map_err(|_| format!("invalid custom method {kind:?}"))?)
            };
            pattern = Some((m, field("path")));
        }
        let (http_method, path) = pattern.ok_or("google.api.http names no pattern (get, post, …)")?;
        let template = PathTemplate::parse(&path).map_err(|e| format!("invalid path template {path:?}: {e}"))?;
        let input = method.input();
        for fp in template.field_paths() {
            message::check_field_path(&input, fp).map_err(|e| format!("path template {path:?}: {e}"))?;
        }
        let body = match text("body").as_str() {
            "" => BodyRule::None,
            "*" => BodyRule::All,
            f => BodyRule::Field(
                input
                    .get_field_by_name(f)
                    .ok_or_else(|| format!("body {f:?}: {} has no such field", input.full_name()))?,
            ),
        };
        let response_body =
            match text("response_body").as_str() {
                "" => None,
                f => Some(method.output().get_field_by_name(f).ok_or_else(|| {
                    format!("response_body {f:?}: {} has no such field", method.output().full_name())
                })?),
            };
        Ok(Binding {
            grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
            method: method.clone(),
            http_method,
            template,
            body,
            response_body,
        })
    }
}

/// A request matched to a binding.
pub struct Call<'a> {
    binding: &'a Binding,
    captures: Vec<Capture<'a>>,
    query: Option<&'a str>,
}

impl Call<'_> {
    /// `:path` of the gRPC call.
    pub fn grpc_path(&self) -> &str {
        &self.binding.grpc_path
    }

    /// `pkg.Service.Method`, for logs.
    pub fn method_name(&self) -> &str {
        self.binding.method.full_name()
    }

    /// Turns the REST request's headers into the gRPC call's: its own content type and `te`,
    /// nothing that described the JSON body. Other headers travel as call metadata.
    pub fn grpc_headers(&self, h: &mut HeaderMap) {
        for n in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::ACCEPT,
            header::ACCEPT_ENCODING,
            header::CONTENT_ENCODING,
            header::EXPECT,
        ] {
            h.remove(n);
        }
        // meshgate does not decompress: the server must not compress.
        h.remove("grpc-encoding");
        h.remove("grpc-accept-encoding");
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }

    /// The gRPC request body (length-prefixed messages) built from the path variables, the
    /// query and the JSON body; for a client-streaming method, the body is NDJSON, one
    /// message per line. An error is a one-line reason for a 400.
    pub fn encode(&self, body: &[u8]) -> Result<Bytes, String> {
        let query = self.query_fields()?;
        let mut out = BytesMut::new();
        if self.binding.method.is_client_streaming() {
            for (n, line) in body.split(|b| *b == b'\n').enumerate() {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                let msg = self
                    .message(Some(line), &query)
                    .map_err(|e| format!("line {}: {e}", n + 1))?;
                frame(&mut out, &msg);
            }
        } else {
            let body = (!body.trim_ascii().is_empty()).then_some(body);
            frame(&mut out, &self.message(body, &query)?);
        }
        Ok(out.freeze())
    }

    /// The query parameters as (field path, value). Per google.api.http they bind only the
    /// fields that neither the path nor the body covers: a parameter naming the body field or
    /// a field under it is an error, as is any parameter with `body: "*"` ("not possible to
    /// have HTTP parameters, as all fields not bound by the path end in the body"); one naming
    /// a path variable's field is left out (the path wins).
    fn query_fields(&self) -> Result<Vec<(Vec<String>, String)>, String> {
        let input = self.binding.method.input();
        let mut fields = Vec::new();
        for (k, v) in message::parse_query(self.query.unwrap_or("")) {
            let path: Vec<String> = k.split('.').map(str::to_string).collect();
            match &self.binding.body {
                BodyRule::All => {
                    return Err(format!(
                        "query parameter {k}: the request body sets every field of {} (its binding has                          `body: \"*\"`), so it takes no query parameters",
                        input.full_name()
                    ))
                }
                BodyRule::Field(body)
                    if message::find_field(&input, &path[0]).is_some_and(|f| f.number() == body.number()) =>
                {
                    return Err(format!(
                        "query parameter {k}: field {} is set by the request body (its binding has                          `body: \"{}\"`), not by the query",
                        body.name(),
                        body.name()
                    ))
                }
                _ => {}
            }
            if self.captures.iter().any(|(p, _)| *p == path.as_slice()) {
                continue;
            }
            fields.push((path, v));
        }
        Ok(fields)
    }

    fn message(&self, body: Option<&[u8]>, query: &[(Vec<String>, String)]) -> Result<DynamicMessage, String> {
        let input = self.binding.method.input();
        let mut msg = match (&self.binding.body, body) {
            (BodyRule::All, Some(json)) => message::message_from_json(&input, json)?,
            (BodyRule::Field(f), Some(json)) => message::field_from_json(&input, f, json)?,
            (BodyRule::None, Some(_)) => {
                return Err(format!(
                    "{} takes no request body on this route (its binding has no `body`)",
                    self.binding.method.full_name()
                ))
            }
            (_, None) => DynamicMessage::new(input.clone()),
        };
        // Query parameters fill the fields neither the path nor the body covers.
        for (path, v) in query {
            message::set_field_path(&mut msg, path, v).map_err(|e| format!("query parameter {e}"))?;
        }
        for (path, v) in &self.captures {
            // The path wins over the body: the URL names the resource.
            let field = message::find_field(&input, &path[0]);
            if path.len() == 1 && field.as_ref().is_some_and(|f| f.is_list()) {
                msg.clear_field(field.as_ref().expect("checked"));
            }
            message::set_field_path(&mut msg, path, v).map_err(|e| format!("path variable {e}"))?;
        }
        Ok(msg)
    }

    fn output(&self) -> (prost_reflect::MessageDescriptor, Option<FieldDescriptor>, bool) {
        (
            self.binding.method.output(),
            self.binding.response_body.clone(),
            self.binding.method.is_server_streaming(),
        )
    }
}

fn frame(out: &mut BytesMut, msg: &DynamicMessage) {
    let len = msg.encoded_len();
    out.reserve(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    msg.encode(out).expect("reserved enough capacity");
}

/// The HTTP status for a gRPC status code: the mapping of google/rpc/code.proto (the one
/// grpc-gateway and Envoy's transcoder use).
pub fn http_status(code: u32) -> StatusCode {
    let s = match code {
        0 => 200,
        1 => 499,  // CANCELLED
        2 => 500,  // UNKNOWN
        3 => 400,  // INVALID_ARGUMENT
        4 => 504,  // DEADLINE_EXCEEDED
        5 => 404,  // NOT_FOUND
        6 => 409,  // ALREADY_EXISTS
        7 => 403,  // PERMISSION_DENIED
        8 => 429,  // RESOURCE_EXHAUSTED
        9 => 400,  // FAILED_PRECONDITION
        10 => 409, // ABORTED
        11 => 400, // OUT_OF_RANGE
        12 => 501, // UNIMPLEMENTED
        13 => 500, // INTERNAL
        14 => 503, // UNAVAILABLE
        15 => 500, // DATA_LOSS
        16 => 401, // UNAUTHENTICATED
        _ => 500,
    };
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The JSON error body: `{"code": N, "message": "..."}` (google.rpc.Status without details).
pub fn error_json(code: u32, message: &str) -> Bytes {
    let mut v =
        serde_json::to_vec(&serde_json::json!({ "code": code, "message": message })).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

#[cfg(test)]
mod tests;
