//! A database client speaking real PostgreSQL protocol to a proxy: SSLRequest, TLS with
//! the user's certificate, StartupMessage, simple and extended queries, CancelRequest.
//! What libpq does, built on `postern_pg`, so it runs on a simulated host.

use std::sync::Arc;
use std::time::Duration;

use postern_pg::Limits;
use postern_pg::backend::BackendMessage;
use postern_pg::frontend::{
    Bind, CancelRequest, FrontendMessage, Parse, ProtocolVersion, StartupMessage, StartupRequest,
    Target,
};
use postern_rt::{Connection, Net};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The port proxies accept PostgreSQL clients on.
pub const PROXY_PG_PORT: u16 = 5432;
/// How long a client waits for any one step before it gives up (a held link must not
/// hang a client forever).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client step failed, kept short and deterministic for the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The server answered with an ErrorResponse: SQLSTATE and message.
    Refused { code: String, message: String },
    /// The network, TLS or a timeout.
    Io(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused { code, message } => write!(f, "refused {code}: {message}"),
            ClientError::Io(e) => write!(f, "io: {e}"),
        }
    }
}

fn io(e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(e.to_string())
}

/// An open session through a proxy.
pub struct Session {
    stream: TlsStream<Connection>,
    buf: Vec<u8>,
    pub backend_key: Option<(i32, Vec<u8>)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("backend_key", &self.backend_key)
            .finish_non_exhaustive()
    }
}

async fn within<T>(
    what: &str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Io(format!("{what} timed out"))),
    }
}

fn encode_startup(request: &StartupRequest) -> Vec<u8> {
    let mut out = Vec::new();
    // Invariant: the requests built here are within every limit.
    request
        .encode(&mut out)
        .expect("a well-formed start-up packet");
    out
}

impl Session {
    /// Connects to `proxy` and starts a session as `db_user` on `db_name`.
    pub async fn open(
        net: &Net,
        proxy: &str,
        tls: Arc<ClientConfig>,
        db_user: &str,
        db_name: &str,
    ) -> Result<Session, ClientError> {
        within("start-up", async {
            let mut conn = net
                .connect(&format!("{proxy}:{PROXY_PG_PORT}"))
                .await
                .map_err(io)?;
            conn.write_all(&encode_startup(&StartupRequest::Ssl))
                .await
                .map_err(io)?;
            let mut answer = [0u8; 1];
            conn.read_exact(&mut answer).await.map_err(io)?;
            if answer[0] != b'S' {
                return Err(io("the proxy did not offer TLS"));
            }
            let name = ServerName::try_from(proxy.to_owned()).map_err(io)?;
            let stream = TlsConnector::from(tls)
                .connect(name, conn)
                .await
                .map_err(io)?;
            let mut session = Session {
                stream,
                buf: Vec::new(),
                backend_key: None,
            };
            let startup = StartupRequest::Startup(StartupMessage {
                version: ProtocolVersion::V3_0,
                parameters: vec![
                    (b"user".to_vec(), db_user.as_bytes().to_vec()),
                    (b"database".to_vec(), db_name.as_bytes().to_vec()),
                ],
            });
            session.write(&encode_startup(&startup)).await?;
            loop {
                match session.read().await? {
                    BackendMessage::BackendKeyData {
                        process_id,
                        secret_key,
                    } => session.backend_key = Some((process_id, secret_key)),
                    BackendMessage::ErrorResponse(fields) => return Err(refused(&fields)),
                    BackendMessage::ReadyForQuery(_) => return Ok(session),
                    _ => {}
                }
            }
        })
        .await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await.map_err(io)?;
        self.stream.flush().await.map_err(io)
    }

    async fn read(&mut self) -> Result<BackendMessage, ClientError> {
        loop {
            match BackendMessage::decode_from(&self.buf, &Limits::default()) {
                Ok(Some((message, used))) => {
                    self.buf.drain(..used);
                    return Ok(message);
                }
                Ok(None) => {
                    if self.stream.read_buf(&mut self.buf).await.map_err(io)? == 0 {
                        return Err(io("connection closed"));
                    }
                }
                Err(e) => return Err(io(format!("bad message from the proxy: {e}"))),
            }
        }
    }

    /// Reads until ReadyForQuery; returns the first column of every DataRow, or the
    /// first error.
    async fn results(&mut self) -> Result<Vec<String>, ClientError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                BackendMessage::DataRow(values) => rows.push(
                    values
                        .first()
                        .cloned()
                        .flatten()
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                        .unwrap_or_default(),
                ),
                BackendMessage::ErrorResponse(fields) => {
                    error.get_or_insert(refused(&fields));
                }
                BackendMessage::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    fn encode(messages: &[FrontendMessage]) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            // Invariant: the messages built here are within every limit.
            message.encode(&mut out).expect("a well-formed message");
        }
        out
    }

    /// A simple query; the first column of each row.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<String>, ClientError> {
        within("query", async {
            let bytes = Self::encode(&[FrontendMessage::Query(sql.as_bytes().to_vec())]);
            self.write(&bytes).await?;
            self.results().await
        })
        .await
    }

    /// Parse, Bind, Describe, Execute, Sync of a named prepared statement.
    pub async fn prepared(&mut self, name: &str, sql: &str) -> Result<Vec<String>, ClientError> {
        within("prepared statement", async {
            let bytes = Self::encode(&[
                FrontendMessage::Parse(Parse {
                    name: name.as_bytes().to_vec(),
                    query: sql.as_bytes().to_vec(),
                    parameter_types: vec![],
                }),
                FrontendMessage::Bind(Bind {
                    portal: vec![],
                    statement: name.as_bytes().to_vec(),
                    parameter_formats: vec![],
                    parameters: vec![],
                    result_formats: vec![],
                }),
                FrontendMessage::Describe(Target::Portal(vec![])),
                FrontendMessage::Execute {
                    portal: vec![],
                    max_rows: 0,
                },
                FrontendMessage::Sync,
            ]);
            self.write(&bytes).await?;
            self.results().await
        })
        .await
    }

    /// Sends bytes that are not a PostgreSQL message and reads what comes back.
    pub async fn malformed(&mut self, garbage: &[u8]) -> Result<Vec<String>, ClientError> {
        within("malformed bytes", async {
            self.write(garbage).await?;
            self.results().await
        })
        .await
    }

    /// Ends the session politely.
    pub async fn terminate(mut self) {
        let bytes = Self::encode(&[FrontendMessage::Terminate]);
        let _ = within("terminate", async {
            self.write(&bytes).await?;
            self.stream.shutdown().await.map_err(io)
        })
        .await;
    }
}

/// Sends a CancelRequest for `key` to `proxy`, as libpq does on a new connection.
pub async fn cancel(net: &Net, proxy: &str, key: &(i32, Vec<u8>)) -> Result<(), ClientError> {
    within("cancel", async {
        let mut conn = net
            .connect(&format!("{proxy}:{PROXY_PG_PORT}"))
            .await
            .map_err(io)?;
        let request = StartupRequest::Cancel(CancelRequest {
            process_id: key.0,
            secret_key: key.1.clone(),
        });
        conn.write_all(&encode_startup(&request))
            .await
            .map_err(io)?;
        conn.shutdown().await.map_err(io)
    })
    .await
}

fn refused(fields: &postern_pg::backend::Fields) -> ClientError {
    let text = |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or_default()).into_owned();
    ClientError::Refused {
        code: text(fields.code()),
        message: text(fields.message()),
    }
}
