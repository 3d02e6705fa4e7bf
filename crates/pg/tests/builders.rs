//! What the proxy and agent say to clients themselves.

use std::time::Duration;

use postern_pg::backend::TransactionStatus;
use postern_pg::reply::{Severity, SqlState};
use postern_pg::{BackendMessage, Error, Limits, PeerMisbehaved, Startup, TlsMode};

fn bytes(message: &BackendMessage) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode(&mut out).unwrap();
    out
}

// Goal: ErrorResponse carries severity (both forms), SQLSTATE and message, NUL-separated.
#[test]
fn error_response() {
    let message = BackendMessage::error(
        Severity::Fatal,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "access denied",
    );
    assert_eq!(
        bytes(&message),
        b"E\0\0\0\x29SFATAL\0VFATAL\0C28000\0Maccess denied\0\0"
    );
    let BackendMessage::ErrorResponse(fields) = message else {
        panic!("not an ErrorResponse");
    };
    assert_eq!(fields.code(), Some(&b"28000"[..]));
    assert_eq!(fields.severity(), Some(&b"FATAL"[..]));
    assert_eq!(fields.message(), Some(&b"access denied"[..]));
}

// Goal: the session-start messages have their exact wire form.
#[test]
fn session_start_messages() {
    assert_eq!(
        bytes(&BackendMessage::authentication_ok()),
        b"R\0\0\0\x08\0\0\0\0"
    );
    assert_eq!(
        bytes(&BackendMessage::backend_key_data(7, &[1, 2, 3, 4])),
        b"K\0\0\0\x0c\0\0\0\x07\x01\x02\x03\x04"
    );
    assert_eq!(
        bytes(&BackendMessage::parameter_status("TimeZone", "UTC")),
        b"S\0\0\0\x11TimeZone\0UTC\0"
    );
    assert_eq!(
        bytes(&BackendMessage::ready_for_query(TransactionStatus::Idle)),
        b"Z\0\0\0\x05I"
    );
}

// Goal: connection-failure codes are in class 08, and a proxy error becomes an
// ErrorResponse a person can act on.
#[test]
fn errors_to_clients() {
    for code in [
        SqlState::CONNECTION_EXCEPTION,
        SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
        SqlState::CONNECTION_FAILURE,
    ] {
        assert!(code.as_str().starts_with("08"));
    }
    let mut startup = Startup::new(Limits::default(), TlsMode::Offer, Duration::ZERO);
    let mut plain = Vec::new();
    postern_pg::StartupRequest::Startup(postern_pg::frontend::StartupMessage {
        version: postern_pg::frontend::ProtocolVersion::V3_0,
        parameters: vec![(b"user".to_vec(), b"x".to_vec())],
    })
    .encode(&mut plain)
    .unwrap();
    let error = startup.handle_input(&plain).unwrap_err();
    assert!(matches!(
        error,
        Error::PeerMisbehaved {
            kind: PeerMisbehaved::TlsRequired,
            ..
        }
    ));
    let BackendMessage::ErrorResponse(fields) = error.to_error_response() else {
        panic!("not an ErrorResponse");
    };
    assert_eq!(fields.code(), Some(&b"28000"[..]));
    assert_eq!(
        fields.message(),
        Some(&b"frontend misbehaved: StartupMessage before TLS; this server only accepts TLS connections"[..])
    );
}
