//! Messages a client sends: the untagged start-up packets and the tagged messages after.
//!
//! Strings are kept as bytes: PostgreSQL sends them in the client encoding, which need
//! not be UTF-8, and the relay must pass them on unchanged.

use crate::error::{Direction, Error, InvalidMessage};
use crate::frame::{self, Frame, Reader, Writer};
use crate::limits::Limits;

/// Message type bytes of frontend messages, named as in the protocol documentation.
pub mod tag {
    /// Bind.
    pub const BIND: u8 = b'B';
    /// Close.
    pub const CLOSE: u8 = b'C';
    /// CopyData.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone.
    pub const COPY_DONE: u8 = b'c';
    /// CopyFail.
    pub const COPY_FAIL: u8 = b'f';
    /// Describe.
    pub const DESCRIBE: u8 = b'D';
    /// Execute.
    pub const EXECUTE: u8 = b'E';
    /// Flush.
    pub const FLUSH: u8 = b'H';
    /// FunctionCall.
    pub const FUNCTION_CALL: u8 = b'F';
    /// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share this byte.
    pub const AUTHENTICATION_RESPONSE: u8 = b'p';
    /// Parse.
    pub const PARSE: u8 = b'P';
    /// Query.
    pub const QUERY: u8 = b'Q';
    /// Sync.
    pub const SYNC: u8 = b'S';
    /// Terminate.
    pub const TERMINATE: u8 = b'X';
}

/// Whether a client ever sends this message type byte after start-up.
pub const fn is_frontend_tag(t: u8) -> bool {
    matches!(
        t,
        tag::BIND
            | tag::CLOSE
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_FAIL
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::FLUSH
            | tag::FUNCTION_CALL
            | tag::AUTHENTICATION_RESPONSE
            | tag::PARSE
            | tag::QUERY
            | tag::SYNC
            | tag::TERMINATE
    )
}

/// Text or binary, for parameters, arguments and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Code 0.
    Text,
    /// Code 1.
    Binary,
}

impl Format {
    pub(crate) fn from_code(code: i16) -> Result<Self, InvalidMessage> {
        match code {
            0 => Ok(Format::Text),
            1 => Ok(Format::Binary),
            code => Err(InvalidMessage::UnknownFormatCode { code }),
        }
    }

    /// The code sent on the wire.
    pub fn code(self) -> i16 {
        match self {
            Format::Text => 0,
            Format::Binary => 1,
        }
    }

    /// The format of value `index` given a list of format codes: none means all text, one
    /// applies to every value, otherwise one per value.
    pub fn of(formats: &[Format], index: usize) -> Format {
        match formats {
            [] => Format::Text,
            [only] => *only,
            many => many.get(index).copied().unwrap_or(Format::Text),
        }
    }
}

/// What Close and Describe refer to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A prepared statement (`S`); the empty name is the unnamed statement.
    Statement(Vec<u8>),
    /// A portal (`P`); the empty name is the unnamed portal.
    Portal(Vec<u8>),
}

impl Target {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        let (target, name) = match self {
            Target::Statement(name) => (b'S', name),
            Target::Portal(name) => (b'P', name),
        };
        w.u8(target);
        w.cstr(name)
    }
}

/// Parse: prepare `query` as statement `name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Parse {
    /// Statement name; empty for the unnamed statement.
    pub name: Vec<u8>,
    /// The SQL text.
    pub query: Vec<u8>,
    /// Parameter type OIDs the client fixes (0 = let the server infer).
    pub parameter_types: Vec<u32>,
}

/// Bind: create portal `portal` from statement `statement` with parameter values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bind {
    /// Portal name; empty for the unnamed portal.
    pub portal: Vec<u8>,
    /// Statement name; empty for the unnamed statement.
    pub statement: Vec<u8>,
    /// Parameter format codes as sent: none (all text), one (for all), or one per value.
    pub parameter_formats: Vec<Format>,
    /// Parameter values; `None` is NULL.
    pub parameters: Vec<Option<Vec<u8>>>,
    /// Result column format codes, with the same none/one/each rule.
    pub result_formats: Vec<Format>,
}

/// FunctionCall: the fast-path interface (used by libpq's large-object functions).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionCall {
    /// OID of the function.
    pub function: u32,
    /// Argument format codes, with the none/one/each rule.
    pub argument_formats: Vec<Format>,
    /// Argument values; `None` is NULL.
    pub arguments: Vec<Option<Vec<u8>>>,
    /// Format of the result.
    pub result_format: Format,
}

