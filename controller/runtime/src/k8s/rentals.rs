//! The `GpuRental` reconciler: the same shape as the `ModelDeployment` one ([`super::reconcile`]) — `finalizer()`,
//! status through server-side apply under the one field manager, Events on transitions.
//!
//! Apply: the spec (and the lifecycle its status recorded, so that a restarted or newly elected controller resumes
//! the rental instead of delivering and billing it again) goes to the control plane at the spec port
//! ([`crate::spec::translate_rental`]); the status — computed without I/O by [`super::status::rental_status`] from the
//! control plane's view — is applied when it differs, the lifecycle's events since the last pass (Fenced, Delivered,
//! ExpiringSoon, Expired, Cancelled, Failed, Degraded, Recovered) are published as Events on the object, and the
//! object is requeued every few seconds so the status follows the lifecycle's clock. Cleanup (the object is being
//! deleted): a cancel — the control plane releases the GPUs, free before delivery, started hours billed after.

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kiln_core::rental::RentalEvent;
use kiln_k8s_api::GpuRental;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        finalizer::{self, Event as Finalizer, finalizer},
    },
};
use serde_json::json;

use super::{
    reconcile::{Context, Error, FIELD_MANAGER, FINALIZER},
    status::rental_status,
};
use crate::spec;

/// How often a rental's status is refreshed without a spec change.
pub const RENTAL_REFRESH: Duration = Duration::from_secs(5);

/// Reconciles one `GpuRental`.
pub async fn reconcile_rental(rental: Arc<GpuRental>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = reconcile_object(rental, &ctx).await;
    if let Err(error) = &result {
        ctx.control.metrics().reconcile_error(error.category());
    }
    result
}

async fn reconcile_object(rental: Arc<GpuRental>, ctx: &Context) -> Result<Action, Error> {
    let namespace = rental.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<GpuRental> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, rental, |event| async {
        match event {
            Finalizer::Apply(r) => apply(&r, ctx, &api).await,
            Finalizer::Cleanup(r) => {
                let key = spec::key(&r.namespace().unwrap_or_default(), &r.name_any());
                ctx.control.remove_rental(&key);
                tracing::info!(rental = %key, "deleted: cancelled, its GPUs return to the pool");
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

async fn apply(rental: &GpuRental, ctx: &Context, api: &Api<GpuRental>) -> Result<Action, Error> {
    let namespace = rental.namespace().unwrap_or_default();
    let name = rental.name_any();
    let created = rental
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or_else(crate::control::wall_now, |t| t.0.as_millisecond() as f64 / 1000.0);
    let served = spec::translate_rental(&namespace, &name, &rental.spec, rental.status.as_ref(), created);
    let key = served.key.clone();
    ctx.control.upsert_rental(served);
    // The loop steps rentals on its own clock; the status shows what it decided so far.
    let view = ctx.control.rental_view(&key);
    let price = view.as_ref().and_then(|v| ctx.control.gpu_price(&v.gpu_model));
    let currency = ctx.control.currency();
    let status = rental_status(
        rental.meta().generation,
        view.as_ref(),
        price.as_ref(),
        &currency,
        rental.status.as_ref(),
        Timestamp::now(),
    );
    if rental.status.as_ref() != Some(&status) {
        let patch = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuRental", "status": status });
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    let reference = rental.object_ref(&());
    for event in ctx.control.take_rental_events(&key) {
        let RentalEvent::Notice { warning, reason, message } = event else { continue };
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(message),
            action: "Renting".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }
    Ok(Action::requeue(RENTAL_REFRESH))
}

/// Waits and retries: a rental's errors are API errors (a conflict, the API server away).
pub fn rental_error_policy(_rental: Arc<GpuRental>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconciling a rental");
    Action::requeue(if error.is_retryable() { Duration::from_secs(5) } else { Duration::from_secs(300) })
}
