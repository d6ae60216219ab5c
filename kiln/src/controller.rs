//! `kiln controller`: the controller against a Kubernetes API server (in-cluster, or the kubeconfig of
//! `KUBECONFIG` / `~/.kube/config`). It acts only while it leads: then it reconciles `ModelDeployment`s and
//! `GpuRental`s, serves agents and the gateway, writes `GpuNode` objects and reads API keys from Secrets labelled
//! `kiln.dev/api-key=true` (in the namespaces of `--api-key-namespaces`, or in every namespace). Losing the
//! leadership ends the process (a restart starts clean).
//!
//! Who leads:
//! - With `--ledger-peer` (the chart's StatefulSet): the replicated usage ledger decides. Every replica runs one
//!   raft replica of the ledger (`kiln_ledger::transport`, its log in `--state-dir`/ledger, peers on
//!   `--ledger-listen`); the raft leader runs the control loop and bills into the group (appends committed by a
//!   quorum). A new leader waits one election timeout in its term before acting: by then a deposed leader has
//!   stepped down (raft's check-quorum), so two controllers do not act at once.
//! - Without: a `coordination.k8s.io` Lease, as before (one replica or an active/standby pair).
//!
//! SIGTERM or SIGINT: the gateway drains (new predictions 503, those under way get `--shutdown-grace`), the
//! prediction store is flushed, then the leadership is handed over (the Lease released, or the raft leadership
//! transferred to an up-to-date follower) so a standby takes over at once. Predictions and counters are kept in
//! `--state-dir` (a volume in the chart) and read back when the process restarts there.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kiln_controller::{
    k8s::{
        self,
        lease::LeaderElector,
        reconcile::{Context, error_policy, reconcile},
        rentals::{reconcile_rental, rental_error_policy},
    },
    registry::RegistryConfig,
    server::{Server, ServerOptions},
};
use kiln_k8s_api::{GpuRental, model_deployment::ModelDeployment};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{Controller, watcher},
};

/// `kiln controller` options.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// The gateway: predictions API, `GET /kiln/v1/deployments`, `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Limits of the gateway's listener.
    #[command(flatten)]
    pub listener: crate::listener::ListenerArgs,
    /// Where agents connect.
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub agent_listen: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kiln-system")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lease duration, e.g. `15s`.
    #[arg(long, default_value = "15s", value_parser = crate::up::seconds)]
    pub lease_duration: Duration,
    /// Silence after which an agent is lost.
    #[arg(long, default_value = "10s", value_parser = crate::up::seconds)]
    pub agent_grace: Duration,
    #[command(flatten)]
    pub webhooks: crate::up::WebhookArgs,
    #[command(flatten)]
    pub limits: crate::up::LimitArgs,
    /// Also serve `/metrics` here without a key (for Prometheus; keep it off the public Service). On --listen,
    /// `/metrics` needs an operator key.
    #[arg(long, env = "KILN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Namespaces to read API key Secrets (labelled `kiln.dev/api-key=true`) from, comma-separated; the controller
    /// then needs `list` on Secrets in these namespaces only. Empty (the default): every namespace, which needs a
    /// cluster-wide right to list Secrets. The Helm chart passes the namespaces it grants a Role in.
    #[arg(long, env = "KILN_API_KEY_NAMESPACES", value_delimiter = ',', num_args = 0..)]
    pub api_key_namespaces: Vec<String>,
    /// Where predictions and counters are kept across restarts (`predictions.redb`).
    #[arg(long, env = "KILN_STATE_DIR", default_value = "/var/lib/kiln")]
    pub state_dir: std::path::PathBuf,
    /// On SIGTERM: how long predictions under way may take to finish before they are answered 503, e.g. `30s`.
    /// Keep the pod's terminationGracePeriodSeconds above it (the chart adds 15 s).
    #[arg(long, default_value = "30s", value_parser = crate::up::seconds)]
    pub shutdown_grace: Duration,
    /// Prices of metering (YAML: `currency`, and per GPU model `serverlessPerGpuSecond`, `rentalPerGpuHour`,
    /// `lendingShare`; the chart mounts `billing.prices` here). Without it nothing is metered and `/v1/usage`
    /// answers 501.
    #[arg(long, env = "KILN_PRICES")]
    pub prices: Option<std::path::PathBuf>,
    /// The replicated ledger's members, `ID=HOST:PORT` (comma-separated or repeated), this replica included:
    /// leadership then comes from the ledger's raft group instead of the Lease. Static membership (see
    /// ARCHITECTURE.md for replacing a member).
    #[arg(long = "ledger-peer", env = "KILN_LEDGER_PEERS", value_delimiter = ',', value_parser = ledger_peer)]
    pub ledger_peers: Vec<(u64, String)>,
    /// This replica's id among `--ledger-peer`; default: the ordinal at the end of `--identity` (a StatefulSet pod
    /// name, `kiln-controller-2`) plus one.
    #[arg(long, env = "KILN_LEDGER_ID")]
    pub ledger_id: Option<u64>,
    /// Where the ledger's peers reach this replica (raft messages; also `Append` and `Status` for tools).
    #[arg(long, default_value = "0.0.0.0:7400")]
    pub ledger_listen: SocketAddr,
    /// Label this pod (`--identity` in `--lease-namespace`) `kiln.dev/role=leader` while it leads and `follower`
    /// otherwise, for Services that select the leader (the chart's, with the ledger on).
    #[arg(long)]
    pub label_pod_role: bool,
}