/// A tagged message from the client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrontendMessage {
    /// Bind (`B`).
    Bind(Bind),
    /// Close (`C`).
    Close(Target),
    /// CopyData (`d`).
    CopyData(Vec<u8>),
    /// CopyDone (`c`).
    CopyDone,
    /// CopyFail (`f`) with the reason.
    CopyFail(Vec<u8>),
    /// Describe (`D`).
    Describe(Target),
    /// Execute (`E`): run `portal`, returning at most `max_rows` rows (0 = all).
    Execute {
        /// Portal name; empty for the unnamed portal.
        portal: Vec<u8>,
        /// Row limit; 0 means no limit.
        max_rows: i32,
    },
    /// Flush (`H`).
    Flush,
    /// FunctionCall (`F`).
    FunctionCall(FunctionCall),
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse (`p`): which one
    /// depends on the authentication request that came before, so the body stays opaque.
    AuthenticationResponse(Vec<u8>),
    /// Parse (`P`).
    Parse(Parse),
    /// Query (`Q`): simple query protocol.
    Query(Vec<u8>),
    /// Sync (`S`).
    Sync,
    /// Terminate (`X`).
    Terminate,
}

fn check_format_count(formats: usize, values: usize) -> Result<(), InvalidMessage> {
    if formats <= 1 || formats == values {
        Ok(())
    } else {
        Err(InvalidMessage::FormatCountMismatch { formats, values })
    }
}

fn write_formats(w: &mut Writer<'_>, formats: &[Format]) -> Result<(), Error> {
    w.count(formats.len())?;
    for format in formats {
        w.i16(format.code());
    }
    Ok(())
}

fn write_values(w: &mut Writer<'_>, values: &[Option<Vec<u8>>]) -> Result<(), Error> {
    w.count(values.len())?;
    for value in values {
        w.value(value.as_deref())?;
    }
    Ok(())
}

impl FrontendMessage {
    /// Splits and decodes the first message of `buf`. Returns the message and the number
    /// of bytes it used, or `Ok(None)` when `buf` holds only part of it.
    pub fn decode_from(buf: &[u8], limits: &Limits) -> Result<Option<(Self, usize)>, Error> {
        match frame::split_message(Direction::Frontend, buf, limits.message_size_max)? {
            None => Ok(None),
            Some(frame) => Ok(Some((Self::decode(frame)?, frame.wire_len()))),
        }
    }

    /// Decodes one framed message. The body must be used exactly: trailing bytes are an
    /// error.
    pub fn decode(frame: Frame<'_>) -> Result<Self, Error> {
        Self::decode_body(frame.tag, frame.body)
            .map_err(|kind| Error::invalid(Direction::Frontend, Some(frame.tag), kind))
    }

