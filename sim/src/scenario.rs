//! Seed → everything: the topology, each client's workload and the faults with their
//! timing, drawn from one ChaCha stream (`postern_rt::Rng`). Faults are drawn "swarm"
//! style: each seed first picks which fault kinds it allows at all, so some seeds are
//! calm, some suffer one kind of trouble a lot, some are storms.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use postern_rt::Rng;

/// How long the safety phase (workload and faults) lasts in simulated time.
pub const SAFETY_PHASE: Duration = Duration::from_secs(30);
/// After every fault is healed, how long clients have to succeed again.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);
/// The auth service's host: it stores the audit events the agents ship.
pub const AUTH_HOST: &str = "auth";
/// Users that exist in every cluster; each has a role `dev-<user>` allowing its own
/// database user only.
pub const USERS: [&str; 3] = ["alice", "bob", "carol"];

/// One client's certificate, as the generator meant it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// Valid for the whole run.
    Valid,
    /// Expired before the run started.
    Expired,
    /// Signed by a user CA of another cluster.
    ForeignCa,
    /// Valid at first, expires this far into the run (mid-workload).
    ExpiresAt(Duration),
}

/// One step of a client's workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A simple query.
    Query,
    /// Parse/Bind/Execute/Sync of a prepared statement.
    Prepared,
    /// A query on a slow database, cancelled with a CancelRequest through the proxy.
    CancelSlow,
    /// Drop the connection without Terminate, then reconnect.
    Disconnect,
    /// Send garbage where a message should be.
    Malformed,
    /// Open a second session, with a certificate for the `postgres` db user (which no
    /// role allows), run a query if it opens, and close it: the agent must refuse it.
    OtherDbUser,
    /// Think for this long.
    Sleep(Duration),
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub name: String,
    pub user: String,
    /// The database (service and host name) the certificate routes to.
    pub database: String,
    /// The database user in the certificate's route: the user's own (allowed) or
    /// `postgres` (no role allows it).
    pub db_user: String,
    pub cert: CertKind,
    /// The proxy this client connects to.
    pub proxy: String,
    pub ops: Vec<Op>,
}

impl ClientSpec {
    /// Whether the roles (unrevoked) allow this client's route.
    pub fn route_allowed(&self) -> bool {
        self.db_user == self.user
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Both directions cut between two hosts.
    Partition(String, String),
    /// Packets from the first host to the second are lost.
    PartitionOneWay(String, String),
    /// Packets between two hosts are held (queued) until released.
    Hold(String, String),
    /// Every message between two hosts takes this long.
    Latency(String, String, Duration),
    /// The host stops; it restarts when the fault heals.
    Crash(String),
    /// The host's wall clock runs this many ms ahead (negative: behind).
    ClockSkew(String, i64),
    /// The database refuses sessions and drops running ones.
    DbDown(String),
    /// Each statement on the database takes this long.
    DbSlow(String, Duration),
    /// The user's role is deleted; it comes back when the fault heals.
    RevokeRole(String),
    /// The user CA rotates through its phases (standby → init → update_clients →
    /// update_servers → standby), one every third of the fault's duration; it has
    /// completed when the fault heals.
    RotateUserCa,
}

/// Fault kinds a seed may enable (the swarm draws among these).
const FAULT_KINDS: u64 = 11;

impl FaultKind {
    /// The kind's name in summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            FaultKind::Partition(..) => "partition",
            FaultKind::PartitionOneWay(..) => "partition_oneway",
            FaultKind::Hold(..) => "hold",
            FaultKind::Latency(..) => "latency",
            FaultKind::Crash(_) => "crash_restart",
            FaultKind::ClockSkew(..) => "clock_skew",
            FaultKind::DbDown(_) => "db_down",
            FaultKind::DbSlow(..) => "db_slow",
            FaultKind::RevokeRole(_) => "role_revoked",
            FaultKind::RotateUserCa => "ca_rotation",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::Partition(a, b) => write!(f, "partition {a} <-> {b}"),
            FaultKind::PartitionOneWay(a, b) => write!(f, "partition {a} -> {b}"),
            FaultKind::Hold(a, b) => write!(f, "hold {a} <-> {b}"),
            FaultKind::Latency(a, b, d) => write!(f, "latency {a} <-> {b} {}ms", d.as_millis()),
            FaultKind::Crash(h) => write!(f, "crash {h}"),
            FaultKind::ClockSkew(h, ms) => write!(f, "clock skew {h} {ms:+}ms"),
            FaultKind::DbDown(h) => write!(f, "database down {h}"),
            FaultKind::DbSlow(h, d) => write!(f, "database slow {h} {}ms", d.as_millis()),
            FaultKind::RevokeRole(u) => write!(f, "revoke role dev-{u}"),
            FaultKind::RotateUserCa => write!(f, "rotate the user CA"),
        }
    }
}

/// A fault with its timing: it starts at `at` and heals at `at + lasts` (all faults are
/// healed when the safety phase ends, whatever their `lasts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub at: Duration,
    pub lasts: Duration,
    pub kind: FaultKind,
}

