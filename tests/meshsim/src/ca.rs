//! The mesh CA: a self-signed root plus one intermediate signing CA (the shape of Istio's plug-in
//! `cacerts`), issuing SPIFFE workload certificates shaped like istiod's (istio-wire §2.6), and
//! writing them in the file layout Istio uses (`cert-chain.pem`, `key.pem`, `root-cert.pem`, §4.1).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::spec::spiffe_id;

/// istiod's `ClockSkewGracePeriod`: leaves start 2 minutes in the past.
pub const CLOCK_SKEW_GRACE: Duration = Duration::from_secs(120);
/// istiod's `DEFAULT_WORKLOAD_CERT_TTL`.
pub const WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Self-signed root lifetime (istio-wire §4.1: 10 years).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Intermediate lifetime: shorter than the root, longer than any test.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// *ring* cannot generate RSA keys (rcgen returns `KeyGenerationUnavailable`), and pulling in a
/// pure-Rust RSA crate only for this would add a heavy dependency tree. RSA leaves therefore all
/// reuse this one 2048-bit key, generated once with `openssl genpkey` for this simulator. It
/// protects nothing: it is a test fixture, published with the source. Every certificate still
/// gets its own random serial number.
const RSA_TEST_KEY_PEM: &str = include_str!("fixtures/rsa2048-test-only.key.pem");

/// A mesh certificate authority.
pub struct MeshCa {
    trust_domain: String,
    root_pem: String,
    intermediate_pem: String,
    intermediate_not_after: SystemTime,
    // The intermediate signs every workload certificate, like Istio's plug-in `ca-cert.pem`.
    issuer: Issuer<'static, KeyPair>,
    // Kept to rebuild `issuer` in [`MeshCa::try_clone`] (rcgen's Issuer is not Clone).
    intermediate_key_pem: String,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What to put in a workload certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// The URI SAN; `None` gives a certificate with no URI SAN at all.
    pub spiffe_id: Option<String>,
    /// Extra DNS SANs (istiod never adds these; they are here to build odd certificates).
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    /// Clamped to the intermediate's own expiry, as istiod does.
    pub not_after: SystemTime,
    /// `false`: ECDSA P-256 key (what ztunnel and `ECC_SIGNATURE_ALGORITHM` agents use).
    /// `true`: RSA 2048 (the sidecar agent's default); all RSA leaves share one fixed test key
    /// (*ring* cannot generate RSA keys).
    pub rsa: bool,
}

impl IssueOptions {
    /// Defaults like istiod: one URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>`, no DNS names,
    /// valid from now − 2 min to now + 24 h, ECDSA P-256.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let now = SystemTime::now();
        IssueOptions {
            spiffe_id: Some(spiffe_id(trust_domain, namespace, service_account)),
            dns_names: Vec::new(),
            not_before: now - CLOCK_SKEW_GRACE,
            not_after: now + WORKLOAD_CERT_TTL,
            rsa: false,
        }
    }
}

/// An issued workload identity (PEM encoded, ready to hand to rustls or to write to files).
#[derive(Clone)]
pub struct WorkloadCert {
    pub spiffe_id: Option<String>,
    /// Leaf first, then the intermediate (the root is not included, like istiod's chain file).
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    // Keeps the private key out of logs and assertion messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Where [`WorkloadCert::write_files`] put the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub root_cert: PathBuf,
}

impl MeshCa {
    /// A new root (ECDSA P-256, 10 years, self-signed) and intermediate (ECDSA P-256, path
    /// length 0) for `trust_domain`.
    pub fn new(trust_domain: &str) -> anyhow::Result<MeshCa> {
        anyhow::ensure!(!trust_domain.is_empty(), "empty trust domain");
        let now = SystemTime::now();
        // A random tag in the CA names tells two CAs of the same trust domain apart (in a test
        // about a foreign CA, or in `openssl x509 -text` output).
        let tag = hex::encode(rand::random::<[u8; 4]>());

        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = ca_name(trust_domain, &format!("meshsim Root CA {tag}"));
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        root.not_before = to_datetime(now - CLOCK_SKEW_GRACE);
        root.not_after = to_datetime(now + ROOT_TTL);
        root.serial_number = Some(random_serial());
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, root_key);

        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut int = CertificateParams::default();
        int.distinguished_name = ca_name(trust_domain, &format!("meshsim Intermediate CA {tag}"));
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.key_usages = root_issuer.key_usages().to_vec();
        let int_not_after = now + INTERMEDIATE_TTL;
        int.not_before = to_datetime(now - CLOCK_SKEW_GRACE);
        int.not_after = to_datetime(int_not_after);
        int.serial_number = Some(random_serial());
        int.use_authority_key_identifier_extension = true;
        let int_cert = int.signed_by(&int_key, &root_issuer)?;

