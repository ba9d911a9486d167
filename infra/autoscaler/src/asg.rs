//! The AWS side: the Auto Scaling API through `aws-sdk-autoscaling` (group state, desired
//! capacity, lifecycle hooks), and EC2 `DescribeInstances` for instances' private IPs.
//!
//! Retries are ours, not the SDK's (its retry is switched off), so the policy is visible and
//! counted: throttling (`Throttling`, `RequestLimitExceeded`, …), `ResourceContention` and
//! transport failures are retried with exponential backoff and full jitter up to
//! `aws.max_attempts`; anything else (validation, access denied) fails at once.
//!
//! EC2: one signed query-API call (`DescribeInstances`) rather than `aws-sdk-ec2`, a crate that
//! takes longer to build than the rest of the autoscaler together; the signing, credentials and
//! region are the SDK's own.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::Client;
use bytes::Bytes;
use http_body_util::Full;

use crate::config::AwsConfig;
use crate::http::Http;
use crate::metrics::Metrics;

/// What the controller needs to know about a group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupState {
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub instances: Vec<InstanceState>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceState {
    pub id: String,
    /// `InService`, `Pending`, `Pending:Wait`, `Terminating:Wait`, …
    pub lifecycle_state: String,
}

impl GroupState {
    pub fn count(&self, state: &str) -> u32 {
        self.instances.iter().filter(|i| i.lifecycle_state == state).count() as u32
    }

    /// Instances launching: `Pending`, `Pending:Wait`, `Pending:Proceed`.
    pub fn pending(&self) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.lifecycle_state.starts_with("Pending"))
            .count() as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Launching,
    Terminating,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Launching => "launching",
            Transition::Terminating => "terminating",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    pub name: String,
    pub transition: Transition,
}

/// A failed AWS call, after retries.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct AwsError {
    pub operation: &'static str,
    /// The AWS error code, when the service answered one.
    pub code: Option<String>,
    pub message: String,
}

/// The retry class of a failed attempt, also the `kind` label of the error counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Throttling,
    ResourceContention,
    Transport,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Throttling => "throttling",
            ErrorKind::ResourceContention => "resource_contention",
            ErrorKind::Transport => "transport",
            ErrorKind::Other => "other",
        }
    }

    pub fn retryable(self) -> bool {
        self != ErrorKind::Other
    }

    pub fn of_code(code: &str) -> ErrorKind {
        match code {
            "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "SlowDown" => ErrorKind::Throttling,
            "ResourceContention" | "ResourceContentionFault" => ErrorKind::ResourceContention,
            _ => ErrorKind::Other,
        }
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: &SdkError<E, R>,
) -> (ErrorKind, Option<String>, String) {
    let message = crate::http::error_chain(e);
    match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            (ErrorKind::Transport, None, message)
        }
        _ => {
            let code = e.code().map(str::to_string);
            let kind = code.as_deref().map(ErrorKind::of_code).unwrap_or(ErrorKind::Other);
            let message = match e.message() {
                Some(m) => format!("{}: {m}", code.as_deref().unwrap_or("error")),
                None => message,
            };
            (kind, code, message)
        }
    }
}

/// Exponential backoff with full jitter: a random delay in [0, base × 2^attempt], capped at 20 s.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = base
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(20));
    cap.mul_f64(rand::random::<f64>())
}

/// The SDK configuration: our HTTP client (rustls on ring), the SDK's retries off (ours are
/// above), region and endpoint from the config, and credentials from the standard chain unless
/// `credentials` is given (tests).
pub async fn sdk_config(aws: &AwsConfig, credentials: Option<Credentials>) -> SdkConfig {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(aws.timeout)
                .connect_timeout(Duration::from_secs(5))
                .build(),
        );
    if let Some(r) = &aws.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &aws.endpoint_url {
        loader = loader.endpoint_url(e.clone());
    }
    if let Some(c) = credentials {
        loader = loader.credentials_provider(c);
    }
    loader.load().await
}

/// The Auto Scaling and EC2 calls the controller makes, with retries and error counting.
#[derive(Clone)]
pub struct Aws {
    client: Client,
    sdk: SdkConfig,
    http: Http,
    cfg: AwsConfig,
    metrics: Arc<Metrics>,
}

impl Aws {
    pub fn new(sdk: &SdkConfig, cfg: &AwsConfig, http: Http, metrics: Arc<Metrics>) -> Aws {
        Aws {
            client: Client::new(sdk),
            sdk: sdk.clone(),
            http,
            cfg: cfg.clone(),
            metrics,
        }
    }

