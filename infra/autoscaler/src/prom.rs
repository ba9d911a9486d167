//! Reading numbers: instant queries against the Prometheus HTTP API (the scaling signals), and
//! meshgate's own `/metrics` exposition (an instance's in-flight requests while it drains).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::http::{url_encode, Http};

/// Why a signal has no usable value this time. Each is logged and counted
/// (`meshgate_autoscaler_signal_missing_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Prometheus unreachable, timed out, or answered with an error.
    Error,
    /// The query returned no series (e.g. no instance scraped).
    Empty,
    /// Several series: a signal must be one number; aggregate it in the query.
    Ambiguous,
    /// NaN or ±Inf.
    NotANumber,
    /// The sample is older than `max_sample_age`.
    Stale,
}

impl Missing {
    pub fn as_str(self) -> &'static str {
        match self {
            Missing::Error => "error",
            Missing::Empty => "empty",
            Missing::Ambiguous => "ambiguous",
            Missing::NotANumber => "nan",
            Missing::Stale => "stale",
        }
    }
}

/// The outcome of reading one signal.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalValue {
    Value(f64),
    Missing(Missing, String),
}

impl SignalValue {
    pub fn value(&self) -> Option<f64> {
        match self {
            SignalValue::Value(v) => Some(*v),
            SignalValue::Missing(..) => None,
        }
    }
}

/// A Prometheus HTTP API client.
#[derive(Debug, Clone)]
pub struct Prometheus {
    http: Http,
    base: String,
    timeout: Duration,
    max_sample_age: Duration,
}

impl Prometheus {
    pub fn new(http: Http, base_url: &str, timeout: Duration, max_sample_age: Duration) -> Prometheus {
        Prometheus {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            timeout,
            max_sample_age,
        }
    }

    /// Runs `expr` as an instant query and reduces the answer to one number.
    pub async fn read(&self, expr: &str) -> SignalValue {
        let url = format!("{}/api/v1/query?query={}", self.base, url_encode(expr));
        let (status, body) = match self.http.get(&url, self.timeout).await {
            Ok(r) => r,
            Err(e) => return SignalValue::Missing(Missing::Error, format!("prometheus: {e}")),
        };
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return SignalValue::Missing(
                    Missing::Error,
                    format!("prometheus: {status}: {}", String::from_utf8_lossy(&body).trim()),
                )
            }
        };
        interpret(&v, SystemTime::now(), self.max_sample_age)
    }
}

/// Reduces an API answer (`{"status":"success","data":{"resultType":…,"result":…}}`) to one
/// number, checking the sample's age against `now`.
pub fn interpret(v: &Value, now: SystemTime, max_age: Duration) -> SignalValue {
    if v["status"] != "success" {
        return SignalValue::Missing(
            Missing::Error,
            format!("prometheus: {}: {}", v["errorType"], v["error"]),
        );
    }
    let data = &v["data"];
    let sample = match data["resultType"].as_str() {
        Some("vector") => {
            let r = data["result"].as_array().cloned().unwrap_or_default();
            match r.len() {
                0 => return SignalValue::Missing(Missing::Empty, "query returned no series".into()),
                1 => r[0]["value"].clone(),
                n => {
                    return SignalValue::Missing(
                        Missing::Ambiguous,
                        format!("query returned {n} series; aggregate it to one (sum, avg, max)"),
                    )
                }
            }
        }
        Some("scalar") => data["result"].clone(),
        other => {
            return SignalValue::Missing(
                Missing::Error,
                format!("query result type {other:?}: want an instant vector or scalar"),
            )
        }
    };
    let (Some(ts), Some(text)) = (sample[0].as_f64(), sample[1].as_str()) else {
        return SignalValue::Missing(Missing::Error, format!("malformed sample {sample}"));
    };
    let value = match parse_float(text) {
        Some(v) if v.is_finite() => v,
        _ => return SignalValue::Missing(Missing::NotANumber, format!("value {text}")),
    };
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let age = now_s - ts;
    if age > max_age.as_secs_f64() {
        return SignalValue::Missing(Missing::Stale, format!("sample is {age:.0} s old"));
    }
    SignalValue::Value(value)
}

