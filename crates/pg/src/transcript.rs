//! One-line renderings of messages, for transcripts and tests.
//!
//! Strings are shown as quoted UTF-8 (invalid bytes replaced); long values are cut to
//! [`VALUE_SHOWN_MAX`] characters so a line stays a line.

use std::fmt;

use crate::backend::{Authentication, BackendMessage, Fields};
use crate::frontend::{Format, FrontendMessage, StartupRequest, Target};

/// Characters of a value shown before it is cut.
pub const VALUE_SHOWN_MAX: usize = 60;

struct Text<'a>(&'a [u8]);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = String::from_utf8_lossy(self.0);
        if s.chars().count() > VALUE_SHOWN_MAX {
            let cut: String = s.chars().take(VALUE_SHOWN_MAX).collect();
            write!(f, "{cut:?}... ({} bytes)", self.0.len())
        } else {
            write!(f, "{s:?}")
        }
    }
}

struct Values<'a>(&'a [Option<Vec<u8>>]);

impl fmt::Display for Values<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, value) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match value {
                None => f.write_str("NULL")?,
                Some(v) => write!(f, "{}", Text(v))?,
            }
        }
        f.write_str("]")
    }
}

struct Formats<'a>(&'a [Format]);

impl fmt::Display for Formats<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for format in self.0 {
            f.write_str(match format {
                Format::Text => "t",
                Format::Binary => "b",
            })?;
        }
        Ok(())
    }
}

fn target(f: &mut fmt::Formatter<'_>, target: &Target) -> fmt::Result {
    match target {
        Target::Statement(name) => write!(f, "statement {}", Text(name)),
        Target::Portal(name) => write!(f, "portal {}", Text(name)),
    }
}

fn fields(f: &mut fmt::Formatter<'_>, fields: &Fields) -> fmt::Result {
    for (kind, value) in &fields.fields {
        // Source file, line and routine change between server builds; leave them out.
        if !matches!(kind, b'F' | b'L' | b'R') {
            write!(f, " {}={}", *kind as char, Text(value))?;
        }
    }
    Ok(())
}

impl fmt::Display for StartupRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupRequest::Ssl => f.write_str("SSLRequest"),
            StartupRequest::GssEnc => f.write_str("GSSENCRequest"),
            StartupRequest::Cancel(cancel) => {
                write!(f, "CancelRequest key_bytes={}", cancel.secret_key.len())
            }
            StartupRequest::Startup(startup) => {
                write!(
                    f,
                    "StartupMessage {}.{}",
                    startup.version.major, startup.version.minor
                )?;
                for (name, value) in &startup.parameters {
                    write!(f, " {}={}", String::from_utf8_lossy(name), Text(value))?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for FrontendMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontendMessage::Bind(bind) => write!(
                f,
                "Bind portal={} statement={} formats={} params={} results={}",
                Text(&bind.portal),
                Text(&bind.statement),
                Formats(&bind.parameter_formats),
                Values(&bind.parameters),
                Formats(&bind.result_formats)
            ),
            FrontendMessage::Close(t) => {
                f.write_str("Close ")?;
                target(f, t)
            }
            FrontendMessage::CopyData(data) => write!(f, "CopyData {}", Text(data)),
            FrontendMessage::CopyDone => f.write_str("CopyDone"),
            FrontendMessage::CopyFail(reason) => write!(f, "CopyFail {}", Text(reason)),
            FrontendMessage::Describe(t) => {
                f.write_str("Describe ")?;
                target(f, t)
            }
            FrontendMessage::Execute { portal, max_rows } => {
                write!(f, "Execute portal={} max_rows={max_rows}", Text(portal))
            }
            FrontendMessage::Flush => f.write_str("Flush"),
            FrontendMessage::FunctionCall(call) => write!(
                f,
                "FunctionCall oid={} formats={} args={} result={}",
                call.function,
                Formats(&call.argument_formats),
                Values(&call.arguments),
                Formats(&[call.result_format])
            ),
            // Never show what may be a password.
            FrontendMessage::AuthenticationResponse(data) => {
                write!(f, "AuthenticationResponse ({} bytes)", data.len())
            }
            FrontendMessage::Parse(parse) => write!(
                f,
                "Parse statement={} query={} types={:?}",
                Text(&parse.name),
                Text(&parse.query),
                parse.parameter_types
            ),
            FrontendMessage::Query(query) => write!(f, "Query {}", Text(query)),
            FrontendMessage::Sync => f.write_str("Sync"),
            FrontendMessage::Terminate => f.write_str("Terminate"),
        }
    }
}