    fn decode_body(t: u8, body: &[u8]) -> Result<Self, InvalidMessage> {
        // One decoder, so the owned messages and the relay's borrowed views accept and
        // refuse exactly the same bytes.
        Ok(match MessageView::decode(t, body)? {
            MessageView::Bind(bind) => FrontendMessage::Bind(Bind {
                portal: bind.portal.to_vec(),
                statement: bind.statement.to_vec(),
                parameter_formats: bind.parameter_formats.iter().collect(),
                parameters: bind
                    .parameters
                    .iter()
                    .map(|v| v.map(<[u8]>::to_vec))
                    .collect(),
                result_formats: bind.result_formats.iter().collect(),
            }),
            MessageView::Close(target) => FrontendMessage::Close(target.to_owned()),
            MessageView::CopyData(data) => FrontendMessage::CopyData(data.to_vec()),
            MessageView::CopyDone => FrontendMessage::CopyDone,
            MessageView::CopyFail(message) => FrontendMessage::CopyFail(message.to_vec()),
            MessageView::Describe(target) => FrontendMessage::Describe(target.to_owned()),
            MessageView::Execute { portal, max_rows } => FrontendMessage::Execute {
                portal: portal.to_vec(),
                max_rows,
            },
            MessageView::Flush => FrontendMessage::Flush,
            MessageView::FunctionCall(call) => FrontendMessage::FunctionCall(FunctionCall {
                function: call.function,
                argument_formats: call.argument_formats.iter().collect(),
                arguments: call
                    .arguments
                    .iter()
                    .map(|v| v.map(<[u8]>::to_vec))
                    .collect(),
                result_format: call.result_format,
            }),
            MessageView::AuthenticationResponse(data) => {
                FrontendMessage::AuthenticationResponse(data.to_vec())
            }
            MessageView::Parse(parse) => FrontendMessage::Parse(Parse {
                name: parse.name.to_vec(),
                query: parse.query.to_vec(),
                parameter_types: parse
                    .parameter_types
                    .chunks_exact(4)
                    .map(|oid| u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]))
                    .collect(),
            }),
            MessageView::Query(query) => FrontendMessage::Query(query.to_vec()),
            MessageView::Sync => FrontendMessage::Sync,
            MessageView::Terminate => FrontendMessage::Terminate,
        })
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Bind(_) => tag::BIND,
            FrontendMessage::Close(_) => tag::CLOSE,
            FrontendMessage::CopyData(_) => tag::COPY_DATA,
            FrontendMessage::CopyDone => tag::COPY_DONE,
            FrontendMessage::CopyFail(_) => tag::COPY_FAIL,
            FrontendMessage::Describe(_) => tag::DESCRIBE,
            FrontendMessage::Execute { .. } => tag::EXECUTE,
            FrontendMessage::Flush => tag::FLUSH,
            FrontendMessage::FunctionCall(_) => tag::FUNCTION_CALL,
            FrontendMessage::AuthenticationResponse(_) => tag::AUTHENTICATION_RESPONSE,
            FrontendMessage::Parse(_) => tag::PARSE,
            FrontendMessage::Query(_) => tag::QUERY,
            FrontendMessage::Sync => tag::SYNC,
            FrontendMessage::Terminate => tag::TERMINATE,
        }
    }

    /// Appends the message to `out`. Fails, leaving `out` unchanged, when a string holds a
    /// NUL or a count or length does not fit its wire field.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut w = Writer::tagged(out, Direction::Frontend, self.tag());
        match self {
            FrontendMessage::Bind(bind) => {
                w.cstr(&bind.portal)?;
                w.cstr(&bind.statement)?;
                write_formats(&mut w, &bind.parameter_formats)?;
                write_values(&mut w, &bind.parameters)?;
                write_formats(&mut w, &bind.result_formats)?;
            }
            FrontendMessage::Close(target) | FrontendMessage::Describe(target) => {
                target.encode(&mut w)?
            }
            FrontendMessage::CopyData(data) | FrontendMessage::AuthenticationResponse(data) => {
                w.bytes(data)
            }
            FrontendMessage::CopyFail(message) => w.cstr(message)?,
            FrontendMessage::Execute { portal, max_rows } => {
                w.cstr(portal)?;
                w.i32(*max_rows);
            }
            FrontendMessage::FunctionCall(call) => {
                w.u32(call.function);
                write_formats(&mut w, &call.argument_formats)?;
                write_values(&mut w, &call.arguments)?;
                w.i16(call.result_format.code());
            }
            FrontendMessage::Parse(parse) => {
                w.cstr(&parse.name)?;
                w.cstr(&parse.query)?;
                w.count(parse.parameter_types.len())?;
                for oid in &parse.parameter_types {
                    w.u32(*oid);
                }
            }
            FrontendMessage::Query(query) => w.cstr(query)?,
            FrontendMessage::CopyDone
            | FrontendMessage::Flush
            | FrontendMessage::Sync
            | FrontendMessage::Terminate => {}
        }
        w.finish()
    }
}

