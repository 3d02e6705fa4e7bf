//! Every message type: encode then decode gives it back; every prefix asks for more
//! bytes; and postgres-protocol, an independent implementation, agrees with our bytes.

use bytes::BytesMut;
use postern_pg::backend::{
    Authentication, CopyResponse, FieldDescription, Fields, TransactionStatus,
};
use postern_pg::frontend::{
    Bind, CancelRequest, Format, FunctionCall, Parse, ProtocolVersion, StartupMessage, Target,
};
use postern_pg::{BackendMessage, FrontendMessage, Limits, StartupRequest};
use postgres_protocol::IsNull;
use postgres_protocol::message::{backend as pp_backend, frontend as pp_frontend};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

/// A string field: any bytes but NUL.
fn text() -> impl Strategy<Value = Vec<u8>> {
    vec(1u8..=255, 0..24)
}

/// ASCII without NUL, for postgres-protocol's `&str` arguments.
fn ascii() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _$;*(),.'=-]{0,24}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Text), Just(Format::Binary)]
}

fn values() -> impl Strategy<Value = Vec<Option<Vec<u8>>>> {
    vec(option::of(bytes()), 0..6)
}

/// Values with a format list that is none, one, or one per value.
fn formatted_values() -> impl Strategy<Value = (Vec<Format>, Vec<Option<Vec<u8>>>)> {
    values().prop_flat_map(|values| {
        let n = values.len();
        (
            prop_oneof![vec(format(), 0..=1), vec(format(), n..=n)],
            Just(values),
        )
    })
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        text().prop_map(Target::Statement),
        text().prop_map(Target::Portal)
    ]
}

fn frontend() -> impl Strategy<Value = FrontendMessage> {
    prop_oneof![
        (text(), text(), formatted_values(), vec(format(), 0..4)).prop_map(
            |(portal, statement, (parameter_formats, parameters), result_formats)| {
                FrontendMessage::Bind(Bind {
                    portal,
                    statement,
                    parameter_formats,
                    parameters,
                    result_formats,
                })
            }
        ),
        target().prop_map(FrontendMessage::Close),
        bytes().prop_map(FrontendMessage::CopyData),
        Just(FrontendMessage::CopyDone),
        text().prop_map(FrontendMessage::CopyFail),
        target().prop_map(FrontendMessage::Describe),
        (text(), any::<i32>())
            .prop_map(|(portal, max_rows)| FrontendMessage::Execute { portal, max_rows }),
        Just(FrontendMessage::Flush),
        (any::<u32>(), formatted_values(), format()).prop_map(
            |(function, (argument_formats, arguments), result_format)| {
                FrontendMessage::FunctionCall(FunctionCall {
                    function,
                    argument_formats,
                    arguments,
                    result_format,
                })
            }
        ),
        bytes().prop_map(FrontendMessage::AuthenticationResponse),
        (text(), text(), vec(any::<u32>(), 0..5)).prop_map(|(name, query, parameter_types)| {
            FrontendMessage::Parse(Parse {
                name,
                query,
                parameter_types,
            })
        }),
        text().prop_map(FrontendMessage::Query),
        Just(FrontendMessage::Sync),
        Just(FrontendMessage::Terminate),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    vec((1u8..=255, text()), 0..6).prop_map(|fields| Fields { fields })
}

fn copy_response() -> impl Strategy<Value = CopyResponse> {
    (format(), vec(format(), 0..5)).prop_map(|(format, column_formats)| CopyResponse {
        format,
        column_formats,
    })
}

fn authentication() -> impl Strategy<Value = Authentication> {
    prop_oneof![
        Just(Authentication::Ok),
        Just(Authentication::KerberosV5),
        Just(Authentication::CleartextPassword),
        any::<[u8; 4]>().prop_map(|salt| Authentication::Md5Password { salt }),
        Just(Authentication::Gss),
        bytes().prop_map(Authentication::GssContinue),
        Just(Authentication::Sspi),
        vec(vec(1u8..=255, 1..16), 0..3).prop_map(|mechanisms| Authentication::Sasl { mechanisms }),
        bytes().prop_map(Authentication::SaslContinue),
        bytes().prop_map(Authentication::SaslFinal),
    ]
}

fn backend() -> impl Strategy<Value = BackendMessage> {
    prop_oneof![
        authentication().prop_map(BackendMessage::Authentication),
        (any::<i32>(), vec(any::<u8>(), 4..=256)).prop_map(|(process_id, secret_key)| {
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            }
        }),
        Just(BackendMessage::BindComplete),
        Just(BackendMessage::CloseComplete),
        text().prop_map(BackendMessage::CommandComplete),
        bytes().prop_map(BackendMessage::CopyData),
        Just(BackendMessage::CopyDone),
        copy_response().prop_map(BackendMessage::CopyInResponse),
        copy_response().prop_map(BackendMessage::CopyOutResponse),
        copy_response().prop_map(BackendMessage::CopyBothResponse),
        values().prop_map(BackendMessage::DataRow),
        Just(BackendMessage::EmptyQueryResponse),
        fields().prop_map(BackendMessage::ErrorResponse),
        option::of(bytes()).prop_map(BackendMessage::FunctionCallResponse),
        (any::<u32>(), vec(text(), 0..3)).prop_map(|(minor_version, unrecognized_options)| {
            BackendMessage::NegotiateProtocolVersion {
                minor_version,
                unrecognized_options,
            }
        }),
        Just(BackendMessage::NoData),
        fields().prop_map(BackendMessage::NoticeResponse),
        (any::<i32>(), text(), text()).prop_map(|(process_id, channel, payload)| {
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            }
        }),
        vec(any::<u32>(), 0..5).prop_map(BackendMessage::ParameterDescription),
        (text(), text()).prop_map(|(name, value)| BackendMessage::ParameterStatus { name, value }),
        Just(BackendMessage::ParseComplete),
        Just(BackendMessage::PortalSuspended),
        prop_oneof![
            Just(TransactionStatus::Idle),
            Just(TransactionStatus::InTransaction),
            Just(TransactionStatus::Failed)
        ]
        .prop_map(BackendMessage::ReadyForQuery),
        vec(field_description(), 0..4).prop_map(BackendMessage::RowDescription),
    ]
}

