//! TCP listeners (`protocol: tcp`): each accepted connection is admitted, its PROXY header read
//! (behind a trusted load balancer), and handed to the pipeline as a tunnel to the listener's
//! one service (`pipeline::tunnel::tcp`), which authorizes it by its source and splices it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::{Admission, ConnGauge, PrefaceSlot};
use crate::io::Prefixed;
use crate::lifecycle::CloseSignal;
use crate::pipeline::{tunnel, ConnInfo};
use crate::proxy_protocol;
use crate::runtime::{Generation, Runtime};

/// Serves `listener` until told to close; connections still open at the drain deadline are cut
/// (a byte stream has no way to ask the client to finish).
pub async fn serve(listener: TcpListener, name: Arc<str>, runtime: Arc<Runtime>, close: CloseSignal) {
    super::accept_loop(listener, name, runtime, close, |c| async move {
        let started = c.accepted_at.into_std();
        handle(
            &c.gen,
            &c.admission,
            c.guard,
            c.stream,
            c.peer,
            c.close,
            c.preface,
            started,
            c.behind_lb,
        )
        .await;
    })
    .await;
}

/// `gen` is the config current at accept time: the listener's service index belongs to it, so
/// a reload while the PROXY header is read cannot point the connection elsewhere.
#[allow(clippy::too_many_arguments)]
async fn handle(
    gen: &Arc<Generation>,
    admission: &Admission,
    mut guard: ConnGauge,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    close: CloseSignal,
    preface: PrefaceSlot,
    started: Instant,
    behind_lb: bool,
) {
    let name = admission.name.clone();
    let cfg = gen.listener(&name);
    // The PROXY header is the whole preface of a TCP connection: due within the header read
    // timeout of the accept.
    let deadline = tokio::time::Instant::from_std(started) + gen.snapshot.limits.header_read_timeout;
    let evicted = preface.evicted();
    let admitted = tokio::select! {
        a = tokio::time::timeout_at(deadline, proxy_protocol::admit(&mut stream, cfg, peer)) => a,
        _ = evicted => return,
    };
    let (client, vpce, prefix) = match admitted {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(listener = %name, %peer, error = %e, "PROXY header rejected; closing");
            gen.metrics.record_denied(&name, "bad_proxy_header");
            return;
        }
        Err(_) => {
            gen.metrics.record_denied(&name, "bad_proxy_header");
            return;
        }
    };
    drop(preface);
    if behind_lb && !admission.admit_source(gen, &mut guard, client.ip()) {
        return;
    }
    let _guard = guard;
    let Some(service_id) = cfg.and_then(|l| l.service) else {
        return;
    };
    let idle = cfg.map_or(Duration::from_secs(3600), |l| l.idle_timeout);
    let mut info = ConnInfo::new(name, client, vpce);
    info.close = Some(close);
    tunnel::tcp(gen, &info, Prefixed::new(prefix, stream), service_id, idle, started).await;
}
