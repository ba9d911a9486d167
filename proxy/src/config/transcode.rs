//! `transcode:` of a service: the descriptor set and the gRPC services whose `google.api.http`
//! bindings meshgate transcodes (docs/config.md "gRPC-JSON transcoding"). The file is read and
//! every binding checked at load, so a bad descriptor set fails `meshgate check` and a reload
//! with one keeps the running config.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::Spanned;
use yamlconf::{line_of as line, Collector};

use super::schema::UpstreamProtocol;
use crate::transcode::Transcoder;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTranscode {
    /// A `FileDescriptorSet` with its imports (`protoc --include_imports --descriptor_set_out`).
    pub descriptor_set: Spanned<String>,
    /// Full names of the gRPC services to transcode, e.g. `bookstore.Bookstore`.
    pub services: Vec<Spanned<String>>,
}

pub(super) fn transcoder(
    config: &Path,
    protocol: UpstreamProtocol,
    raw: &Spanned<RawTranscode>,
    errs: &mut Collector,
) -> Option<Arc<Transcoder>> {
    if protocol != UpstreamProtocol::Http2 {
        errs.at(
            line(raw),
            "transcode: only for protocol http2 services (gRPC runs over HTTP/2)",
        );
        return None;
    }
    let t = &raw.value;
    let file = super::validate::resolve_path(config, &t.descriptor_set.value);
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) => {
            errs.at(
                line(&t.descriptor_set),
                format!("cannot read descriptor set {}: {e}", file.display()),
            );
            return None;
        }
    };
    let names: Vec<&str> = t.services.iter().map(|s| s.value.as_str()).collect();
    match Transcoder::load(&bytes, &names) {
        Ok(tc) => Some(Arc::new(tc)),
        Err(list) => {
            for e in list {
                let at = match e.service {
                    Some(i) => line(&t.services[i]),
                    None if t.services.is_empty() => line(raw),
                    None => line(&t.descriptor_set),
                };
                errs.at(at, format!("transcode: {}: {}", file.display(), e.message));
            }
            None
        }
    }
}
