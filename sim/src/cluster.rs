//! One seed's run: a whole cluster on turmoil hosts with the real proxy (front door,
//! dispatcher, tunnel server), the real agent (tunnel client, session service with
//! authorization, database client certificates, relay and audit), fake databases, and
//! clients speaking PostgreSQL through the proxies. The harness applies the seed's
//! faults between simulation steps, heals them all when the safety phase ends, then
//! gives every client [`LIVENESS_BOUND`] to query again, and finally checks the
//! invariants against what the [`World`] recorded.
//!
//! The services are wired by hand, as `crates/proxy/tests/e2e_postgres.rs` does; the
//! auth service is represented by its state (the CAs, a role store the agents read
//! live, and a signer for proxy→agent certificates) and by an audit store host that the
//! agents' real durable spools ship to ([`crate::auditstore`]). Each agent's storage
//! root is a real directory that survives its crashes and restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use postern_agent::session::{
    LocalDbCa, LookupError, RoleSource, ServedDatabase, SessionConfig, SessionService,
};
use postern_agent::spool;
use postern_agent::upstream::postgres::PostgresTarget;
use postern_agent::upstream::{TlsMode, UpstreamTls};
use postern_auth::database::{Database, Protocol};
use postern_auth::role::Role;
use postern_pki::tls::{mtls_client_config, mtls_server_config, ring_provider};
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, PrivateKey,
    UnixTime, Usage, Validator, VerifiedIdentity,
};
use postern_proxy::client_auth::server_config;
use postern_proxy::dispatch::{DbAccessSigner, Dispatcher};
use postern_proxy::postgres::{ALPN_PROTOCOLS, Accepted, FrontDoor};
use postern_rt::{Blocking, Net, Rng, Runtime, WallClock};
use postern_tunnel::{Agent, AgentConfig, ProxyConfig, ProxyTunnels};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use crate::Trace;
use crate::auditstore::{self, SimAuditSink};
use crate::client::{self, ClientError, Session};
use crate::fakedb::{self, DbControl, FakeDb};
use crate::scenario::{
    AUTH_HOST, CertKind, ClientSpec, Fault, FaultKind, LIVENESS_BOUND, Op, SAFETY_PHASE, Scenario,
};
use crate::world::{Audited, World};

/// The simulated epoch: 2026-11-24T00:00:00Z. russh checks tunnel certificates against
/// the real clock as well, so tunnel certificates are issued valid around both.
pub const EPOCH_SECS: u64 = 1_795_478_400;
/// The port proxies accept tunnels on.
pub const TUNNEL_PORT: u16 = 3024;
/// How long the agent may take to reach a database after its access decision.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A session start audited this long after the role was revoked is a violation: the
/// decision was taken before, at most the upstream connect before the start event.
pub const REVOCATION_GRACE: Duration = Duration::from_secs(4);
/// Extra simulated time after the liveness bound before the run is declared stuck.
const SLACK: Duration = Duration::from_secs(30);
/// After the liveness bound, how long the agents have to ship every spooled event.
pub const AUDIT_SHIP_BOUND: Duration = Duration::from_secs(20);
/// The most a statement's answer takes from the database to its agent on a healthy
/// link (the simulation's message latency is 1–20 ms): an agent that crashes within
/// this of a statement may never have seen its answer, so never audited it.
const ANSWER_IN_FLIGHT: Duration = Duration::from_millis(25);
const CLUSTER: &str = "sim";
const DAY: Duration = Duration::from_secs(86_400);

fn at_secs(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

/// What one seed's run produced.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub trace: Trace,
    /// Invariant violations and errors; empty when the seed passed.
    pub failures: Vec<String>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub simulated: Duration,
    pub statements_executed: usize,
    pub audit_events: usize,
    pub sessions_opened: u64,
}

/// The auth service's role store, which agents read on every session (as they would
/// through the auth service's cache). Revoking deletes a role; healing puts it back.
#[derive(Clone, Debug, Default)]
pub struct SimRoles {
    roles: Arc<Mutex<BTreeMap<String, Role>>>,
}