/// Sets `kiln.dev/role` on this controller's pod.
async fn label_pod(pods: &Api<Pod>, name: &str, role: &str) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "metadata": { "labels": { "kiln.dev/role": role } } });
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

/// Labels this pod `role`, retrying until it works or `give_up` passes (the API server can be briefly away).
async fn label_pod_until(pods: &Api<Pod>, name: &str, role: &str, give_up: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match label_pod(pods, name, role).await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= give_up => {
                return Err(e).with_context(|| format!("labelling pod {name} kiln.dev/role={role}"));
            }
            Err(e) => tracing::warn!(error = %e, pod = name, role, "could not label the pod; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ledger_peer(s: &str) -> Result<(u64, String), String> {
    kiln_ledger::transport::parse_peer(s)
}

/// The raft id of a StatefulSet pod: its ordinal plus one (raft ids are non-zero).
fn id_from_identity(identity: &str) -> Option<u64> {
    let (_, ordinal) = identity.rsplit_once('-')?;
    ordinal.parse::<u64>().ok().map(|o| o + 1)
}

/// Whether this replica leads, from its ledger replica's status: true once it has led for `quiet` in one term
/// (see the module docs), false from the moment it stops leading or the term changes.
async fn raft_leadership(
    mut status: tokio::sync::watch::Receiver<kiln_ledger::transport::ReplicaStatus>,
    quiet: Duration,
    leading: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let Ok(term) = status.wait_for(|s| s.node.is_leader).await.map(|s| s.node.term) else { return };
        let deposed = |s: &kiln_ledger::transport::ReplicaStatus| !s.node.is_leader || s.node.term != term;
        if tokio::time::timeout(quiet, status.wait_for(deposed)).await.is_ok() {
            continue; // lost it within the quiet period: never acted
        }
        if leading.send(true).is_err() {
            return;
        }
        let _ = status.wait_for(deposed).await;
        let _ = leading.send(false);
        return;
    }
}

/// How this replica is elected (see the module docs).
enum Election {
    Lease(LeaderElector),
    Raft { replica: kiln_ledger::transport::Replica, server: tokio::task::JoinHandle<()> },
}

impl Election {
    /// Hands the leadership over after a clean shutdown.
    async fn hand_over(self) {
        match self {
            Election::Lease(elector) => match elector.release().await {
                Ok(true) => tracing::info!("released the kiln-controller Lease"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the Lease; a standby takes over when it expires")
                }
            },
            Election::Raft { replica, server } => {
                match replica.transfer_leadership(Duration::from_secs(2)).await {
                    Some(to) => tracing::info!(to, "handed the ledger's leadership over"),
                    None => tracing::info!("no follower took the leadership over; the group elects one"),
                }
                server.abort();
                if let Err(e) = tokio::task::spawn_blocking(move || replica.stop()).await.unwrap_or(Ok(())) {
                    tracing::warn!(error = %e, "the ledger replica stopped with an error");
                }
            }
        }
    }
}