impl fmt::Display for BackendMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendMessage::Authentication(auth) => match auth {
                Authentication::Ok => f.write_str("AuthenticationOk"),
                Authentication::KerberosV5 => f.write_str("AuthenticationKerberosV5"),
                Authentication::CleartextPassword => f.write_str("AuthenticationCleartextPassword"),
                Authentication::Md5Password { .. } => f.write_str("AuthenticationMD5Password"),
                Authentication::Gss => f.write_str("AuthenticationGSS"),
                Authentication::GssContinue(_) => f.write_str("AuthenticationGSSContinue"),
                Authentication::Sspi => f.write_str("AuthenticationSSPI"),
                Authentication::Sasl { mechanisms } => {
                    f.write_str("AuthenticationSASL")?;
                    for mechanism in mechanisms {
                        write!(f, " {}", Text(mechanism))?;
                    }
                    Ok(())
                }
                Authentication::SaslContinue(_) => f.write_str("AuthenticationSASLContinue"),
                Authentication::SaslFinal(_) => f.write_str("AuthenticationSASLFinal"),
            },
            // Process id and key change every session; show only the key length.
            BackendMessage::BackendKeyData { secret_key, .. } => {
                write!(f, "BackendKeyData key_bytes={}", secret_key.len())
            }
            BackendMessage::BindComplete => f.write_str("BindComplete"),
            BackendMessage::CloseComplete => f.write_str("CloseComplete"),
            BackendMessage::CommandComplete(tag) => write!(f, "CommandComplete {}", Text(tag)),
            BackendMessage::CopyData(data) => write!(f, "CopyData {}", Text(data)),
            BackendMessage::CopyDone => f.write_str("CopyDone"),
            BackendMessage::CopyInResponse(copy) => write!(
                f,
                "CopyInResponse {} columns={}",
                Formats(&[copy.format]),
                Formats(&copy.column_formats)
            ),
            BackendMessage::CopyOutResponse(copy) => write!(
                f,
                "CopyOutResponse {} columns={}",
                Formats(&[copy.format]),
                Formats(&copy.column_formats)
            ),
            BackendMessage::CopyBothResponse(copy) => write!(
                f,
                "CopyBothResponse {} columns={}",
                Formats(&[copy.format]),
                Formats(&copy.column_formats)
            ),
            BackendMessage::DataRow(values) => write!(f, "DataRow {}", Values(values)),
            BackendMessage::EmptyQueryResponse => f.write_str("EmptyQueryResponse"),
            BackendMessage::ErrorResponse(error) => {
                f.write_str("ErrorResponse")?;
                fields(f, error)
            }
            BackendMessage::FunctionCallResponse(value) => match value {
                None => f.write_str("FunctionCallResponse NULL"),
                Some(v) => write!(f, "FunctionCallResponse {}", Text(v)),
            },
            BackendMessage::NegotiateProtocolVersion {
                minor_version,
                unrecognized_options,
            } => write!(
                f,
                "NegotiateProtocolVersion minor={minor_version} unrecognized={}",
                unrecognized_options.len()
            ),
            BackendMessage::NoData => f.write_str("NoData"),
            BackendMessage::NoticeResponse(notice) => {
                f.write_str("NoticeResponse")?;
                fields(f, notice)
            }
            BackendMessage::NotificationResponse {
                channel, payload, ..
            } => write!(
                f,
                "NotificationResponse channel={} payload={}",
                Text(channel),
                Text(payload)
            ),
            BackendMessage::ParameterDescription(types) => {
                write!(f, "ParameterDescription {types:?}")
            }
            BackendMessage::ParameterStatus { name, value } => {
                write!(f, "ParameterStatus {}={}", Text(name), Text(value))
            }
            BackendMessage::ParseComplete => f.write_str("ParseComplete"),
            BackendMessage::PortalSuspended => f.write_str("PortalSuspended"),
            BackendMessage::ReadyForQuery(status) => write!(f, "ReadyForQuery {status:?}"),
            BackendMessage::RowDescription(fields) => {
                f.write_str("RowDescription")?;
                for field in fields {
                    write!(
                        f,
                        " {}:{}{}",
                        Text(&field.name),
                        field.type_oid,
                        Formats(&[field.format])
                    )?;
                }
                Ok(())
            }
        }
    }
}