/// Prometheus' float syntax, `NaN` and `±Inf` included.
pub fn parse_float(s: &str) -> Option<f64> {
    match s.trim() {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

/// One sample line of a Prometheus/OpenMetrics text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// The raw label set without braces, e.g. `listener="vm"`.
    pub labels: String,
    pub value: f64,
}

/// Parses the sample lines of a text exposition (comments, `# EOF` and malformed lines are
/// skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) if line[..i].find(' ').is_none() => {
                // Label values may contain '}' inside quotes: find the closing brace outside.
                let mut in_quotes = false;
                let mut escaped = false;
                let mut end = None;
                for (j, c) in line[i + 1..].char_indices() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => in_quotes = !in_quotes,
                        '}' if !in_quotes => {
                            end = Some(i + 1 + j);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(end) = end else { continue };
                (&line[..i], &line[i + 1..end], &line[end + 1..])
            }
            _ => match line.split_once(' ') {
                Some((n, r)) => (n, "", r),
                None => continue,
            },
        };
        let Some(v) = rest.split_whitespace().next().and_then(parse_float) else {
            continue;
        };
        out.push(Sample {
            name: name.to_string(),
            labels: labels.to_string(),
            value: v,
        });
    }
    out
}

/// The sum of every sample of `name` (all label sets); None if there is none.
pub fn sum_of(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in samples.iter().filter(|s| s.name == name) {
        found = true;
        total += s.value;
    }
    found.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    #[test]
    fn api_answers_reduce_to_one_number_or_a_reason() {
        let age = Duration::from_secs(60);
        let vector = |result: Value| json!({"status":"success","data":{"resultType":"vector","result":result}});
        let one = vector(json!([{"metric":{},"value":[1000.0,"12.5"]}]));
        assert_eq!(interpret(&one, at(1010.0), age), SignalValue::Value(12.5));
        let scalar = json!({"status":"success","data":{"resultType":"scalar","result":[1000.0,"3"]}});
        assert_eq!(interpret(&scalar, at(1000.0), age), SignalValue::Value(3.0));

        let reason = |v: &Value, now: f64| match interpret(v, at(now), age) {
            SignalValue::Missing(m, _) => Some(m),
            SignalValue::Value(_) => None,
        };
        assert_eq!(reason(&vector(json!([])), 1000.0), Some(Missing::Empty));
        let two = vector(json!([{"metric":{"a":"1"},"value":[1000.0,"1"]},{"metric":{"a":"2"},"value":[1000.0,"2"]}]));
        assert_eq!(reason(&two, 1000.0), Some(Missing::Ambiguous));
        for nan in ["NaN", "+Inf", "-Inf"] {
            let v = vector(json!([{"metric":{},"value":[1000.0, nan]}]));
            assert_eq!(reason(&v, 1000.0), Some(Missing::NotANumber), "{nan}");
        }
        assert_eq!(reason(&one, 1061.0), Some(Missing::Stale));
        let err = json!({"status":"error","errorType":"bad_data","error":"parse error"});
        assert_eq!(reason(&err, 1000.0), Some(Missing::Error));
        let matrix = json!({"status":"success","data":{"resultType":"matrix","result":[]}});
        assert_eq!(reason(&matrix, 1000.0), Some(Missing::Error));
    }

    #[test]
    fn exposition_lines() {
        let text = "# HELP meshgate_requests_in_flight Requests being handled.\n\
# TYPE meshgate_requests_in_flight gauge\n\
meshgate_requests_in_flight 7\n\
meshgate_downstream_connections{listener=\"vm\"} 3\n\
meshgate_downstream_connections{listener=\"a}b\"} 2 1700000000\n\
meshgate_draining 1\n\
weird_line\n\
# EOF\n";
        let s = parse_exposition(text);
        assert_eq!(sum_of(&s, "meshgate_requests_in_flight"), Some(7.0));
        assert_eq!(sum_of(&s, "meshgate_downstream_connections"), Some(5.0));
        assert_eq!(sum_of(&s, "meshgate_draining"), Some(1.0));
        assert_eq!(sum_of(&s, "nope"), None);
        assert_eq!(s[2].labels, "listener=\"a}b\"");
    }
}
