//! Calls to one meshgate instance's admin API: `POST /drain`, `GET /readyz`, `GET /metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::http::Http;
use crate::prom::{parse_exposition, sum_of};

/// What an instance's `/metrics` says about its drain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceLoad {
    /// `meshgate_requests_in_flight`.
    pub in_flight: f64,
    /// `meshgate_downstream_connections`, all listeners.
    pub connections: f64,
    /// `meshgate_draining` is 1.
    pub draining: bool,
}

impl InstanceLoad {
    /// Nothing left to lose: draining, no request in flight and no client connection open.
    /// In-flight alone is not enough: between two requests it is 0 while clients (and the load
    /// balancer, until its deregistration delay ends) keep sending on open connections.
    pub fn drained(&self) -> bool {
        self.draining && self.in_flight == 0.0 && self.connections == 0.0
    }
}

#[derive(Debug, Clone)]
pub struct Admin {
    http: Http,
    token: Option<String>,
    timeout: Duration,
}

impl Admin {
    pub fn new(http: Http, token: Option<String>, timeout: Duration) -> Admin {
        Admin { http, token, timeout }
    }

    /// Starts the drain; Ok once the instance accepted it (202, or 200 "already draining").
    pub async fn drain(&self, addr: SocketAddr) -> Result<(), String> {
        let mut req = Request::post(format!("http://{addr}/drain"));
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let (status, body) = self.http.send(req, self.timeout).await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "POST /drain: {status} {}",
                String::from_utf8_lossy(&body).trim()
            ))
        }
    }

    /// `GET /readyz` is 200.
    pub async fn ready(&self, addr: SocketAddr) -> Result<bool, String> {
        let (status, _) = self
            .http
            .get(&format!("http://{addr}/readyz"), self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok(status == StatusCode::OK)
    }

    pub async fn load(&self, addr: SocketAddr) -> Result<InstanceLoad, String> {
        let (status, body) = self
            .http
            .get(&format!("http://{addr}/metrics"), self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("GET /metrics: {status}"));
        }
        let samples = parse_exposition(&String::from_utf8_lossy(&body));
        let in_flight =
            sum_of(&samples, "meshgate_requests_in_flight").ok_or("GET /metrics: no meshgate_requests_in_flight")?;
        Ok(InstanceLoad {
            in_flight,
            connections: sum_of(&samples, "meshgate_downstream_connections").unwrap_or(0.0),
            draining: sum_of(&samples, "meshgate_draining").unwrap_or(0.0) >= 1.0,
        })
    }
}
