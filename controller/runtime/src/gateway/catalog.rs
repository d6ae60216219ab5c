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
    /// The caller may not make it, or the controller may not (403; the apiserver's message).
    #[error("{0}")]
    Forbidden(String),
    /// The manifest could not be read or written, or the Kubernetes API failed (500).
    #[error("{0}")]
    Io(String),
}

impl DeploymentChange {
    /// The deployment a create copies, `namespace/name`: `model` names one of the caller's namespace (a bare name
    /// is in it); another namespace's is refused.
    pub fn copied(&self, namespace: &str) -> Result<String, ChangeError> {
        let model = self.model.as_deref().unwrap_or_default();
        match model.split_once('/') {
            Some((ns, _)) if ns != namespace => Err(ChangeError::Invalid(format!(
                "model {model}: a deployment copies one of its own namespace ({namespace})"
            ))),
            Some(_) => Ok(model.to_owned()),
            None => Ok(crate::spec::key(namespace, model)),
        }
    }

    /// What the change sets in a `ModelDeployment`, as a JSON merge patch: `spec.scaling.minReplicas` and
    /// `maxReplicas`, and `spec.gpu.models` (the one GPU model of `fleet_models` whose [`sku`] is `hardware`; a SKU
    /// that is none of them is refused, naming those there are).
    pub fn spec_patch(&self, fleet_models: &[String]) -> Result<serde_json::Value, ChangeError> {
        let mut patch = serde_json::json!({ "spec": {} });
        if let Some(n) = self.min_instances {
            patch["spec"]["scaling"]["minReplicas"] = n.into();
        }
        if let Some(n) = self.max_instances {
            patch["spec"]["scaling"]["maxReplicas"] = n.into();
        }
        if let Some(hardware) = &self.hardware {
            let mut models: Vec<&String> = fleet_models.iter().collect();
            models.sort();
            models.dedup();
            let Some(model) = models.iter().find(|m| sku(m) == *hardware) else {
                let skus: Vec<String> = models.iter().map(|m| sku(m)).collect();
                return Err(ChangeError::Invalid(format!(
                    "hardware {hardware} is not in this fleet (GET /v1/hardware: {})",
                    skus.join(", ")
                )));
            };
            patch["spec"]["gpu"]["models"] = serde_json::json!([model]);
        }
        Ok(patch)
    }
}

/// Merges a JSON merge patch (RFC 7386) into `target`: objects field by field, `null` removes, anything else
/// replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    if let serde_json::Value::Object(into) = target {
        for (name, value) in fields {
            if value.is_null() {
                into.remove(name);
            } else {
                merge_patch(into.entry(name.clone()).or_insert(serde_json::Value::Null), value);
            }
        }
    }
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
    fn a_change_becomes_a_merge_patch_and_hardware_must_be_in_the_fleet() {
        let fleet = ["NVIDIA H100 80GB HBM3".to_owned(), "NVIDIA H200".to_owned(), "NVIDIA H200".to_owned()];
        let change = DeploymentChange {
            name: "copy".into(),
            kind: ChangeKind::Update,
            model: None,
            hardware: Some("gpu-h200".into()),
            min_instances: Some(1),
            max_instances: None,
        };
        let patch = change.spec_patch(&fleet).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({ "spec": { "scaling": { "minReplicas": 1 }, "gpu": { "models": ["NVIDIA H200"] } } })
        );
        let mut object = serde_json::json!({ "spec": { "scaling": { "minReplicas": 0, "maxReplicas": 4 }, "x": 1 } });
        merge_patch(&mut object, &patch);
        merge_patch(&mut object, &serde_json::json!({ "spec": { "x": null } }));
        assert_eq!(
            object,
            serde_json::json!({ "spec": { "scaling": { "minReplicas": 1, "maxReplicas": 4 },
                                          "gpu": { "models": ["NVIDIA H200"] } } })
        );
        let bad = DeploymentChange { hardware: Some("gpu-a100".into()), ..change.clone() };
        assert_eq!(
            bad.spec_patch(&fleet).unwrap_err().to_string(),
            "hardware gpu-a100 is not in this fleet (GET /v1/hardware: gpu-h100-80gb-hbm3, gpu-h200)"
        );
        let copy = |model: &str| DeploymentChange { model: Some(model.into()), ..change.clone() }.copied("ns");
        assert_eq!((copy("m").unwrap(), copy("ns/m").unwrap()), ("ns/m".to_owned(), "ns/m".to_owned()));
        assert!(matches!(copy("other/m"), Err(ChangeError::Invalid(_))));
    }

    #[test]
    fn skus_are_the_product_names_words_without_the_vendor() {
        assert_eq!(sku("NVIDIA H100 80GB HBM3"), "gpu-h100-80gb-hbm3");
        assert_eq!(sku("NVIDIA H200"), "gpu-h200");
        assert_eq!(sku("Tesla T4"), "gpu-tesla-t4");
        assert_eq!(sku(""), "gpu");
    }
}