/// A tagged client message borrowed from its frame: what the relay reads on its hot path,
/// without allocating. [`FrontendMessage::decode`] is built on it, so both accept exactly
/// the same bytes; lists (formats, values) are checked whole when decoded and read lazily.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MessageView<'a> {
    Bind(BindView<'a>),
    Close(TargetView<'a>),
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail(&'a [u8]),
    Describe(TargetView<'a>),
    Execute { portal: &'a [u8], max_rows: i32 },
    Flush,
    FunctionCall(FunctionCallView<'a>),
    AuthenticationResponse(&'a [u8]),
    Parse(ParseView<'a>),
    Query(&'a [u8]),
    Sync,
    Terminate,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BindView<'a> {
    pub(crate) portal: &'a [u8],
    pub(crate) statement: &'a [u8],
    pub(crate) parameter_formats: FormatsView<'a>,
    pub(crate) parameters: ValuesView<'a>,
    pub(crate) result_formats: FormatsView<'a>,
}

impl<'a> BindView<'a> {
    /// Decodes a Bind body, exactly as [`MessageView::decode`] does: the relay reads
    /// one per statement and goes straight here.
    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let bind = BindView::read(&mut r)?;
        r.finish()?;
        Ok(bind)
    }

    fn read(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        let parameter_formats = FormatsView::decode(r)?;
        let parameters = ValuesView::decode(r)?;
        check_format_count(parameter_formats.len(), parameters.len())?;
        let result_formats = FormatsView::decode(r)?;
        Ok(BindView {
            portal,
            statement,
            parameter_formats,
            parameters,
            result_formats,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct FunctionCallView<'a> {
    pub(crate) function: u32,
    pub(crate) argument_formats: FormatsView<'a>,
    pub(crate) arguments: ValuesView<'a>,
    pub(crate) result_format: Format,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ParseView<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) query: &'a [u8],
    /// Big-endian OIDs, four bytes each.
    pub(crate) parameter_types: &'a [u8],
}

/// Close or Describe: `S` (statement) or `P` (portal) and a name.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TargetView<'a> {
    Statement(&'a [u8]),
    Portal(&'a [u8]),
}

impl<'a> TargetView<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let target = r.u8()?;
        let name = r.cstr()?;
        match target {
            b'S' => Ok(TargetView::Statement(name)),
            b'P' => Ok(TargetView::Portal(name)),
            target => Err(InvalidMessage::UnknownTarget { target }),
        }
    }

    fn to_owned(self) -> Target {
        match self {
            TargetView::Statement(name) => Target::Statement(name.to_vec()),
            TargetView::Portal(name) => Target::Portal(name.to_vec()),
        }
    }
}

/// Format codes, two bytes each, every one checked to be 0 or 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FormatsView<'a>(&'a [u8]);

impl<'a> FormatsView<'a> {
    /// Format codes already checked by [`FormatsView::decode`] (e.g. copied out of one).
    pub(crate) fn checked(bytes: &'a [u8]) -> Self {
        FormatsView(bytes)
    }

    /// The raw codes, two bytes each.
    pub(crate) fn bytes(self) -> &'a [u8] {
        self.0
    }

    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let count = r.u16()?;
        let start = r.remaining();
        for _ in 0..count {
            Format::from_code(r.i16()?)?;
        }
        Ok(FormatsView(consumed(start, r.remaining())))
    }

    pub(crate) fn len(self) -> usize {
        self.0.len() / 2
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Format> + 'a {
        self.0.chunks_exact(2).map(|code| match code {
            [0, 0] => Format::Text,
            // Checked when decoded: anything else is 1.
            _ => Format::Binary,
        })
    }

    /// The format of value `index`, with the none/one/each rule of [`Format::of`].
    pub(crate) fn of(self, index: usize) -> Format {
        let code = match self.len() {
            0 => return Format::Text,
            1 => 0,
            _ => index,
        };
        match self.0.get(code * 2..code * 2 + 2) {
            Some([0, 1]) => Format::Binary,
            _ => Format::Text,
        }
    }
}

/// Length-prefixed values (-1 = NULL), every length checked when decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ValuesView<'a> {
    count: u16,
    bytes: &'a [u8],
}

impl<'a> ValuesView<'a> {
    /// Values already checked by [`ValuesView::decode`] (e.g. copied out of one).
    pub(crate) fn checked(count: u16, bytes: &'a [u8]) -> Self {
        ValuesView { count, bytes }
    }

    /// The raw length-prefixed values.
    pub(crate) fn bytes(self) -> &'a [u8] {
        self.bytes
    }

    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let count = r.u16()?;
        let start = r.remaining();
        for _ in 0..count {
            r.value()?;
        }
        Ok(ValuesView {
            count,
            bytes: consumed(start, r.remaining()),
        })
    }

    pub(crate) fn len(self) -> usize {
        usize::from(self.count)
    }

    pub(crate) fn count(self) -> u16 {
        self.count
    }

    /// The values in order; `None` is NULL.
    pub(crate) fn iter(self) -> impl Iterator<Item = Option<&'a [u8]>> {
        let mut r = Reader::new(self.bytes);
        // Every value was read once when decoded, so reading them again cannot fail.
        (0..self.count).map_while(move |_| r.value().ok())
    }
}

/// The part of `start` that was read to leave `rest` (a suffix of `start`).
fn consumed<'a>(start: &'a [u8], rest: &[u8]) -> &'a [u8] {
    start
        .get(..start.len().saturating_sub(rest.len()))
        .unwrap_or_default()
}

