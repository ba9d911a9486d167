//! API keys: how clients present them, how the config stores them (`sha256:<hex>`), and how
//! `meshgate hash-key` makes new ones.
//!
//! Accepted forms: `Proxy-Authorization: Bearer KEY`, `Proxy-Authorization: Basic` with the key as
//! the password (so `curl --proxy-user :KEY` works), and the configured key header. The caller
//! removes all of them before forwarding, whatever the outcome.

use base64::Engine;
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// A key as presented by a client, already reduced to its digest so the plaintext is dropped early.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey(pub [u8; 32]);

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresentedKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("malformed Proxy-Authorization (expected Bearer or Basic)")]
    Malformed,
    #[error("more than one API key presented")]
    Conflicting,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub use crate::config::parse_key_hash;

/// A fresh random key (256 bits, URL-safe) and its config form.
pub fn generate_key() -> (String, String) {
    let mut raw = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    let key = format!("mgk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let hashed = format!("sha256:{}", hex::encode(hash_key(&key)));
    (key, hashed)
}

fn from_proxy_authorization(value: &[u8]) -> Result<String, KeyError> {
    let value = std::str::from_utf8(value).map_err(|_| KeyError::Malformed)?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(KeyError::Malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(KeyError::Malformed);
        }
        return Ok(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| KeyError::Malformed)?;
        let decoded = String::from_utf8(decoded).map_err(|_| KeyError::Malformed)?;
        let (user, pass) = decoded.split_once(':').ok_or(KeyError::Malformed)?;
        // The key is the password; a key typed as the user name with an empty password is the
        // other common slip, and is unambiguous, so accept it too.
        let key = if pass.is_empty() { user } else { pass };
        if key.is_empty() {
            return Err(KeyError::Malformed);
        }
        return Ok(key.to_string());
    }
    Err(KeyError::Malformed)
}

/// Finds the API key a request presents, if any. Conflicting or repeated keys are refused
/// rather than guessing which one was meant.
pub fn presented_key(headers: &HeaderMap, key_header: &HeaderName) -> Result<Option<PresentedKey>, KeyError> {
    let mut found: Option<String> = None;
    let mut add = |k: String| -> Result<(), KeyError> {
        match &found {
            Some(prev) if *prev != k => Err(KeyError::Conflicting),
            _ => {
                found = Some(k);
                Ok(())
            }
        }
    };
    for v in headers.get_all(http::header::PROXY_AUTHORIZATION) {
        add(from_proxy_authorization(v.as_bytes())?)?;
    }
    for v in headers.get_all(key_header) {
        let k = std::str::from_utf8(v.as_bytes())
            .map_err(|_| KeyError::Malformed)?
            .trim();
        if k.is_empty() {
            return Err(KeyError::Malformed);
        }
        add(k.to_string())?;
    }
    Ok(found.map(|k| PresentedKey(hash_key(&k))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }
    fn kh() -> HeaderName {
        HeaderName::from_static("x-meshgate-key")
    }
    fn key(k: &str) -> Option<PresentedKey> {
        Some(PresentedKey(hash_key(k)))
    }

    #[test]
    fn bearer() {
        let h = headers(&[("proxy-authorization", "Bearer abc")]);
        assert_eq!(presented_key(&h, &kh()), Ok(key("abc")));
    }

    #[test]
    fn basic_with_key_as_password() {
        // curl --proxy-user :abc
        let h = headers(&[("proxy-authorization", "Basic OmFiYw==")]);
        assert_eq!(presented_key(&h, &kh()), Ok(key("abc")));
        // user:abc
        let h = headers(&[("proxy-authorization", "basic dXNlcjphYmM=")]);
        assert_eq!(presented_key(&h, &kh()), Ok(key("abc")));
    }

    #[test]
    fn custom_header() {
        let h = headers(&[("x-meshgate-key", "abc")]);
        assert_eq!(presented_key(&h, &kh()), Ok(key("abc")));
    }

    #[test]
    fn none() {
        assert_eq!(presented_key(&HeaderMap::new(), &kh()), Ok(None));
    }

    #[test]
    fn malformed() {
        for v in ["Bearer", "Digest x", "Basic !!!", "Basic YWJj", "Basic Og=="] {
            let h = headers(&[("proxy-authorization", v)]);
            assert_eq!(presented_key(&h, &kh()), Err(KeyError::Malformed), "{v}");
        }
    }

    #[test]
    fn same_key_twice_is_fine_different_keys_are_not() {
        let h = headers(&[("proxy-authorization", "Bearer abc"), ("x-meshgate-key", "abc")]);
        assert_eq!(presented_key(&h, &kh()), Ok(key("abc")));
        let h = headers(&[("proxy-authorization", "Bearer abc"), ("x-meshgate-key", "abd")]);
        assert_eq!(presented_key(&h, &kh()), Err(KeyError::Conflicting));
    }

    #[test]
    fn config_hash_form() {
        let (k, h) = generate_key();
        assert!(k.starts_with("mgk_"));
        assert_eq!(parse_key_hash(&h).unwrap(), hash_key(&k));
        assert!(parse_key_hash("abc").is_err());
        assert!(parse_key_hash("sha256:abcd").is_err());
    }
}