/// Everything a seed determines.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub proxies: Vec<String>,
    /// Agent host → the databases it serves.
    pub agents: BTreeMap<String, Vec<String>>,
    pub databases: Vec<String>,
    pub clients: Vec<ClientSpec>,
    /// Sorted by start time.
    pub faults: Vec<Fault>,
    /// A fault that is never healed: a redundant agent (every database it serves has
    /// another agent) whose clock falls minutes behind for good, so proxies' certificates
    /// look not yet valid to it. Liveness must hold through the other agents.
    pub lasting: Option<Fault>,
}

impl Scenario {
    pub fn generate(seed: u64) -> Self {
        let rng = Rng::from_seed(seed);
        // Separate streams: adding a draw to the workload does not move the faults.
        let (topology, workload, faults) = (rng.fork(), rng.fork(), rng.fork());
        let lasting_rng = rng.fork();
        let range = |rng: &Rng, low: u64, high: u64| low + rng.below(high - low + 1);

        let proxies: Vec<String> = (1..=range(&topology, 1, 3))
            .map(|i| format!("proxy{i}"))
            .collect();
        let databases: Vec<String> = (1..=range(&topology, 1, 3))
            .map(|i| format!("db{i}"))
            .collect();
        let agent_count = range(&topology, 1, 4) as usize;
        let mut agents: BTreeMap<String, Vec<String>> = (1..=agent_count)
            .map(|i| (format!("agent{i}"), Vec::new()))
            .collect();
        let names: Vec<String> = agents.keys().cloned().collect();
        for (i, db) in databases.iter().enumerate() {
            // Every database has at least one agent; some have more.
            let first = &names[i % names.len()];
            if let Some(d) = agents.get_mut(first) {
                d.push(db.clone());
            }
            for name in &names {
                if name != first
                    && topology.chance(1, 3)
                    && let Some(d) = agents.get_mut(name)
                {
                    d.push(db.clone());
                }
            }
        }

        // An agent left without a database serves a random one (an idle agent tests
        // nothing).
        for dbs in agents.values_mut() {
            if dbs.is_empty() {
                dbs.push(databases[topology.below(databases.len() as u64) as usize].clone());
            }
        }

        let client_count = range(&workload, 2, 5);
        let mut clients = Vec::new();
        for i in 1..=client_count {
            let user = USERS[workload.below(USERS.len() as u64) as usize].to_owned();
            let database = databases[workload.below(databases.len() as u64) as usize].clone();
            let db_user = if workload.chance(1, 6) {
                "postgres".to_owned()
            } else {
                user.clone()
            };
            let cert_draw = workload.below(12);
            let proxy = proxies[workload.below(proxies.len() as u64) as usize].clone();
            let ops: Vec<Op> = (0..range(&workload, 5, 30))
                .map(|_| match workload.below(20) {
                    0..=7 => Op::Query,
                    8..=11 => Op::Prepared,
                    12 => Op::CancelSlow,
                    13 => Op::Disconnect,
                    14 => Op::Malformed,
                    15 => Op::OtherDbUser,
                    _ => Op::Sleep(Duration::from_millis(range(&workload, 10, 2_000))),
                })
                .collect();
            let cert = match cert_draw {
                0 => CertKind::Expired,
                1 => CertKind::ForeignCa,
                // Short-lived: it expires while the workload still runs (its pauses, and
                // some 30 ms per operation), and the client keeps using it, as a user's
                // cached certificate is.
                2 | 3 => {
                    let paused: u64 = ops
                        .iter()
                        .map(|op| match op {
                            Op::Sleep(d) => d.as_millis() as u64,
                            _ => 30,
                        })
                        .sum();
                    CertKind::ExpiresAt(Duration::from_millis(range(
                        &workload,
                        200,
                        (paused * 3 / 4).max(400),
                    )))
                }
                _ => CertKind::Valid,
            };
            clients.push(ClientSpec {
                name: format!("client{i}"),
                user,
                database,
                db_user,
                cert,
                proxy,
                ops,
            });
        }

        // Swarm: which kinds this seed allows, then how many faults.
        let enabled: Vec<u64> = (0..FAULT_KINDS).filter(|_| faults.chance(1, 2)).collect();
        let mut drawn = Vec::new();
        let count = if enabled.is_empty() {
            0
        } else {
            faults.below(9)
        };
        let mut hosts: Vec<String> = proxies.clone();
        hosts.extend(agents.keys().cloned());
        hosts.extend(databases.iter().cloned());
        hosts.push(AUTH_HOST.to_owned());
        let agent_names: Vec<String> = agents.keys().cloned().collect();
        let pick = |list: &[String]| list[faults.below(list.len() as u64) as usize].clone();
        let pair = || {
            let a = pick(&hosts);
            let mut b = pick(&hosts);
            while b == a {
                b = pick(&hosts);
            }
            (a, b)
        };
        for _ in 0..count {
            let at = Duration::from_millis(faults.below(SAFETY_PHASE.as_millis() as u64 - 1_000));
            let kind = match enabled[faults.below(enabled.len() as u64) as usize] {
                0 => {
                    let (a, b) = pair();
                    FaultKind::Partition(a, b)
                }
                1 => {
                    let (a, b) = pair();
                    FaultKind::PartitionOneWay(a, b)
                }
                2 => {
                    let (a, b) = pair();
                    FaultKind::Hold(a, b)
                }
                3 => {
                    let (a, b) = pair();
                    FaultKind::Latency(a, b, Duration::from_millis(range(&faults, 50, 3_000)))
                }
                4 => FaultKind::Crash(pick(&hosts)),
                5 => {
                    let skew = range(&faults, 0, 240_000) as i64 - 120_000;
                    FaultKind::ClockSkew(pick(&hosts), skew)
                }
                6 => FaultKind::DbDown(pick(&databases)),
                7 => FaultKind::DbSlow(
                    pick(&databases),
                    Duration::from_millis(range(&faults, 100, 5_000)),
                ),
                8 => FaultKind::RevokeRole(USERS[faults.below(3) as usize].to_owned()),
                10 => {
                    // One rotation per run: a second would interleave its phases.
                    if drawn
                        .iter()
                        .any(|f: &Fault| f.kind == FaultKind::RotateUserCa)
                    {
                        continue;
                    }
                    FaultKind::RotateUserCa
                }
                _ => {
                    // An agent cut off from auth (its audit events pile up in its spool),
                    // which then crashes and restarts while still cut off.
                    let agent = pick(&agent_names);
                    let lasts = Duration::from_millis(range(&faults, 4_000, 10_000));
                    drawn.push(Fault {
                        at: at + lasts / 3,
                        lasts: lasts / 3,
                        kind: FaultKind::Crash(agent.clone()),
                    });
                    drawn.push(Fault {
                        at,
                        lasts,
                        kind: FaultKind::Partition(agent, AUTH_HOST.to_owned()),
                    });
                    continue;
                }
            };
            let lasts = Duration::from_millis(range(&faults, 200, 10_000));
            drawn.push(Fault { at, lasts, kind });
        }
        drawn.sort_by(|a, b| a.at.cmp(&b.at).then(a.kind.cmp(&b.kind)));

        // Half the seeds with a redundant agent keep one of them broken for good.
        let redundant: Vec<&String> = agents
            .iter()
            .filter(|(name, dbs)| {
                dbs.iter().all(|db| {
                    agents
                        .iter()
                        .any(|(other, served)| other != *name && served.contains(db))
                })
            })
            .map(|(name, _)| name)
            .collect();
        let lasting = (!redundant.is_empty() && lasting_rng.chance(1, 2)).then(|| {
            let agent = redundant[lasting_rng.below(redundant.len() as u64) as usize].clone();
            let behind_ms = range(&lasting_rng, 150_000, 300_000) as i64;
            Fault {
                at: Duration::from_millis(lasting_rng.below(SAFETY_PHASE.as_millis() as u64)),
                lasts: Duration::MAX,
                kind: FaultKind::ClockSkew(agent, -behind_ms),
            }
        });
        Scenario {
            seed,
            proxies,
            agents,
            databases,
            clients,
            faults: drawn,
            lasting,
        }
    }

