//! Messages a server sends.

use crate::error::{Direction, Error, InvalidMessage};
use crate::frame::{self, Frame, Reader, Writer};
use crate::frontend::{CANCEL_KEY_LEN, Format};
use crate::limits::Limits;

/// Message type bytes of backend messages, named as in the protocol documentation.
pub mod tag {
    /// Authentication requests (AuthenticationOk, ...SASL, ...).
    pub const AUTHENTICATION: u8 = b'R';
    /// BackendKeyData.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// BindComplete.
    pub const BIND_COMPLETE: u8 = b'2';
    /// CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// CommandComplete.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// CopyData.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone.
    pub const COPY_DONE: u8 = b'c';
    /// CopyInResponse.
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse.
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// CopyBothResponse.
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// DataRow.
    pub const DATA_ROW: u8 = b'D';
    /// EmptyQueryResponse.
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// FunctionCallResponse.
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    /// NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// NoData.
    pub const NO_DATA: u8 = b'n';
    /// NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// NotificationResponse.
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    /// ParameterDescription.
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    /// ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// PortalSuspended.
    pub const PORTAL_SUSPENDED: u8 = b's';
    /// ReadyForQuery.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// RowDescription.
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Whether a server ever sends this message type byte.
pub const fn is_backend_tag(t: u8) -> bool {
    matches!(
        t,
        tag::AUTHENTICATION
            | tag::BACKEND_KEY_DATA
            | tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::COMMAND_COMPLETE
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_IN_RESPONSE
            | tag::COPY_OUT_RESPONSE
            | tag::COPY_BOTH_RESPONSE
            | tag::DATA_ROW
            | tag::EMPTY_QUERY_RESPONSE
            | tag::ERROR_RESPONSE
            | tag::FUNCTION_CALL_RESPONSE
            | tag::NEGOTIATE_PROTOCOL_VERSION
            | tag::NO_DATA
            | tag::NOTICE_RESPONSE
            | tag::NOTIFICATION_RESPONSE
            | tag::PARAMETER_DESCRIPTION
            | tag::PARAMETER_STATUS
            | tag::PARSE_COMPLETE
            | tag::PORTAL_SUSPENDED
            | tag::READY_FOR_QUERY
            | tag::ROW_DESCRIPTION
    )
}

/// An authentication request (`R`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Authentication {
    /// 0: authenticated.
    Ok,
    /// 2: Kerberos V5 (no longer supported by servers).
    KerberosV5,
    /// 3: send the password in clear text.
    CleartextPassword,
    /// 5: send the MD5-hashed password with this salt.
    Md5Password {
        /// The salt.
        salt: [u8; 4],
    },
    /// 7: start GSSAPI.
    Gss,
    /// 8: GSSAPI or SSPI continuation data.
    GssContinue(Vec<u8>),
    /// 9: start SSPI.
    Sspi,
    /// 10: SASL with one of these mechanisms.
    Sasl {
        /// Mechanism names, e.g. `SCRAM-SHA-256`.
        mechanisms: Vec<Vec<u8>>,
    },
    /// 11: SASL challenge.
    SaslContinue(Vec<u8>),
    /// 12: SASL outcome data.
    SaslFinal(Vec<u8>),
}

/// Ready-for-query transaction status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// The body of CopyIn/CopyOut/CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CopyResponse {
    /// Overall format: text (rows as lines) or binary.
    pub format: Format,
    /// Per-column formats.
    pub column_formats: Vec<Format>,
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldDescription {
    /// Column name.
    pub name: Vec<u8>,
    /// OID of the table, or 0.
    pub table_oid: u32,
    /// Attribute number in the table, or 0.
    pub column: i16,
    /// OID of the data type.
    pub type_oid: u32,
    /// Size of the type (negative for variable width).
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
    /// Format of this column in the DataRows that follow.
    pub format: Format,
}

/// The fields of an ErrorResponse or NoticeResponse, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Fields {
    /// (field type byte, value) pairs, e.g. `(b'C', b"28000")`.
    pub fields: Vec<(u8, Vec<u8>)>,
}

