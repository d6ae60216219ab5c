//! The `ModelDeployment` reconciler (the shape of kube-rs/controller-rs): `reconcile` wrapped in `finalizer()`,
//! one `error_policy`, status through server-side apply under one field manager, Events only on transitions.
//!
//! Apply: the spec is translated at the spec port ([`crate::spec`]) and handed to the control plane (which places,
//! scales and commands agents); its status — computed by [`super::status`] from the control plane's view — is
//! applied when it differs from what the object shows, with the Events its transitions deserve; the object is
//! requeued every few seconds so the status follows replicas that come and go without a spec change. A spec that
//! passed the schema but cannot be served is withdrawn from the control plane, the status says why (`Degraded`,
//! `Scheduled=False` with reason `InvalidSpec`) and the reconcile fails with [`Error::InvalidSpec`]. Cleanup (the
//! object is being deleted): the deployment leaves the control plane, its replicas stop, and the finalizer is
//! removed.
//!
//! Errors: each [`Error`] has a [`category`](Error::category) (the metric label and, as [`reason`](Error::reason),
//! the Event reason) and says whether it [is retryable](Error::is_retryable). A failed reconcile counts in
//! `kiln_reconcile_errors_total{category}` and publishes a Warning Event on the object — once per distinct error
//! (category and message) until a reconcile of that object succeeds again, not on every retry. [`error_policy`]
//! then picks the wait per object ([`Failures`]): a retryable error backs off exponentially from
//! [`BACKOFF_START`] to [`BACKOFF_MAX`]; one that is not (an invalid spec) waits [`NOT_RETRYABLE_WAIT`] — a change
//! of the object reconciles it sooner. A successful reconcile forgets the object's failures.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kiln_k8s_api::model_deployment::{DeploymentState, ModelDeployment, ModelDeploymentStatus};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{self, Event as Finalizer, finalizer},
        reflector::ObjectRef,
    },
};
use serde_json::json;

use super::status::{EventSpec, deployment_status, transitions};
use crate::{
    control::ControlPlane,
    spec::{self, SpecError},
};

/// The finalizer Kiln puts on every `ModelDeployment` it serves.
pub const FINALIZER: &str = "kiln.dev/cleanup";
/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "kiln-controller";
/// How often a served deployment's status is refreshed without a spec change.
pub const REFRESH: Duration = Duration::from_secs(5);
/// The wait after an object's first retryable error; it doubles with each consecutive one.
pub const BACKOFF_START: Duration = Duration::from_secs(5);
/// The longest wait between retries of a retryable error.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The wait after an error that is not retryable (a change of the object reconciles it sooner).
pub const NOT_RETRYABLE_WAIT: Duration = Duration::from_secs(3600);
/// The longest Event note the API server takes, bytes.
const MAX_NOTE_BYTES: usize = 1024;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer machinery failed (adding or removing the finalizer).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// The object has no namespace (ModelDeployment is namespaced: a malformed event).
    #[error("ModelDeployment without a namespace")]
    NoNamespace,
    /// The spec passed the schema but cannot be served.
    #[error("the spec cannot be served: {0}")]
    InvalidSpec(#[from] SpecError),
}

/// The category of a Kubernetes API error: a conflict (409: someone else changed the object), or any other
/// failure to talk to the API server.
fn kube_category(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.code == 409 => "conflict",
        _ => "apiserver",
    }
}

impl Error {
    /// The category, a stable label (metric label; the Event reason is [`Error::reason`]): `invalid_spec`,
    /// `apiserver`, `conflict` or `internal`.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(e) => kube_category(e),
            Error::Finalizer(e) => match &**e {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.category(),
                finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => kube_category(e),
                finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => "internal",
            },
            Error::NoNamespace => "internal",
            Error::InvalidSpec(e) => e.category(),
        }
    }

    /// The Event reason of the category (UpperCamelCase).
    pub fn reason(&self) -> &'static str {
        match self.category() {
            "invalid_spec" => "InvalidSpec",
            "apiserver" => "ApiServerError",
            "conflict" => "Conflict",
            _ => "InternalError",
        }
    }

    /// Whether trying again without a change to the object may succeed: API server errors and conflicts are; an
    /// invalid spec and a malformed object are not.
    pub fn is_retryable(&self) -> bool {
        matches!(self.category(), "apiserver" | "conflict")
    }
}

