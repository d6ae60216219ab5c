//! The controller against a Kubernetes API server (in-cluster or a kubeconfig): the `ModelDeployment` reconciler
//! ([`reconcile`]), `GpuNode` objects kept from agent registrations ([`sync_gpu_nodes`]), the gateway's API keys
//! from Secrets ([`api_keys`]), and leader election on a Lease ([`lease`]). What they write is computed without I/O
//! in [`status`].

pub mod changes;
pub mod lease;
pub mod reconcile;
pub mod rentals;
pub mod status;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kiln_k8s_api::gpu_node::GpuNode;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};

use crate::{control::ControlPlane, registry::Registry};

/// The label that marks a Secret as an API key of its namespace; the key is the Secret's `key` entry.
pub const API_KEY_LABEL: &str = "kiln.dev/api-key";

/// Where the controller reads API keys: the namespaces it may list Secrets in (the Helm chart's default: a Role per
/// namespace), or every namespace (a cluster-wide right to list Secrets, an explicit opt-in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyNamespaces {
    /// Every namespace.
    All,
    /// These namespaces only.
    Only(Vec<String>),
}

impl KeyNamespaces {
    /// From `kiln controller --api-key-namespaces`: an empty list means every namespace.
    pub fn from_list(namespaces: &[String]) -> Self {
        let mut namespaces: Vec<String> =
            namespaces.iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() { Self::All } else { Self::Only(namespaces) }
    }
}

/// The label that makes an API key Secret an operator key ([`crate::gateway::OPERATOR`]): honoured only in the
/// controller's own namespace, where tenants cannot create Secrets.
pub const OPERATOR_KEY_LABEL: &str = "kiln.dev/operator-key";

/// The API keys in Secrets labelled [`API_KEY_LABEL`]`=true` in `namespaces`: (key, namespace). A Secret without
/// a usable `key` entry is skipped with a warning. A Secret also labelled [`OPERATOR_KEY_LABEL`]`=true` in
/// `operator_namespace` is an operator key (namespace [`crate::gateway::OPERATOR`]); elsewhere that label is
/// ignored with a warning (the key stays a tenant key). A namespace that cannot be read fails the whole read, so
/// the caller keeps the keys it had rather than dropping that namespace's keys.
pub async fn api_keys(
    client: &Client,
    namespaces: &KeyNamespaces,
    operator_namespace: &str,
) -> Result<Vec<(String, String)>, kube::Error> {
    let params = ListParams::default().labels(&format!("{API_KEY_LABEL}=true"));
    let list: Vec<Secret> = match namespaces {
        KeyNamespaces::All => Api::<Secret>::all(client.clone()).list(&params).await?.items,
        KeyNamespaces::Only(namespaces) => {
            let mut secrets = Vec::new();
            for namespace in namespaces {
                secrets.extend(Api::<Secret>::namespaced(client.clone(), namespace).list(&params).await?.items);
            }
            secrets
        }
    };
    let mut keys = Vec::new();
    for secret in list {
        let namespace = secret.namespace().unwrap_or_default();
        let key = secret
            .data
            .as_ref()
            .and_then(|d| d.get("key"))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|k| k.trim().to_owned())
            .filter(|k| k.len() >= 16);
        let operator = secret.labels().get(OPERATOR_KEY_LABEL).is_some_and(|v| v == "true");
        let namespace = match (operator, namespace == operator_namespace) {
            (true, true) => crate::gateway::OPERATOR.to_owned(),
            (true, false) => {
                tracing::warn!(secret = %secret.name_any(), %namespace, %operator_namespace,
                    "operator keys count only in the controller's namespace; this one stays a tenant key");
                namespace
            }
            (false, _) => namespace,
        };
        match key {
            Some(key) => keys.push((key, namespace)),
            None => tracing::warn!(secret = %secret.name_any(), %namespace,
                "API key Secret without a `key` entry of at least 16 characters; skipped"),
        }
    }
    Ok(keys)
}

/// What was last written for each `GpuNode`, to skip writes that would change nothing but the heartbeat.
#[derive(Debug, Default)]
pub struct NodeWrites {
    last: std::collections::HashMap<String, (kiln_k8s_api::gpu_node::GpuNodeStatus, std::time::Instant)>,
}

/// How often an unchanged `GpuNode` still gets its heartbeat written.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

impl NodeWrites {
    /// Whether `status` must be written now: it changed (beyond its times), or the last write is older than
    /// [`HEARTBEAT_EVERY`].
    pub fn due(&self, node: &str, status: &kiln_k8s_api::gpu_node::GpuNodeStatus) -> bool {
        match self.last.get(node) {
            Some((last, at)) => at.elapsed() >= HEARTBEAT_EVERY || !same_but_times(last, status),
            None => true,
        }
    }

    fn written(&mut self, node: &str, status: kiln_k8s_api::gpu_node::GpuNodeStatus) {
        self.last.insert(node.to_owned(), (status, std::time::Instant::now()));
    }
}