impl SimRoles {
    fn new() -> Self {
        let mut text = String::new();
        for user in crate::scenario::USERS {
            text.push_str(&format!(
                "[[role]]\nname = \"dev-{user}\"\nallow.db_labels = {{ env = \"dev\" }}\nallow.db_users = [\"{user}\"]\nallow.db_names = [\"*\"]\n\n"
            ));
        }
        // Invariant: the text above is a valid role file.
        let roles = postern_auth::role::parse_role_file("sim-roles.toml", &text)
            .expect("the simulator's role file parses");
        Self {
            roles: Arc::new(Mutex::new(
                roles.into_iter().map(|r| (r.name.clone(), r)).collect(),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Role>> {
        self.roles.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RoleSource for SimRoles {
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, LookupError> {
        let roles = self.lock();
        Ok(names.iter().filter_map(|n| roles.get(n).cloned()).collect())
    }
}

/// Signs proxy→agent certificates with the user CA, as the auth service does.
struct SimSigner {
    user_ca: Arc<CertAuthority>,
    clock: WallClock,
}

impl DbAccessSigner for SimSigner {
    async fn sign(
        &self,
        user: &VerifiedIdentity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = PrivateKey::generate().map_err(|e| e.to_string())?;
        let now = self.clock.now().as_secs().saturating_sub(60);
        let (_, cert) = self
            .user_ca
            .issue_db_access(
                user,
                &key.public_key(),
                at_secs(now),
                Duration::from_secs(600),
            )
            .map_err(|e| e.to_string())?;
        Ok((vec![cert.der().clone()], key.to_rustls()))
    }
}

/// The cluster's certificate authorities, and a user CA of another cluster.
struct Cas {
    user: Arc<CertAuthority>,
    host: Arc<CertAuthority>,
    db: Arc<CertAuthority>,
    foreign_user: Arc<CertAuthority>,
}

impl Cas {
    fn new() -> Self {
        let start = at_secs(EPOCH_SECS - 30 * 86_400);
        let ttl = 3650 * DAY;
        // Invariant: generating a CA with valid parameters does not fail.
        let ca = |kind, cluster| {
            Arc::new(CertAuthority::generate(kind, cluster, start, ttl).expect("a CA"))
        };
        Cas {
            user: ca(CaKind::User, CLUSTER),
            host: ca(CaKind::Host, CLUSTER),
            db: ca(CaKind::Db, CLUSTER),
            foreign_user: ca(CaKind::User, CLUSTER),
        }
    }

    fn host_identity(&self, id: &str, role: HostRole, names: &[&str]) -> HostIdentity {
        HostIdentity {
            host_id: id.to_owned(),
            role,
            cluster: CLUSTER.to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            expires: at_secs(EPOCH_SECS + 365 * 86_400),
        }
    }

    /// A TLS host certificate and key for `id`.
    fn host_tls(&self, id: &str, role: HostRole) -> (postern_pki::IssuedCert, PrivateKey) {
        let key = PrivateKey::generate().expect("a key");
        let cert = self
            .host
            .issue_host(
                &self.host_identity(id, role, &[id]),
                &key.public_key(),
                at_secs(EPOCH_SECS - 86_400),
            )
            .expect("a host certificate");
        (cert, key)
    }

    /// A user certificate for `spec`, as `postern db login` would write it.
    fn user_cert(
        &self,
        spec: &ClientSpec,
        kind: &CertKind,
        issued_secs: u64,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>, UnixTime) {
        let (ca, issued, expires) = match kind {
            CertKind::Valid => (&self.user, issued_secs, issued_secs + 3600),
            CertKind::Expired => (&self.user, issued_secs - 7200, issued_secs - 3600),
            CertKind::ForeignCa => (&self.foreign_user, issued_secs, issued_secs + 3600),
            CertKind::ExpiresAt(after) => {
                (&self.user, issued_secs, EPOCH_SECS + after.as_secs().max(1))
            }
        };
        let key = PrivateKey::generate().expect("a key");
        let identity = Identity {
            user: spec.user.clone(),
            roles: vec![format!("dev-{}", spec.user)],
            traits: Default::default(),
            route: Some(DbRoute {
                service: spec.database.clone(),
                protocol: DbProtocol::Postgres,
                db_user: spec.db_user.clone(),
                db_name: "postgres".to_owned(),
            }),
            allowed_db_names: vec![],
            allowed_db_users: vec![],
            usage: Usage::User,
            cluster: CLUSTER.to_owned(),
            client_ip: None,
            expires: at_secs(expires),
        };
        let cert = ca
            .issue_identity(&identity, &key.public_key(), at_secs(issued - 60))
            .expect("a user certificate");
        (cert.der().clone(), key.to_rustls(), at_secs(expires))
    }
}

/// A seed for one incarnation of one host: a restarted host draws new ids, as a real
/// process seeded from the OS would, but the same ones on every replay.
fn host_seed(seed: u64, host: &str, incarnation: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in host.bytes().chain(incarnation.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A run's durable storage: a directory per host that survives the host's crashes (on
/// tmpfs when there is one, so fsync costs nothing), removed when the run ends.
struct Storage {
    dir: std::path::PathBuf,
}

impl Storage {
    fn new(seed: u64) -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "postern-sim-{}-{seed}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir }
    }

    fn host(&self, host: &str) -> std::path::PathBuf {
        self.dir.join(host)
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `seed` to the end and checks every invariant.
pub fn run(seed: u64) -> Outcome {
    let scenario = Scenario::generate(seed);
    let storage = Storage::new(seed);
    let world = World::default();
    for line in scenario.describe() {
        world.record_at(Duration::ZERO, "sim", line);
    }
    let cas = Arc::new(Cas::new());
    let roles = SimRoles::new();

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(SAFETY_PHASE + LIVENESS_BOUND + AUDIT_SHIP_BOUND + SLACK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .build();

    // Every service host reads its own clock, so skew can be applied per host.
    let mut clocks: BTreeMap<String, WallClock> = BTreeMap::new();
    let mut clock_of = |host: &str| {
        clocks
            .entry(host.to_owned())
            .or_insert_with(WallClock::simulated)
            .clone()
    };

    sim.host(AUTH_HOST, {
        let world = world.clone();
        move || {
            let world = world.clone();
            async move {
                world.record(AUTH_HOST, "audit store started");
                auditstore::serve(AUTH_HOST.to_owned(), world).await?;
                Ok(())
            }
        }
    });

    let mut controls: BTreeMap<String, Arc<DbControl>> = BTreeMap::new();
    for db in &scenario.databases {
        let control = Arc::new(DbControl::default());
        controls.insert(db.clone(), control.clone());
        let clock = clock_of(db);
        let files = cas
            .db
            .sign_db_server(
                std::slice::from_ref(db),
                at_secs(EPOCH_SECS - 86_400),
                365 * DAY,
            )
            .expect("a database server certificate");
        let chain =
            vec![CertificateDer::from_pem_slice(files.server_crt.as_bytes()).expect("cert PEM")];
        let key = PrivateKeyDer::from_pem_slice(files.server_key.as_bytes()).expect("key PEM");
        let tls = mtls_server_config(
            chain,
            key,
            &[cas.db.trusted().clone()],
            ring_provider(),
            Arc::new(clock),
        )
        .expect("a database TLS configuration");
        let db_host = FakeDb {
            host: db.clone(),
            tls,
            control,
            world: world.clone(),
        };
        sim.host(db.as_str(), move || {
            let db_host = db_host.clone();
            async move {
                db_host.serve(Net::Turmoil).await?;
                Ok(())
            }
        });
    }

    for proxy in &scenario.proxies {
        let clock = clock_of(proxy);
        let (tls_cert, tls_key) = cas.host_tls(proxy, HostRole::Proxy);
        let ssh_key = postern_pki::ssh::generate_ssh_key().expect("an SSH key");
        let ssh_cert = cas
            .host
            .issue_ssh_host_cert(
                &cas.host_identity(proxy, HostRole::Proxy, &[proxy]),
                ssh_key.public_key(),
                at_secs(EPOCH_SECS - 86_400),
            )
            .expect("an SSH host certificate");
        let tunnel_config = ProxyConfig::new(
            ssh_key,
            ssh_cert,
            vec![cas.host.ssh_public_key().expect("the host CA's SSH key")],
        );
        let tls = server_config(
            &tls_cert,
            &tls_key,
            &[cas.user.trusted().clone()],
            ALPN_PROTOCOLS,
            ring_provider(),
            Arc::new(clock.clone()),
        )
        .expect("a front door TLS configuration");
        let incarnations = Arc::new(AtomicU64::new(0));
        let (name, cas, world) = (proxy.clone(), cas.clone(), world.clone());
        sim.host(proxy.as_str(), move || {
            let incarnation = incarnations.fetch_add(1, Ordering::Relaxed);
            let (name, cas, world) = (name.clone(), cas.clone(), world.clone());
            let (tunnel_config, tls, clock) = (tunnel_config.clone(), tls.clone(), clock.clone());
            async move {
                let rt = Runtime::from_parts(
                    Net::Turmoil,
                    clock.clone(),
                    Rng::from_seed(host_seed(seed, &name, incarnation)),
                    format!("/sim/{name}").into(),
                );
                world.record(&name, format!("start (incarnation {incarnation})"));
                let tunnels = ProxyTunnels::new(&rt, tunnel_config)?;
                let tunnel_listener = rt.net().listen(&format!("0.0.0.0:{TUNNEL_PORT}")).await?;
                tokio::spawn({
                    let tunnels = tunnels.clone();
                    async move { tunnels.serve(tunnel_listener).await }
                });
                let door = FrontDoor::new(
                    tls,
                    Arc::new(Validator::new([cas.user.trusted().clone()])),
                    clock.clone(),
                );
                let dispatcher = Arc::new(Dispatcher::new(
                    tunnels,
                    SimSigner {
                        user_ca: cas.user.clone(),
                        clock: clock.clone(),
                    },
                    vec![cas.host.trusted().clone()],
                    clock.clone(),
                    rt.rng().fork(),
                ));
                let front = rt
                    .net()
                    .listen(&format!("0.0.0.0:{}", client::PROXY_PG_PORT))
                    .await?;
                loop {
                    let conn = front.accept().await?;
                    let (door, dispatcher, world, name, clock) = (
                        door.clone(),
                        dispatcher.clone(),
                        world.clone(),
                        name.clone(),
                        clock.clone(),
                    );
                    tokio::spawn(async move {
                        match door.accept(conn).await {
                            Ok(Accepted::Session(session)) => {
                                // The front door admits only identities valid now, by
                                // its own clock (certificate times are whole seconds).
                                let identity = session.identity.identity();
                                let (now, expires) =
                                    (clock.now().as_secs(), identity.expires.as_secs());
                                if now > expires + 1 {
                                    world.violation(
                                        &name,
                                        format!(
                                            "front door admitted {} with a certificate expired {}s ago",
                                            identity.user,
                                            now - expires
                                        ),
                                    );
                                }
                                if let Err(e) = dispatcher.serve(session).await {
                                    world.record(&name, format!("dispatch failed: {e}"));
                                }
                            }
                            Ok(Accepted::Cancel(_)) => {
                                world.record(&name, "cancel request (not forwarded)");
                            }
                            Ok(_) => {}
                            Err(e) => {
                                world.record(&name, format!("front door refused: {e}"))
                            }
                        }
                    });
                }
            }
        });
    }

    let proxy_addrs: Vec<String> = scenario
        .proxies
        .iter()
        .map(|p| format!("{p}:{TUNNEL_PORT}"))
        .collect();
    for (agent, databases) in &scenario.agents {
        let clock = clock_of(agent);
        let (tls_cert, tls_key) = cas.host_tls(agent, HostRole::Agent);
        let session_tls = mtls_server_config(
            vec![tls_cert.der().clone()],
            tls_key.to_rustls(),
            &[cas.user.trusted().clone()],
            ring_provider(),
            Arc::new(clock.clone()),
        )
        .expect("an agent TLS configuration");
        let ssh_key = postern_pki::ssh::generate_ssh_key().expect("an SSH key");
        let ssh_cert = cas
            .host
            .issue_ssh_user_cert(
                &cas.host_identity(agent, HostRole::Agent, &[]),
                ssh_key.public_key(),
                at_secs(EPOCH_SECS - 86_400),
            )
            .expect("an SSH user certificate");
        let db_ca_pem = cas.db.trusted().to_pem();
        let served: Vec<ServedDatabase> = databases
            .iter()
            .map(|db| ServedDatabase {
                database: Database {
                    name: db.clone(),
                    description: format!("simulated {db}"),
                    protocol: Protocol::Postgres,
                    uri: format!("{db}:{}", fakedb::PORT),
                    labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
                },
                target: PostgresTarget {
                    host: db.clone(),
                    port: fakedb::PORT,
                    tls: UpstreamTls::new(
                        TlsMode::VerifyFull,
                        db_ca_pem.as_bytes(),
                        None,
                        ring_provider(),
                        Arc::new(clock.clone()),
                    )
                    .expect("upstream TLS"),
                },
            })
            .collect();
        let session_config = SessionConfig {
            cluster: CLUSTER.to_owned(),
            tls: session_tls,
            validator: Validator::new([cas.user.trusted().clone()]),
            databases: served,
            limits: Default::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: AGENT_CONNECT_TIMEOUT,
        };
        let (databases_tx, databases_rx) = watch::channel(databases.clone());
        // The sender lives as long as the simulation: the list never changes.
        std::mem::forget(databases_tx);
        let agent_config = AgentConfig::new(
            agent.clone(),
            ssh_key,
            ssh_cert,
            vec![cas.host.ssh_public_key().expect("the host CA's SSH key")],
            databases_rx,
        );
        let incarnations = Arc::new(AtomicU64::new(0));
        let (name, cas, world, roles, proxy_addrs) = (
            agent.clone(),
            cas.clone(),
            world.clone(),
            roles.clone(),
            proxy_addrs.clone(),
        );
        let storage_root = storage.host(agent);
        sim.host(agent.as_str(), move || {
            let incarnation = incarnations.fetch_add(1, Ordering::Relaxed);
            let (name, cas, world, roles) =
                (name.clone(), cas.clone(), world.clone(), roles.clone());
            let (agent_config, session_config, clock, proxy_addrs, storage_root) = (
                agent_config.clone(),
                session_config.clone(),
                clock.clone(),
                proxy_addrs.clone(),
                storage_root.clone(),
            );
            async move {
                let rt = Runtime::from_parts(
                    Net::Turmoil,
                    clock.clone(),
                    Rng::from_seed(host_seed(seed, &name, incarnation)),
                    storage_root,
                )
                .with_blocking(Blocking::Inline);
                world.record(&name, format!("start (incarnation {incarnation})"));
                let (tunnel_agent, mut channels) = Agent::new(&rt, agent_config)?;
                // Audit as AgentService does it: sessions ─► queue ─► durable spool ─► auth.
                // The simulator notes each event as its session emits it, on the way.
                let spool = Arc::new(postern_agent::service::open_audit_spool(
                    &rt,
                    spool::SPOOL_SIZE_MAX_DEFAULT,
                )?);
                let (audit_tx, mut audit_rx) = mpsc::channel(1024);
                let (spool_tx, spool_rx) = mpsc::channel(1024);
                tokio::spawn({
                    let (world, name) = (world.clone(), name.clone());
                    async move {
                        while let Some(event) = audit_rx.recv().await {
                            let event: postern_auth::audit::AuditEvent = event;
                            world.emitted(audited(&name, &event));
                            if spool_tx.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                tokio::spawn(spool::write_events(spool.clone(), spool_rx, rt.blocking()));
                tokio::spawn(spool::ship_events(
                    spool.clone(),
                    SimAuditSink {
                        addr: format!("{AUTH_HOST}:{}", auditstore::PORT),
                    },
                    rt.blocking(),
                ));
                let sessions = Arc::new(
                    SessionService::new(
                        &rt,
                        session_config,
                        roles,
                        LocalDbCa::new(cas.db.clone(), clock.clone()),
                        audit_tx,
                    )
                    .with_audit_gate(spool.gate()),
                );
                tokio::spawn(async move {
                    while let Some(channel) = channels.recv().await {
                        let sessions = sessions.clone();
                        tokio::spawn(async move {
                            let _ = sessions.serve(channel).await;
                        });
                    }
                });
                let (_keep, proxies) = watch::channel(proxy_addrs);
                tunnel_agent.run(proxies).await;
                Ok(())
            }
        });
    }

    let stats = Arc::new(Mutex::new(ClientStats::default()));
    for spec in &scenario.clients {
        let stats = stats.clone();
        let client = client_main(spec.clone(), cas.clone(), world.clone(), stats.clone());
        sim.client(spec.name.as_str(), async move {
            let result = client.await;
            stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .finished += 1;
            result
        });
    }

    sim.client(
        "audit-wait",
        audit_wait(world.clone(), stats.clone(), scenario.clients.len()),
    );

    let mut faults = BTreeMap::new();
    let (sim_error, skew_slack) = drive(
        &mut sim,
        &scenario,
        &world,
        &roles,
        &controls,
        &clocks,
        &mut faults,
    );
    let simulated = sim.elapsed();
    drop(sim);
    drop(storage);

    let mut failures = Vec::new();
    if let Some(e) = sim_error {
        failures.push(format!("simulation error (panic or host failure): {e}"));
    }
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(PoisonError::into_inner));
    check(&scenario, &world, &stats, skew_slack, &mut failures);
    for failure in &failures {
        world.record_at(simulated, "check", format!("FAILED {failure}"));
    }
    let trace = world.trace();
    Outcome {
        seed,
        trace,
        failures,
        faults,
        simulated,
        statements_executed: world.snapshot_executed().len(),
        audit_events: world.snapshot_audited().len(),
        sessions_opened: stats.sessions_opened,
    }
}

/// An audit event as the checks see it.
fn audited(agent: &str, event: &postern_auth::audit::AuditEvent) -> Audited {
    Audited {
        at: World::now(),
        agent: agent.to_owned(),
        id: event.id.clone(),
        event: event.event.clone(),
        code: event.code.clone(),
        user: event.user.clone(),
        db_service: event.db_service.clone(),
        db_user: event.db_user.clone(),
        session_id: event.session_id.clone(),
        query: event
            .fields
            .get("query")
            .and_then(|q| q.as_str())
            .map(str::to_owned),
    }
}

/// Keeps the simulation going after the clients are done until auth has stored every
/// audit event the sessions emitted, or [`AUDIT_SHIP_BOUND`] after the liveness bound.
async fn audit_wait(
    world: World,
    stats: Arc<Mutex<ClientStats>>,
    clients: usize,
) -> turmoil::Result {
    let deadline = SAFETY_PHASE + LIVENESS_BOUND + AUDIT_SHIP_BOUND;
    let clients_done = || {
        stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finished
            >= clients
    };
    while !clients_done() || (!world.all_stored() && World::now() < deadline) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// What clients saw, for the checks.
#[derive(Debug, Default)]
struct ClientStats {
    sessions_opened: u64,
    /// (client, simulated time, certificate expiry) for every session that opened.
    opened: Vec<(String, Duration, Option<UnixTime>, CertKind, bool)>,
    /// Clients that could query in the liveness phase.
    live: BTreeSet<String>,
    /// Clients whose workload and liveness attempts are over.
    finished: usize,
}

/// The harness loop: faults on and off between steps, heal at the end of the safety
/// phase (except the scenario's lasting fault), run until every client is done.
/// Returns the simulation's error, if any, and the largest backward clock skew applied
/// to a proxy (the front door checks certificate expiry with its clock).
fn drive(
    sim: &mut turmoil::Sim<'_>,
    scenario: &Scenario,
    world: &World,
    roles: &SimRoles,
    controls: &BTreeMap<String, Arc<DbControl>>,
    clocks: &BTreeMap<String, WallClock>,
    counts: &mut BTreeMap<&'static str, u64>,
) -> (Option<String>, Duration) {
    let mut pending: Vec<Fault> = scenario.faults.clone();
    pending.reverse();
    let mut lasting = scenario.lasting.clone();
    let mut lasting_skew: BTreeMap<String, i64> = BTreeMap::new();
    let mut active: Vec<(Duration, Fault)> = Vec::new();
    let mut crashed: BTreeSet<String> = BTreeSet::new();
    let mut revoked: BTreeMap<String, Role> = BTreeMap::new();
    let mut skew_slack = Duration::ZERO;
    let mut healed_all = false;
    loop {
        let now = sim.elapsed();
        if let Some(fault) = lasting.take_if(|f| f.at <= now) {
            *counts.entry("lasting_clock_skew").or_default() += 1;
            world.record_at(now, "sim", format!("lasting fault: {}", fault.kind));
            if let FaultKind::ClockSkew(h, ms) = &fault.kind
                && let Some(clock) = clocks.get(h)
            {
                clock.set_skew_ms(*ms);
                lasting_skew.insert(h.clone(), *ms);
            }
        }
        while pending.last().is_some_and(|f| f.at <= now) && now < SAFETY_PHASE {
            let fault = pending.pop().expect("checked above");
            *counts.entry(fault.kind.kind()).or_default() += 1;
            world.record_at(now, "sim", format!("fault: {}", fault.kind));
            match &fault.kind {
                FaultKind::Partition(a, b) => sim.partition(a.as_str(), b.as_str()),
                FaultKind::PartitionOneWay(a, b) => sim.partition_oneway(a.as_str(), b.as_str()),
                FaultKind::Hold(a, b) => sim.hold(a.as_str(), b.as_str()),
                FaultKind::Latency(a, b, d) => sim.set_link_latency(a.as_str(), b.as_str(), *d),
                FaultKind::Crash(h) => {
                    if crashed.insert(h.clone()) {
                        sim.crash(h.as_str());
                        world.crashed(h, now);
                    }
                }
                FaultKind::ClockSkew(h, ms) => {
                    if let Some(clock) = clocks.get(h) {
                        clock.set_skew_ms(*ms);
                        if *ms < 0 && h.starts_with("proxy") {
                            skew_slack = skew_slack.max(Duration::from_millis(ms.unsigned_abs()));
                        }
                    }
                }
                FaultKind::DbDown(db) => {
                    controls[db].down.store(true, Ordering::Relaxed);
                }
                FaultKind::DbSlow(db, d) => {
                    controls[db]
                        .slow_ms
                        .store(d.as_millis() as u64, Ordering::Relaxed);
                }
                FaultKind::RevokeRole(user) => {
                    if let Some(role) = roles.lock().remove(&format!("dev-{user}")) {
                        revoked.insert(user.clone(), role);
                    }
                }
            }
            active.push((now + fault.lasts, fault));
        }
        let heal_everything = now >= SAFETY_PHASE && !healed_all;
        let mut still = Vec::new();
        for (until, fault) in active.drain(..) {
            if until > now && !heal_everything {
                still.push((until, fault));
                continue;
            }
            world.record_at(now, "sim", format!("healed: {}", fault.kind));
            match &fault.kind {
                FaultKind::Partition(a, b) => sim.repair(a.as_str(), b.as_str()),
                FaultKind::PartitionOneWay(a, b) => sim.repair_oneway(a.as_str(), b.as_str()),
                FaultKind::Hold(a, b) => sim.release(a.as_str(), b.as_str()),
                FaultKind::Latency(a, b, _) => {
                    sim.set_link_latency(a.as_str(), b.as_str(), Duration::from_millis(1))
                }
                FaultKind::Crash(h) => {
                    if crashed.remove(h) {
                        sim.bounce(h.as_str());
                    }
                }
                FaultKind::ClockSkew(h, _) => {
                    if let Some(clock) = clocks.get(h) {
                        clock.set_skew_ms(lasting_skew.get(h).copied().unwrap_or(0));
                    }
                }
                FaultKind::DbDown(db) => controls[db].down.store(false, Ordering::Relaxed),
                FaultKind::DbSlow(db, _) => controls[db].slow_ms.store(0, Ordering::Relaxed),
                FaultKind::RevokeRole(user) => {
                    if let Some(role) = revoked.remove(user) {
                        roles.lock().insert(role.name.clone(), role);
                        world.record_at(now, "sim", format!("role dev-{user} restored"));
                    }
                }
            }
        }
        active = still;
        if heal_everything {
            healed_all = true;
            world.record_at(now, "sim", "all faults healed: liveness phase");
        }
        match sim.step() {
            Ok(true) => return (None, skew_slack),
            Ok(false) => {}
            Err(e) => return (Some(e.to_string()), skew_slack),
        }
    }
}

/// One client: its workload through the safety phase, then (with a fresh certificate,
/// as after `postern db login`) queries until one succeeds or the liveness bound passes.
async fn client_main(
    spec: ClientSpec,
    cas: Arc<Cas>,
    world: World,
    stats: Arc<Mutex<ClientStats>>,
) -> turmoil::Result {
    let net = Net::Turmoil;
    let clock = WallClock::simulated();
    let name = spec.name.clone();
    let tls_for = |kind: &CertKind, spec: &ClientSpec| {
        let (cert, key, expires) = cas.user_cert(spec, kind, clock.now().as_secs());
        let config = mtls_client_config(
            vec![cert],
            key,
            &[cas.host.trusted().clone()],
            ring_provider(),
            Arc::new(clock.clone()),
        )
        .expect("a client TLS configuration");
        (config, expires)
    };
    let (tls, expires) = tls_for(&spec.cert, &spec);
    let mut session: Option<Session> = None;
    let mut n = 0u64;
    for op in &spec.ops {
        n += 1;
        if let Op::Sleep(d) = op {
            tokio::time::sleep(*d).await;
            continue;
        }
        if let Op::OtherDbUser = op {
            // A second connection as a db user the role does not allow (a certificate
            // that routes to it, as a user who asked for it would hold).
            let other = ClientSpec {
                db_user: "postgres".to_owned(),
                ..spec.clone()
            };
            let (other_tls, other_expires) = tls_for(&CertKind::Valid, &other);
            match Session::open(&net, &other.proxy, other_tls, &other.db_user, "postgres").await {
                Ok(mut s) => {
                    world.record(&name, "second session opened as postgres");
                    {
                        let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                        stats.sessions_opened += 1;
                        stats.opened.push((
                            name.clone(),
                            World::now(),
                            Some(other_expires),
                            CertKind::Valid,
                            other.route_allowed(),
                        ));
                    }
                    let sql = format!("select '{} {} {}'", name, spec.database, n);
                    if let Err(e) = s.query(&sql).await {
                        world.record(&name, format!("query as postgres failed: {}", short(&e)));
                    }
                    s.terminate().await;
                }
                Err(e) => world.record(
                    &name,
                    format!("second session as postgres refused: {}", short(&e)),
                ),
            }
            continue;
        }
        if session.is_none() {
            match Session::open(&net, &spec.proxy, tls.clone(), &spec.db_user, "postgres").await {
                Ok(s) => {
                    world.record(&name, format!("session opened via {}", spec.proxy));
                    let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                    stats.sessions_opened += 1;
                    stats.opened.push((
                        name.clone(),
                        World::now(),
                        Some(expires),
                        spec.cert.clone(),
                        spec.route_allowed(),
                    ));
                    session = Some(s);
                }
                Err(e) => {
                    world.record(&name, format!("session refused: {}", short(&e)));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(s) = session.as_mut() else { continue };
        let sql = format!("select '{} {} {}'", name, spec.database, n);
        let result = match op {
            Op::Query => s.query(&sql).await,
            Op::Prepared => s.prepared(&format!("s{n}"), &sql).await,
            Op::CancelSlow => {
                let key = s.backend_key.clone();
                let proxy = spec.proxy.clone();
                let canceller = async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(key) = &key {
                        let _ = client::cancel(&net, &proxy, key).await;
                    }
                };
                let (result, ()) = tokio::join!(s.query(&sql), canceller);
                result
            }
            Op::Malformed => s.malformed(b"\x00\x00\x00\x02garbage").await,
            Op::Disconnect => {
                session = None;
                world.record(&name, "disconnected");
                continue;
            }
            Op::Sleep(_) | Op::OtherDbUser => continue,
        };
        match result {
            Ok(rows) => {
                if rows != [spec.database.clone()] {
                    world.violation(
                        &name,
                        format!(
                            "routed to {} but the answer came from {rows:?}",
                            spec.database
                        ),
                    );
                }
                world.record(&name, format!("{op:?} {n} ok"));
            }
            Err(e) => {
                world.record(&name, format!("{op:?} {n} failed: {}", short(&e)));
                if matches!(e, ClientError::Io(_)) || matches!(op, Op::Malformed) {
                    session = None;
                }
            }
        }
    }
    if let Some(s) = session.take() {
        s.terminate().await;
    }

    // Liveness: wait for the heal, log in again, and query within the bound.
    while World::now() < SAFETY_PHASE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back after the break: first the cached certificate (refused if it has expired
    // since), then a fresh one for the client's own db user, as after `postern db login`.
    match Session::open(&net, &spec.proxy, tls.clone(), &spec.db_user, "postgres").await {
        Ok(s) => {
            world.record(&name, "session opened with the cached certificate");
            {
                let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                stats.sessions_opened += 1;
                stats.opened.push((
                    name.clone(),
                    World::now(),
                    Some(expires),
                    spec.cert.clone(),
                    spec.route_allowed(),
                ));
            }
            s.terminate().await;
        }
        Err(e) => world.record(&name, format!("cached certificate refused: {}", short(&e))),
    }
    let fresh = ClientSpec {
        db_user: spec.user.clone(),
        ..spec.clone()
    };
    let (tls, _) = tls_for(&CertKind::Valid, &fresh);
    let deadline = SAFETY_PHASE + LIVENESS_BOUND;
    let mut last_error = String::new();
    while World::now() < deadline {
        let attempt = async {
            let mut s =
                Session::open(&net, &fresh.proxy, tls.clone(), &fresh.db_user, "postgres").await?;
            let rows = s
                .query(&format!("select '{} {} live'", name, fresh.database))
                .await?;
            s.terminate().await;
            Ok::<_, ClientError>(rows)
        };
        match attempt.await {
            Ok(rows) => {
                if rows != [fresh.database.clone()] {
                    world.violation(&name, format!("liveness query answered by {rows:?}"));
                }
                world.record(&name, "live: queried after healing");
                stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .live
                    .insert(name.clone());
                return Ok(());
            }
            Err(e) => {
                last_error = short(&e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    world.record(&name, format!("not live: {last_error}"));
    Ok(())
}

/// An error's stable part for the trace: the SQLSTATE, or the I/O error's text.
fn short(e: &ClientError) -> String {
    match e {
        ClientError::Refused { code, .. } => format!("SQLSTATE {code}"),
        ClientError::Io(e) => e.clone(),
    }
}

/// The invariants, over everything the run recorded.
fn check(
    scenario: &Scenario,
    world: &World,
    stats: &ClientStats,
    skew_slack: Duration,
    failures: &mut Vec<String>,
) {
    failures.extend(world.violations());
    let executed = world.snapshot_executed();
    let audited = world.snapshot_audited();
    let clients: BTreeMap<&str, &ClientSpec> = scenario
        .clients
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();

    // Revocation windows per user, from the trace of faults.
    let mut revocations: Vec<(String, Duration, Duration)> = Vec::new();
    for f in &scenario.faults {
        if let FaultKind::RevokeRole(user) = &f.kind {
            let end = (f.at + f.lasts).min(SAFETY_PHASE);
            revocations.push((user.clone(), f.at, end));
        }
    }

    // 1. Every session start the agents allowed was allowed by the roles at the time.
    let starts: Vec<&Audited> = audited
        .iter()
        .filter(|a| a.event == "db.session.start" && a.code == "TDB00I")
        .collect();
    for start in &starts {
        let user = start.user.as_deref().unwrap_or("");
        if start.db_user.as_deref() != Some(user) {
            failures.push(format!(
                "{} allowed {user} as db user {:?} on {:?}, which no role allows",
                start.agent, start.db_user, start.db_service
            ));
        }
        for (revoked_user, from, until) in &revocations {
            if revoked_user == user && start.at > *from + REVOCATION_GRACE && start.at < *until {
                failures.push(format!(
                    "{} allowed {user} at {:?}, while role dev-{user} was revoked since {from:?}",
                    start.agent, start.at
                ));
            }
        }
    }

    // 2. No statement ran without an allow decision for that identity before it, and
    //    each went to the database its client's certificate routes to.
    for e in &executed {
        let mut words = e.statement.trim_start_matches("select '").split(' ');
        let (client, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if target != e.db {
            failures.push(format!(
                "{} ran a statement meant for {target}: {}",
                e.db, e.statement
            ));
        }
        let user = clients.get(client).map(|c| c.user.as_str()).unwrap_or("?");
        let allowed = starts.iter().any(|s| {
            s.db_service.as_deref() == Some(e.db.as_str())
                && s.db_user.as_deref() == Some(e.db_user.as_str())
                && s.user.as_deref() == Some(user)
                && s.at <= e.at
        });
        if !allowed {
            failures.push(format!(
                "{} executed {:?} as {} with no allow decision for {user} before it",
                e.db, e.statement, e.db_user
            ));
        }
    }

    // 3. Every executed statement has its audit event stored by auth, after healing
    //    and shipping (auth's store keeps each id once; an id emitted twice was reported
    //    when it happened). Excused: a statement whose agent crashed before the
    //    database's answer could reach it (the relay audits a statement with its answer).
    let crashes = world.crashes();
    let link_fault_between = |a: &str, b: &str, from: Duration, to: Duration| {
        scenario.faults.iter().any(|f| {
            let (x, y) = match &f.kind {
                FaultKind::Partition(x, y)
                | FaultKind::PartitionOneWay(x, y)
                | FaultKind::Hold(x, y)
                | FaultKind::Latency(x, y, _) => (x, y),
                _ => return false,
            };
            let linked = (x == a && y == b) || (x == b && y == a);
            linked && f.at <= to && f.at.saturating_add(f.lasts) >= from
        })
    };
    let in_flight_at_crash = |e: &crate::world::Executed| {
        let Some(agent) = &e.via else { return false };
        crashes.iter().any(|(host, at)| {
            host == agent
                && *at >= e.at
                && (*at - e.at <= ANSWER_IN_FLIGHT || link_fault_between(agent, &e.db, e.at, *at))
        })
    };
    let statement_events = [
        "db.session.query",
        "db.session.query.failed",
        "db.session.postgres.statements.execute",
    ];
    let mut wanted: BTreeMap<(String, String, String), (i64, i64)> = BTreeMap::new();
    for e in &executed {
        let entry = wanted
            .entry((e.db.clone(), e.db_user.clone(), e.statement.clone()))
            .or_default();
        entry.0 += 1;
        if in_flight_at_crash(e) {
            entry.1 += 1;
        }
    }
    // An Execute whose statement's ParseComplete never came back (the session was cut
    // with the batch in flight) carries no SQL text; the audit trail still says what
    // ran, through the session's Parse before it, and that is how it is read here.
    let mut parsed: BTreeMap<&str, Vec<(Duration, &str)>> = BTreeMap::new();
    for a in &audited {
        if a.event == "db.session.postgres.statements.parse"
            && let (Some(session), Some(query)) = (&a.session_id, &a.query)
        {
            parsed.entry(session).or_default().push((a.at, query));
        }
    }
    for list in parsed.values_mut() {
        list.sort();
    }
    for a in &audited {
        if !statement_events.contains(&a.event.as_str()) {
            continue;
        }
        let query = a.query.clone().or_else(|| {
            let session = a.session_id.as_deref()?;
            let (_, text) = parsed.get(session)?.iter().rfind(|(at, _)| *at <= a.at)?;
            world.record_at(
                a.at,
                "check",
                format!(
                    "note: {} {} has no SQL text; read from its session's Parse: {text}",
                    a.event, a.id
                ),
            );
            Some((*text).to_owned())
        });
        if let (Some(db), Some(db_user), Some(query)) = (&a.db_service, &a.db_user, query)
            && let Some((count, _)) = wanted.get_mut(&(db.clone(), db_user.clone(), query))
        {
            *count -= 1;
        }
    }
    for ((db, db_user, statement), (missing, excused)) in wanted {
        if missing > excused {
            failures.push(format!(
                "{missing} execution(s) of {statement:?} as {db_user} on {db} without an audit event stored by auth"
            ));
        } else if missing > 0 {
            world.record_at(
                Duration::ZERO,
                "check",
                format!(
                    "excused: {missing} execution(s) of {statement:?} on {db}, in flight when their agent crashed"
                ),
            );
        }
    }
    //    Every event a session emitted reached auth, unless its agent crashed at once.
    let unstored: Vec<Audited> = world
        .unstored()
        .into_iter()
        .filter(|a| {
            !crashes
                .iter()
                .any(|(host, at)| *host == a.agent && *at >= a.at && *at - a.at <= ANSWER_IN_FLIGHT)
        })
        .collect();
    if let Some(first) = unstored.first() {
        failures.push(format!(
            "{} audit event(s) emitted but never stored by auth, first {} {} from {} at {:?}",
            unstored.len(),
            first.event,
            first.id,
            first.agent,
            first.at
        ));
    }

    // 4. No expired, foreign-CA or unroutable identity opened a session.
    for (client, at, expires, kind, route_allowed) in &stats.opened {
        let now_secs = EPOCH_SECS + at.as_secs();
        match kind {
            CertKind::Expired | CertKind::ForeignCa => failures.push(format!(
                "{client} opened a session with a {kind:?} certificate"
            )),
            _ => {}
        }
        if let Some(expires) = expires {
            // Seconds granularity in certificates, plus any backward skew applied.
            if now_secs > expires.as_secs() + 1 + skew_slack.as_secs() {
                failures.push(format!(
                    "{client} opened a session at {at:?}, after its certificate expired"
                ));
            }
        }
        if !route_allowed {
            failures.push(format!(
                "{client} opened a session as a db user no role allows"
            ));
        }
    }

    // 5. Liveness: after healing, every client could log in and query.
    for c in &scenario.clients {
        if !stats.live.contains(&c.name) {
            failures.push(format!(
                "{} could not query within {LIVENESS_BOUND:?} after every fault healed",
                c.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Executed;

    fn spec(name: &str, user: &str, db_user: &str) -> ClientSpec {
        ClientSpec {
            name: name.to_owned(),
            user: user.to_owned(),
            database: "db1".to_owned(),
            db_user: db_user.to_owned(),
            cert: CertKind::Valid,
            proxy: "proxy1".to_owned(),
            ops: vec![],
        }
    }

    fn scenario(clients: Vec<ClientSpec>) -> Scenario {
        Scenario {
            seed: 0,
            proxies: vec!["proxy1".to_owned()],
            agents: BTreeMap::from([("agent1".to_owned(), vec!["db1".to_owned()])]),
            databases: vec!["db1".to_owned()],
            clients,
            faults: vec![],
            lasting: None,
        }
    }

    fn audited(
        ms: u64,
        event: &str,
        code: &str,
        user: &str,
        db_user: &str,
        query: Option<&str>,
    ) -> Audited {
        Audited {
            at: Duration::from_millis(ms),
            agent: "agent1".to_owned(),
            id: format!("{ms}-{event}"),
            event: event.to_owned(),
            code: code.to_owned(),
            user: Some(user.to_owned()),
            db_service: Some("db1".to_owned()),
            db_user: Some(db_user.to_owned()),
            session_id: Some("s1".to_owned()),
            query: query.map(str::to_owned),
        }
    }

    fn executed(ms: u64, db_user: &str, statement: &str) -> Executed {
        Executed {
            at: Duration::from_millis(ms),
            db: "db1".to_owned(),
            db_user: db_user.to_owned(),
            statement: statement.to_owned(),
            via: Some("agent1".to_owned()),
        }
    }

    fn live(names: &[&str]) -> ClientStats {
        ClientStats {
            live: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn failures_of(scenario: &Scenario, world: &World, stats: &ClientStats) -> Vec<String> {
        let mut failures = Vec::new();
        check(scenario, world, stats, Duration::ZERO, &mut failures);
        failures
    }

    /// An event emitted by a session and stored by auth.
    fn store(world: &World, event: Audited) {
        let id = event.id.clone();
        world.emitted(event);
        world.stored(&[id]);
    }

    const SQL: &str = "select 'client1 db1 1'";

    // A clean record passes: allowed start, the statement, its audit event.
    #[test]
    fn a_consistent_record_passes() {
        let world = World::default();
        store(
            &world,
            audited(1, "db.session.start", "TDB00I", "alice", "alice", None),
        );
        world.executed(executed(2, "alice", SQL));
        store(
            &world,
            audited(3, "db.session.query", "TDB02I", "alice", "alice", Some(SQL)),
        );
        let s = scenario(vec![spec("client1", "alice", "alice")]);
        assert_eq!(
            failures_of(&s, &world, &live(&["client1"])),
            Vec::<String>::new()
        );
    }

    // A statement with no allow decision before it, or with none at all, fails.
    #[test]
    fn a_statement_without_an_allow_decision_fails() {
        let world = World::default();
        world.executed(executed(2, "alice", SQL));
        store(
            &world,
            audited(3, "db.session.query", "TDB02I", "alice", "alice", Some(SQL)),
        );
        store(
            &world,
            audited(4, "db.session.start", "TDB00I", "alice", "alice", None),
        );
        let s = scenario(vec![spec("client1", "alice", "alice")]);
        let failures = failures_of(&s, &world, &live(&["client1"]));
        assert!(
            failures.iter().any(|f| f.contains("no allow decision")),
            "{failures:?}"
        );
    }

    // A statement that ran but was never audited fails; a duplicate event id fails.
    #[test]
    fn an_unaudited_statement_and_a_duplicate_event_fail() {
        let world = World::default();
        store(
            &world,
            audited(1, "db.session.start", "TDB00I", "alice", "alice", None),
        );
        store(
            &world,
            audited(1, "db.session.start", "TDB00I", "alice", "alice", None),
        );
        world.executed(executed(2, "alice", SQL));
        let s = scenario(vec![spec("client1", "alice", "alice")]);
        let failures = failures_of(&s, &world, &live(&["client1"]));
        assert!(
            failures
                .iter()
                .any(|f| f.contains("without an audit event")),
            "{failures:?}"
        );
        assert!(
            failures.iter().any(|f| f.contains("emitted twice")),
            "{failures:?}"
        );
    }

    // Allowing a db user no role allows, a session during a revocation, an expired
    // certificate's session, a wrong database, and a client that never came back: each
    // is reported.
    #[test]
    fn forbidden_sessions_and_lost_liveness_fail() {
        let world = World::default();
        store(
            &world,
            audited(1, "db.session.start", "TDB00I", "bob", "postgres", None),
        );
        store(
            &world,
            audited(9_000, "db.session.start", "TDB00I", "alice", "alice", None),
        );
        world.executed(executed(9_001, "alice", "select 'client1 db2 1'"));
        let mut s = scenario(vec![
            spec("client1", "alice", "alice"),
            spec("client2", "bob", "postgres"),
        ]);
        s.faults.push(Fault {
            at: Duration::from_millis(1_000),
            lasts: Duration::from_secs(20),
            kind: FaultKind::RevokeRole("alice".to_owned()),
        });
        let mut stats = live(&["client1"]);
        stats.opened.push((
            "client1".to_owned(),
            Duration::from_secs(100),
            Some(at_secs(EPOCH_SECS + 10)),
            CertKind::ExpiresAt(Duration::from_secs(10)),
            true,
        ));
        stats.opened.push((
            "client2".to_owned(),
            Duration::ZERO,
            None,
            CertKind::ForeignCa,
            false,
        ));
        let failures = failures_of(&s, &world, &stats);
        for needle in [
            "which no role allows",
            "was revoked",
            "after its certificate expired",
            "ForeignCa",
            "db user no role allows",
            "meant for db2",
            "client2 could not query",
        ] {
            assert!(
                failures.iter().any(|f| f.contains(needle)),
                "{needle}: {failures:?}"
            );
        }
    }
}
