//! The controller against a Kubernetes API server (in-cluster or a kubeconfig): the `ModelDeployment` reconciler
//! ([`reconcile`]), `GpuNode` objects kept from agent registrations ([`sync_gpu_nodes`]), the gateway's API keys
//! from Secrets ([`api_keys`]), and leader election on a Lease ([`lease`]). What they write is computed without I/O
//! in [`status`].

pub mod lease;
pub mod reconcile;
pub mod status;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kiln_k8s_api::gpu_node::GpuNode;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{control::ControlPlane, registry::Registry};

/// The label that marks a Secret as an API key of its namespace; the key is the Secret's `key` entry.
pub const API_KEY_LABEL: &str = "kiln.dev/api-key";

/// The API keys in Secrets labelled [`API_KEY_LABEL`]`=true`, in any namespace: (key, namespace). A Secret without
/// a usable `key` entry is skipped with a warning.
pub async fn api_keys(client: &Client) -> Result<Vec<(String, String)>, kube::Error> {
    let secrets: Api<Secret> = Api::all(client.clone());
    let list = secrets.list(&ListParams::default().labels(&format!("{API_KEY_LABEL}=true"))).await?;
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
        match key {
            Some(key) => keys.push((key, namespace)),
            None => tracing::warn!(secret = %secret.name_any(), %namespace,
                "API key Secret without a `key` entry of at least 16 characters; skipped"),
        }
    }
    Ok(keys)
}

/// Applies one `GpuNode` per registered agent (object and status, server-side apply under the controller's field
/// manager; `spec.unschedulable` is left to operators), and returns the names written.
pub async fn sync_gpu_nodes(
    client: &Client,
    registry: &Registry,
    control: &ControlPlane,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<GpuNode> = Api::all(client.clone());
    let params = PatchParams::apply(reconcile::FIELD_MANAGER).force();
    let replicas = control.replicas();
    let mut written = Vec::new();
    for node in registry.nodes() {
        let busy: BTreeSet<u32> =
            replicas.iter().filter(|r| r.2 == node.name).flat_map(|r| r.3.iter().copied()).collect();
        let busy: Vec<u32> = busy.into_iter().collect();
        let status = status::gpu_node_status(&node, &busy, "", Timestamp::now());
        let object = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode", "metadata": { "name": node.name } });
        api.patch(&node.name, &params, &Patch::Apply(&object)).await?;
        let status = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode", "status": status });
        api.patch_status(&node.name, &params, &Patch::Apply(&status)).await?;
        written.push(node.name);
    }
    Ok(written)
}

/// Keeps `GpuNode` objects and the gateway's API keys current, every `every`, until the process ends.
pub async fn keep_current(
    client: Client,
    registry: Registry,
    control: Arc<ControlPlane>,
    set_keys: impl Fn(Vec<(String, String)>) + Send + 'static,
    every: Duration,
) {
    let nodes: Api<GpuNode> = Api::all(client.clone());
    loop {
        if let Err(e) = sync_gpu_nodes(&client, &registry, &control).await {
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
        match api_keys(&client).await {
            Ok(keys) => set_keys(keys),
            Err(e) => tracing::warn!(error = %e, "reading API key Secrets; keeping the keys read before"),
        }
        tokio::time::sleep(every).await;
    }
}
