//! The proxy's side of connection start-up, before it knows who the client is.
//!
//! ```text
//!  first packet ── SSLRequest ──► reply 'S', StartTls ──► (TLS) ──► StartupMessage ─► Startup
//!       │           (reply 'N' when TLS was already terminated by ALPN routing)
//!       ├── GSSENCRequest ──► reply 'N', then any of the above once more
//!       ├── 0x16 (TLS ClientHello, PostgreSQL 17 direct SSL) ──► DirectTls ──► (TLS, ALPN
//!       │                                                         "postgresql") ──► ...
//!       ├── CancelRequest ──► Cancel (before or after TLS)
//!       └── StartupMessage ──► Startup (only after TLS, or when TLS was already terminated)
//! ```
//!
//! Feed bytes with [`Startup::handle_input`]; it returns how many it used. Drain
//! [`Startup::poll_output`] after every call. Bytes after the request that ends start-up
//! (CancelRequest or StartupMessage) are left to the caller.

use std::collections::VecDeque;
use std::time::Duration;

use crate::error::{Error, InvalidMessage, Limit, PeerMisbehaved};
use crate::frontend::{CancelRequest, ProtocolVersion, StartupMessage, StartupRequest};
use crate::limits::Limits;

/// The ALPN protocol name of PostgreSQL over direct TLS (PostgreSQL 17).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// First byte of a TLS handshake record: a client that opens with a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Whether this listener still has to do TLS itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP: answer SSLRequest with `S` and require TLS before StartupMessage.
    Offer,
    /// TLS was already terminated in front of us (ALPN routing on the web port): answer
    /// SSLRequest with `N` and accept StartupMessage at once.
    Terminated,
}

/// What a client asked for in its StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    /// Protocol version requested (3.0 to 3.x).
    pub version: ProtocolVersion,
    /// Database user; never empty.
    pub user: String,
    /// Database name; the user name when the client sent none or an empty one.
    pub database: String,
    /// `application_name`, if sent.
    pub application_name: Option<String>,
    /// `options` (command-line options for the backend), if sent.
    pub options: Option<String>,
    /// `replication` (`true`, `database`, ...), if sent.
    pub replication: Option<String>,
    /// Every other parameter (client_encoding, DateStyle, `_pq_.` options, ...), in order.
    pub other: Vec<(String, String)>,
}

impl StartupParams {
    /// Extracts the parameters of a StartupMessage. Refuses an empty user and a protocol
    /// other than 3.x.
    pub fn from_message(message: &StartupMessage) -> Result<Self, Error> {
        if message.version.major != 3 {
            return Err(Error::frontend(
                PeerMisbehaved::UnsupportedProtocolVersion {
                    major: message.version.major,
                    minor: message.version.minor,
                },
            ));
        }
        let text = |name: &'static str, value: &[u8]| {
            String::from_utf8(value.to_vec()).map_err(|_| {
                Error::invalid(
                    crate::Direction::Frontend,
                    None,
                    InvalidMessage::NotUtf8 { name },
                )
            })
        };
        let mut params = StartupParams {
            version: message.version,
            user: String::new(),
            database: String::new(),
            application_name: None,
            options: None,
            replication: None,
            other: Vec::new(),
        };
        for (name, value) in &message.parameters {
            match name.as_slice() {
                b"user" => params.user = text("user", value)?,
                b"database" => params.database = text("database", value)?,
                b"application_name" => {
                    params.application_name = Some(text("application_name", value)?)
                }
                b"options" => params.options = Some(text("options", value)?),
                b"replication" => params.replication = Some(text("replication", value)?),
                _ => params.other.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                )),
            }
        }
        if params.user.is_empty() {
            return Err(Error::frontend(PeerMisbehaved::EmptyUser));
        }
        if params.database.is_empty() {
            params.database = params.user.clone();
        }
        Ok(params)
    }
}

