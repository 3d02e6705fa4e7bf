//! The auth service's audit log, as the agents' spools see it: a host that stores
//! shipped events idempotently by id, and the sink the agents' real spool shipper
//! (`postern_agent::spool::ship_events`) sends to over the simulated network.
//!
//! The wire is deliberately plain (one JSON array of events per line, answered `ok`):
//! what is simulated is the network between agent and auth (partitions, holds, crashes
//! on either side) and the store's idempotency, not the HTTP API.

use std::io;
use std::time::Duration;

use postern_agent::spool::AuditSink;
use postern_auth::audit::AuditEvent;
use postern_rt::Net;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::world::World;

/// The port the auth host takes audit events on.
pub const PORT: u16 = 3025;
/// How long a shipment may take before the agent counts it as failed.
pub const SHIP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line (one batch) the store reads.
const LINE_LEN_MAX: u64 = 16 << 20;

/// Accepts shipments until the host is crashed. Stored events live in the [`World`],
/// as a database outlives its server process.
pub async fn serve(host: String, world: World) -> io::Result<()> {
    let listener = Net::Turmoil.listen(&format!("0.0.0.0:{PORT}")).await?;
    loop {
        let conn = listener.accept().await?;
        let (host, world) = (host.clone(), world.clone());
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(conn);
            let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, LINE_LEN_MAX));
            let mut line = String::new();
            while matches!(lines.read_line(&mut line).await, Ok(n) if n > 0) {
                let Ok(events) = serde_json::from_str::<Vec<AuditEvent>>(line.trim_end()) else {
                    world.violation(&host, "an undecodable audit shipment");
                    return;
                };
                let ids: Vec<String> = events.into_iter().map(|e| e.id).collect();
                let new = world.stored(&ids);
                world.record(
                    &host,
                    format!("stored {new} audit events ({} resent)", ids.len() - new),
                );
                if write.write_all(b"ok\n").await.is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
}

/// Ships an agent's spooled events to the auth host at `addr`.
#[derive(Clone, Debug)]
pub struct SimAuditSink {
    pub addr: String,
}

impl AuditSink for SimAuditSink {
    async fn ship(&self, events: &[AuditEvent]) -> Result<(), String> {
        let mut line = serde_json::to_string(events).map_err(|e| e.to_string())?;
        line.push('\n');
        let shipment = async {
            let conn = Net::Turmoil.connect(&self.addr).await?;
            let (read, mut write) = tokio::io::split(conn);
            write.write_all(line.as_bytes()).await?;
            let mut answer = String::new();
            BufReader::new(read).read_line(&mut answer).await?;
            if answer == "ok\n" {
                Ok(())
            } else {
                Err(io::Error::other(format!("auth answered {answer:?}")))
            }
        };
        match tokio::time::timeout(SHIP_TIMEOUT, shipment).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer from auth within {SHIP_TIMEOUT:?}")),
        }
    }
}