impl<'a> MessageView<'a> {
    /// Decodes one message body. The body must be used exactly: trailing bytes are an
    /// error.
    pub(crate) fn decode(t: u8, body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let message = match t {
            tag::BIND => MessageView::Bind(BindView::read(&mut r)?),
            tag::CLOSE => MessageView::Close(TargetView::decode(&mut r)?),
            tag::COPY_DATA => MessageView::CopyData(r.rest()),
            tag::COPY_DONE => MessageView::CopyDone,
            tag::COPY_FAIL => MessageView::CopyFail(r.cstr()?),
            tag::DESCRIBE => MessageView::Describe(TargetView::decode(&mut r)?),
            tag::EXECUTE => MessageView::Execute {
                portal: r.cstr()?,
                max_rows: r.i32()?,
            },
            tag::FLUSH => MessageView::Flush,
            tag::FUNCTION_CALL => {
                let function = r.u32()?;
                let argument_formats = FormatsView::decode(&mut r)?;
                let arguments = ValuesView::decode(&mut r)?;
                check_format_count(argument_formats.len(), arguments.len())?;
                let result_format = Format::from_code(r.i16()?)?;
                MessageView::FunctionCall(FunctionCallView {
                    function,
                    argument_formats,
                    arguments,
                    result_format,
                })
            }
            tag::AUTHENTICATION_RESPONSE => MessageView::AuthenticationResponse(r.rest()),
            tag::PARSE => {
                let name = r.cstr()?;
                let query = r.cstr()?;
                let count = r.u16()?;
                let parameter_types = r.bytes(usize::from(count) * 4)?;
                MessageView::Parse(ParseView {
                    name,
                    query,
                    parameter_types,
                })
            }
            tag::QUERY => MessageView::Query(r.cstr()?),
            tag::SYNC => MessageView::Sync,
            tag::TERMINATE => MessageView::Terminate,
            _ => return Err(InvalidMessage::UnknownTag),
        };
        r.finish()?;
        Ok(message)
    }
}

/// Request codes of untagged start-up packets.
pub mod request_code {
    /// SSLRequest: 1234 << 16 | 5679.
    pub const SSL: u32 = 80_877_103;
    /// GSSENCRequest: 1234 << 16 | 5680.
    pub const GSSENC: u32 = 80_877_104;
    /// CancelRequest: 1234 << 16 | 5678.
    pub const CANCEL: u32 = 80_877_102;
}

/// A protocol version from a StartupMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolVersion {
    /// Major version (3).
    pub major: u16,
    /// Minor version (0 or 2; PostgreSQL 18 added 3.2).
    pub minor: u16,
}

impl ProtocolVersion {
    /// Protocol 3.0, spoken by every PostgreSQL since 7.4.
    pub const V3_0: Self = ProtocolVersion { major: 3, minor: 0 };
    /// Protocol 3.2: variable-length cancel keys.
    pub const V3_2: Self = ProtocolVersion { major: 3, minor: 2 };

    fn code(self) -> u32 {
        u32::from(self.major) << 16 | u32::from(self.minor)
    }
}

/// CancelRequest: cancel the query running in the session that owns this key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelRequest {
    /// Backend process id from BackendKeyData.
    pub process_id: i32,
    /// Secret key from BackendKeyData: 4 bytes in 3.0, up to 256 bytes in 3.2.
    pub secret_key: Vec<u8>,
}

/// Shortest and longest cancel key (protocol 3.2).
pub(crate) const CANCEL_KEY_LEN: std::ops::RangeInclusive<usize> = 4..=256;

/// StartupMessage: protocol version and parameters (user, database, options, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StartupMessage {
    /// The version the client asks for.
    pub version: ProtocolVersion,
    /// Name/value pairs in the order sent.
    pub parameters: Vec<(Vec<u8>, Vec<u8>)>,
}

impl StartupMessage {
    /// The value of parameter `name`, if sent.
    pub fn parameter(&self, name: &str) -> Option<&[u8]> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// An untagged packet: the first message a client sends on a connection (and, after an
/// SSLRequest or GSSENCRequest is answered, the one after it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartupRequest {
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest.
    Cancel(CancelRequest),
    /// StartupMessage.
    Startup(StartupMessage),
}

