//! The gRPC transport on 127.0.0.1: frames, limits, tokens, TLS, and dead peers.

use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::*;

fn limits(max_frame: usize) -> LinkLimits {
    LinkLimits {
        depth: 4,
        max_frame,
        send_timeout: Duration::from_secs(10),
        recv_timeout: Duration::from_secs(10),
    }
}

fn server(token: Option<&str>, tls: Option<TlsIdentity>, max_frame: usize) -> GrpcServer {
    GrpcServer::start(ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: token.map(str::to_string),
        tls,
        limits: limits(max_frame),
    })
    .unwrap()
}

fn client(server: &GrpcServer) -> ClientOptions {
    ClientOptions {
        server: server.local_addr().to_string(),
        name: "client 0".into(),
        token: None,
        tls: None,
        limits: limits(32 << 20),
        connect_for: Duration::from_secs(5),
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn frames_cross_in_order_both_ways_beyond_grpcs_default_4_mib() {
    let mut server = server(None, None, 32 << 20);
    let mut a = connect(&client(&server)).unwrap();
    let mut b = server.accept(WAIT).unwrap();
    assert!(b.peer().starts_with("client 0 (127.0.0.1:"), "{}", b.peer());
    let big: Vec<u8> = (0..10 << 20).map(|i| (i % 251) as u8).collect();
    a.send(vec![1, 2, 3]).unwrap();
    a.send(big.clone()).unwrap();
    a.send(Vec::new()).unwrap();
    assert_eq!(b.recv().unwrap(), vec![1, 2, 3]);
    assert_eq!(b.recv().unwrap(), big);
    assert_eq!(b.recv().unwrap(), Vec::<u8>::new());
    b.send(vec![9]).unwrap();
    assert_eq!(a.recv().unwrap(), vec![9]);
}

#[test]
fn frames_above_the_limit_are_refused_on_both_sides() {
    let mut server = server(None, None, 1024);
    let mut a = connect(&ClientOptions {
        limits: limits(4096),
        ..client(&server)
    })
    .unwrap();
    let mut b = server.accept(WAIT).unwrap();
    // Our own end refuses before anything is queued.
    let mut small = connect(&ClientOptions {
        limits: limits(1024),
        ..client(&server)
    })
    .unwrap();
    assert_eq!(
        small.send(vec![0; 1025]).unwrap_err(),
        TransportError::TooLarge {
            peer: format!("the server at {}", server.local_addr()),
            len: 1025,
            max: 1024
        }
    );
    // A peer that sends one anyway breaks the link, and the receiver names it.
    a.send(vec![0; 1000]).unwrap();
    a.send(vec![0; 3000]).unwrap();
    assert_eq!(b.recv().unwrap().len(), 1000);
    let e = b.recv().unwrap_err();
    assert!(matches!(e, TransportError::Broken { .. }), "{e}");
    assert!(e.to_string().contains("client 0"), "{e}");
}

#[test]
fn a_wrong_or_missing_token_is_refused_and_the_server_goes_on_serving() {
    let mut server = server(Some("s3cret"), None, 1024);
    for token in [None, Some("guess")] {
        let e = connect(&ClientOptions {
            token: token.map(str::to_string),
            ..client(&server)
        })
        .err()
        .expect("refused");
        assert!(matches!(e, GrpcError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("token"), "{e}");
    }
    let started = Instant::now();
    let mut a = connect(&ClientOptions {
        token: Some("s3cret".into()),
        ..client(&server)
    })
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut b = server.accept(WAIT).unwrap();
    a.send(vec![7]).unwrap();
    assert_eq!(b.recv().unwrap(), vec![7]);
    let refusals = server.refusals();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals[0].contains("no token presented"), "{refusals:?}");
    assert!(refusals[1].contains("wrong token"), "{refusals:?}");
}

#[test]
fn without_a_token_only_loopback_peers_are_admitted() {
    let loopback = "127.0.0.1:4000".parse().ok();
    let mapped = "[::ffff:127.0.0.1]:4000".parse().ok();
    let remote = "10.1.2.3:4000".parse().ok();
    assert!(admit(None, None, loopback).is_ok());
    assert!(admit(None, None, mapped).is_ok());
    let refused = admit(None, None, remote).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("10.1.2.3"));
    assert!(admit(None, None, None).is_err());
    // With a token, the address does not matter but the token does.
    assert!(admit(Some("t"), Some("t"), remote).is_ok());
    assert!(admit(Some("t"), Some("tt"), loopback).is_err());
    assert!(admit(Some("t"), None, loopback).is_err());
}

/// A throwaway CA and a certificate for localhost / 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    identity: TlsIdentity,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "splitaux test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        identity: TlsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

#[test]
fn tls_with_the_servers_ca_works_and_another_ca_is_refused() {
    let good = pki();
    let other = pki();
    let mut server = server(None, Some(good.identity.clone()), 1024);
    let trusting = |ca_pem: &str| TrustedServer {
        ca_pem: ca_pem.to_string(),
        domain: "localhost".into(),
    };
    let mut a = connect(&ClientOptions {
        tls: Some(trusting(&good.ca_pem)),
        ..client(&server)
    })
    .unwrap();
    let mut b = server.accept(WAIT).unwrap();
    a.send(vec![1]).unwrap();
    assert_eq!(b.recv().unwrap(), vec![1]);

    let started = Instant::now();
    let e = connect(&ClientOptions {
        tls: Some(trusting(&other.ca_pem)),
        ..client(&server)
    })
    .err()
    .expect("refused");
    assert!(
        e.to_string().contains("certificate"),
        "the error names the certificate problem: {e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a TLS failure is not retried"
    );
    // A plaintext client cannot talk to a TLS server either.
    assert!(
        connect(&ClientOptions {
            connect_for: Duration::from_millis(300),
            ..client(&server)
        })
        .is_err()
    );
}

#[test]
fn dead_peers_are_noticed_and_named() {
    // The server goes away: the client's next receive fails, naming the server's address.
    let mut server_a = server(None, None, 1024);
    let mut a = connect(&client(&server_a)).unwrap();
    let b = server_a.accept(WAIT).unwrap();
    let addr = server_a.local_addr();
    drop(b);
    drop(server_a);
    let e = a.recv().unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Closed { .. } | TransportError::Broken { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&addr.to_string()), "{e}");

    // The client goes away: the server's next receive fails, naming the client.
    let mut server_b = server(None, None, 1024);
    let a = connect(&client(&server_b)).unwrap();
    let mut b = server_b.accept(WAIT).unwrap();
    drop(a);
    let e = b.recv().unwrap_err();
    assert!(e.to_string().contains("client 0"), "{e}");

    // Nobody listening: connecting gives up after the configured time, naming the address.
    let free = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let started = Instant::now();
    let e = connect(&ClientOptions {
        server: free.to_string(),
        name: "client 1".into(),
        token: None,
        tls: None,
        limits: limits(1024),
        connect_for: Duration::from_millis(700),
    })
    .err()
    .expect("nobody listens");
    assert!(matches!(e, GrpcError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&free.to_string()), "{e}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}