/// What the start-up machine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartupOutput {
    /// Send this one byte to the client: `S` (TLS follows) or `N` (no encryption).
    Reply(u8),
    /// Run a TLS handshake on the connection now, then call
    /// [`Startup::handle_tls_established`].
    StartTls,
    /// The client opened with a TLS ClientHello (direct SSL): nothing was consumed; hand
    /// every byte received so far to TLS, then call [`Startup::handle_tls_established`].
    DirectTls,
    /// A CancelRequest: route it to the session that owns the key. Start-up is over.
    Cancel(CancelRequest),
    /// A StartupMessage: authorize and connect. Start-up is over.
    Startup(StartupParams),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before TLS: the first packet, or the next one after `N`.
    Plain {
        first: bool,
    },
    /// Waiting for the driver's TLS handshake.
    Handshake {
        direct: bool,
    },
    /// Inside TLS (ours, or terminated in front of us).
    Encrypted,
    /// Cancel or Startup seen.
    Done,
    Failed(Error),
}

/// Proxy-side start-up negotiation. See the module documentation.
#[derive(Debug)]
pub struct Startup {
    limits: Limits,
    mode: TlsMode,
    state: State,
    ssl_requested: bool,
    gssenc_requested: bool,
    /// When the connection was accepted, in the driver's monotonic time; start-up must
    /// end by `started + limits.startup_timeout`.
    started: Duration,
    /// At most two replies and one final output are queued at a time.
    outputs: VecDeque<StartupOutput>,
}

impl Startup {
    /// A machine for one new client connection, accepted at `now`.
    ///
    /// Times are monotonic durations since an origin the driver picks (the accept time
    /// itself will do: `Duration::ZERO`), as in every Postern core: no clock is read here,
    /// and tests and simulations pass whatever time they like.
    pub fn new(limits: Limits, mode: TlsMode, now: Duration) -> Self {
        let state = match mode {
            TlsMode::Offer => State::Plain { first: true },
            TlsMode::Terminated => State::Encrypted,
        };
        Startup {
            limits,
            mode,
            state,
            ssl_requested: false,
            gssenc_requested: false,
            started: now,
            outputs: VecDeque::new(),
        }
    }