fn field_description() -> impl Strategy<Value = FieldDescription> {
    (
        text(),
        any::<u32>(),
        any::<i16>(),
        any::<u32>(),
        any::<i16>(),
        any::<i32>(),
        format(),
    )
        .prop_map(
            |(name, table_oid, column, type_oid, type_size, type_modifier, format)| {
                FieldDescription {
                    name,
                    table_oid,
                    column,
                    type_oid,
                    type_size,
                    type_modifier,
                    format,
                }
            },
        )
}

fn startup_request() -> impl Strategy<Value = StartupRequest> {
    prop_oneof![
        Just(StartupRequest::Ssl),
        Just(StartupRequest::GssEnc),
        (any::<i32>(), vec(any::<u8>(), 4..=256)).prop_map(|(process_id, secret_key)| {
            StartupRequest::Cancel(CancelRequest {
                process_id,
                secret_key,
            })
        }),
        (0u16..=3, vec((vec(1u8..=255, 1..12), text()), 0..6)).prop_map(|(minor, parameters)| {
            StartupRequest::Startup(StartupMessage {
                version: ProtocolVersion { major: 3, minor },
                parameters,
            })
        }),
    ]
}

proptest! {
    // Goal: every frontend message survives encode -> decode, and every strict prefix of
    // its encoding is "need more bytes", never an error.
    #[test]
    fn frontend_round_trip(message in frontend()) {
        let mut wire = Vec::new();
        message.encode(&mut wire).unwrap();
        let limits = Limits::default();
        let (decoded, len) = FrontendMessage::decode_from(&wire, &limits).unwrap().unwrap();
        prop_assert_eq!(&decoded, &message);
        prop_assert_eq!(len, wire.len());
        for cut in 0..wire.len() {
            prop_assert_eq!(FrontendMessage::decode_from(&wire[..cut], &limits).unwrap(), None);
        }
    }

    // Goal: every backend message survives encode -> decode, and every strict prefix is
    // "need more bytes".
    #[test]
    fn backend_round_trip(message in backend()) {
        let mut wire = Vec::new();
        message.encode(&mut wire).unwrap();
        let limits = Limits::default();
        let (decoded, len) = BackendMessage::decode_from(&wire, &limits).unwrap().unwrap();
        prop_assert_eq!(&decoded, &message);
        prop_assert_eq!(len, wire.len());
        for cut in 0..wire.len() {
            prop_assert_eq!(BackendMessage::decode_from(&wire[..cut], &limits).unwrap(), None);
        }
    }

    // Goal: every start-up packet survives encode -> decode, and every strict prefix is
    // "need more bytes".
    #[test]
    fn startup_round_trip(request in startup_request()) {
        let mut wire = Vec::new();
        request.encode(&mut wire).unwrap();
        let limits = Limits::default();
        let (decoded, len) = StartupRequest::decode_from(&wire, &limits).unwrap().unwrap();
        prop_assert_eq!(&decoded, &request);
        prop_assert_eq!(len, wire.len());
        for cut in 0..wire.len() {
            prop_assert_eq!(StartupRequest::decode_from(&wire[..cut], &limits).unwrap(), None);
        }
    }

    // Goal: our frontend encodings are byte-identical to postgres-protocol's for the
    // messages it can write.
    #[test]
    fn frontend_matches_postgres_protocol(
        name in ascii(),
        query in ascii(),
        types in vec(any::<u32>(), 0..4),
        params in vec(option::of(vec(any::<u8>(), 0..16)), 0..4),
        max_rows in any::<i32>(),
        data in bytes(),
    ) {
        let mut theirs = BytesMut::new();
        let mut ours = Vec::new();
        let mut both = |message: FrontendMessage| message.encode(&mut ours).unwrap();
        pp_frontend::query(&query, &mut theirs).unwrap();
        both(FrontendMessage::Query(query.clone().into()));
        pp_frontend::parse(&name, &query, types.iter().copied(), &mut theirs).unwrap();
        both(FrontendMessage::Parse(Parse {
            name: name.clone().into(),
            query: query.clone().into(),
            parameter_types: types.clone(),
        }));
        let formats: Vec<i16> = vec![1; params.len()];
        pp_frontend::bind(
            &name,
            &query,
            formats.iter().copied(),
            params.iter(),
            |value, buf| match value {
                None => Ok(IsNull::Yes),
                Some(v) => { buf.extend_from_slice(v); Ok(IsNull::No) }
            },
            Some(0),
            &mut theirs,
        ).map_err(|_| TestCaseError::fail("bind"))?;
        both(FrontendMessage::Bind(Bind {
            portal: name.clone().into(),
            statement: query.clone().into(),
            parameter_formats: vec![Format::Binary; params.len()],
            parameters: params.clone(),
            result_formats: vec![Format::Text],
        }));
        pp_frontend::execute(&name, max_rows, &mut theirs).unwrap();
        both(FrontendMessage::Execute { portal: name.clone().into(), max_rows });
        pp_frontend::close(b'S', &name, &mut theirs).unwrap();
        both(FrontendMessage::Close(Target::Statement(name.clone().into())));
        pp_frontend::describe(b'P', &name, &mut theirs).unwrap();
        both(FrontendMessage::Describe(Target::Portal(name.clone().into())));
        pp_frontend::CopyData::new(&data[..]).unwrap().write(&mut theirs);
        both(FrontendMessage::CopyData(data.clone()));
        pp_frontend::copy_done(&mut theirs);
        both(FrontendMessage::CopyDone);
        pp_frontend::copy_fail(&query, &mut theirs).unwrap();
        both(FrontendMessage::CopyFail(query.clone().into()));
        pp_frontend::password_message(name.as_bytes(), &mut theirs).unwrap();
        // postgres-protocol NUL-terminates passwords; ours keeps the body opaque.
        let mut password = name.clone().into_bytes();
        password.push(0);
        both(FrontendMessage::AuthenticationResponse(password));
        pp_frontend::flush(&mut theirs);
        both(FrontendMessage::Flush);
        pp_frontend::sync(&mut theirs);
        both(FrontendMessage::Sync);
        pp_frontend::terminate(&mut theirs);
        both(FrontendMessage::Terminate);
        pp_frontend::ssl_request(&mut theirs);
        StartupRequest::Ssl.encode(&mut ours).unwrap();
        pp_frontend::cancel_request(max_rows, 0x0102_0304, &mut theirs);
        StartupRequest::Cancel(CancelRequest { process_id: max_rows, secret_key: vec![1, 2, 3, 4] })
            .encode(&mut ours).unwrap();
        pp_frontend::startup_message([("user", name.as_str()), ("database", query.as_str())], &mut theirs).unwrap();
        StartupRequest::Startup(StartupMessage {
            version: ProtocolVersion::V3_0,
            parameters: vec![(b"user".to_vec(), name.clone().into()), (b"database".to_vec(), query.clone().into())],
        }).encode(&mut ours).unwrap();
        prop_assert_eq!(&ours[..], &theirs[..]);
    }

    // Goal: postgres-protocol's backend parser reads our backend encodings as the same
    // message (for the variants it knows).
    #[test]
    fn backend_parsed_by_postgres_protocol(message in backend()) {
        let mut wire = Vec::new();
        message.encode(&mut wire).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let parsed = pp_backend::Message::parse(&mut buf);
        match (&message, parsed) {
            // Variants postgres-protocol does not know (or only with 4-byte keys).
            (BackendMessage::CopyBothResponse(_)
                | BackendMessage::FunctionCallResponse(_)
                | BackendMessage::NegotiateProtocolVersion { .. }
                | BackendMessage::BackendKeyData { .. }, _) => {}
            (BackendMessage::CommandComplete(tag), Ok(Some(pp_backend::Message::CommandComplete(body)))) => {
                if let Ok(theirs) = body.tag() { prop_assert_eq!(theirs.as_bytes(), &tag[..]); }
            }
            (BackendMessage::DataRow(values), Ok(Some(pp_backend::Message::DataRow(body)))) => {
                let buffer = body.buffer();
                let theirs: Vec<Option<Vec<u8>>> = fallible_iterator::FallibleIterator::collect(
                    fallible_iterator::FallibleIterator::map(body.ranges(), |r| Ok(r.map(|r| buffer[r].to_vec())))
                ).unwrap();
                prop_assert_eq!(&theirs, values);
            }
            (BackendMessage::ReadyForQuery(status), Ok(Some(pp_backend::Message::ReadyForQuery(body)))) => {
                let ours = match status {
                    TransactionStatus::Idle => b'I',
                    TransactionStatus::InTransaction => b'T',
                    TransactionStatus::Failed => b'E',
                };
                prop_assert_eq!(body.status(), ours);
            }
            (BackendMessage::ParameterDescription(types), Ok(Some(pp_backend::Message::ParameterDescription(body)))) => {
                let theirs: Vec<u32> = fallible_iterator::FallibleIterator::collect(body.parameters()).unwrap();
                prop_assert_eq!(&theirs, types);
            }
            (BackendMessage::Authentication(Authentication::Md5Password { salt }), Ok(Some(pp_backend::Message::AuthenticationMd5Password(body)))) => {
                prop_assert_eq!(&body.salt(), salt);
            }
            (_, Ok(Some(parsed))) => {
                // Same message kind: compare through the type byte of a known mapping.
                prop_assert!(same_kind(&message, &parsed), "{message:?} parsed as another kind");
            }
            (_, Ok(None)) => prop_assert!(false, "postgres-protocol wants more bytes for {message:?}"),
            (_, Err(e)) => prop_assert!(false, "postgres-protocol failed on {message:?}: {e}"),
        }
    }
}