    /// A one-paragraph description, the first lines of a trace.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "seed {}: {} proxies, {} agents, {} databases, {} clients, {} faults",
            self.seed,
            self.proxies.len(),
            self.agents.len(),
            self.databases.len(),
            self.clients.len(),
            self.faults.len()
        )];
        for (agent, dbs) in &self.agents {
            lines.push(format!("{agent} serves {}", dbs.join(",")));
        }
        for c in &self.clients {
            lines.push(format!(
                "{} user={} route={}/{} cert={:?} via {} ops={}",
                c.name,
                c.user,
                c.database,
                c.db_user,
                c.cert,
                c.proxy,
                c.ops.len()
            ));
        }
        for f in &self.faults {
            lines.push(format!(
                "fault at {}ms for {}ms: {}",
                f.at.as_millis(),
                f.lasts.as_millis(),
                f.kind
            ));
        }
        if let Some(f) = &self.lasting {
            lines.push(format!(
                "lasting fault at {}ms, never healed: {}",
                f.at.as_millis(),
                f.kind
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A seed gives the same scenario every time; seeds differ; limits are respected.
    #[test]
    fn a_seed_determines_the_scenario_within_its_limits() {
        let a = Scenario::generate(42);
        let b = Scenario::generate(42);
        assert_eq!(a.describe(), b.describe());
        let mut differing = 0;
        for seed in 0..200 {
            let s = Scenario::generate(seed);
            assert!((1..=3).contains(&s.proxies.len()));
            assert!((1..=4).contains(&s.agents.len()));
            assert!((1..=3).contains(&s.databases.len()));
            for db in &s.databases {
                assert!(s.agents.values().any(|d| d.contains(db)), "{db} unserved");
            }
            if s.describe() != a.describe() {
                differing += 1;
            }
        }
        assert!(differing >= 199);
        // Swarm: some seeds have no faults, some have many.
        let counts: Vec<usize> = (0..200)
            .map(|s| Scenario::generate(s).faults.len())
            .collect();
        assert!(counts.contains(&0));
        assert!(counts.iter().any(|&c| c >= 6));
    }
}
