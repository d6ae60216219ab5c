//! Replicate's deployment changes: `POST /v1/deployments` (create), `PATCH /v1/deployments/{owner}/{name}`
//! (update) and `DELETE /v1/deployments/{owner}/{name}` (delete), carried out by the [`Catalog`]'s spec source
//! (`kiln up`: a manifest in its directory; Kubernetes mode: the `ModelDeployment` resource, `k8s::changes`; a spec
//! source that cannot: 501). A tenant's key changes its own
//! namespace's deployments; an operator's key, which belongs to no namespace, changes none. The answer comes
//! once the control plane serves the change (at most [`SERVED_WITHIN`] later): the deployment in Replicate's shape
//! (create and update) or 204 (delete).

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{
    Backend, Caller, Catalog, Gateway,
    catalog::{ChangeError, ChangeKind, DeploymentChange, DeploymentInfo, sku},
    listing::deployment_json,
    routes::problem,
};

/// Longest a change waits for the control plane to serve it.
pub const SERVED_WITHIN: Duration = Duration::from_secs(10);

/// Why a change request is refused before it reaches the spec source (400).
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is not a JSON object: {0}")]
    NotJson(String),
    #[error("{field} must be {what}, not {value}")]
    Field { field: &'static str, what: &'static str, value: Value },
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("name {0:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.', at most 253)")]
    Name(String),
}

/// Whether `name` is a DNS-1123 subdomain, as a `ModelDeployment`'s name must be (so it is also safe in a file
/// name: no `/`, no `..`).
fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn text(body: &Value, field: &'static str) -> Result<Option<String>, BodyError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(BodyError::Field { field, what: "a string", value: v.clone() }),
    }
}

fn count(body: &Value, field: &'static str) -> Result<Option<u32>, BodyError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or_else(|| BodyError::Field {
            field,
            what: "a whole number",
            value: v.clone(),
        }),
    }
}

/// The change a body asks for.
fn parse(kind: ChangeKind, name: Option<String>, body: &[u8]) -> Result<DeploymentChange, BodyError> {
    let body: Value = if body.is_empty() && kind == ChangeKind::Delete {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?
    };
    if !body.is_object() {
        return Err(BodyError::NotJson(body.to_string()));
    }
    let name = match name {
        Some(n) => n,
        // The Python client strips an `owner/` prefix; a name with one is taken the same way.
        None => text(&body, "name")?
            .map(|n| n.rsplit('/').next().unwrap_or_default().to_owned())
            .ok_or(BodyError::Missing("name"))?,
    };
    if !valid_name(&name) {
        return Err(BodyError::Name(name));
    }
    let model = text(&body, "model")?;
    if kind == ChangeKind::Create && model.is_none() {
        return Err(BodyError::Missing("model"));
    }
    // `version` is accepted and not used: a deployment's version is its spec's.
    text(&body, "version")?;
    Ok(DeploymentChange {
        name,
        kind,
        model,
        hardware: text(&body, "hardware")?,
        min_instances: count(&body, "min_instances")?,
        max_instances: count(&body, "max_instances")?,
    })
}

