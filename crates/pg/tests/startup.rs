//! The proxy's start-up negotiation, including out-of-order and repeated requests.

use std::time::Duration;

use postern_pg::frontend::{CancelRequest, ProtocolVersion, StartupMessage};
use postern_pg::startup::ALPN_POSTGRESQL;
use postern_pg::{
    Error, Limit, Limits, PeerMisbehaved, Startup, StartupOutput, StartupRequest, TlsMode,
};

fn packet(request: StartupRequest) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode(&mut out).unwrap();
    out
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    packet(StartupRequest::Startup(StartupMessage {
        version: ProtocolVersion::V3_0,
        parameters: params
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
    }))
}

fn ssl() -> Vec<u8> {
    packet(StartupRequest::Ssl)
}

fn gssenc() -> Vec<u8> {
    packet(StartupRequest::GssEnc)
}

fn outputs(machine: &mut Startup) -> Vec<StartupOutput> {
    std::iter::from_fn(|| machine.poll_output()).collect()
}

fn misbehaved(kind: PeerMisbehaved) -> Error {
    Error::PeerMisbehaved {
        direction: postern_pg::Direction::Frontend,
        kind,
    }
}

// Goal: the ordinary libpq sequence (SSLRequest, TLS, StartupMessage) yields 'S', StartTls
// and the parsed parameters.
#[test]
fn ssl_then_startup() {
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    assert_eq!(m.handle_input(&ssl()), Ok(8));
    assert_eq!(
        outputs(&mut m),
        [StartupOutput::Reply(b'S'), StartupOutput::StartTls]
    );
    m.handle_tls_established(None).unwrap();
    let bytes = startup(&[
        ("user", "alice"),
        ("database", "orders"),
        ("application_name", "psql"),
        ("options", "-c search_path=app"),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
    ]);
    assert_eq!(m.handle_input(&bytes), Ok(bytes.len()));
    let [StartupOutput::Startup(params)] = &outputs(&mut m)[..] else {
        panic!("expected one Startup output");
    };
    assert_eq!(params.user, "alice");
    assert_eq!(params.database, "orders");
    assert_eq!(params.application_name.as_deref(), Some("psql"));
    assert_eq!(params.options.as_deref(), Some("-c search_path=app"));
    assert_eq!(params.replication.as_deref(), Some("database"));
    assert_eq!(
        params.other,
        [("client_encoding".to_owned(), "UTF8".to_owned())]
    );
    assert!(m.is_done());
}

// Goal: bytes arriving one at a time give the same result ("need more bytes", not errors).
#[test]
fn byte_at_a_time() {
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    let bytes = startup(&[("user", "bob")]);
    let mut buffered = Vec::new();
    for &b in &bytes {
        buffered.push(b);
        let used = m.handle_input(&buffered).unwrap();
        buffered.drain(..used);
    }
    assert!(buffered.is_empty());
    let [StartupOutput::Startup(params)] = &outputs(&mut m)[..] else {
        panic!("expected one Startup output");
    };
    // An empty database defaults to the user.
    assert_eq!(
        (params.user.as_str(), params.database.as_str()),
        ("bob", "bob")
    );
}

// Goal: when TLS was already terminated by ALPN routing, SSLRequest gets 'N' and the
// StartupMessage that follows in the same read is accepted.
#[test]
fn tls_terminated_answers_n() {
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    let mut bytes = ssl();
    bytes.extend(startup(&[("user", "carol"), ("database", "")]));
    assert_eq!(m.handle_input(&bytes), Ok(bytes.len()));
    let out = outputs(&mut m);
    assert_eq!(out[0], StartupOutput::Reply(b'N'));
    let StartupOutput::Startup(params) = &out[1] else {
        panic!("expected Startup");
    };
    assert_eq!(params.database, "carol");
}

// Goal: GSSENCRequest is refused with 'N', and SSLRequest is accepted after it.
#[test]
fn gssenc_then_ssl() {
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    assert_eq!(m.handle_input(&gssenc()), Ok(8));
    assert_eq!(outputs(&mut m), [StartupOutput::Reply(b'N')]);
    assert_eq!(m.handle_input(&ssl()), Ok(8));
    assert_eq!(
        outputs(&mut m),
        [StartupOutput::Reply(b'S'), StartupOutput::StartTls]
    );
}

// Goal: CancelRequest is recognized with its key, before TLS, in 3.0 and 3.2 key sizes.
#[test]
fn cancel_request() {
    for key in [vec![1, 2, 3, 4], vec![7; 32]] {
        let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
        let cancel = CancelRequest {
            process_id: 4242,
            secret_key: key,
        };
        let bytes = packet(StartupRequest::Cancel(cancel.clone()));
        assert_eq!(m.handle_input(&bytes), Ok(bytes.len()));
        assert_eq!(outputs(&mut m), [StartupOutput::Cancel(cancel)]);
        assert_eq!(
            m.handle_input(b"x"),
            Err(misbehaved(PeerMisbehaved::InputAfterEnd(
                "start-up exchange"
            )))
        );
    }
}

