//! A small PostgreSQL server for simulated hosts, built on `postern_pg`: it speaks enough
//! of the protocol for the agent and clients (SSLRequest, TLS that requires a client
//! certificate from the database CA, StartupMessage, simple and extended query, cancel),
//! and records every statement it executes with the identity it ran as (the CN of the
//! client certificate, which must equal the start-up user, as PostgreSQL's `cert`
//! authentication requires).
//!
//! Faults are switches on [`DbControl`]: `down` refuses new sessions and ends running
//! ones; `slow_ms` delays each statement (a cancel request ends the wait early).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postern_pg::Limits;
use postern_pg::backend::{BackendMessage, TransactionStatus};
use postern_pg::frontend::{FrontendMessage, StartupRequest};
use postern_pg::reply::{Severity, SqlState};
use postern_rt::{Connection, Net};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::world::{Executed, World};

/// The port fake databases listen on.
pub const PORT: u16 = 5432;

/// Most bytes a fake database buffers from one client before it gives up on it.
pub const BUFFERED_LEN_MAX: usize = 1 << 20;

/// Switches the simulator flips to make a database misbehave. Shared by all sessions and
/// surviving host restarts.
#[derive(Debug, Default)]
pub struct DbControl {
    pub down: AtomicBool,
    pub slow_ms: AtomicU64,
    next_process_id: AtomicI32,
    /// Process ids with a pending cancel.
    cancelled: Mutex<BTreeSet<i32>>,
}

impl DbControl {
    fn cancel(&self, process_id: i32) {
        self.cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(process_id);
    }

    fn take_cancel(&self, process_id: i32) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&process_id)
    }
}

/// A fake database on one simulated host.
#[derive(Clone, Debug)]
pub struct FakeDb {
    pub host: String,
    pub tls: Arc<ServerConfig>,
    pub control: Arc<DbControl>,
    pub world: World,
}

impl FakeDb {
    /// Accepts connections until the host is crashed.
    pub async fn serve(self, net: Net) -> io::Result<()> {
        let listener = net.listen(&format!("0.0.0.0:{PORT}")).await?;
        self.world.record(&self.host, "listening");
        loop {
            let conn = listener.accept().await?;
            let db = self.clone();
            tokio::spawn(async move {
                if let Err(e) = db.session(conn).await {
                    db.world.record(&db.host, format!("session ended: {e}"));
                }
            });
        }
    }

    async fn session(&self, mut conn: Connection) -> io::Result<()> {
        let via = conn
            .peer_addr()
            .and_then(|addr| turmoil::reverse_lookup(addr.ip()));
        let limits = Limits::default();
        let mut buf = Vec::new();
        match read_startup(&mut conn, &mut buf, &limits).await? {
            StartupRequest::Ssl => {}
            StartupRequest::Cancel(cancel) => {
                self.world.record(
                    &self.host,
                    format!("cancel request for {}", cancel.process_id),
                );
                self.control.cancel(cancel.process_id);
                return Ok(());
            }
            _ => {
                // Like `hostssl ... cert` only: no plaintext sessions at all.
                return Err(io::Error::other("refused a session without TLS"));
            }
        }
        if !buf.is_empty() {
            return Err(io::Error::other("bytes after SSLRequest, before TLS"));
        }
        if self.control.down.load(Ordering::Relaxed) {
            conn.write_all(b"N").await?;
            return Err(io::Error::other("down: refused TLS"));
        }
        conn.write_all(b"S").await?;
        let mut tls = TlsAcceptor::from(self.tls.clone())
            .accept(conn)
            .await
            .map_err(|e| io::Error::other(format!("TLS refused: {e}")))?;
        let cn = {
            let (_, session) = tls.get_ref();
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| io::Error::other("no client certificate"))?;
            common_name(cert.as_ref()).ok_or_else(|| io::Error::other("certificate has no CN"))?
        };
        let StartupRequest::Startup(startup) = read_startup(&mut tls, &mut buf, &limits).await?
        else {
            return Err(io::Error::other("expected a StartupMessage after TLS"));
        };
        let user = String::from_utf8_lossy(startup.parameter("user").unwrap_or_default());
        if user != cn {
            let message = format!("certificate authentication failed for user \"{user}\"");
            send(
                &mut tls,
                &[BackendMessage::error(
                    Severity::Fatal,
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    &message,
                )],
            )
            .await?;
            return Err(io::Error::other(message));
        }
        let process_id = self.control.next_process_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.world
            .record(&self.host, format!("session {process_id} as {cn}"));
        send(
            &mut tls,
            &[
                BackendMessage::authentication_ok(),
                BackendMessage::parameter_status("server_version", "15.0 (postern-sim)"),
                BackendMessage::parameter_status("client_encoding", "UTF8"),
                BackendMessage::backend_key_data(process_id, &process_id.to_be_bytes()),
                BackendMessage::ready_for_query(TransactionStatus::Idle),
            ],
        )
        .await?;