    /// The SDK client, for callers that need more than the controller does (tests set groups up
    /// with it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn retry<T, E, R, F, Fut>(&self, operation: &'static str, mut f: F) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let (kind, code, message) = classify(&e);
                    self.metrics.aws_error(operation, kind);
                    attempt += 1;
                    if !kind.retryable() || attempt >= self.cfg.max_attempts {
                        return Err(AwsError {
                            operation,
                            code,
                            message,
                        });
                    }
                    let delay = backoff(self.cfg.retry_base_delay, attempt - 1);
                    tracing::warn!(operation, kind = kind.as_str(), attempt, ?delay, error = %message, "AWS call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    pub async fn describe_group(&self, name: &str) -> Result<GroupState, AwsError> {
        let out = self
            .retry("DescribeAutoScalingGroups", || {
                self.client
                    .describe_auto_scaling_groups()
                    .auto_scaling_group_names(name)
                    .send()
            })
            .await?;
        let g = out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .ok_or_else(|| AwsError {
                operation: "DescribeAutoScalingGroups",
                code: None,
                message: format!("no Auto Scaling group named {name:?}"),
            })?;
        let n = |v: Option<i32>| v.unwrap_or(0).max(0) as u32;
        Ok(GroupState {
            desired: n(g.desired_capacity()),
            min: n(g.min_size()),
            max: n(g.max_size()),
            instances: g
                .instances()
                .iter()
                .filter_map(|i| {
                    Some(InstanceState {
                        id: i.instance_id()?.to_string(),
                        lifecycle_state: i.lifecycle_state().map(|s| s.as_str().to_string()).unwrap_or_default(),
                    })
                })
                .collect(),
        })
    }

    pub async fn set_desired_capacity(&self, group: &str, desired: u32) -> Result<(), AwsError> {
        let capacity = i32::try_from(desired).unwrap_or(i32::MAX);
        self.retry("SetDesiredCapacity", || {
            self.client
                .set_desired_capacity()
                .auto_scaling_group_name(group)
                .desired_capacity(capacity)
                .honor_cooldown(self.cfg.honor_cooldown)
                .send()
        })
        .await?;
        Ok(())
    }

    /// The group's lifecycle hooks for launching and terminating instances.
    pub async fn hooks(&self, group: &str) -> Result<Vec<Hook>, AwsError> {
        let out = self
            .retry("DescribeLifecycleHooks", || {
                self.client
                    .describe_lifecycle_hooks()
                    .auto_scaling_group_name(group)
                    .send()
            })
            .await?;
        Ok(out
            .lifecycle_hooks()
            .iter()
            .filter_map(|h| {
                let transition = match h.lifecycle_transition()? {
                    "autoscaling:EC2_INSTANCE_LAUNCHING" => Transition::Launching,
                    "autoscaling:EC2_INSTANCE_TERMINATING" => Transition::Terminating,
                    _ => return None,
                };
                Some(Hook {
                    name: h.lifecycle_hook_name()?.to_string(),
                    transition,
                })
            })
            .collect())
    }

    pub async fn complete_lifecycle_action(&self, group: &str, hook: &str, instance: &str) -> Result<(), AwsError> {
        self.retry("CompleteLifecycleAction", || {
            self.client
                .complete_lifecycle_action()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .instance_id(instance)
                .lifecycle_action_result("CONTINUE")
                .send()
        })
        .await?;
        Ok(())
    }

    pub async fn heartbeat(&self, group: &str, hook: &str, instance: &str) -> Result<(), AwsError> {
        self.retry("RecordLifecycleActionHeartbeat", || {
            self.client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .instance_id(instance)
                .send()
        })
        .await?;
        Ok(())
    }

    /// Private IPv4 addresses of `ids` (EC2 `DescribeInstances`); instances without one are
    /// left out.
    pub async fn private_ips(&self, ids: &[String]) -> Result<HashMap<String, IpAddr>, AwsError> {
        let op = "DescribeInstances";
        let err = |message: String| AwsError {
            operation: op,
            code: None,
            message,
        };
        let region = self
            .sdk
            .region()
            .ok_or_else(|| err("no AWS region configured".into()))?
            .to_string();
        let endpoint = match &self.cfg.endpoint_url {
            Some(e) => format!("{e}/"),
            None => format!("https://ec2.{region}.amazonaws.com/"),
        };
        let mut body = String::from("Action=DescribeInstances&Version=2016-11-15");
        for (i, id) in ids.iter().enumerate() {
            body.push_str(&format!("&InstanceId.{}={}", i + 1, crate::http::url_encode(id)));
        }
        let provider = self
            .sdk
            .credentials_provider()
            .ok_or_else(|| err("no AWS credentials provider".into()))?;
        let mut attempt = 0;
        loop {
            let result: Result<Bytes, (ErrorKind, Option<String>, String)> = async {
                let creds = provider
                    .provide_credentials()
                    .await
                    .map_err(|e| (ErrorKind::Other, None, format!("credentials: {e}")))?;
                let req =
                    signed_query(&endpoint, &region, "ec2", &body, creds).map_err(|e| (ErrorKind::Other, None, e))?;
                let (status, resp) = self
                    .http
                    .send(req, self.cfg.timeout)
                    .await
                    .map_err(|e| (ErrorKind::Transport, None, e.to_string()))?;
                if status.is_success() {
                    return Ok(resp);
                }
                let text = String::from_utf8_lossy(&resp).into_owned();
                let code = xml_first(&text, "Code");
                let kind = code
                    .as_deref()
                    .map(ErrorKind::of_code)
                    .unwrap_or(if status.is_server_error() {
                        ErrorKind::Transport
                    } else {
                        ErrorKind::Other
                    });
                let message = xml_first(&text, "Message").unwrap_or(text.clone());
                Err((kind, code, format!("{status}: {message}")))
            }
            .await;
            match result {
                Ok(bytes) => return parse_describe_instances(&String::from_utf8_lossy(&bytes)).map_err(err),
                Err((kind, code, message)) => {
                    self.metrics.aws_error(op, kind);
                    attempt += 1;
                    if !kind.retryable() || attempt >= self.cfg.max_attempts {
                        return Err(AwsError {
                            operation: op,
                            code,
                            message,
                        });
                    }
                    tokio::time::sleep(backoff(self.cfg.retry_base_delay, attempt - 1)).await;
                }
            }
        }
    }
}