impl StartupRequest {
    /// Splits and decodes the first start-up packet of `buf`. Returns the request and
    /// the number of bytes it used, or `Ok(None)` when `buf` holds only part of it.
    pub fn decode_from(buf: &[u8], limits: &Limits) -> Result<Option<(Self, usize)>, Error> {
        match frame::split_startup_packet(buf, limits.startup_packet_size_max)? {
            None => Ok(None),
            Some(packet) => Ok(Some((Self::decode(packet)?, packet.len()))),
        }
    }

    /// Decodes one whole start-up packet, length word included.
    pub fn decode(packet: &[u8]) -> Result<Self, Error> {
        Self::decode_packet(packet).map_err(|kind| Error::invalid(Direction::Frontend, None, kind))
    }

    fn decode_packet(packet: &[u8]) -> Result<Self, InvalidMessage> {
        let mut parameters = Vec::new();
        let head = PacketHead::read(packet, |name, value| {
            parameters.push((name.to_vec(), value.to_vec()));
        })?;
        Ok(match head {
            PacketHead::Ssl => StartupRequest::Ssl,
            PacketHead::GssEnc => StartupRequest::GssEnc,
            PacketHead::Cancel {
                process_id,
                secret_key,
            } => StartupRequest::Cancel(CancelRequest {
                process_id,
                secret_key: secret_key.to_vec(),
            }),
            PacketHead::Startup(version) => StartupRequest::Startup(StartupMessage {
                version,
                parameters,
            }),
        })
    }

    /// Appends the packet to `out`. Fails, leaving `out` unchanged, when a parameter holds
    /// a NUL or a name is empty (an empty name ends the list).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut w = Writer::untagged(out);
        match self {
            StartupRequest::Ssl => w.u32(request_code::SSL),
            StartupRequest::GssEnc => w.u32(request_code::GSSENC),
            StartupRequest::Cancel(cancel) => {
                w.u32(request_code::CANCEL);
                w.i32(cancel.process_id);
                w.bytes(&cancel.secret_key);
            }
            StartupRequest::Startup(startup) => {
                w.u32(startup.version.code());
                for (name, value) in &startup.parameters {
                    if name.is_empty() {
                        // Checked before writing so that `out` is left as it was.
                        w.cstr(b"\0")?;
                    }
                    w.cstr(name)?;
                    w.cstr(value)?;
                }
                w.u8(0);
            }
        }
        w.finish()
    }
}

/// A start-up packet read and checked without copying anything out of it: what the
/// relay needs (which request it is), and what [`StartupRequest`] is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketHead<'a> {
    Ssl,
    GssEnc,
    Cancel {
        process_id: i32,
        secret_key: &'a [u8],
    },
    /// A StartupMessage; its parameters went to the caller's function.
    Startup(ProtocolVersion),
}

impl<'a> PacketHead<'a> {
    /// Reads one whole start-up packet, length word included, passing each parameter
    /// of a StartupMessage to `parameter` in the order sent.
    pub(crate) fn read(
        packet: &'a [u8],
        mut parameter: impl FnMut(&'a [u8], &'a [u8]),
    ) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(packet);
        let length = r.u32()?;
        if length as usize != packet.len() {
            // The framing gave us exactly `length` bytes; a caller that did its own
            // framing may not have.
            return Err(if (length as usize) < packet.len() {
                InvalidMessage::TrailingBytes {
                    count: packet.len() - length as usize,
                }
            } else {
                InvalidMessage::Truncated
            });
        }
        let code = r.u32()?;
        let head = match code {
            request_code::SSL => PacketHead::Ssl,
            request_code::GSSENC => PacketHead::GssEnc,
            request_code::CANCEL => {
                let process_id = r.i32()?;
                let secret_key = r.rest();
                if !CANCEL_KEY_LEN.contains(&secret_key.len()) {
                    return Err(InvalidMessage::CancelKeyLength {
                        length: secret_key.len(),
                    });
                }
                PacketHead::Cancel {
                    process_id,
                    secret_key,
                }
            }
            // Any code whose high half is below 1234 is a protocol version; which versions
            // we accept is the state machine's decision, not the decoder's.
            code if code >> 16 < 1234 => {
                loop {
                    let name = r.cstr()?;
                    if name.is_empty() {
                        break;
                    }
                    parameter(name, r.cstr()?);
                }
                PacketHead::Startup(ProtocolVersion {
                    major: (code >> 16) as u16,
                    minor: (code & 0xffff) as u16,
                })
            }
            code => return Err(InvalidMessage::UnknownRequestCode { code }),
        };
        r.finish()?;
        Ok(head)
    }
}
