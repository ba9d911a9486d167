//! What the project's YAML config files (meshgate's, the autoscaler's) have in common: errors
//! that name file, line and reason, the message of a serde-saphyr error without its own location
//! suffix, and the duration syntax (`250ms`, `5s`, `2m`, `1h`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is not tied to a line (e.g. the file cannot be read).
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// All the problems found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects the errors of one file while validating it, so all of them are reported at once.
pub struct Collector<'a> {
    pub file: &'a Path,
    pub list: Vec<ConfigError>,
}

impl<'a> Collector<'a> {
    pub fn new(file: &'a Path) -> Self {
        Collector { file, list: Vec::new() }
    }

    pub fn at(&mut self, line: Option<u64>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.to_owned(),
            line,
            message: message.into(),
        });
    }

    /// The errors sorted by line (those without a line last).
    pub fn into_errors(mut self) -> ConfigErrors {
        self.list.sort_by_key(|e| e.line.unwrap_or(u64::MAX));
        ConfigErrors(self.list)
    }
}

/// The 1-based line of a spanned value, if known.
pub fn line_of<T>(s: &serde_saphyr::Spanned<T>) -> Option<u64> {
    let l = s.referenced.line();
    (l > 0).then_some(l)
}

/// A YAML or type error as a [`ConfigError`]: the line from the parser, the message without the
/// location and advice the library appends (the line goes in front; the column is noise).
pub fn yaml_error(file: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
    let rendered = e.without_snippet().to_string();
    let mut message = rendered.lines().next().unwrap_or("invalid YAML").trim().to_string();
    for cut in [" at line ", ", set DuplicateKeyPolicy"] {
        if let Some(idx) = message.find(cut) {
            message.truncate(idx);
        }
    }
    if message.is_empty() {
        message = "invalid YAML".into();
    }
    ConfigError {
        file: file.to_owned(),
        line,
        message,
    }
}

/// Parses `250ms`, `5s`, `1.5s`, `2m`, `1h` (zero allowed; at most a year).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 250ms, 5s, 2m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {s:?}: unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || !(0.0..=86400.0 * 365.0).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration in a config file (see [`parse_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("9999h").is_err());
    }

    #[test]
    fn yaml_errors_carry_the_line_without_the_library_suffix() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            a: u32,
        }
        let e = serde_saphyr::from_str::<C>("a: 1\nb: 2\n").unwrap_err();
        let ce = yaml_error(Path::new("f.yaml"), &e);
        assert_eq!(ce.line, Some(2));
        assert!(ce.message.starts_with("unknown field `b`"), "{}", ce.message);
        assert!(!ce.message.contains(" at line "));
        assert_eq!(ce.to_string(), format!("f.yaml:2: {}", ce.message));
    }
}
