//! `GET /v1/account` (the key's namespace, as a Replicate organization) and `GET /v1/hardware` (the fleet's GPU
//! models as Replicate's hardware: `[{"name", "sku"}]`).

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Backend, Caller, Gateway, OPERATOR, catalog::sku};

/// An account in Replicate's shape: a namespace is an organization named as it is.
pub(super) fn account_json(namespace: &str) -> Value {
    json!({ "type": "organization", "username": namespace, "name": namespace, "github_url": null })
}

/// `GET /v1/account`: the namespace of the caller's key (an operator key's is `*`, named "operator").
pub(super) async fn account<B: Backend>(State(gw): State<Arc<Gateway<B>>>, headers: HeaderMap) -> Response {
    match gw.caller(&headers) {
        None => gw.unauthorized(),
        Some(Caller::Tenant(ns)) => Json(account_json(&ns)).into_response(),
        Some(Caller::Operator) => {
            let mut account = account_json(OPERATOR);
            account["name"] = json!("operator");
            Json(account).into_response()
        }
    }
}

/// `GET /v1/hardware`: each GPU model of the fleet once, by name, with its SKU (what a deployment's
/// `configuration.hardware` says).
pub(super) async fn hardware<B: Backend>(State(gw): State<Arc<Gateway<B>>>, headers: HeaderMap) -> Response {
    if gw.caller(&headers).is_none() {
        return gw.unauthorized();
    }
    let mut models = gw.catalog.gpu_models();
    models.sort();
    models.dedup();
    let list: Vec<Value> = models.iter().map(|m| json!({ "name": m, "sku": sku(m) })).collect();
    Json(list).into_response()
}