/// The wait before the next try after `consecutive` failures in a row (from 1) of retryable errors:
/// [`BACKOFF_START`] doubling to [`BACKOFF_MAX`].
pub fn backoff(consecutive: u32) -> Duration {
    let doublings = consecutive.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// What the reconciler remembers of an object's failures since its last successful reconcile.
#[derive(Debug, Default)]
struct Failing {
    /// Failed reconciles in a row.
    consecutive: u32,
    /// The last error published as an Event: (category, message).
    published: Option<(&'static str, String)>,
}

/// The failures of each object, for its backoff and to publish each distinct error once.
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<ObjectRef<ModelDeployment>, Failing>>);

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<ModelDeployment>, Failing>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reconcile of `object` succeeded: its backoff starts over and its errors are news again.
    pub fn succeeded(&self, object: &ObjectRef<ModelDeployment>) {
        self.lock().remove(object);
    }

    /// Whether `error` differs from the error last published for `object`; if so it is recorded as published.
    pub fn is_news(&self, object: &ObjectRef<ModelDeployment>, error: &Error) -> bool {
        let seen = (error.category(), error.to_string());
        let mut failures = self.lock();
        let failing = failures.entry(object.clone()).or_default();
        if failing.published.as_ref() == Some(&seen) {
            return false;
        }
        failing.published = Some(seen);
        true
    }

    /// Counts a failure of `object` and returns the wait before its next try.
    pub fn failed(&self, object: &ObjectRef<ModelDeployment>, error: &Error) -> Duration {
        let mut failures = self.lock();
        let failing = failures.entry(object.clone()).or_default();
        failing.consecutive = failing.consecutive.saturating_add(1);
        if error.is_retryable() { backoff(failing.consecutive) } else { NOT_RETRYABLE_WAIT }
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
    /// Each object's failures (backoff, Events published).
    failures: Arc<Failures>,
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
        Self { recorder: Recorder::new(client.clone(), reporter), client, control, failures: Arc::default() }
    }
}

/// Reconciles one `ModelDeployment`; a failure is counted and, when it is news, published as a Warning Event
/// before it is returned (see the module docs).
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let object = ObjectRef::from_obj(&*md);
    let result = reconcile_object(Arc::clone(&md), &ctx).await;
    match &result {
        Ok(_) => ctx.failures.succeeded(&object),
        Err(error) => {
            ctx.control.metrics().reconcile_error(error.category());
            if ctx.failures.is_news(&object, error) {
                publish_error(&md, error, &ctx).await;
            }
        }
    }
    result
}

async fn reconcile_object(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action, Error> {
    let namespace = md.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, md, |event| async {
        match event {
            Finalizer::Apply(md) => apply(&md, ctx, &api).await,
            Finalizer::Cleanup(md) => {
                let key = spec::key(&md.namespace().unwrap_or_default(), &md.name_any());
                ctx.control.remove(&key);
                tracing::info!(deployment = %key, "deleted: its replicas stop");
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    })
}

async fn apply(md: &ModelDeployment, ctx: &Context, api: &Api<ModelDeployment>) -> Result<Action, Error> {
    let key = spec::key(&md.namespace().unwrap_or_default(), &md.name_any());
    let generation = md.meta().generation;
    let version = generation.map_or_else(|| "0".to_owned(), |g| g.to_string());
    match spec::translate(key.clone(), version, &md.spec) {
        Ok(served) => {
            ctx.control.upsert(served);
            let view = ctx.control.view(&key).unwrap_or_default();
            let status = deployment_status(generation, Ok(&view), md.status.as_ref(), Timestamp::now());
            write_status(api, md, status, ctx).await?;
            Ok(Action::requeue(REFRESH))
        }
        Err(invalid) => {
            ctx.control.withdraw(&key);
            let status = deployment_status(generation, Err(&invalid), md.status.as_ref(), Timestamp::now());
            write_status(api, md, status, ctx).await?;
            Err(Error::InvalidSpec(invalid))
        }
    }
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

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Publishes `error` as a Warning Event on `md` (reason from its category); a failure to publish is logged.
async fn publish_error(md: &ModelDeployment, error: &Error, ctx: &Context) {
    let event = Event {
        type_: EventType::Warning,
        reason: error.reason().into(),
        note: Some(truncated(error.to_string(), MAX_NOTE_BYTES)),
        action: "Reconciling".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

/// The wait before the next reconcile of a failed object: exponential backoff per object for a retryable error,
/// [`NOT_RETRYABLE_WAIT`] for one that is not (see the module docs). The error was counted and published by
/// [`reconcile`].
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.failures.failed(&ObjectRef::from_obj(&*md), error);
    tracing::warn!(deployment = %md.name_any(), namespace = md.namespace().unwrap_or_default(),
        category = error.category(), retryable = error.is_retryable(), retry_in_s = wait.as_secs(), %error,
        "reconcile failed");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_five_seconds_to_five_minutes() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncated("abc".into(), 5), "abc");
        assert_eq!(truncated("aé".into(), 2), "a", "é is two bytes");
    }

    #[test]
    fn categories_and_retryability() {
        let conflict = kube::Error::Api(Box::new(kube::core::Status::failure("modified", "Conflict").with_code(409)));
        let conflict = Error::Kube(conflict);
        assert_eq!((conflict.category(), conflict.reason(), conflict.is_retryable()), ("conflict", "Conflict", true));
        let unavailable =
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status::failure("down", "").with_code(503))));
        assert_eq!((unavailable.category(), unavailable.is_retryable()), ("apiserver", true));
        let finalizer = Error::Finalizer(Box::new(finalizer::Error::UnnamedObject));
        assert_eq!((finalizer.category(), finalizer.is_retryable()), ("internal", false));
        assert_eq!((Error::NoNamespace.category(), Error::NoNamespace.reason()), ("internal", "InternalError"));
    }
}
