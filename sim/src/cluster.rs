//! One seed's run: a whole cluster on turmoil hosts with the real auth server and its
//! HTTPS API ([`crate::authhost`]), the real proxy service
//! (`postern_proxy::service::ProxyService`: front door, dispatcher, cancel forwarding,
//! tunnel server), the real database service (`postern_agent::service::AgentService`:
//! join, roles polled from auth, announcements, database client certificates from
//! auth, session service, relay, durable audit spool shipped to auth), fake databases,
//! and clients speaking PostgreSQL through the proxies. The harness applies the seed's
//! faults between simulation steps, heals them all when the safety phase ends, then
//! gives every client [`LIVENESS_BOUND`] to query again, and finally checks the
//! invariants against what the [`World`] recorded and what auth stored.
//!
//! Auth's state (backend and audit log) outlives the auth host's crashes; each agent's
//! storage root is a real directory that survives its crashes and restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use postern_agent::service::{
    AgentService, AgentServiceConfig, AgentTimers, DatabaseConfig, DatabaseTls, HostMaterial,
};
use postern_agent::upstream::TlsMode;
use postern_auth::audit::AuditEvent;
use postern_auth::database::Protocol;
use postern_auth::role::Role;
use postern_auth::server::TokenKind;
use postern_pki::tls::{mtls_client_config, mtls_server_config, ring_provider};
use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, Identity, PrivateKey, TrustedCa, UnixTime, Usage,
};
use postern_rt::{Blocking, Net, Rng, Runtime, WallClock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Trace;
use crate::authhost::{self, Admin, CLUSTER, ProxyHost};
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
/// A session start audited this long after the role was revoked is a violation. The
/// agent reads roles from its cache, which polls auth every second
/// (`ROLES_POLL_PERIOD_DEFAULT`); the start event comes after the database client
/// certificate from auth and the upstream connect (at most [`AGENT_CONNECT_TIMEOUT`]).
pub const REVOCATION_GRACE: Duration = Duration::from_secs(5);
/// Extra simulated time after the liveness bound before the run is declared stuck.
const SLACK: Duration = Duration::from_secs(30);
/// After the liveness bound, how long the agents have to ship every spooled event.
pub const AUDIT_SHIP_BOUND: Duration = Duration::from_secs(20);
/// The most a statement's answer takes from the database to its agent on a healthy
/// link (the simulation's message latency is 1–20 ms): an agent that crashes within
/// this of a statement may never have seen its answer, so never audited it.
const ANSWER_IN_FLIGHT: Duration = Duration::from_millis(25);
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

/// The roles every cluster starts with: `dev-<user>` allows the user's own db user on
/// every database labelled `env=dev`.
fn initial_roles() -> Vec<Role> {
    let mut text = String::new();
    for user in crate::scenario::USERS {
        text.push_str(&format!(
            "[[role]]\nname = \"dev-{user}\"\nallow.db_labels = {{ env = \"dev\" }}\nallow.db_users = [\"{user}\"]\nallow.db_names = [\"*\"]\n\n"
        ));
    }
    // Invariant: the text above is a valid role file.
    postern_auth::role::parse_role_file("sim-roles.toml", &text)
        .expect("the simulator's role file parses")
}

/// Certificates the harness issues as auth would: user certificates as `postern db
/// login` writes them (signed by whichever user CA auth signs with at that moment),
/// and database server certificates. Also a user CA of another cluster.
struct Cas {
    admin: Arc<Admin>,
    db: CertAuthority,
    foreign_user: CertAuthority,
}

impl Cas {
    fn new(admin: Arc<Admin>) -> Self {
        let start = at_secs(EPOCH_SECS - 30 * 86_400);
        // Invariant: generating a CA with valid parameters does not fail.
        let foreign_user =
            CertAuthority::generate(CaKind::User, CLUSTER, start, 3650 * DAY).expect("a CA");
        Cas {
            db: admin.signing_ca(CaKind::Db),
            foreign_user,
            admin,
        }
    }

    /// The host CA bundle (PEM): what hosts and clients check auth's and proxies'
    /// certificates against.
    fn host_ca_pem(&self) -> String {
        self.admin
            .trusted(CaKind::Host)
            .iter()
            .map(TrustedCa::to_pem)
            .collect()
    }

    /// A user certificate for `spec`, as `postern db login` would write it.
    fn user_cert(
        &self,
        spec: &ClientSpec,
        kind: &CertKind,
        issued_secs: u64,
    ) -> (
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
        UnixTime,
        Vec<u8>,
    ) {
        let user_ca = self.admin.signing_ca(CaKind::User);
        let (ca, issued, expires) = match kind {
            CertKind::Valid => (&user_ca, issued_secs, issued_secs + 3600),
            CertKind::Expired => (&user_ca, issued_secs - 7200, issued_secs - 3600),
            CertKind::ForeignCa => (&self.foreign_user, issued_secs, issued_secs + 3600),
            CertKind::ExpiresAt(after) => {
                (&user_ca, issued_secs, EPOCH_SECS + after.as_secs().max(1))
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
        let ca_id = ca.trusted().key_id().to_vec();
        (cert.der().clone(), key.to_rustls(), at_secs(expires), ca_id)
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
    let (admin, auth_state) = Admin::bootstrap(seed, EPOCH_SECS, &initial_roles());
    let admin = Arc::new(admin);
    let cas = Arc::new(Cas::new(admin.clone()));
    let host_ca_pem = cas.host_ca_pem();

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

    {
        let (world, state, clock) = (world.clone(), auth_state.clone(), clock_of(AUTH_HOST));
        let incarnations = Arc::new(AtomicU64::new(0));
        sim.host(AUTH_HOST, move || {
            let incarnation = incarnations.fetch_add(1, Ordering::Relaxed);
            authhost::serve(
                state.clone(),
                world.clone(),
                clock.clone(),
                host_seed(seed, AUTH_HOST, incarnation),
                incarnation,
            )
        });
    }

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
        let host = Arc::new(ProxyHost {
            name: proxy.clone(),
            join_token: admin.join_token(TokenKind::Proxy),
            auth_ca_pem: host_ca_pem.clone(),
            saved: Default::default(),
            postgres_port: client::PROXY_PG_PORT,
            tunnel_port: TUNNEL_PORT,
        });
        let incarnations = Arc::new(AtomicU64::new(0));
        let world = world.clone();
        sim.host(proxy.as_str(), move || {
            let incarnation = incarnations.fetch_add(1, Ordering::Relaxed);
            let (host, world, clock) = (host.clone(), world.clone(), clock.clone());
            async move {
                let rt = Runtime::from_parts(
                    Net::Turmoil,
                    clock,
                    Rng::from_seed(host_seed(seed, &host.name, incarnation)),
                    format!("/sim/{}", host.name).into(),
                )
                .with_blocking(Blocking::Inline);
                world.record(&host.name, format!("start (incarnation {incarnation})"));
                authhost::run_proxy(&host, rt, &world).await
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
        let config = AgentServiceConfig {
            cluster: CLUSTER.to_owned(),
            host_id: agent.clone(),
            auth_addr: authhost::addr(),
            auth_server_name: authhost::SERVER_NAME.to_owned(),
            auth_ca_pem: host_ca_pem.clone(),
            host: HostMaterial::JoinToken(admin.join_token(TokenKind::Db)),
            proxies: proxy_addrs.clone(),
            databases: databases
                .iter()
                .map(|db| DatabaseConfig {
                    name: db.clone(),
                    description: format!("simulated {db}"),
                    protocol: Protocol::Postgres,
                    uri: format!("{db}:{}", fakedb::PORT),
                    ca_cert_file: None,
                    tls: DatabaseTls {
                        mode: TlsMode::VerifyFull,
                        server_name: None,
                    },
                    aws_region: None,
                    static_labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
                    dynamic_labels: BTreeMap::new(),
                })
                .collect(),
            timers: AgentTimers {
                connect_timeout: AGENT_CONNECT_TIMEOUT,
                handshake_timeout: Duration::from_secs(10),
                ..AgentTimers::default()
            },
            aws_credentials: None,
        };
        let incarnations = Arc::new(AtomicU64::new(0));
        let (name, world) = (agent.clone(), world.clone());
        let storage_root = storage.host(agent);
        sim.host(agent.as_str(), move || {
            let incarnation = incarnations.fetch_add(1, Ordering::Relaxed);
            let (name, world, config, clock, storage_root) = (
                name.clone(),
                world.clone(),
                config.clone(),
                clock.clone(),
                storage_root.clone(),
            );
            async move {
                let rt = Runtime::from_parts(
                    Net::Turmoil,
                    clock,
                    Rng::from_seed(host_seed(seed, &name, incarnation)),
                    storage_root,
                )
                .with_blocking(Blocking::Inline);
                world.record(&name, format!("start (incarnation {incarnation})"));
                // The real database service: join, CAs and SSH certificate from auth,
                // roles polled from auth, announcements, database client certificates
                // from auth, durable audit spool shipped to auth, tunnels to every
                // proxy. The simulator notes each audit event as a session emits it.
                let tap = {
                    let (world, name) = (world.clone(), name.clone());
                    move |event: &AuditEvent| world.emitted(audited(&name, event))
                };
                AgentService::new(rt, config)?
                    .with_audit_tap(tap)
                    .run(std::future::pending())
                    .await?;
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
        &admin,
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
    // The audit invariants are checked against what the real auth server stored.
    match admin.stored_events(&auth_state) {
        Ok(events) => {
            let ids: Vec<String> = events
                .into_iter()
                .filter(|e| e.event.starts_with("db."))
                .map(|e| e.id)
                .collect();
            world.stored_by_auth(&ids);
        }
        Err(e) => failures.push(e),
    }
    // Liveness: every agent is registered with auth for each database it serves.
    for (agent, databases) in &scenario.agents {
        for db in databases {
            if !admin.servers_of(db).contains(agent) {
                failures.push(format!(
                    "{agent} is not registered with auth for {db} after the run"
                ));
            }
        }
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

/// A session a client opened: client, simulated time, certificate expiry and kind,
/// whether the roles allow its route, and the key id of the CA that signed it.
type Opened = (String, Duration, Option<UnixTime>, CertKind, bool, Vec<u8>);

/// What clients saw, for the checks.
#[derive(Debug, Default)]
struct ClientStats {
    sessions_opened: u64,
    /// (client, simulated time, certificate expiry) for every session that opened.
    opened: Vec<Opened>,
    /// Clients that could query in the liveness phase.
    live: BTreeSet<String>,
    /// Clients whose workload and liveness attempts are over.
    finished: usize,
}

/// Calls of `rotate_ca` from standby back to standby.
const ROTATION_PHASES: u32 = 4;

/// Moves the user CA's rotation one phase on, as `postern admin auth rotate` would.
fn rotate_user_ca(admin: &Admin, world: &World, now: Duration) {
    let from = admin.phase(CaKind::User);
    match admin.rotate(CaKind::User) {
        Ok(to) => world.record_at(now, "sim", format!("user CA rotation: {from} -> {to}")),
        Err(e) => world.violation("sim", format!("user CA rotation from {from} failed: {e}")),
    }
}

/// The harness loop: faults on and off between steps, heal at the end of the safety
/// phase (except the scenario's lasting fault), run until every client is done.
/// Returns the simulation's error, if any, and the largest backward clock skew applied
/// to a proxy (the front door checks certificate expiry with its clock).
fn drive(
    sim: &mut turmoil::Sim<'_>,
    scenario: &Scenario,
    world: &World,
    admin: &Admin,
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
    let mut healed_lasting = false;
    // A user CA rotation in flight: its start, duration, phases moved and the old CA.
    let mut rotation: Option<(Duration, Duration, u32, Vec<u8>)> = None;
    loop {
        let now = sim.elapsed();
        if let Some((start, lasts, done, _)) = &mut rotation {
            // The phases before the last, at start and each third of the duration.
            while *done < ROTATION_PHASES - 1 && now >= *start + *lasts * *done / 3 {
                rotate_user_ca(admin, world, now);
                *done += 1;
            }
        }
        // Auth's backend (lease expiry) and the harness's own actions read this time.
        admin.set_now(EPOCH_SECS + now.as_secs());
        if !healed_lasting && now >= SAFETY_PHASE + LIVENESS_BOUND {
            // Liveness is judged; now the lasting fault heals too, so that the broken
            // agent can ship what it spooled ("every event stored after the run heals").
            healed_lasting = true;
            for (host, _) in std::mem::take(&mut lasting_skew) {
                if let Some(clock) = clocks.get(&host) {
                    clock.set_skew_ms(0);
                }
                world.record_at(now, "sim", format!("lasting fault healed: {host}"));
            }
        }
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
                    if let Some(role) = admin.revoke_role(&format!("dev-{user}")) {
                        revoked.insert(user.clone(), role);
                    }
                }
                FaultKind::RotateUserCa => {
                    let old = admin.signing_ca(CaKind::User).trusted().key_id().to_vec();
                    rotation = Some((now, fault.lasts, 0, old));
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
                        admin.restore_role(role);
                        world.record_at(now, "sim", format!("role dev-{user} restored"));
                    }
                }
                FaultKind::RotateUserCa => {
                    if let Some((_, _, done, old)) = rotation.take() {
                        for _ in done..ROTATION_PHASES {
                            rotate_user_ca(admin, world, now);
                        }
                        world.rotation_completed(now, old);
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
    let host_cas = cas.admin.trusted(CaKind::Host);
    let tls_for = |kind: &CertKind, spec: &ClientSpec| {
        let (cert, key, expires, ca) = cas.user_cert(spec, kind, clock.now().as_secs());
        let config = mtls_client_config(
            vec![cert],
            key,
            &host_cas,
            ring_provider(),
            Arc::new(clock.clone()),
        )
        .expect("a client TLS configuration");
        (config, expires, ca)
    };
    let (tls, expires, ca) = tls_for(&spec.cert, &spec);
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
            let (other_tls, other_expires, other_ca) = tls_for(&CertKind::Valid, &other);
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
                            other_ca,
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
                        ca.clone(),
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
                    ca.clone(),
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
    let (tls, _, _) = tls_for(&CertKind::Valid, &fresh);
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

/// Whether `agent` may have been unable to refresh its roles from auth at some time in
/// `[from, to]`: a link fault between them, or either of them crashed.
fn auth_unreachable(
    scenario: &Scenario,
    crashes: &[(String, Duration)],
    agent: &str,
    from: Duration,
    to: Duration,
) -> bool {
    let link = scenario.faults.iter().any(|f| {
        let (x, y) = match &f.kind {
            FaultKind::Partition(x, y)
            | FaultKind::PartitionOneWay(x, y)
            | FaultKind::Hold(x, y)
            | FaultKind::Latency(x, y, _) => (x.as_str(), y.as_str()),
            FaultKind::Crash(h) | FaultKind::ClockSkew(h, _) => (h.as_str(), h.as_str()),
            _ => return false,
        };
        let linked = (x == agent && y == AUTH_HOST)
            || (x == AUTH_HOST && y == agent)
            || (x == y && x == AUTH_HOST);
        linked && f.at <= to && f.at.saturating_add(f.lasts) >= from
    });
    link || crashes
        .iter()
        .any(|(host, at)| host == AUTH_HOST && *at <= to && *at + REVOCATION_GRACE >= from)
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

    let crashes = world.crashes();
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
            // An agent that cannot reach auth keeps its last roles (as it must, to
            // serve through an auth outage): a start while its link to auth was cut,
            // slowed or held, or auth was down, is excused and noted.
            if revoked_user == user
                && start.at > *from + REVOCATION_GRACE
                && start.at < *until
                && auth_unreachable(scenario, &crashes, &start.agent, *from, start.at)
            {
                world.record_at(
                    start.at,
                    "check",
                    format!(
                        "excused: {} allowed {user} with roles cached while auth was out of reach",
                        start.agent
                    ),
                );
                continue;
            }
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
    // In flight either way: the answer had not reached the agent when it crashed, or
    // the statement itself was still on its way to the database (it executed after
    // the agent that sent it was gone).
    let in_flight_at_crash = |e: &crate::world::Executed| {
        let Some(agent) = &e.via else { return false };
        crashes.iter().any(|(host, at)| {
            host == agent
                && if *at >= e.at {
                    *at - e.at <= ANSWER_IN_FLIGHT || link_fault_between(agent, &e.db, e.at, *at)
                } else {
                    e.at - *at <= ANSWER_IN_FLIGHT
                }
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
    for a in &audited {
        if !statement_events.contains(&a.event.as_str()) {
            continue;
        }
        // The relay names the SQL of every statement event, also of a batch cut before its
        // answers came back (regression seed 26).
        let query = a.query.clone();
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
    let rotations = world.rotations();
    for (client, at, expires, kind, route_allowed, ca) in &stats.opened {
        for (rotated_at, old) in &rotations {
            if ca == old && *at > *rotated_at + REVOCATION_GRACE {
                failures.push(format!(
                    "{client} opened a session at {at:?} with a certificate of the user CA rotated out at {rotated_at:?}"
                ));
            }
        }
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
            b"old-ca".to_vec(),
        ));
        stats.opened.push((
            "client2".to_owned(),
            Duration::ZERO,
            None,
            CertKind::ForeignCa,
            false,
            b"foreign-ca".to_vec(),
        ));
        world.rotation_completed(Duration::from_secs(50), b"old-ca".to_vec());
        let failures = failures_of(&s, &world, &stats);
        for needle in [
            "which no role allows",
            "was revoked",
            "after its certificate expired",
            "ForeignCa",
            "db user no role allows",
            "meant for db2",
            "client2 could not query",
            "user CA rotated out",
        ] {
            assert!(
                failures.iter().any(|f| f.contains(needle)),
                "{needle}: {failures:?}"
            );
        }
    }
}