// Goal: a TLS ClientHello first is direct SSL: nothing consumed, and ALPN "postgresql" is
// required.
#[test]
fn direct_tls() {
    let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    assert_eq!(m.handle_input(&hello), Ok(0));
    assert_eq!(outputs(&mut m), [StartupOutput::DirectTls]);
    m.handle_tls_established(Some(ALPN_POSTGRESQL)).unwrap();
    let bytes = startup(&[("user", "dave")]);
    assert_eq!(m.handle_input(&bytes), Ok(bytes.len()));
    assert!(matches!(&outputs(&mut m)[..], [StartupOutput::Startup(_)]));

    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    m.handle_input(&hello).unwrap();
    assert_eq!(
        m.handle_tls_established(None),
        Err(misbehaved(PeerMisbehaved::DirectTlsWithoutAlpn))
    );
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    m.handle_input(&hello).unwrap();
    assert_eq!(
        m.handle_tls_established(Some(b"http/1.1")),
        Err(misbehaved(PeerMisbehaved::WrongAlpn {
            alpn: "http/1.1".into()
        }))
    );
}

// Goal: out-of-order and repeated requests get specific errors, and a failed machine
// stays failed.
#[test]
fn out_of_order() {
    // StartupMessage before TLS on a TLS-only listener.
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    let err = m.handle_input(&startup(&[("user", "eve")])).unwrap_err();
    assert_eq!(err, misbehaved(PeerMisbehaved::TlsRequired));
    assert_eq!(m.handle_input(&ssl()), Err(err));

    // A second SSLRequest inside TLS.
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    m.handle_input(&ssl()).unwrap();
    m.handle_tls_established(None).unwrap();
    assert_eq!(
        m.handle_input(&ssl()),
        Err(misbehaved(PeerMisbehaved::SecondSslRequest))
    );

    // A second SSLRequest after 'N'.
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    let mut bytes = ssl();
    bytes.extend(ssl());
    assert_eq!(
        m.handle_input(&bytes),
        Err(misbehaved(PeerMisbehaved::SecondSslRequest))
    );

    // GSSENCRequest twice.
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    let mut bytes = gssenc();
    bytes.extend(gssenc());
    assert_eq!(
        m.handle_input(&bytes),
        Err(misbehaved(PeerMisbehaved::SecondGssEncRequest))
    );

    // Plaintext bytes pipelined after SSLRequest (CVE-2021-23214).
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    let mut bytes = ssl();
    bytes.extend(startup(&[("user", "mallory")]));
    assert!(matches!(
        m.handle_input(&bytes),
        Err(Error::PeerMisbehaved {
            kind: PeerMisbehaved::UnexpectedMessage { .. },
            ..
        })
    ));

    // Bytes while the driver's TLS handshake is under way.
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    m.handle_input(&ssl()).unwrap();
    assert!(m.handle_input(b"x").is_err());

    // TLS established without a handshake.
    let mut m = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    assert!(m.handle_tls_established(None).is_err());

    // A tagged message where a start-up packet belongs: its type byte reads as a huge length.
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    assert!(matches!(
        m.handle_input(b"Q\0\0\0\rselect 1\0"),
        Err(Error::LimitExceeded {
            limit: Limit::StartupPacketSize,
            ..
        })
    ));
}

// Goal: an empty or missing user is refused; other protocol majors are refused.
#[test]
fn refused_parameters() {
    for params in [&[("user", "")][..], &[("database", "x")][..]] {
        let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
        assert_eq!(
            m.handle_input(&startup(params)),
            Err(misbehaved(PeerMisbehaved::EmptyUser))
        );
    }
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    let bytes = packet(StartupRequest::Startup(StartupMessage {
        version: ProtocolVersion { major: 2, minor: 0 },
        parameters: vec![(b"user".to_vec(), b"x".to_vec())],
    }));
    assert_eq!(
        m.handle_input(&bytes),
        Err(misbehaved(PeerMisbehaved::UnsupportedProtocolVersion {
            major: 2,
            minor: 0
        }))
    );
}

// Goal: protocol 3.2 is accepted and reported, so the proxy can negotiate it upstream.
#[test]
fn protocol_3_2() {
    let mut m = Startup::new(Limits::default(), TlsMode::Terminated, Duration::ZERO);
    let bytes = packet(StartupRequest::Startup(StartupMessage {
        version: ProtocolVersion::V3_2,
        parameters: vec![(b"user".to_vec(), b"x".to_vec())],
    }));
    m.handle_input(&bytes).unwrap();
    let [StartupOutput::Startup(params)] = &outputs(&mut m)[..] else {
        panic!("expected Startup");
    };
    assert_eq!(params.version, ProtocolVersion::V3_2);
}

// Goal: a client that stalls before finishing start-up is cut off at the deadline with
// the limit named; a finished start-up has no deadline.
#[test]
fn startup_deadline() {
    let accepted = Duration::ZERO;
    let limits = Limits::default();
    let deadline = accepted + limits.startup_timeout;
    let mut m = Startup::new(limits.clone(), TlsMode::Offer, accepted);
    assert_eq!(m.poll_timeout(), Some(deadline));
    m.handle_input(&ssl()[..5]).unwrap();
    assert_eq!(
        m.handle_timeout(deadline - Duration::from_millis(1)),
        Ok(())
    );
    let late = deadline + Duration::from_millis(500);
    let error = Error::LimitExceeded {
        limit: Limit::StartupTime,
        actual: 10_500,
        max: 10_000,
    };
    assert_eq!(m.handle_timeout(late), Err(error.clone()));
    assert_eq!(m.poll_timeout(), None);
    assert_eq!(m.handle_input(&ssl()[5..]), Err(error));

    let mut m = Startup::new(limits, TlsMode::Terminated, accepted);
    m.handle_input(&startup(&[("user", "x")])).unwrap();
    assert_eq!(m.poll_timeout(), None);
    assert_eq!(m.handle_timeout(late), Ok(()));
}