impl IntoResponse for ChangeError {
    fn into_response(self) -> Response {
        let status = match self {
            Self::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        problem(status, self.to_string())
    }
}

/// Whether `d` (`None`: not served) shows `change`.
fn shows(d: Option<&DeploymentInfo>, change: &DeploymentChange) -> bool {
    match (change.kind, d) {
        (ChangeKind::Delete, d) => d.is_none(),
        (_, None) => false,
        (_, Some(d)) => {
            change.min_instances.is_none_or(|n| n == d.min_instances)
                && change.max_instances.is_none_or(|n| n == d.max_instances)
                && change.hardware.as_ref().is_none_or(|h| d.gpu_model.as_deref().map(sku).as_ref() == Some(h))
        }
    }
}

/// Carries out `change` in `namespace` and waits until it is served.
async fn carry_out<B: Backend>(
    gw: &Arc<Gateway<B>>,
    headers: &HeaderMap,
    owner: Option<&str>,
    change: DeploymentChange,
) -> Response {
    let namespace = match gw.caller(headers) {
        None => return gw.unauthorized(),
        Some(Caller::Operator) => {
            let detail = "an operator key belongs to no namespace: change deployments with the namespace's key";
            return problem(StatusCode::FORBIDDEN, detail);
        }
        Some(Caller::Tenant(ns)) => ns,
    };
    if owner.is_some_and(|o| o != namespace) {
        let detail = format!("this API key does not give access to namespace {}", owner.unwrap_or_default());
        return problem(StatusCode::FORBIDDEN, detail);
    }
    let catalog: Arc<dyn Catalog> = Arc::clone(&gw.catalog);
    let (ns, ch) = (namespace.clone(), change.clone());
    match tokio::task::spawn_blocking(move || catalog.change(&ns, &ch)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("the change did not finish: {e}")),
    }
    let key = format!("{namespace}/{}", change.name);
    let deadline = tokio::time::Instant::now() + SERVED_WITHIN;
    loop {
        let d = gw.catalog.deployment(&key);
        if shows(d.as_ref(), &change) {
            return match d {
                Some(d) => Json(deployment_json(&d)).into_response(),
                None => StatusCode::NO_CONTENT.into_response(),
            };
        }
        if tokio::time::Instant::now() > deadline {
            let detail = format!(
                "the change to {key} was written but is not served after {} s: GET /kiln/v1/deployments says why",
                SERVED_WITHIN.as_secs()
            );
            return problem(StatusCode::INTERNAL_SERVER_ERROR, detail);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/deployments`: `{"name", "model", "version", "hardware", "min_instances", "max_instances"}`.
pub(super) async fn create<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    match parse(ChangeKind::Create, None, &body) {
        Ok(change) => carry_out(&gw, &headers, None, change).await,
        Err(e) => problem(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `PATCH /v1/deployments/{owner}/{name}`: any of `hardware`, `min_instances`, `max_instances` (and `version`).
pub(super) async fn update<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    match parse(ChangeKind::Update, Some(name), &body) {
        Ok(change) => carry_out(&gw, &headers, Some(&owner), change).await,
        Err(e) => problem(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `DELETE /v1/deployments/{owner}/{name}`: 204 once it is no longer served.
pub(super) async fn delete<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    match parse(ChangeKind::Delete, Some(name), &body) {
        Ok(change) => carry_out(&gw, &headers, Some(&owner), change).await,
        Err(e) => problem(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_changes_or_say_what_is_wrong() {
        let create = parse(
            ChangeKind::Create,
            None,
            br#"{"name": "ns/copy", "model": "ns/mlp", "version": "x", "hardware": "gpu-h100", "min_instances": 0, "max_instances": 3}"#,
        )
        .unwrap();
        assert_eq!(create.name, "copy", "an owner/ prefix is dropped");
        assert_eq!(
            (create.model.as_deref(), create.hardware.as_deref(), create.min_instances, create.max_instances),
            (Some("ns/mlp"), Some("gpu-h100"), Some(0), Some(3))
        );
        let update = parse(ChangeKind::Update, Some("m".into()), br#"{"max_instances": 2}"#).unwrap();
        assert_eq!((update.max_instances, update.min_instances, update.hardware), (Some(2), None, None));
        assert!(parse(ChangeKind::Delete, Some("m".into()), b"").is_ok());
        let error = |kind, body: &[u8]| parse(kind, None, body).unwrap_err().to_string();
        assert_eq!(error(ChangeKind::Create, br#"{"model": "a/b"}"#), "name is required");
        assert_eq!(error(ChangeKind::Create, br#"{"name": "n"}"#), "model is required");
        assert_eq!(
            error(ChangeKind::Create, br#"{"name": "n", "model": "a/b", "max_instances": -1}"#),
            "max_instances must be a whole number, not -1"
        );
        assert!(error(ChangeKind::Create, b"[]").starts_with("the body is not a JSON object"));
        for bad in ["..", "a..b", "A", "-a", "a_b", "", "ns/"] {
            let body = serde_json::to_vec(&serde_json::json!({ "name": bad, "model": "m" })).unwrap();
            assert!(error(ChangeKind::Create, &body).starts_with("name "), "{bad:?}");
        }
        assert!(valid_name("mlp-demo.v2") && valid_name(&"a".repeat(63)) && !valid_name(&"a".repeat(64)));
    }
}
