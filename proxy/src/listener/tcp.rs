//! TCP listeners (`protocol: tcp`): each accepted connection is admitted, its PROXY header read
//! (behind a trusted load balancer), and handed to the pipeline as a tunnel to the listener's
//! one service (`pipeline::tunnel::tcp`), which authorizes it by its source and splices it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{accept_failed, finish, told_to_close, Admission};
use crate::io::Prefixed;
use crate::lifecycle::CloseSignal;
use crate::pipeline::{tunnel, ConnInfo};
use crate::proxy_protocol;
use crate::runtime::{Generation, Runtime};

/// Serves `listener` until told to close; connections still open at the drain deadline are cut
/// (a byte stream has no way to ask the client to finish).
pub async fn serve(listener: TcpListener, name: Arc<str>, runtime: Arc<Runtime>, mut close: CloseSignal) {
    let admission = Admission::new(runtime.clone(), name.clone());
    let mut conns = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        accept_failed(&name, e).await;
                        continue;
                    }
                };
                let gen = runtime.current();
                let Some(guard) = admission.admit(&gen) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (name, close) = (name.clone(), close.clone());
                conns.spawn(async move {
                    let _guard = guard;
                    handle(&gen, name, stream, peer, close).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            deadline = told_to_close(&mut close) => break deadline,
        }
    };
    drop(listener);
    finish(&name, conns, deadline).await;
}

/// `gen` is the config current at accept time: the listener's service index belongs to it, so
/// a reload while the PROXY header is read cannot point the connection elsewhere.
async fn handle(
    gen: &Generation,
    name: Arc<str>,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    close: CloseSignal,
) {
    let started = Instant::now();
    let cfg = gen.listener(&name);
    let (client, vpce, prefix) = match proxy_protocol::admit(&mut stream, cfg, peer).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(listener = %name, %peer, error = %e, "PROXY header rejected; closing");
            gen.metrics.record_denied(&name, "bad_proxy_header");
            return;
        }
    };
    let Some(service_id) = cfg.and_then(|l| l.service) else {
        return;
    };
    let idle = cfg.map_or(Duration::from_secs(3600), |l| l.idle_timeout);
    let mut info = ConnInfo::new(name, client, vpce);
    info.close = Some(close);
    tunnel::tcp(gen, &info, Prefixed::new(prefix, stream), service_id, idle, started).await;
}
