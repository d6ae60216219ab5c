//! Replicate's deployments API in Kubernetes mode: a create, update or delete through the gateway is written as the
//! `ModelDeployment` resource in the key's namespace — created (a copy of the deployment `model` names, with the
//! scaling and hardware asked for), merge-patched, or deleted. Before a create or a patch is sent, the object the
//! apiserver would store is checked with the offline validator (`kiln_k8s_api::validate`: the generated CRD schema
//! and its CEL rules, transition rules against the live object), as `kubectl apply` would be checked, so a bad
//! change is refused with the apiserver's message without a round trip; the apiserver's own refusals map to the
//! same Replicate-shaped errors ([`api_error`]). The control plane serves the change once the reconciler sees it.
//! A patch carries the live object's `resourceVersion`, so what was validated is what gets changed (a concurrent
//! write makes it a 409).

use kiln_k8s_api::{model_deployment::ModelDeployment, validate::Validator};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::gateway::{ChangeError, ChangeKind, DeploymentChange, merge_patch};

/// The field manager of the gateway's writes (`metadata.managedFields`).
pub const FIELD_MANAGER: &str = "kiln-gateway";

/// Writes deployment changes to the Kubernetes API.
#[derive(Clone)]
pub struct KubeDeployments {
    client: Client,
    validator: std::sync::Arc<Validator>,
}

impl std::fmt::Debug for KubeDeployments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDeployments").finish_non_exhaustive()
    }
}

impl KubeDeployments {
    /// Changes written through `client`.
    pub fn new(client: Client) -> Self {
        Self { client, validator: std::sync::Arc::new(Validator::default()) }
    }

    /// Carries out `change` in `namespace`; `fleet_models` are the GPU models a `hardware` SKU may name.
    pub async fn change(
        &self,
        namespace: &str,
        change: &DeploymentChange,
        fleet_models: &[String],
    ) -> Result<(), ChangeError> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), namespace);
        let key = crate::spec::key(namespace, &change.name);
        match change.kind {
            ChangeKind::Delete => {
                api.delete(&change.name, &DeleteParams::default()).await.map_err(|e| api_error(e, &key))?;
                Ok(())
            }
            ChangeKind::Update => {
                let live = api.get(&change.name).await.map_err(|e| api_error(e, &key))?;
                let live = to_value(&live)?;
                let mut patch = change.spec_patch(fleet_models)?;
                patch["metadata"] = json!({ "resourceVersion": live["metadata"]["resourceVersion"] });
                let mut stored = live.clone();
                merge_patch(&mut stored, &patch);
                self.validator
                    .validate_update(&stored, Some(&live))
                    .map_err(|e| ChangeError::Invalid(e.to_string()))?;
                let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
                api.patch(&change.name, &params, &Patch::Merge(&patch)).await.map_err(|e| api_error(e, &key))?;
                Ok(())
            }
            ChangeKind::Create => {
                let source = change.copied(namespace)?;
                let (source_ns, source_name) = source.split_once('/').unwrap_or((namespace, source.as_str()));
                let copied = Api::<ModelDeployment>::namespaced(self.client.clone(), source_ns)
                    .get(source_name)
                    .await
                    .map_err(|e| match e {
                        kube::Error::Api(s) if s.is_not_found() => ChangeError::Invalid(format!(
                            "model {}: no deployment {source} to copy (a model here is a deployment; write a \
                             ModelDeployment for a new model source)",
                            change.model.as_deref().unwrap_or_default()
                        )),
                        other => api_error(other, &source),
                    })?;
                let mut object = to_value(&copied)?;
                // A new object: its own name, nothing else of the copied one's metadata, no status.
                object["metadata"] = json!({ "name": change.name, "namespace": namespace });
                if let Some(fields) = object.as_object_mut() {
                    fields.remove("status");
                }
                merge_patch(&mut object, &change.spec_patch(fleet_models)?);
                self.validator.validate(&object).map_err(|e| ChangeError::Invalid(e.to_string()))?;
                let resource: ModelDeployment =
                    serde_json::from_value(object).map_err(|e| ChangeError::Invalid(e.to_string()))?;
                let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
                api.create(&params, &resource).await.map_err(|e| api_error(e, &key))?;
                Ok(())
            }
        }
    }
}

fn to_value(resource: &ModelDeployment) -> Result<Value, ChangeError> {
    serde_json::to_value(resource).map_err(|e| ChangeError::Io(e.to_string()))
}

/// The Replicate-shaped error of a Kubernetes API failure about deployment `key`: not found (404), exists already
/// or changed meanwhile (409), invalid (422, the apiserver's message), forbidden (403: the caller's, or the
/// controller's RBAC), anything else (500, saying it was the Kubernetes API).
pub fn api_error(error: kube::Error, key: &str) -> ChangeError {
    match error {
        kube::Error::Api(s) if s.is_not_found() => ChangeError::NotFound(key.to_owned()),
        kube::Error::Api(s) if s.is_already_exists() => {
            ChangeError::Conflict(format!("deployment {key} exists already"))
        }
        kube::Error::Api(s) if s.is_conflict() => {
            ChangeError::Conflict(format!("deployment {key} changed meanwhile; read it and try again ({})", s.message))
        }
        kube::Error::Api(s) if s.is_invalid() || s.code == 422 || s.code == 400 => ChangeError::Invalid(s.message),
        kube::Error::Api(s) if s.is_forbidden() => {
            ChangeError::Forbidden(format!("the Kubernetes API refused the change to {key}: {}", s.message))
        }
        other => ChangeError::Io(format!("the Kubernetes API, changing {key}: {other}")),
    }
}
