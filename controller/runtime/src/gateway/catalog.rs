//! What the Replicate-shaped API describes beside predictions: the deployments (as Replicate's models and
//! deployments) and the fleet's GPU models (as Replicate's hardware), through the [`Catalog`] trait the process
//! that serves the gateway implements (`crate::server`), and the changes to deployments it can make
//! ([`DeploymentChange`], refused with a [`ChangeError`]). No HTTP here; the handlers are in `listing`, `models`,
//! `changes` and `account`.

use std::time::SystemTime;

/// A deployment as the Replicate-shaped API describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentInfo {
    /// `namespace/name`.
    pub key: String,
    /// Its spec's version (the predictions' `version`).
    pub version: String,
    /// The release number (Replicate's `current_release.number`): the spec generation where there is one.
    pub release: u64,
    /// When this release was first served.
    pub released_at: SystemTime,
    /// The GPU model it runs on: the one its spec asks for, else the one of its replicas' nodes, else the fleet's
    /// only one; `None` when none of these says.
    pub gpu_model: Option<String>,
    /// Least replicas (`scaling.minReplicas`).
    pub min_instances: u32,
    /// Most replicas (`scaling.maxReplicas`).
    pub max_instances: u32,
    /// Predictions received, in all (its counters).
    pub run_count: i64,
}

impl DeploymentInfo {
    /// The namespace (Replicate's owner) and the name.
    pub fn owner_and_name(&self) -> (&str, &str) {
        self.key.split_once('/').unwrap_or(("", self.key.as_str()))
    }
}

/// Where the gateway reads the deployments and the fleet's hardware from.
pub trait Catalog: Send + Sync + std::fmt::Debug + 'static {
    /// Every deployment served, in any order.
    fn deployments(&self) -> Vec<DeploymentInfo>;
    /// One deployment, `None` if it is not served.
    fn deployment(&self, key: &str) -> Option<DeploymentInfo> {
        self.deployments().into_iter().find(|d| d.key == key)
    }
    /// The GPU models of the fleet's nodes (product names as NVML gives them), in any order, repeats allowed.
    fn gpu_models(&self) -> Vec<String>;
    /// Creates, updates or deletes a deployment of `namespace` in the spec source (blocking: files are written).
    /// Returns once the change is written; the control plane serves it when the spec source is read again.
    fn change(&self, namespace: &str, change: &DeploymentChange) -> Result<(), ChangeError> {
        let _ = (namespace, change);
        Err(ChangeError::Unsupported("this gateway's spec source"))
    }
}

/// A change to a deployment, as Replicate's deployments API asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentChange {
    /// The deployment's name (in the caller's namespace).
    pub name: String,
    /// Create, update or delete.
    pub kind: ChangeKind,
    /// For a create: the deployment (`owner/name` or a name in the same namespace) whose spec the new one copies.
    pub model: Option<String>,
    /// A hardware SKU of the fleet ([`sku`]): the GPU model the deployment is constrained to.
    pub hardware: Option<String>,
    /// `scaling.minReplicas`.
    pub min_instances: Option<u32>,
    /// `scaling.maxReplicas`.
    pub max_instances: Option<u32>,
}

/// What a [`DeploymentChange`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `POST /v1/deployments`.
    Create,
    /// `PATCH /v1/deployments/{owner}/{name}`.
    Update,
    /// `DELETE /v1/deployments/{owner}/{name}`.
    Delete,
}

/// Why a deployment change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The spec source cannot be changed through the API (501).
    #[error("changing deployments through the API is not supported by {0}: write the ModelDeployment instead")]
    Unsupported(&'static str),
    /// No such deployment (404).
    #[error("deployment {0} not found")]
    NotFound(String),
    /// It exists already, or its manifest holds more than it (409).
    #[error("{0}")]
    Conflict(String),
    /// The resulting `ModelDeployment` is not valid, or the request is not (422; the apiserver's message).
    #[error("{0}")]
    Invalid(String),
    /// The manifest could not be read or written (500).
    #[error("{0}")]
    Io(String),
}

/// A catalog with no deployments and no GPUs (a gateway not given one).
#[derive(Debug, Default, Clone, Copy)]
pub struct EmptyCatalog;

impl Catalog for EmptyCatalog {
    fn deployments(&self) -> Vec<DeploymentInfo> {
        Vec::new()
    }
    fn gpu_models(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The hardware SKU of a GPU model, in Replicate's style: `gpu-` and the product name's words in lowercase without
/// the vendor (`NVIDIA H100 80GB HBM3` is `gpu-h100-80gb-hbm3`).
pub fn sku(gpu_model: &str) -> String {
    let words: Vec<String> = gpu_model
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !w.eq_ignore_ascii_case("nvidia"))
        .map(str::to_ascii_lowercase)
        .collect();
    if words.is_empty() { "gpu".to_owned() } else { format!("gpu-{}", words.join("-")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_the_product_names_words_without_the_vendor() {
        assert_eq!(sku("NVIDIA H100 80GB HBM3"), "gpu-h100-80gb-hbm3");
        assert_eq!(sku("NVIDIA H200"), "gpu-h200");
        assert_eq!(sku("Tesla T4"), "gpu-tesla-t4");
        assert_eq!(sku(""), "gpu");
    }
}
