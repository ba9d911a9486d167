//! Renewal timing, the hand-written protobuf and gRPC framing.

use super::istio_ca::{percent_decode, put_varint};
use super::*;
use bytes::BufMut;

#[test]
fn renewal_is_half_way_with_bounded_jitter() {
    let nb = UNIX_EPOCH + Duration::from_secs(1000);
    let na = nb + Duration::from_secs(86400);
    assert_eq!(renew_at(nb, na, 0.0), nb + Duration::from_secs(43200));
    assert_eq!(renew_at(nb, na, 1.0), nb + Duration::from_secs(47520));
    assert_eq!(renew_at(nb, na, -1.0), nb + Duration::from_secs(38880));
    assert_eq!(renew_at(nb, na, 7.0), renew_at(nb, na, 1.0));
    // A certificate whose not_after is before not_before renews at once.
    assert_eq!(renew_at(na, nb, 0.0), na);
}

#[test]
fn retries_back_off_but_fit_in_the_time_left() {
    let day = Duration::from_secs(86400);
    assert_eq!(retry_delay(0, day, 0.0), Duration::from_secs(1));
    assert_eq!(retry_delay(3, day, 0.0), Duration::from_secs(8));
    assert_eq!(retry_delay(30, day, 0.0), Duration::from_secs(60));
    assert_eq!(retry_delay(30, Duration::from_secs(20), 0.0), Duration::from_secs(2));
    // Never below 1 s, even in the last seconds; after expiry, plain backoff.
    assert_eq!(retry_delay(5, Duration::from_millis(300), 0.0), Duration::from_secs(1));
    assert_eq!(retry_delay(5, Duration::ZERO, 0.0), Duration::from_secs(32));
    assert_eq!(retry_delay(3, day, 1.0), Duration::from_secs(8).mul_f64(1.2));
    assert_eq!(retry_delay(3, day, -1.0), Duration::from_secs(8).mul_f64(0.8));
}

#[test]
fn request_encoding_round_trips_and_unknown_fields_are_skipped() {
    let req = encode_request("-----BEGIN CERTIFICATE REQUEST-----\n", 86400);
    let (s, v) = decode_strings(req.clone(), 1).unwrap();
    assert_eq!(s, vec!["-----BEGIN CERTIFICATE REQUEST-----\n".to_string()]);
    assert_eq!(v, vec![(3, 86400)]);
    // An answer with an unknown fixed64 and varint before two chain entries.
    let mut b = BytesMut::new();
    b.put_u8((9 << 3) | 1);
    b.put_u64(7);
    b.put_u8(5 << 3);
    put_varint(&mut b, 300);
    for s in ["leaf", "root"] {
        b.put_u8(0x0a);
        put_varint(&mut b, s.len() as u64);
        b.extend_from_slice(s.as_bytes());
    }
    let (s, _) = decode_strings(b.freeze(), 1).unwrap();
    assert_eq!(s, vec!["leaf", "root"]);
    assert!(decode_strings(Bytes::from_static(&[0x0a, 0x05, b'a']), 1).is_err());
}

#[test]
fn grpc_frames_round_trip() {
    let f = grpc_frame(b"hello");
    assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
    assert_eq!(grpc_unframe(f).unwrap(), Bytes::from_static(b"hello"));
    assert!(grpc_unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
    assert!(grpc_unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
}

#[test]
fn csr_has_one_uri_san_and_an_empty_subject() {
    let (_, pem) = key_and_csr("spiffe://cluster.local/ns/vms/sa/meshgate").unwrap();
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    use x509_parser::prelude::FromDer as _;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref()).unwrap();
    assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                match n {
                    x509_parser::extensions::GeneralName::URI(u) => uris.push(u.to_string()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    assert_eq!(uris, vec!["spiffe://cluster.local/ns/vms/sa/meshgate"]);
}

#[test]
fn addresses_parse_with_and_without_scheme() {
    let e = Endpoint::parse("istiod.istio-system.svc:15012", true).unwrap();
    assert_eq!(
        (e.host.as_str(), e.port, e.tls),
        ("istiod.istio-system.svc", 15012, true)
    );
    let e = Endpoint::parse("http://127.0.0.1:8200/", true).unwrap();
    assert_eq!((e.host.as_str(), e.port, e.tls), ("127.0.0.1", 8200, false));
    let e = Endpoint::parse("https://[::1]:8200", false).unwrap();
    assert_eq!((e.host.as_str(), e.port, e.tls), ("::1", 8200, true));
    assert!(Endpoint::parse("vault:8200/v1", true).is_err());
    assert!(Endpoint::parse("vault", true).is_err());
    assert!(Endpoint::parse("vault:0", true).is_err());
}

#[test]
fn grpc_messages_are_percent_decoded() {
    assert_eq!(
        percent_decode("request%20authenticate%20failure"),
        "request authenticate failure"
    );
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz"), "%zz");
}
