//! The Vault PKI issuer (istio-wire.md §4.4): `issue/<role>` (Vault makes the key) or
//! `sign/<role>` (our key and CSR), authenticated by a token file or an AppRole login.

use bytes::Bytes;
use rustls::pki_types::CertificateDer;

use super::*;

async fn vault_call(
    ep: &Endpoint,
    roots: &[CertificateDer<'static>],
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<serde_json::Value, IssueError> {
    let io = dial(ep, &ep.host, roots, None, b"http/1.1").await?;
    let authority = if ep.host.contains(':') {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    let mut req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("x-vault-token", t);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| err(e.to_string()))?;
    let (parts, data, _) = exchange(io, false, req).await?;
    let json: serde_json::Value = serde_json::from_slice(&data).unwrap_or(serde_json::Value::Null);
    if !parts.status.is_success() {
        // Vault errors: {"errors": ["..."]}.
        let reasons = json
            .get("errors")
            .and_then(|e| e.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        return Err(err(format!("POST {path}: HTTP {} {reasons}", parts.status.as_u16())));
    }
    Ok(json)
}

pub(super) async fn vault(
    spec: &IssuerSpec,
    mesh_roots: &[CertificateDer<'static>],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IssueError> {
    let IssuerKind::Vault {
        address,
        ca_cert,
        mount,
        role,
        sign,
        common_name,
        auth,
    } = &spec.kind
    else {
        unreachable!("called for a Vault issuer");
    };
    let ep = Endpoint::parse(address, true).map_err(err)?;
    let roots = match ca_cert {
        Some(p) => Identity::load_roots(p).map_err(|e| err(e.to_string()))?,
        None => mesh_roots.to_vec(),
    };
    let token = match auth {
        VaultAuth::TokenFile(p) => read_trimmed(p, "Vault token file")?,
        VaultAuth::AppRole {
            mount,
            role_id_file,
            secret_id_file,
        } => {
            let body = serde_json::json!({
                "role_id": read_trimmed(role_id_file, "AppRole role_id file")?,
                "secret_id": read_trimmed(secret_id_file, "AppRole secret_id file")?,
            });
            let answer = vault_call(&ep, &roots, &format!("/v1/auth/{mount}/login"), None, body).await?;
            answer["auth"]["client_token"]
                .as_str()
                .ok_or_else(|| err("AppRole login answer has no auth.client_token"))?
                .to_string()
        }
    };
    let mut body = serde_json::json!({
        "uri_sans": spec.spiffe_id,
        "ttl": format!("{}s", spec.ttl.as_secs()),
        "format": "pem",
        "exclude_cn_from_sans": true,
    });
    if let Some(cn) = common_name {
        body["common_name"] = cn.clone().into();
    }
    let generated = if *sign {
        let (key, csr) = key_and_csr(&spec.spiffe_id)?;
        body["csr"] = csr.into();
        Some(key)
    } else {
        body["private_key_format"] = "pkcs8".into();
        None
    };
    let op = if *sign { "sign" } else { "issue" };
    let answer = vault_call(&ep, &roots, &format!("/v1/{mount}/{op}/{role}"), Some(&token), body).await?;
    let data = &answer["data"];
    let leaf = data["certificate"]
        .as_str()
        .ok_or_else(|| err(format!("{op} answer has no data.certificate")))?;
    let mut chain = parse_pem_certs(leaf)?;
    // `ca_chain` (newer Vault) lists the issuing CA and its parents; older answers have only
    // `issuing_ca`. Certificates equal to a mesh root are left out, as for the Istio CA.
    let cas: Vec<String> = match data["ca_chain"].as_array() {
        Some(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        None => data["issuing_ca"].as_str().map(String::from).into_iter().collect(),
    };
    for pem in cas {
        for c in parse_pem_certs(&pem)? {
            if !mesh_roots.contains(&c) && !chain.contains(&c) {
                chain.push(c);
            }
        }
    }
    let key = match generated {
        Some(k) => PrivateKeyDer::Pkcs8(k.serialize_der().into()),
        None => {
            let pem = data["private_key"]
                .as_str()
                .ok_or_else(|| err("issue answer has no data.private_key"))?;
            PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| err(format!("unreadable data.private_key: {e}")))?
        }
    };
    Ok((chain, key))
}