/// Runs until interrupted or the Lease is lost.
pub fn controller(args: &ControllerArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let mut shutdown = crate::up::shutdown_signal()?;
        // Read before waiting for the Lease, so a bad price file stops the controller at once.
        let prices = match &args.prices {
            Some(path) => Some(kiln_controller::billing::PriceFile::read(path)?),
            None => {
                tracing::warn!("no --prices: GPU usage is not metered and /v1/usage answers 501");
                None
            }
        };
        let store = crate::up::open_store(&args.state_dir)?;
        let client =
            Client::try_default().await.context("connecting to the Kubernetes API (in-cluster or kubeconfig)")?;
        let identity = args.identity.clone().unwrap_or_else(|| format!("kiln-controller-{}", std::process::id()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), &args.lease_namespace);
        if args.label_pod_role {
            // A pod that led before a crash may still carry the leader's label: only the leader may.
            label_pod_until(&pods, &identity, "follower", Duration::from_secs(60)).await?;
        }
        let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
        let mut usage_ledger = kiln_controller::server::UsageLedger::Memory;
        let election = if args.ledger_peers.is_empty() {
            let elector = LeaderElector::new(
                client.clone(),
                &args.lease_namespace,
                "kiln-controller",
                &identity,
                args.lease_duration,
            );
            tokio::spawn(elector.clone().run(leading_tx));
            tracing::info!(%identity, namespace = %args.lease_namespace, "waiting for the kiln-controller Lease");
            Election::Lease(elector)
        } else {
            let (replica, server) = start_ledger_replica(args, &identity).await?;
            let cfg = &replica.config().node;
            let quiet = replica.config().tick * u32::try_from(cfg.election_tick).unwrap_or(10);
            tokio::spawn(raft_leadership(replica.watch_status(), quiet, leading_tx));
            usage_ledger =
                kiln_controller::server::UsageLedger::Group(replica.ledger("controller", Duration::from_secs(5)));
            tracing::info!(%identity, id = cfg.id, "waiting to lead the ledger's raft group");
            Election::Raft { replica, server }
        };
        tokio::select! {
            r = leading.wait_for(|l| *l) => { r.context("leader election stopped")?; }
            _ = shutdown.wait_for(|s| *s) => {
                tracing::info!("stopped before leading");
                // The elector may have won meanwhile: hand it over.
                election.hand_over().await;
                return Ok(());
            }
        }
        tracing::info!(%identity, "leading");

        let server = Server::bind(ServerOptions {
            manifests: None,
            http_addr: args.listen,
            http_limits: args.listener.limits(),
            agent_addr: args.agent_listen,
            registry: RegistryConfig { grace: args.agent_grace, ..RegistryConfig::default() },
            webhook_secret: std::env::var("KILN_WEBHOOK_SECRET").ok(),
            webhook_destinations: args.webhooks.destinations(),
            metrics_addr: args.metrics_listen,
            tenant_limits: args.limits.config(),
            store,
            shutdown_grace: args.shutdown_grace,
            prices,
            ledger: usage_ledger,
            kube: Some(kiln_controller::k8s::changes::KubeDeployments::new(client.clone())),
            ..ServerOptions::default()
        })
        .await?;
        let ctx = Arc::new(Context::new(client.clone(), Arc::clone(&server.control), Some(identity.clone())));
        let rental_ctx = Arc::clone(&ctx);
        let deployments: Api<ModelDeployment> = Api::all(client.clone());
        tokio::spawn(
            Controller::new(deployments, watcher::Config::default())
                .shutdown_on_signal()
                .run(reconcile, error_policy, ctx)
                .for_each(|result| async move {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "reconcile");
                    }
                }),
        );
        let rentals: Api<GpuRental> = Api::all(client.clone());
        tokio::spawn(
            Controller::new(rentals, watcher::Config::default())
                .shutdown_on_signal()
                .run(reconcile_rental, rental_error_policy, rental_ctx)
                .for_each(|result| async move {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "reconcile rental");
                    }
                }),
        );
        let gateway = Arc::clone(&server.gateway);
        let key_namespaces = k8s::KeyNamespaces::from_list(&args.api_key_namespaces);
        match &key_namespaces {
            k8s::KeyNamespaces::All => tracing::info!("reading API keys from Secrets in every namespace"),
            k8s::KeyNamespaces::Only(namespaces) => {
                tracing::info!(namespaces = %namespaces.join(","), "reading API keys from Secrets in these namespaces")
            }
        }
        tokio::spawn(k8s::keep_current(
            client,
            server.registry.clone(),
            Arc::clone(&server.control),
            key_namespaces,
            args.lease_namespace.clone(),
            move |keys| gateway.set_keys(keys),
            Duration::from_secs(10),
        ));
        if args.label_pod_role {
            label_pod_until(&pods, &identity, "leader", Duration::from_secs(30)).await?;
        }
        println!(
            "kiln controller: leading as {identity}; gateway http://{}, agents connect to {}",
            server.http_addr, server.agent_addr
        );
        // The server drains when `shutdown` turns true and returns once done: the Lease is kept meanwhile, so no
        // other replica acts on the predictions still running here.
        let serving = server.serve(shutdown);
        tokio::select! {
            r = serving => r.context("serving")?,
            _ = leading.wait_for(|l| !*l) => bail!("lost the leadership; exiting so a restart starts clean"),
        }
        // Drained and flushed: a clean shutdown hands the leadership over at once.
        if args.label_pod_role
            && let Err(e) = label_pod(&pods, &identity, "follower").await
        {
            tracing::warn!(error = %e, "could not label the pod a follower (it stops serving now anyway)");
        }
        election.hand_over().await;
        Ok(())
    })
}