/// Field type bytes of ErrorResponse and NoticeResponse.
pub mod field {
    /// Severity, localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (`ERROR`, `FATAL`, ...).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    /// SQLSTATE code.
    pub const CODE: u8 = b'C';
    /// Primary message.
    pub const MESSAGE: u8 = b'M';
    /// Detail.
    pub const DETAIL: u8 = b'D';
    /// Hint.
    pub const HINT: u8 = b'H';
}

impl Fields {
    /// The value of field `kind`, if present.
    pub fn get(&self, kind: u8) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// The SQLSTATE, e.g. `42P01`.
    pub fn code(&self) -> Option<&[u8]> {
        self.get(field::CODE)
    }

    /// The primary message.
    pub fn message(&self) -> Option<&[u8]> {
        self.get(field::MESSAGE)
    }

    /// The non-localized severity when sent (9.6+), else the localized one.
    pub fn severity(&self) -> Option<&[u8]> {
        self.get(field::SEVERITY_NONLOCALIZED)
            .or_else(|| self.get(field::SEVERITY))
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let mut fields = Vec::new();
        loop {
            match r.u8()? {
                0 => return Ok(Fields { fields }),
                kind => fields.push((kind, r.cstr()?.to_vec())),
            }
        }
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        for (kind, value) in &self.fields {
            if *kind == 0 {
                // A zero field type ends the list; refuse rather than truncate.
                w.cstr(b"\0")?;
            }
            w.u8(*kind);
            w.cstr(value)?;
        }
        w.u8(0);
        Ok(())
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendMessage {
    /// Authentication request (`R`).
    Authentication(Authentication),
    /// BackendKeyData (`K`): what a CancelRequest must quote.
    BackendKeyData {
        /// Backend process id.
        process_id: i32,
        /// Secret key: 4 bytes in 3.0, 4 to 256 bytes in 3.2.
        secret_key: Vec<u8>,
    },
    /// BindComplete (`2`).
    BindComplete,
    /// CloseComplete (`3`).
    CloseComplete,
    /// CommandComplete (`C`) with its command tag, e.g. `INSERT 0 1`.
    CommandComplete(Vec<u8>),
    /// CopyData (`d`).
    CopyData(Vec<u8>),
    /// CopyDone (`c`).
    CopyDone,
    /// CopyInResponse (`G`).
    CopyInResponse(CopyResponse),
    /// CopyOutResponse (`H`).
    CopyOutResponse(CopyResponse),
    /// CopyBothResponse (`W`).
    CopyBothResponse(CopyResponse),
    /// DataRow (`D`); `None` is NULL.
    DataRow(Vec<Option<Vec<u8>>>),
    /// EmptyQueryResponse (`I`).
    EmptyQueryResponse,
    /// ErrorResponse (`E`).
    ErrorResponse(Fields),
    /// FunctionCallResponse (`V`); `None` is NULL.
    FunctionCallResponse(Option<Vec<u8>>),
    /// NegotiateProtocolVersion (`v`).
    NegotiateProtocolVersion {
        /// Newest minor version the server supports.
        minor_version: u32,
        /// `_pq_.` options the server did not recognize.
        unrecognized_options: Vec<Vec<u8>>,
    },
    /// NoData (`n`).
    NoData,
    /// NoticeResponse (`N`).
    NoticeResponse(Fields),
    /// NotificationResponse (`A`).
    NotificationResponse {
        /// Notifying backend's process id.
        process_id: i32,
        /// Channel name.
        channel: Vec<u8>,
        /// Payload.
        payload: Vec<u8>,
    },
    /// ParameterDescription (`t`): parameter type OIDs.
    ParameterDescription(Vec<u32>),
    /// ParameterStatus (`S`).
    ParameterStatus {
        /// Parameter name.
        name: Vec<u8>,
        /// Its current value.
        value: Vec<u8>,
    },
    /// ParseComplete (`1`).
    ParseComplete,
    /// PortalSuspended (`s`).
    PortalSuspended,
    /// ReadyForQuery (`Z`).
    ReadyForQuery(TransactionStatus),
    /// RowDescription (`T`).
    RowDescription(Vec<FieldDescription>),
}

/// The tag of a CommandComplete body, borrowed: the relay reads one per statement and
/// keeps only its text. Accepts exactly what [`BackendMessage::decode`] accepts.
pub(crate) fn command_tag(body: &[u8]) -> Result<&[u8], Error> {
    decode_command_tag(body)
        .map_err(|kind| Error::invalid(Direction::Backend, Some(tag::COMMAND_COMPLETE), kind))
}

fn decode_command_tag(body: &[u8]) -> Result<&[u8], InvalidMessage> {
    let mut r = Reader::new(body);
    let command_tag = r.cstr()?;
    r.finish()?;
    Ok(command_tag)
}

fn copy_response(r: &mut Reader<'_>) -> Result<CopyResponse, InvalidMessage> {
    let format = Format::from_code(r.u8()?.into())?;
    let count = r.u16()?;
    let column_formats = (0..count)
        .map(|_| Format::from_code(r.i16()?))
        .collect::<Result<_, _>>()?;
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

impl BackendMessage {
    /// Splits and decodes the first message of `buf`. Returns the message and the number
    /// of bytes it used, or `Ok(None)` when `buf` holds only part of it.
    pub fn decode_from(buf: &[u8], limits: &Limits) -> Result<Option<(Self, usize)>, Error> {
        match frame::split_message(Direction::Backend, buf, limits.message_size_max)? {
            None => Ok(None),
            Some(frame) => Ok(Some((Self::decode(frame)?, frame.wire_len()))),
        }
    }

    /// Decodes one framed message. The body must be used exactly: trailing bytes are an
    /// error.
    pub fn decode(frame: Frame<'_>) -> Result<Self, Error> {
        Self::decode_body(frame.tag, frame.body)
            .map_err(|kind| Error::invalid(Direction::Backend, Some(frame.tag), kind))
    }

    fn decode_body(t: u8, body: &[u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let message = match t {
            tag::AUTHENTICATION => BackendMessage::Authentication(match r.i32()? {
                0 => Authentication::Ok,
                2 => Authentication::KerberosV5,
                3 => Authentication::CleartextPassword,
                5 => Authentication::Md5Password {
                    salt: [r.u8()?, r.u8()?, r.u8()?, r.u8()?],
                },
                7 => Authentication::Gss,
                8 => Authentication::GssContinue(r.rest().to_vec()),
                9 => Authentication::Sspi,
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let mechanism = r.cstr()?;
                        if mechanism.is_empty() {
                            break;
                        }
                        mechanisms.push(mechanism.to_vec());
                    }
                    Authentication::Sasl { mechanisms }
                }
                11 => Authentication::SaslContinue(r.rest().to_vec()),
                12 => Authentication::SaslFinal(r.rest().to_vec()),
                code => return Err(InvalidMessage::UnknownAuthentication { code }),
            }),
            tag::BACKEND_KEY_DATA => {
                let process_id = r.i32()?;
                let secret_key = r.rest().to_vec();
                if !CANCEL_KEY_LEN.contains(&secret_key.len()) {
                    return Err(InvalidMessage::CancelKeyLength {
                        length: secret_key.len(),
                    });
                }
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                }
            }
            tag::BIND_COMPLETE => BackendMessage::BindComplete,
            tag::CLOSE_COMPLETE => BackendMessage::CloseComplete,
            tag::COMMAND_COMPLETE => {
                return decode_command_tag(body)
                    .map(|t| BackendMessage::CommandComplete(t.to_vec()));
            }
            tag::COPY_DATA => BackendMessage::CopyData(r.rest().to_vec()),
            tag::COPY_DONE => BackendMessage::CopyDone,
            tag::COPY_IN_RESPONSE => BackendMessage::CopyInResponse(copy_response(&mut r)?),
            tag::COPY_OUT_RESPONSE => BackendMessage::CopyOutResponse(copy_response(&mut r)?),
            tag::COPY_BOTH_RESPONSE => BackendMessage::CopyBothResponse(copy_response(&mut r)?),
            tag::DATA_ROW => {
                let count = r.u16()?;
                BackendMessage::DataRow(
                    (0..count)
                        .map(|_| Ok(r.value()?.map(<[u8]>::to_vec)))
                        .collect::<Result<_, _>>()?,
                )
            }
            tag::EMPTY_QUERY_RESPONSE => BackendMessage::EmptyQueryResponse,
            tag::ERROR_RESPONSE => BackendMessage::ErrorResponse(Fields::decode(&mut r)?),
            tag::FUNCTION_CALL_RESPONSE => {
                BackendMessage::FunctionCallResponse(r.value()?.map(<[u8]>::to_vec))
            }
            tag::NEGOTIATE_PROTOCOL_VERSION => {
                let minor_version = r.u32()?;
                let count = r.u32()?;
                let mut unrecognized_options = Vec::new();
                for _ in 0..count {
                    unrecognized_options.push(r.cstr()?.to_vec());
                }
                BackendMessage::NegotiateProtocolVersion {
                    minor_version,
                    unrecognized_options,
                }
            }
            tag::NO_DATA => BackendMessage::NoData,
            tag::NOTICE_RESPONSE => BackendMessage::NoticeResponse(Fields::decode(&mut r)?),
            tag::NOTIFICATION_RESPONSE => BackendMessage::NotificationResponse {
                process_id: r.i32()?,
                channel: r.cstr()?.to_vec(),
                payload: r.cstr()?.to_vec(),
            },
            tag::PARAMETER_DESCRIPTION => {
                let count = r.u16()?;
                BackendMessage::ParameterDescription(
                    (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?,
                )
            }
            tag::PARAMETER_STATUS => BackendMessage::ParameterStatus {
                name: r.cstr()?.to_vec(),
                value: r.cstr()?.to_vec(),
            },
            tag::PARSE_COMPLETE => BackendMessage::ParseComplete,
            tag::PORTAL_SUSPENDED => BackendMessage::PortalSuspended,
            tag::READY_FOR_QUERY => BackendMessage::ReadyForQuery(match r.u8()? {
                b'I' => TransactionStatus::Idle,
                b'T' => TransactionStatus::InTransaction,
                b'E' => TransactionStatus::Failed,
                status => return Err(InvalidMessage::UnknownTransactionStatus { status }),
            }),
            tag::ROW_DESCRIPTION => {
                let count = r.u16()?;
                let mut fields = Vec::new();
                for _ in 0..count {
                    fields.push(FieldDescription {
                        name: r.cstr()?.to_vec(),
                        table_oid: r.u32()?,
                        column: r.i16()?,
                        type_oid: r.u32()?,
                        type_size: r.i16()?,
                        type_modifier: r.i32()?,
                        format: Format::from_code(r.i16()?)?,
                    });
                }
                BackendMessage::RowDescription(fields)
            }
            _ => return Err(InvalidMessage::UnknownTag),
        };
        r.finish()?;
        Ok(message)
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => tag::AUTHENTICATION,
            BackendMessage::BackendKeyData { .. } => tag::BACKEND_KEY_DATA,
            BackendMessage::BindComplete => tag::BIND_COMPLETE,
            BackendMessage::CloseComplete => tag::CLOSE_COMPLETE,
            BackendMessage::CommandComplete(_) => tag::COMMAND_COMPLETE,
            BackendMessage::CopyData(_) => tag::COPY_DATA,
            BackendMessage::CopyDone => tag::COPY_DONE,
            BackendMessage::CopyInResponse(_) => tag::COPY_IN_RESPONSE,
            BackendMessage::CopyOutResponse(_) => tag::COPY_OUT_RESPONSE,
            BackendMessage::CopyBothResponse(_) => tag::COPY_BOTH_RESPONSE,
            BackendMessage::DataRow(_) => tag::DATA_ROW,
            BackendMessage::EmptyQueryResponse => tag::EMPTY_QUERY_RESPONSE,
            BackendMessage::ErrorResponse(_) => tag::ERROR_RESPONSE,
            BackendMessage::FunctionCallResponse(_) => tag::FUNCTION_CALL_RESPONSE,
            BackendMessage::NegotiateProtocolVersion { .. } => tag::NEGOTIATE_PROTOCOL_VERSION,
            BackendMessage::NoData => tag::NO_DATA,
            BackendMessage::NoticeResponse(_) => tag::NOTICE_RESPONSE,
            BackendMessage::NotificationResponse { .. } => tag::NOTIFICATION_RESPONSE,
            BackendMessage::ParameterDescription(_) => tag::PARAMETER_DESCRIPTION,
            BackendMessage::ParameterStatus { .. } => tag::PARAMETER_STATUS,
            BackendMessage::ParseComplete => tag::PARSE_COMPLETE,
            BackendMessage::PortalSuspended => tag::PORTAL_SUSPENDED,
            BackendMessage::ReadyForQuery(_) => tag::READY_FOR_QUERY,
            BackendMessage::RowDescription(_) => tag::ROW_DESCRIPTION,
        }
    }

    /// Appends the message to `out`. Fails, leaving `out` unchanged, when a string holds a
    /// NUL or a count or length does not fit its wire field.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut w = Writer::tagged(out, Direction::Backend, self.tag());
        match self {
            BackendMessage::Authentication(auth) => match auth {
                Authentication::Ok => w.i32(0),
                Authentication::KerberosV5 => w.i32(2),
                Authentication::CleartextPassword => w.i32(3),
                Authentication::Md5Password { salt } => {
                    w.i32(5);
                    w.bytes(salt);
                }
                Authentication::Gss => w.i32(7),
                Authentication::GssContinue(data) => {
                    w.i32(8);
                    w.bytes(data);
                }
                Authentication::Sspi => w.i32(9),
                Authentication::Sasl { mechanisms } => {
                    w.i32(10);
                    for mechanism in mechanisms {
                        if mechanism.is_empty() {
                            // An empty name ends the list; refuse rather than truncate.
                            w.cstr(b"\0")?;
                        }
                        w.cstr(mechanism)?;
                    }
                    w.u8(0);
                }
                Authentication::SaslContinue(data) => {
                    w.i32(11);
                    w.bytes(data);
                }
                Authentication::SaslFinal(data) => {
                    w.i32(12);
                    w.bytes(data);
                }
            },
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => {
                w.i32(*process_id);
                w.bytes(secret_key);
            }
            BackendMessage::CommandComplete(tag) => w.cstr(tag)?,
            BackendMessage::CopyData(data) => w.bytes(data),
            BackendMessage::CopyInResponse(copy)
            | BackendMessage::CopyOutResponse(copy)
            | BackendMessage::CopyBothResponse(copy) => {
                // The overall format is one byte; the codes are 0 and 1.
                w.u8(copy.format.code() as u8);
                w.count(copy.column_formats.len())?;
                for format in &copy.column_formats {
                    w.i16(format.code());
                }
            }
            BackendMessage::DataRow(values) => {
                w.count(values.len())?;
                for value in values {
                    w.value(value.as_deref())?;
                }
            }
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                fields.encode(&mut w)?
            }
            BackendMessage::FunctionCallResponse(value) => w.value(value.as_deref())?,
            BackendMessage::NegotiateProtocolVersion {
                minor_version,
                unrecognized_options,
            } => {
                w.u32(*minor_version);
                w.u32(unrecognized_options.len().try_into().unwrap_or(u32::MAX));
                for option in unrecognized_options {
                    w.cstr(option)?;
                }
            }
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => {
                w.i32(*process_id);
                w.cstr(channel)?;
                w.cstr(payload)?;
            }
            BackendMessage::ParameterDescription(types) => {
                w.count(types.len())?;
                for oid in types {
                    w.u32(*oid);
                }
            }
            BackendMessage::ParameterStatus { name, value } => {
                w.cstr(name)?;
                w.cstr(value)?;
            }
            BackendMessage::ReadyForQuery(status) => w.u8(status.byte()),
            BackendMessage::RowDescription(fields) => {
                w.count(fields.len())?;
                for field in fields {
                    w.cstr(&field.name)?;
                    w.u32(field.table_oid);
                    w.i16(field.column);
                    w.u32(field.type_oid);
                    w.i16(field.type_size);
                    w.i32(field.type_modifier);
                    w.i16(field.format.code());
                }
            }
            BackendMessage::BindComplete
            | BackendMessage::CloseComplete
            | BackendMessage::CopyDone
            | BackendMessage::EmptyQueryResponse
            | BackendMessage::NoData
            | BackendMessage::ParseComplete
            | BackendMessage::PortalSuspended => {}
        }
        w.finish()
    }
}