fn same_kind(ours: &BackendMessage, theirs: &pp_backend::Message) -> bool {
    use pp_backend::Message as M;
    matches!(
        (ours, theirs),
        (
            BackendMessage::Authentication(Authentication::Ok),
            M::AuthenticationOk
        ) | (
            BackendMessage::Authentication(Authentication::KerberosV5),
            M::AuthenticationKerberosV5
        ) | (
            BackendMessage::Authentication(Authentication::CleartextPassword),
            M::AuthenticationCleartextPassword
        ) | (
            BackendMessage::Authentication(Authentication::Gss),
            M::AuthenticationGss
        ) | (
            BackendMessage::Authentication(Authentication::GssContinue(_)),
            M::AuthenticationGssContinue(_)
        ) | (
            BackendMessage::Authentication(Authentication::Sspi),
            M::AuthenticationSspi
        ) | (
            BackendMessage::Authentication(Authentication::Sasl { .. }),
            M::AuthenticationSasl(_)
        ) | (
            BackendMessage::Authentication(Authentication::SaslContinue(_)),
            M::AuthenticationSaslContinue(_)
        ) | (
            BackendMessage::Authentication(Authentication::SaslFinal(_)),
            M::AuthenticationSaslFinal(_)
        ) | (BackendMessage::BindComplete, M::BindComplete)
            | (BackendMessage::CloseComplete, M::CloseComplete)
            | (BackendMessage::CopyData(_), M::CopyData(_))
            | (BackendMessage::CopyDone, M::CopyDone)
            | (BackendMessage::CopyInResponse(_), M::CopyInResponse(_))
            | (BackendMessage::CopyOutResponse(_), M::CopyOutResponse(_))
            | (BackendMessage::EmptyQueryResponse, M::EmptyQueryResponse)
            | (BackendMessage::ErrorResponse(_), M::ErrorResponse(_))
            | (BackendMessage::NoData, M::NoData)
            | (BackendMessage::NoticeResponse(_), M::NoticeResponse(_))
            | (
                BackendMessage::NotificationResponse { .. },
                M::NotificationResponse(_)
            )
            | (
                BackendMessage::ParameterStatus { .. },
                M::ParameterStatus(_)
            )
            | (BackendMessage::ParseComplete, M::ParseComplete)
            | (BackendMessage::PortalSuspended, M::PortalSuspended)
            | (BackendMessage::RowDescription(_), M::RowDescription(_))
    )
}