    /// When to call [`Startup::handle_timeout`]: the start-up deadline, until start-up is
    /// over or failed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Done | State::Failed(_) => None,
            _ => Some(self.started + self.limits.startup_timeout),
        }
    }

    /// Tells the machine the time. Past the deadline, an unfinished start-up fails with
    /// [`Limit::StartupTime`] (a client that connects and says nothing, or stalls in the
    /// TLS handshake, must not hold the connection).
    pub fn handle_timeout(&mut self, now: Duration) -> Result<(), Error> {
        let Some(deadline) = self.poll_timeout() else {
            return match &self.state {
                State::Failed(error) => Err(error.clone()),
                _ => Ok(()),
            };
        };
        if now < deadline {
            return Ok(());
        }
        let millis = |d: Duration| usize::try_from(d.as_millis()).unwrap_or(usize::MAX);
        let error = Error::limit(
            Limit::StartupTime,
            millis(now.saturating_sub(self.started)),
            millis(self.limits.startup_timeout),
        );
        self.state = State::Failed(error.clone());
        Err(error)
    }

    /// Feeds bytes from the client. Returns how many were used; the rest must be offered
    /// again with more bytes appended (or, once start-up is over, belong to the session).
    pub fn handle_input(&mut self, input: &[u8]) -> Result<usize, Error> {
        if let State::Failed(error) = &self.state {
            return Err(error.clone());
        }
        let result = self.process(input);
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
        }
        result
    }

    fn process(&mut self, input: &[u8]) -> Result<usize, Error> {
        // `used` only grows by the length of packets split off `input[used..]`, so it
        // never passes `input.len()`.
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Plain { first: true } if rest.first() == Some(&TLS_HANDSHAKE_RECORD) => {
                    self.state = State::Handshake { direct: true };
                    self.outputs.push_back(StartupOutput::DirectTls);
                    return Ok(used);
                }
                State::Plain { .. } | State::Encrypted => {}
                State::Handshake { .. } => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    return Err(Error::frontend(PeerMisbehaved::UnexpectedMessage {
                        tag: None,
                        state: "before the TLS handshake finished",
                    }));
                }
                State::Done => {
                    if used == 0 && !rest.is_empty() {
                        return Err(Error::frontend(PeerMisbehaved::InputAfterEnd(
                            "start-up exchange",
                        )));
                    }
                    return Ok(used);
                }
                State::Failed(ref error) => return Err(error.clone()),
            }
            let Some((request, len)) = StartupRequest::decode_from(rest, &self.limits)? else {
                return Ok(used);
            };
            used += len;
            self.handle_request(request, &input[used..])?;
        }
    }

    fn handle_request(&mut self, request: StartupRequest, after: &[u8]) -> Result<(), Error> {
        let encrypted = self.state == State::Encrypted;
        match request {
            StartupRequest::Ssl => {
                if self.ssl_requested || (encrypted && self.mode == TlsMode::Offer) {
                    return Err(Error::frontend(PeerMisbehaved::SecondSslRequest));
                }
                self.ssl_requested = true;
                match self.mode {
                    TlsMode::Terminated => self.outputs.push_back(StartupOutput::Reply(b'N')),
                    TlsMode::Offer => {
                        // Bytes sent after SSLRequest but before TLS would be read as if they
                        // came through TLS (CVE-2021-23214): refuse them.
                        if !after.is_empty() {
                            return Err(Error::frontend(PeerMisbehaved::UnexpectedMessage {
                                tag: None,
                                state: "between SSLRequest and the TLS handshake",
                            }));
                        }
                        self.outputs.push_back(StartupOutput::Reply(b'S'));
                        self.outputs.push_back(StartupOutput::StartTls);
                        self.state = State::Handshake { direct: false };
                    }
                }
            }
            StartupRequest::GssEnc => {
                if self.gssenc_requested {
                    return Err(Error::frontend(PeerMisbehaved::SecondGssEncRequest));
                }
                if self.ssl_requested || (encrypted && self.mode == TlsMode::Offer) {
                    return Err(Error::frontend(PeerMisbehaved::UnexpectedMessage {
                        tag: None,
                        state: "(GSSENCRequest) after SSLRequest or inside TLS",
                    }));
                }
                self.gssenc_requested = true;
                self.outputs.push_back(StartupOutput::Reply(b'N'));
                if let State::Plain { first } = &mut self.state {
                    *first = false;
                }
            }
            StartupRequest::Cancel(cancel) => {
                self.outputs.push_back(StartupOutput::Cancel(cancel));
                self.state = State::Done;
            }
            StartupRequest::Startup(message) => {
                if !encrypted {
                    return Err(Error::frontend(PeerMisbehaved::TlsRequired));
                }
                let params = StartupParams::from_message(&message)?;
                self.outputs.push_back(StartupOutput::Startup(params));
                self.state = State::Done;
            }
        }
        Ok(())
    }

    /// Tells the machine the driver's TLS handshake finished, with the ALPN protocol it
    /// negotiated. Direct TLS requires ALPN `postgresql`; after SSLRequest, ALPN is
    /// optional but must be `postgresql` if used.
    pub fn handle_tls_established(&mut self, alpn: Option<&[u8]>) -> Result<(), Error> {
        let direct = match &self.state {
            State::Handshake { direct } => *direct,
            State::Failed(error) => return Err(error.clone()),
            _ => {
                let error = Error::frontend(PeerMisbehaved::UnexpectedMessage {
                    tag: None,
                    state: "(TLS established) without a TLS handshake under way",
                });
                self.state = State::Failed(error.clone());
                return Err(error);
            }
        };
        let result = match alpn {
            Some(ALPN_POSTGRESQL) => Ok(()),
            None if !direct => Ok(()),
            None => Err(Error::frontend(PeerMisbehaved::DirectTlsWithoutAlpn)),
            Some(other) => Err(Error::frontend(PeerMisbehaved::WrongAlpn {
                alpn: String::from_utf8_lossy(other).into_owned(),
            })),
        };
        match &result {
            Ok(()) => {
                // A direct-TLS client never sends SSLRequest; one inside TLS is a second.
                self.ssl_requested = true;
                self.state = State::Encrypted;
            }
            Err(error) => self.state = State::Failed(error.clone()),
        }
        result
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<StartupOutput> {
        self.outputs.pop_front()
    }

    /// Whether start-up is over (CancelRequest or StartupMessage seen).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }
}
