//! Replicate's models, where a model is a deployment (its namespace the owner): `GET /v1/models/{owner}/{name}`
//! describes it, `POST /v1/models/{owner}/{name}/predictions` runs it (the deployments' create handler); and the
//! answers for what a serving platform without model versions does not serve: a 501 (or, for an unknown path,
//! a 404) whose `detail` names it and says what to use instead.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{Backend, Gateway, routes::problem};

/// `GET /v1/models/{owner}/{name}`: the deployment in Replicate's model shape (`description`, `latest_version`
/// and the URLs `null`, `visibility` `private`, `run_count` its predictions received).
pub(super) async fn model<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let d = match gw.described(&headers, &owner, &name) {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    Json(json!({
        "url": format!("{}/v1/models/{owner}/{name}", gw.base_url),
        "owner": owner,
        "name": name,
        "description": null,
        "visibility": "private",
        "github_url": null,
        "paper_url": null,
        "license_url": null,
        "run_count": d.run_count,
        "cover_image_url": null,
        "default_example": null,
        "latest_version": null,
    }))
    .into_response()
}

/// What an unsupported part of Replicate's API is, by its path: `(what, why or what to use)`.
fn unsupported(method: &Method, path: &str) -> Option<(&'static str, &'static str)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    const RUN: &str = "Kiln serves deployments, each its own model; run one with POST \
                       /v1/models/{owner}/{name}/predictions or /v1/deployments/{owner}/{name}/predictions";
    Some(match parts.as_slice() {
        ["v1", "trainings", ..] | ["v1", "models", _, _, "versions", _, "trainings"] => {
            ("trainings", "Kiln serves models; it does not train them")
        }
        ["v1", "models", _, _, "versions", ..] => ("model versions", RUN),
        ["v1", "models", _, _, "examples", ..] => ("model examples", RUN),
        ["v1", "models", _, _, "readme"] => ("model READMEs", RUN),
        ["v1", "models", _, _] if method == Method::DELETE => {
            ("deleting models", "delete the ModelDeployment (kubectl delete, or its manifest under kiln up)")
        }
        ["v1", "models"] => ("listing and creating models", "list deployments with GET /v1/deployments"),
        ["v1", "predictions"] if method == Method::POST => ("predictions of a model version", RUN),
        ["v1", "files", ..] => ("the files API", "pass inputs inline in the prediction's JSON (data: URLs)"),
        ["v1", "collections", ..] => ("collections", "list deployments with GET /v1/deployments"),
        ["v1", "search", ..] => ("search", "list deployments with GET /v1/deployments"),
        _ => return None,
    })
}

/// Every request no route takes: 501 naming the unsupported part of Replicate's API it belongs to, else 404 (405
/// is not told apart: a method a path does not take is answered here too).
pub(super) async fn fallback(method: Method, uri: Uri) -> Response {
    match unsupported(&method, uri.path()) {
        Some((what, instead)) => {
            problem(StatusCode::NOT_IMPLEMENTED, format!("not supported by Kiln's gateway: {what}. {instead}"))
        }
        None => problem(StatusCode::NOT_FOUND, format!("{method} {} is not an endpoint of this API", uri.path())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_parts_are_named() {
        let name = |m: Method, p: &str| unsupported(&m, p).map(|(what, _)| what);
        assert_eq!(name(Method::GET, "/v1/models/a/b/versions"), Some("model versions"));
        assert_eq!(name(Method::GET, "/v1/models/a/b/versions/xyz"), Some("model versions"));
        assert_eq!(name(Method::POST, "/v1/predictions"), Some("predictions of a model version"));
        assert_eq!(name(Method::POST, "/v1/trainings"), Some("trainings"));
        assert_eq!(name(Method::GET, "/v1/files"), Some("the files API"));
        assert_eq!(name(Method::GET, "/v1/collections/x"), Some("collections"));
        assert_eq!(name(Method::GET, "/v1/nothing"), None);
        assert_eq!(name(Method::GET, "/v1/predictions"), None, "served");
    }
}
