//! `kiln controller`: the controller against a Kubernetes API server (in-cluster, or the kubeconfig of
//! `KUBECONFIG` / `~/.kube/config`). It competes for a Lease and acts only while it holds it: then it reconciles
//! `ModelDeployment`s, serves agents and the gateway, writes `GpuNode` objects and reads API keys from Secrets
//! labelled `kiln.dev/api-key=true` (in the namespaces of `--api-key-namespaces`, or in every namespace). Losing
//! the Lease ends the process (a restart starts clean).
//!
//! SIGTERM or SIGINT: the gateway drains (new predictions 503, those under way get `--shutdown-grace`), the
//! prediction store is flushed, then the Lease is released so a standby takes over at once. Predictions and
//! counters are kept in `--state-dir` (a volume in the chart) and read back when the process restarts there.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt;
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
        let elector = LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            "kiln-controller",
            &identity,
            args.lease_duration,
        );
        let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
        tokio::spawn(elector.clone().run(leading_tx));
        tracing::info!(%identity, namespace = %args.lease_namespace, "waiting for the kiln-controller Lease");
        tokio::select! {
            r = leading.wait_for(|l| *l) => { r.context("leader election stopped")?; }
            _ = shutdown.wait_for(|s| *s) => {
                tracing::info!("stopped before leading");
                // The elector may have won the Lease meanwhile: hand it over.
                let _ = elector.release().await;
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
        println!(
            "kiln controller: leading as {identity}; gateway http://{}, agents connect to {}",
            server.http_addr, server.agent_addr
        );
        // The server drains when `shutdown` turns true and returns once done: the Lease is kept meanwhile, so no
        // other replica acts on the predictions still running here.
        let serving = server.serve(shutdown);
        tokio::select! {
            r = serving => r.context("serving")?,
            _ = leading.wait_for(|l| !*l) => bail!("lost the kiln-controller Lease; exiting so a restart starts clean"),
        }
        // Drained and flushed: a clean shutdown hands the Lease over at once.
        match elector.release().await {
            Ok(true) => tracing::info!("released the kiln-controller Lease"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not release the Lease; a standby takes over when it expires"),
        }
        Ok(())
    })
}