        let mut statements: BTreeMap<Vec<u8>, String> = BTreeMap::new();
        let mut portals: BTreeMap<Vec<u8>, String> = BTreeMap::new();
        // After an error in an extended-protocol batch, skip to Sync.
        let mut skipping = false;
        loop {
            if self.control.down.load(Ordering::Relaxed) {
                return Err(io::Error::other("down: session dropped"));
            }
            let message = match FrontendMessage::decode_from(&buf, &limits) {
                Ok(Some((message, used))) => {
                    buf.drain(..used);
                    message
                }
                Ok(None) => {
                    if buf.len() > BUFFERED_LEN_MAX {
                        return Err(io::Error::other("client sent too much at once"));
                    }
                    if tls.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    let reply = BackendMessage::error(
                        Severity::Fatal,
                        SqlState::PROTOCOL_VIOLATION,
                        &e.to_string(),
                    );
                    send(&mut tls, &[reply]).await?;
                    return Err(io::Error::other(format!("malformed message: {e}")));
                }
            };
            let mut out = Vec::new();
            match message {
                FrontendMessage::Query(query) => {
                    let query = String::from_utf8_lossy(trim_nul(&query)).into_owned();
                    if query.trim().is_empty() {
                        out.push(BackendMessage::EmptyQueryResponse);
                    } else {
                        out.extend(self.execute(&cn, via.as_deref(), process_id, &query).await);
                    }
                    out.push(BackendMessage::ready_for_query(TransactionStatus::Idle));
                }
                FrontendMessage::Parse(parse) if !skipping => {
                    let query = String::from_utf8_lossy(&parse.query).into_owned();
                    statements.insert(parse.name, query);
                    out.push(BackendMessage::ParseComplete);
                }
                FrontendMessage::Bind(bind) if !skipping => match statements.get(&bind.statement) {
                    Some(query) => {
                        portals.insert(bind.portal, query.clone());
                        out.push(BackendMessage::BindComplete);
                    }
                    None => {
                        skipping = true;
                        out.push(BackendMessage::error(
                            Severity::Error,
                            SqlState::PROTOCOL_VIOLATION,
                            "prepared statement does not exist",
                        ));
                    }
                },
                FrontendMessage::Describe(_) if !skipping => out.push(BackendMessage::NoData),
                FrontendMessage::Execute { portal, .. } if !skipping => {
                    match portals.get(&portal).cloned() {
                        Some(query) => {
                            let replies =
                                self.execute(&cn, via.as_deref(), process_id, &query).await;
                            skipping = replies
                                .iter()
                                .any(|m| matches!(m, BackendMessage::ErrorResponse(_)));
                            out.extend(replies);
                        }
                        None => {
                            skipping = true;
                            out.push(BackendMessage::error(
                                Severity::Error,
                                SqlState::PROTOCOL_VIOLATION,
                                "portal does not exist",
                            ));
                        }
                    }
                }
                FrontendMessage::Close(_) if !skipping => out.push(BackendMessage::CloseComplete),
                FrontendMessage::Sync => {
                    skipping = false;
                    out.push(BackendMessage::ready_for_query(TransactionStatus::Idle));
                }
                FrontendMessage::Flush => {}
                FrontendMessage::Terminate => return Ok(()),
                _ if skipping => {}
                other => out.push(BackendMessage::error(
                    Severity::Error,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    &format!(
                        "the simulated database does not support {:?}",
                        other.tag() as char
                    ),
                )),
            }
            send(&mut tls, &out).await?;
        }
    }

    /// Runs one statement: waits `slow_ms` (unless cancelled), records it, and answers.
    async fn execute(
        &self,
        cn: &str,
        via: Option<&str>,
        process_id: i32,
        query: &str,
    ) -> Vec<BackendMessage> {
        let slow_ms = self.control.slow_ms.load(Ordering::Relaxed);
        let mut waited_ms = 0;
        while waited_ms < slow_ms {
            if self.control.take_cancel(process_id) {
                self.world
                    .record(&self.host, format!("cancelled in {process_id}: {query}"));
                return vec![query_canceled()];
            }
            let step_ms = (slow_ms - waited_ms).min(10);
            tokio::time::sleep(Duration::from_millis(step_ms)).await;
            waited_ms += step_ms;
        }
        // A cancel that arrives when nothing is running does nothing (as in PostgreSQL).
        self.control.take_cancel(process_id);
        self.world.executed(Executed {
            at: World::now(),
            db: self.host.clone(),
            db_user: cn.to_owned(),
            statement: query.to_owned(),
            via: via.map(str::to_owned),
        });
        // Each reply names the database, so clients can check where they landed.
        let column = postern_pg::backend::FieldDescription {
            name: b"db".to_vec(),
            table_oid: 0,
            column: 0,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: postern_pg::frontend::Format::Text,
        };
        vec![
            BackendMessage::RowDescription(vec![column]),
            BackendMessage::DataRow(vec![Some(self.host.as_bytes().to_vec())]),
            BackendMessage::CommandComplete(b"SELECT 1".to_vec()),
        ]
    }
}

/// SQLSTATE 57014, which `postern_pg::reply` has no constant for (the proxy never
/// sends it).
fn query_canceled() -> BackendMessage {
    BackendMessage::ErrorResponse(postern_pg::backend::Fields {
        fields: vec![
            (b'S', b"ERROR".to_vec()),
            (b'V', b"ERROR".to_vec()),
            (b'C', b"57014".to_vec()),
            (b'M', b"canceling statement due to user request".to_vec()),
        ],
    })
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(&[0]).unwrap_or(bytes)
}

async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> io::Result<StartupRequest> {
    loop {
        match StartupRequest::decode_from(buf, limits) {
            Ok(Some((request, used))) => {
                buf.drain(..used);
                return Ok(request);
            }
            Ok(None) => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(io::Error::other("closed during start-up"));
                }
            }
            Err(e) => return Err(io::Error::other(format!("bad start-up packet: {e}"))),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    messages: &[BackendMessage],
) -> io::Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut out = Vec::new();
    for message in messages {
        message.encode(&mut out).map_err(io::Error::other)?;
    }
    stream.write_all(&out).await?;
    stream.flush().await
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