/// A SigV4-signed AWS query-protocol POST.
fn signed_query(
    endpoint: &str,
    region: &str,
    service: &str,
    body: &str,
    creds: Credentials,
) -> Result<http::Request<Full<Bytes>>, String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    use aws_sigv4::sign::v4;
    let mut req = http::Request::post(endpoint)
        .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?;
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .ok_or_else(|| format!("endpoint {endpoint:?} has no host"))?;
    req.headers_mut()
        .insert(http::header::HOST, host.parse().map_err(|_| "bad host".to_string())?);
    let identity = creds.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing: {e}"))?
        .into();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let signable = SignableRequest::new(
        "POST",
        endpoint,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| format!("signing: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("signing: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(&mut req);
    Ok(req)
}

/// The text of the first `<tag>` in `xml` (error codes and messages).
fn xml_first(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].to_string())
}

/// Instance id → private IP from a `DescribeInstancesResponse`:
/// `reservationSet/item/instancesSet/item/{instanceId, privateIpAddress}`.
pub fn parse_describe_instances(xml: &str) -> Result<HashMap<String, IpAddr>, String> {
    use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};
    fn instance(mut d: ScopedDecoder) -> Result<Option<(String, IpAddr)>, String> {
        let (mut id, mut ip) = (None, None);
        while let Some(mut t) = d.next_tag() {
            if t.start_el().matches("instanceId") {
                id = Some(try_data(&mut t).map_err(|e| e.to_string())?.to_string());
            } else if t.start_el().matches("privateIpAddress") {
                ip = try_data(&mut t).map_err(|e| e.to_string())?.trim().parse().ok();
            }
        }
        Ok(id.zip(ip))
    }
    let mut out = HashMap::new();
    let mut doc = Document::new(xml);
    let mut root = doc.root_element().map_err(|e| e.to_string())?;
    while let Some(mut set) = root.next_tag() {
        if !set.start_el().matches("reservationSet") {
            continue;
        }
        while let Some(mut reservation) = set.next_tag() {
            while let Some(mut instances) = reservation.next_tag() {
                if !instances.start_el().matches("instancesSet") {
                    continue;
                }
                while let Some(item) = instances.next_tag() {
                    if let Some((id, ip)) = instance(item)? {
                        out.insert(id, ip);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified() {
        for c in ["Throttling", "RequestLimitExceeded", "ThrottlingException"] {
            assert_eq!(ErrorKind::of_code(c), ErrorKind::Throttling, "{c}");
        }
        assert_eq!(ErrorKind::of_code("ResourceContention"), ErrorKind::ResourceContention);
        assert_eq!(ErrorKind::of_code("ValidationError"), ErrorKind::Other);
        assert!(!ErrorKind::Other.retryable());
        assert!(ErrorKind::ResourceContention.retryable());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 0..30 {
            let d = backoff(base, attempt);
            assert!(
                d <= base * 2u32.pow(attempt.min(16)) && d <= Duration::from_secs(20),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn describe_instances_response() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-aaa</instanceId>
          <privateDnsName>ip-10-0-0-7.ec2.internal</privateDnsName>
          <privateIpAddress>10.0.0.7</privateIpAddress>
          <networkInterfaceSet><item><privateIpAddress>10.0.0.99</privateIpAddress></item></networkInterfaceSet>
        </item>
        <item>
          <instanceId>i-bbb</instanceId>
        </item>
      </instancesSet>
    </item>
    <item>
      <instancesSet><item><instanceId>i-ccc</instanceId><privateIpAddress>10.0.1.8</privateIpAddress></item></instancesSet>
    </item>
  </reservationSet>
</DescribeInstancesResponse>"#;
        let m = parse_describe_instances(xml).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["i-aaa"].to_string(), "10.0.0.7");
        assert_eq!(m["i-ccc"].to_string(), "10.0.1.8");
    }
}
