//! The `ModelDeployment` reconciler (the shape of kube-rs/controller-rs): `reconcile` wrapped in `finalizer()`,
//! one `error_policy`, status through server-side apply under one field manager, Events only on transitions.
//!
//! Apply: the deployment is handed to the control plane (which places, scales and commands agents); its status —
//! computed by [`super::status`] from the control plane's view — is applied when it differs from what the object
//! shows, with the Events its transitions deserve; the object is requeued every few seconds so the status follows
//! replicas that come and go without a spec change. Cleanup (the object is being deleted): the deployment leaves
//! the control plane, its replicas stop, and the finalizer is removed.

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kiln_k8s_api::model_deployment::{DeploymentState, ModelDeployment, ModelDeploymentStatus};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
    },
};
use serde_json::json;

use super::status::{EventSpec, deployment_status, transitions};
use crate::{control::ControlPlane, manifests::Deployment};

/// The finalizer Kiln puts on every `ModelDeployment` it serves.
pub const FINALIZER: &str = "kiln.dev/cleanup";
/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "kiln-controller";
/// How often a served deployment's status is refreshed without a spec change.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The object has no namespace (ModelDeployment is namespaced: a malformed event).
    #[error("ModelDeployment without a namespace")]
    NoNamespace,
}

impl Error {
    /// The category (Event reason and metric label).
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::Finalizer(_) => "FinalizerError",
            Error::NoNamespace => "Malformed",
        }
    }
}

/// What the reconciler needs.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The control plane.
    pub control: Arc<ControlPlane>,
    /// Publishes Events.
    pub recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

impl Context {
    /// A context reporting Events as `kiln-controller` (instance `instance`, e.g. the pod name).
    pub fn new(client: Client, control: Arc<ControlPlane>, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance };
        Self { recorder: Recorder::new(client.clone(), reporter), client, control }
    }
}

/// Reconciles one `ModelDeployment`.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = md.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, md, |event| async {
        match event {
            Finalizer::Apply(md) => apply(&md, &ctx, &api).await,
            Finalizer::Cleanup(md) => {
                let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
                ctx.control.remove(&key);
                tracing::info!(deployment = %key, "deleted: its replicas stop");
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(md: &ModelDeployment, ctx: &Context, api: &Api<ModelDeployment>) -> Result<Action, Error> {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let generation = md.meta().generation;
    let deployment = Deployment {
        namespace: namespace.clone(),
        name: name.clone(),
        version: generation.map_or_else(|| "0".to_owned(), |g| g.to_string()),
        resource: md.clone(),
        file: Default::default(),
    };
    let key = deployment.key();
    let view = match ctx.control.upsert(&deployment) {
        Ok(()) => ctx.control.view(&key).unwrap_or_default(),
        Err(why) => super::status::DeploymentView { invalid: Some(why), ..Default::default() },
    };
    let status = deployment_status(generation, &view, md.status.as_ref(), Timestamp::now());
    write_status(api, md, status, ctx).await?;
    Ok(Action::requeue(REFRESH))
}

/// Applies `status` if it differs from the object's (ignoring condition timestamps), then publishes the Events of
/// the transition.
pub async fn write_status(
    api: &Api<ModelDeployment>,
    md: &ModelDeployment,
    status: ModelDeploymentStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let previous = md.status.as_ref();
    if previous == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "status": status,
    });
    api.patch_status(&md.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    let reference = md.object_ref(&());
    for EventSpec { warning, reason, note } in transitions(previous, &status) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason,
            note: Some(note),
            action: if status.state == Some(DeploymentState::Degraded) { "Scheduling" } else { "Scaling" }.into(),
            secondary: None,
        };
        // An Event that cannot be written is logged, never fails the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }
    Ok(())
}

/// Requeues a failed reconcile after a pause; the error's category is logged.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %md.name_any(), category = error.category(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}