fn same_but_times(a: &kiln_k8s_api::gpu_node::GpuNodeStatus, b: &kiln_k8s_api::gpu_node::GpuNodeStatus) -> bool {
    let strip = |s: &kiln_k8s_api::gpu_node::GpuNodeStatus| {
        let mut s = s.clone();
        s.last_heartbeat = None;
        for c in &mut s.conditions {
            c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// Applies one `GpuNode` per registered agent whose status changed (object and status, server-side apply under the
/// controller's field manager; the object patch is `spec: {}`, so `spec.unschedulable` stays the operators', see
/// [`status::gpu_node_object`]), and returns the names written.
pub async fn sync_gpu_nodes(
    client: &Client,
    registry: &Registry,
    control: &ControlPlane,
    writes: &mut NodeWrites,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<GpuNode> = Api::all(client.clone());
    let params = PatchParams::apply(reconcile::FIELD_MANAGER).force();
    let replicas = control.replicas();
    let mut written = Vec::new();
    for node in registry.nodes() {
        let busy: BTreeSet<u32> =
            replicas.iter().filter(|r| r.node == node.name).flat_map(|r| r.gpus.iter().copied()).collect();
        let busy: Vec<u32> = busy.into_iter().collect();
        let status = status::gpu_node_status(&node, &busy, Timestamp::now());
        if !writes.due(&node.name, &status) {
            continue;
        }
        api.patch(&node.name, &params, &Patch::Apply(&status::gpu_node_object(&node.name))).await?;
        api.patch_status(&node.name, &params, &Patch::Apply(&status::gpu_node_status_patch(&status))).await?;
        writes.written(&node.name, status);
        written.push(node.name);
    }
    Ok(written)
}

/// Keeps `GpuNode` objects and the gateway's API keys (read in `key_namespaces`) current, every `every`, until the
/// process ends.
pub async fn keep_current(
    client: Client,
    registry: Registry,
    control: Arc<ControlPlane>,
    key_namespaces: KeyNamespaces,
    operator_namespace: String,
    set_keys: impl Fn(Vec<(String, String)>) + Send + 'static,
    every: Duration,
) {
    let nodes: Api<GpuNode> = Api::all(client.clone());
    let mut writes = NodeWrites::default();
    loop {
        if let Err(e) = sync_gpu_nodes(&client, &registry, &control, &mut writes).await {
            tracing::warn!(error = %e, "writing GpuNode objects");
        }
        // Operators cordon a node through `GpuNode.spec.unschedulable`.
        match nodes.list(&ListParams::default()).await {
            Ok(list) => {
                for n in list {
                    control.set_cordoned(&n.name_any(), n.spec.unschedulable);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading GpuNode objects"),
        }
        match api_keys(&client, &key_namespaces, &operator_namespace).await {
            Ok(keys) => set_keys(keys),
            Err(e) => tracing::warn!(error = %e, "reading API key Secrets; keeping the keys read before"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{GpuView, NodeView};

    fn view(ready: bool) -> NodeView {
        NodeView {
            name: "n".into(),
            ready,
            simulated: true,
            gpus: vec![GpuView {
                index: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_bytes: 80 << 30,
                health: kiln_proto::v1::GpuHealth::Healthy,
            }],
            replicas: Default::default(),
            cached: vec![kiln_proto::v1::CachedModel {
                model_uri: "file:///m".into(),
                size_bytes: 1 << 30,
                tier: kiln_proto::v1::CacheTier::Disk as i32,
                ..Default::default()
            }],
            versions: ["0.1.0".into(), "550.54".into(), "12.4".into()],
            worker_endpoint: String::new(),
            worker_http1: false,
            cpu_milli: 0,
            host_memory_bytes: 0,
            labels: Vec::new(),
            last_seen: std::time::Instant::now(),
        }
    }

    #[test]
    fn a_gpu_node_is_written_when_it_changes_not_on_every_pass() {
        let mut writes = NodeWrites::default();
        let t0 = Timestamp::from_second(1_790_000_000).unwrap();
        let s0 = status::gpu_node_status(&view(true), &[], t0);
        assert!(writes.due("n", &s0), "never written");
        assert_eq!(s0.cached_models[0].size_bytes, 1 << 30);
        assert_eq!((s0.agent_version.as_deref(), s0.cuda_version.as_deref()), (Some("0.1.0"), Some("12.4")));
        writes.written("n", s0);
        let later = status::gpu_node_status(&view(true), &[], t0 + k8s_openapi::jiff::SignedDuration::from_secs(10));
        assert!(!writes.due("n", &later), "only the heartbeat changed");
        let busy = status::gpu_node_status(&view(true), &[0], t0);
        assert!(writes.due("n", &busy), "a GPU got a replica");
        let lost = status::gpu_node_status(&view(false), &[], t0);
        assert!(writes.due("n", &lost), "the agent was lost");
    }
}