        Ok(MeshCa {
            trust_domain: trust_domain.to_string(),
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            intermediate_not_after: truncate_to_secs(int_not_after),
            intermediate_key_pem: int_key.serialize_pem(),
            issuer: Issuer::new(int, int_key),
        })
    }

    /// The same CA (same keys) as a second value, for servers that sign on their own tasks.
    pub fn try_clone(&self) -> anyhow::Result<MeshCa> {
        let key = KeyPair::from_pem(&self.intermediate_key_pem)?;
        Ok(MeshCa {
            trust_domain: self.trust_domain.clone(),
            root_pem: self.root_pem.clone(),
            intermediate_pem: self.intermediate_pem.clone(),
            intermediate_not_after: self.intermediate_not_after,
            issuer: Issuer::from_ca_cert_pem(&self.intermediate_pem, key)?,
            intermediate_key_pem: self.intermediate_key_pem.clone(),
        })
    }

    /// Signs the public key of a PEM CSR (its signature checked) as a workload certificate for
    /// `spiffe_id` valid for `ttl` (the CSR's own names are not copied: the caller decides,
    /// as istiod and istio-csr do). Returns the leaf PEM and its not-after.
    pub fn sign_csr(
        &self,
        csr: &rcgen::CertificateSigningRequestParams,
        spiffe_id: &str,
        ttl: Duration,
    ) -> anyhow::Result<(String, SystemTime)> {
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names
            .push(SanType::URI(spiffe_id.try_into().context("SPIFFE ID is not IA5")?));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let not_after = truncate_to_secs((now + ttl).min(self.intermediate_not_after));
        // istiod backdates by 2 minutes; for the seconds-long certificates of renewal tests
        // that would put "half the lifetime" a minute away, so short ones backdate a tenth.
        p.not_before = to_datetime(now - CLOCK_SKEW_GRACE.min(ttl / 10));
        p.not_after = to_datetime(not_after);
        let signed = rcgen::CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key.clone(),
        }
        .signed_by(&self.issuer)?;
        Ok((signed.pem(), not_after))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (`root-cert.pem`).
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The root as DER, for building rustls root stores.
    pub fn root_der(&self) -> CertificateDer<'static> {
        // The PEM was produced by rcgen a moment ago; failing to re-read it is a bug here.
        CertificateDer::from_pem_slice(self.root_pem.as_bytes()).expect("rcgen produced an unreadable root PEM")
    }

    /// The intermediate's certificate and private key in one PEM, as an operator hands a
    /// plug-in CA to another issuer (Vault's `pki/config/ca` `pem_bundle`).
    pub fn intermediate_bundle_pem(&self) -> String {
        format!("{}{}", self.intermediate_pem, self.intermediate_key_pem)
    }

    /// The intermediate signing CA as PEM.
    pub fn intermediate_pem(&self) -> String {
        self.intermediate_pem.clone()
    }

    /// A workload certificate for `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn issue(&self, namespace: &str, service_account: &str) -> anyhow::Result<WorkloadCert> {
        self.issue_with(&IssueOptions::workload(&self.trust_domain, namespace, service_account))
    }

    /// A workload certificate shaped like istiod's `genCertTemplateFromCSR`: empty subject, SAN
    /// marked critical (rcgen does this itself whenever the subject is empty, as RFC 5280
    /// §4.1.2.6 requires), KeyUsage DigitalSignature|KeyEncipherment, EKU serverAuth+clientAuth,
    /// BasicConstraints CA:false, NotAfter clamped to the signing certificate.
    pub fn issue_with(&self, opts: &IssueOptions) -> anyhow::Result<WorkloadCert> {
        let key = if opts.rsa {
            KeyPair::from_pkcs8_pem_and_sign_algo(RSA_TEST_KEY_PEM, &PKCS_RSA_SHA256)
                .context("loading the RSA test key")?
        } else {
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?
        };
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        if let Some(id) = &opts.spiffe_id {
            p.subject_alt_names
                .push(SanType::URI(id.as_str().try_into().context("SPIFFE ID is not IA5")?));
        }
        for dns in &opts.dns_names {
            p.subject_alt_names.push(SanType::DnsName(
                dns.as_str().try_into().context("DNS name is not IA5")?,
            ));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let not_after = truncate_to_secs(opts.not_after.min(self.intermediate_not_after));
        p.not_before = to_datetime(opts.not_before);
        p.not_after = to_datetime(not_after);
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            spiffe_id: opts.spiffe_id.clone(),
            chain_pem: format!("{}{}", cert.pem(), self.intermediate_pem),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

impl WorkloadCert {
    /// Writes `cert-chain.pem`, `key.pem` (mode 0600) and `root-cert.pem` into `dir` (created if
    /// missing), the names Istio uses for file-mounted certificates.
    pub fn write_files(&self, dir: &Path, root_pem: &str) -> std::io::Result<IdentityFiles> {
        std::fs::create_dir_all(dir)?;
        let files = IdentityFiles {
            cert_chain: dir.join("cert-chain.pem"),
            key: dir.join("key.pem"),
            root_cert: dir.join("root-cert.pem"),
        };
        std::fs::write(&files.cert_chain, &self.chain_pem)?;
        write_private(&files.key, self.key_pem.as_bytes())?;
        std::fs::write(&files.root_cert, root_pem)?;
        Ok(files)
    }

    /// The chain as DER (leaf first).
    pub fn chain_der(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing chain PEM")?;
        anyhow::ensure!(!chain.is_empty(), "empty certificate chain");
        Ok(chain)
    }

    /// The private key as DER.
    pub fn key_der(&self) -> anyhow::Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("parsing key PEM")
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(contents)
}

fn ca_name(trust_domain: &str, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    dn
}

// rcgen derives the serial from the public key by default; the shared RSA test key would then
// give every RSA leaf the same serial, so serials are random (positive, 16 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

// X.509 validity has whole seconds; keep `WorkloadCert::not_after` equal to what is encoded.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn to_datetime(t: SystemTime) -> time::OffsetDateTime {
    let dt = time::OffsetDateTime::from(truncate_to_secs(t));
    dt.replace_nanosecond(0).unwrap_or(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::*;

    #[test]
    fn workload_cert_is_shaped_like_istiod() {
        let ca = MeshCa::new("cluster.local").unwrap();
        let wc = ca.issue("bookinfo", "reviews").unwrap();
        let chain = wc.chain_der().unwrap();
        assert_eq!(chain.len(), 2, "leaf + intermediate");
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(leaf.subject().iter().count(), 0, "empty subject");

        let mut saw_san = false;
        for ext in leaf.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    saw_san = true;
                    assert!(ext.critical, "SAN must be critical");
                    assert_eq!(
                        san.general_names,
                        vec![GeneralName::URI("spiffe://cluster.local/ns/bookinfo/sa/reviews")]
                    );
                }
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ku.digital_signature() && ku.key_encipherment());
                    assert!(!ku.key_cert_sign());
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    assert!(eku.server_auth && eku.client_auth);
                }
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                _ => {}
            }
        }
        assert!(saw_san);
        let nb = leaf.validity().not_before.timestamp();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - 125..=now - 115).contains(&nb), "NotBefore = now - 2min");
        let na = leaf.validity().not_after.timestamp();
        assert!((now + 24 * 3600 - 5..=now + 24 * 3600).contains(&na));

        // The chain's second element is the intermediate, and it is a CA signed by the root.
        let (_, int) = parse_x509_certificate(&chain[1]).unwrap();
        assert!(int.is_ca());
        assert_eq!(leaf.issuer(), int.subject());
        let root = ca.root_der();
        let (_, root) = parse_x509_certificate(&root).unwrap();
        assert_eq!(int.issuer(), root.subject());
    }

    #[test]
    fn no_uri_san_and_rsa_options() {
        let ca = MeshCa::new("example.org").unwrap();
        let mut opts = IssueOptions::workload("example.org", "a", "b");
        opts.spiffe_id = None;
        opts.dns_names = vec!["x.example.org".into()];
        opts.rsa = true;
        let wc = ca.issue_with(&opts).unwrap();
        assert!(wc.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let chain = wc.chain_der().unwrap();
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::DNSName("x.example.org")]);
        assert_eq!(
            leaf.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
        );
        // Two RSA leaves share the key but not the serial.
        let wc2 = ca.issue_with(&opts).unwrap();
        let chain2 = wc2.chain_der().unwrap();
        let (_, leaf2) = parse_x509_certificate(&chain2[0]).unwrap();
        assert_ne!(leaf.serial, leaf2.serial);
    }

    #[test]
    fn write_files_uses_istio_names() {
        let ca = MeshCa::new("cluster.local").unwrap();
        let wc = ca.issue("ns", "sa").unwrap();
        let dir = std::env::temp_dir().join(format!("meshsim-ca-test-{}", rand::random::<u64>()));
        let files = wc.write_files(&dir, &ca.root_pem()).unwrap();
        assert_eq!(files.cert_chain.file_name().unwrap(), "cert-chain.pem");
        assert_eq!(files.key.file_name().unwrap(), "key.pem");
        assert_eq!(files.root_cert.file_name().unwrap(), "root-cert.pem");
        assert_eq!(std::fs::read_to_string(&files.root_cert).unwrap(), ca.root_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