/// Starts this replica of the ledger group and its gRPC server on `--ledger-listen`.
async fn start_ledger_replica(
    args: &ControllerArgs,
    identity: &str,
) -> Result<(kiln_ledger::transport::Replica, tokio::task::JoinHandle<()>)> {
    let id = match args.ledger_id.or_else(|| id_from_identity(identity)) {
        Some(id) => id,
        None => bail!("--ledger-peer needs --ledger-id, or an --identity ending in a StatefulSet ordinal (-0, -1, ..)"),
    };
    let peers: std::collections::BTreeMap<u64, String> = args.ledger_peers.iter().cloned().collect();
    if peers.len() != args.ledger_peers.len() {
        bail!("--ledger-peer names a replica id twice: {:?}", args.ledger_peers);
    }
    if !peers.contains_key(&id) {
        bail!("this replica's ledger id {id} is not among --ledger-peer {:?}", peers.keys().collect::<Vec<_>>());
    }
    let dir = args.state_dir.join("ledger");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let replica = kiln_ledger::transport::Replica::start(kiln_ledger::transport::ReplicaConfig::new(id, &dir, peers))
        .with_context(|| format!("opening the ledger replica in {}", dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.ledger_listen)
        .await
        .with_context(|| format!("binding the ledger's peer address {}", args.ledger_listen))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let service = replica.service();
    let server = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "the ledger's peer server stopped");
        }
    });
    tracing::info!(id, listen = %args.ledger_listen, "ledger replica started");
    Ok((replica, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statefulset_pod_name_gives_the_raft_id() {
        assert_eq!(id_from_identity("kiln-controller-0"), Some(1));
        assert_eq!(id_from_identity("kiln-controller-2"), Some(3));
        assert_eq!(id_from_identity("kiln-controller-7f9c"), None);
        assert_eq!(id_from_identity("controller"), None);
    }

    fn status(id: u64, leader: bool, term: u64) -> kiln_ledger::transport::ReplicaStatus {
        kiln_ledger::transport::ReplicaStatus {
            node: kiln_ledger::NodeStatus {
                id,
                term,
                leader: leader.then_some(id),
                is_leader: leader,
                commit: 0,
                applied: 0,
                log: (0, 0),
                snapshot_index: 0,
                snapshots_made: 0,
                snapshots_installed: 0,
                snapshots_failed: 0,
                pending_proposals: 0,
            },
            records: 0,
            log_bytes: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_raft_leader_acts_after_a_quiet_period_and_stops_when_deposed() {
        let (status_tx, status_rx) = tokio::sync::watch::channel(status(1, false, 1));
        let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
        let quiet = Duration::from_secs(1);
        let election = tokio::spawn(raft_leadership(status_rx, quiet, leading_tx));
        // Elected, then deposed within the quiet period: never acts.
        status_tx.send(status(1, true, 2)).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        status_tx.send(status(1, false, 3)).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*leading.borrow(), "a leader deposed within the quiet period does not act");
        // Elected again and leading for the whole quiet period: acts.
        status_tx.send(status(1, true, 4)).unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!*leading.borrow(), "not before the quiet period has passed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(*leading.borrow());
        // A new term (even if leading again) ends it.
        status_tx.send(status(1, true, 5)).unwrap();
        leading.wait_for(|l| !*l).await.unwrap();
        election.await.unwrap();
    }
}
