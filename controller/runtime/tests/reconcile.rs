//! The reconcilers, the `GpuNode` writer and the leader election against kube's mock API server
//! (`tower_test::mock::pair` + `Client::new`, the ApiServerVerifier pattern of kube-rs/controller-rs): every request
//! the controller makes is checked — method, path, query and body — and answered as the API server would. Every
//! write to a `kiln.dev` resource is also validated as the apiserver validates it: merged into the object the mock
//! holds, then checked against the generated CRD schema and CEL rules with the offline validator
//! (`kiln_k8s_api::validate`), so a body a real apiserver would reject fails here too.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{collections::HashMap, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::{SignedDuration, Timestamp},
};
use kiln_controller::{
    control::{ControlConfig, ControlPlane},
    k8s::{
        lease::LeaderElector,
        reconcile::{Context, error_policy, reconcile},
    },
    registry::{MonotonicClock, Registry, RegistryConfig},
    spec::ServedSpec,
};
use kiln_k8s_api::{model_deployment::ModelDeployment, validate::Validator};
use kube::{Client, client::Body, runtime::controller::Action};
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse, pair};

/// The mock API server: the handle on the client's requests, and the `kiln.dev` objects it holds by URL path.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    objects: HashMap<String, Value>,
    validator: Validator,
}

fn mock() -> (Client, ApiServer) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle, objects: HashMap::new(), validator: Validator::default() })
}

const MLP: &str = "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments/mlp";

impl ApiServer {
    /// The mock holds `object` at `path` (what the controller read before writing).
    fn holding(mut self, path: &str, object: &impl serde::Serialize) -> Self {
        self.objects.insert(path.to_owned(), serde_json::to_value(object).unwrap());
        self
    }

    /// Takes the next request: (method, path and query, JSON body). A write to a `kiln.dev` resource is validated
    /// against its CRD as the apiserver would (the test fails with the apiserver's message if it is invalid), and
    /// the object the apiserver would store is kept for the next write.
    async fn next(&mut self) -> (String, String, Value, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .expect("the controller made no request")
            .expect("the client is gone");
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        self.check_write(&method, &uri, &content_type, &body);
        (method, uri, body, send)
    }

    /// Fails the test if the client sends anything within `within`.
    async fn expect_silence(&mut self, within: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(within, self.handle.next_request()).await {
            let uri = request.uri().to_string();
            let body = request.into_body().collect_bytes().await.unwrap();
            panic!("unexpected request {uri}: {}", String::from_utf8_lossy(&body));
        }
    }

    fn check_write(&mut self, method: &str, uri: &str, content_type: &str, body: &Value) {
        let path = uri.split('?').next().unwrap();
        if !path.starts_with("/apis/kiln.dev/") || !matches!(method, "PATCH" | "POST" | "PUT") {
            return;
        }
        let (path, status) = match path.strip_suffix("/status") {
            Some(object) => (object.to_owned(), true),
            None => (path.to_owned(), false),
        };
        let path =
            if method == "POST" { format!("{path}/{}", body["metadata"]["name"].as_str().unwrap()) } else { path };
        let live = self.objects.get(&path);
        let stored = match (method, content_type, status) {
            ("PATCH", "application/apply-patch+yaml", false) => self.validator.validate_apply(body, live),
            ("PATCH", "application/apply-patch+yaml", true) => {
                let live = live.unwrap_or_else(|| panic!("{uri}: the status of an object that does not exist"));
                self.validator.validate_status_apply(body, live)
            }
            ("PATCH", "application/json-patch+json" | "application/merge-patch+json", _) => {
                let live = live.unwrap_or_else(|| panic!("{uri}: patching an object that does not exist"));
                let mut patched = live.clone();
                if content_type == "application/json-patch+json" {
                    // The apiserver's JSON patch (evanphx/json-patch) lets `test` of a missing path against null
                    // pass, as kube's finalizer helper relies on; the json-patch crate does not, so those go.
                    let ops: Vec<Value> = body
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && live.pointer(op["path"].as_str().unwrap()).is_none())
                        })
                        .cloned()
                        .collect();
                    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
                    json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{uri}: {e}"));
                } else {
                    json_patch::merge(&mut patched, body);
                }
                self.validator.validate_update(&patched, Some(live)).map(|()| patched)
            }
            ("POST" | "PUT", _, _) => self.validator.validate_update(body, live).map(|()| body.clone()),
            other => panic!("{uri}: a write the mock does not know how to check: {other:?}"),
        };
        match stored {
            Ok(object) => {
                self.objects.insert(path, object);
            }
            Err(invalid) => panic!("{method} {uri}: the apiserver would answer 422: {invalid}\nbody: {body}"),
        }
    }
}

fn deployment(min_replicas: u32, finalizer: bool, deleting: bool) -> ModelDeployment {
    let mut md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": { "name": "mlp", "namespace": "demo", "generation": 3, "uid": "u-1", "resourceVersion": "7" },
        "spec": {
            "model": { "uri": "file:///models/mlp.safetensors", "runtime": "native" },
            "gpu": { "count": 1, "memoryPerGpu": "1Gi" },
            "scaling": { "minReplicas": min_replicas, "maxReplicas": 2 }
        }
    }))
    .unwrap();
    if finalizer {
        md.metadata.finalizers = Some(vec!["kiln.dev/cleanup".into()]);
    }
    if deleting {
        md.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    }
    md
}

/// What the control plane serves of `md` (generation 3).
fn served(md: &ModelDeployment) -> ServedSpec {
    kiln_controller::spec::translate("demo/mlp".into(), "3".into(), &md.spec).unwrap()
}

fn context(client: Client) -> Arc<Context> {
    let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
    let control = ControlPlane::new(registry, ControlConfig::default());
    Arc::new(Context::new(client, control, Some("kiln-controller-0".into())))
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

fn not_found(name: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
            "message": format!("{name} not found") })
}

#[tokio::test]
async fn a_new_deployment_gets_the_finalizer_before_anything_else() {
    let md = deployment(0, false, false);
    let (client, api) = mock();
    let mut api = api.holding(MLP, &md);
    let ctx = context(client);
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = api.next().await;
        assert_eq!(method, "PATCH");
        assert_eq!(uri, "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments/mlp?");
        assert_eq!(
            body,
            json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": ["kiln.dev/cleanup"] }
            ])
        );
        respond(send, StatusCode::OK, &serde_json::to_value(deployment(0, true, false)).unwrap());
    });
    let action = reconcile(Arc::new(md), Arc::clone(&ctx)).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(ctx.control.view("demo/mlp").is_none(), "nothing is served before the finalizer is on");
}

#[tokio::test]
async fn a_deployment_is_served_and_its_status_applied_under_the_field_manager() {
    let (client, api) = mock();
    let mut api = api.holding(MLP, &deployment(0, true, false));
    let ctx = context(client);
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = api.next().await;
        assert_eq!(method, "PATCH");
        assert_eq!(
            uri,
            "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments/mlp/status?&force=true&fieldManager=kiln-controller"
        );
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("kiln.dev/v1alpha1"), Some("ModelDeployment"))
        );
        let status = &body["status"];
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(status["state"], "ScaledToZero");
        assert_eq!(status["replicas"], json!({ "desired": 0, "loading": 0, "ready": 0, "idle": 0 }));
        let conditions: Vec<(String, String, String, i64)> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().to_owned(),
                    c["status"].as_str().unwrap().to_owned(),
                    c["reason"].as_str().unwrap().to_owned(),
                    c["observedGeneration"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            conditions,
            [
                ("Ready".into(), "True".into(), "ScaledToZero".into(), 3),
                ("Scheduled".into(), "True".into(), "Scheduled".into(), 3),
                ("Degraded".into(), "False".into(), "StartsSucceed".into(), 3)
            ]
        );
        let mut md = serde_json::to_value(deployment(0, true, false)).unwrap();
        md["status"] = status.clone();
        respond(send, StatusCode::OK, &md);
        // No Event: appearing at zero replicas is not a transition worth one.
        api.expect_silence(Duration::from_millis(200)).await;
    });
    let action = reconcile(Arc::new(deployment(0, true, false)), Arc::clone(&ctx)).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(ctx.control.view("demo/mlp").unwrap().desired, 0);
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let (client, mut api) = mock();
    let ctx = context(client);
    let mut md = deployment(0, true, false);
    let view = kiln_controller::control::DeploymentView::default();
    let earlier = Timestamp::now() - SignedDuration::from_secs(60);
    md.status = Some(kiln_controller::k8s::status::deployment_status(Some(3), Ok(&view), None, earlier));
    let watcher = tokio::spawn(async move { api.expect_silence(Duration::from_millis(300)).await });
    reconcile(Arc::new(md), ctx).await.unwrap();
    watcher.await.unwrap();
}

#[tokio::test]
async fn an_unschedulable_deployment_is_degraded_with_a_warning_event_saying_why() {
    let md = deployment(1, true, false);
    let (client, api) = mock();
    let mut api = api.holding(MLP, &md);
    let ctx = context(client);
    // The control loop has tried to place the replica minReplicas asks for, on a cluster with no node.
    ctx.control.upsert(served(&md));
    ctx.control.step();
    let verifier = tokio::spawn(async move {
        let (_, uri, body, send) = api.next().await;
        assert!(uri.contains("/modeldeployments/mlp/status?"), "{uri}");
        assert_eq!(body["status"]["state"], "Degraded");
        let scheduled = &body["status"]["conditions"][1];
        assert_eq!(
            (scheduled["status"].as_str(), scheduled["reason"].as_str()),
            (Some("False"), Some("Unschedulable"))
        );
        respond(send, StatusCode::OK, &serde_json::to_value(deployment(1, true, false)).unwrap());
        let (method, uri, event, send) = api.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("POST", "/apis/events.k8s.io/v1/namespaces/demo/events?"));
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "Unschedulable");
        assert_eq!(event["reportingController"], "kiln-controller");
        assert_eq!(event["regarding"]["name"], "mlp");
        let note = event["note"].as_str().unwrap();
        assert_eq!(
            note,
            "no GPU node has registered yet; a replica needs 1024 MiB of GPU memory, 0.25 CPU and 1024 MiB of host memory"
        );
        respond(send, StatusCode::CREATED, &event);
    });
    reconcile(Arc::new(md), ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_deleted_deployment_leaves_the_control_plane_then_loses_its_finalizer() {
    let (client, api) = mock();
    let mut api = api.holding(MLP, &deployment(0, true, true));
    let ctx = context(client);
    ctx.control.upsert(served(&deployment(0, true, false)));
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = api.next().await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("PATCH", "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments/mlp?")
        );
        assert_eq!(
            body,
            json!([
                { "op": "test", "path": "/metadata/finalizers/0", "value": "kiln.dev/cleanup" },
                { "op": "remove", "path": "/metadata/finalizers/0" }
            ])
        );
        respond(send, StatusCode::OK, &serde_json::to_value(deployment(0, false, true)).unwrap());
    });
    let action = reconcile(Arc::new(deployment(0, true, true)), Arc::clone(&ctx)).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(ctx.control.view("demo/mlp").is_none());
}

/// A ModelDeployment the schema accepts but the runtime cannot serve: 10^9 CPUs per replica overflow the
/// millicores the core counts in.
fn unservable() -> ModelDeployment {
    let mut md = deployment(1, true, false);
    md.spec.resources = Some(serde_json::from_value(json!({ "cpu": "1e9" })).unwrap());
    md
}

fn api_error(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": message })
}

/// The value of `kiln_reconcile_errors_total{category=...}` on the metrics page (0 when absent).
fn reconcile_errors(ctx: &Context, category: &str) -> u64 {
    let line = format!("kiln_reconcile_errors_total{{category=\"{category}\"}} ");
    let text = ctx.control.metrics_text();
    text.lines().find_map(|l| l.strip_prefix(line.as_str())).map_or(0, |n| n.parse().unwrap())
}

/// An invalid spec is withdrawn (an earlier valid version stops being served), shown in the status (Degraded,
/// Scheduled=False with reason InvalidSpec, the translation's message), published as one Warning Event, counted
/// under `invalid_spec`, and not retried soon: the next change of the object brings it back. Failing again the
/// same way publishes nothing new.
#[tokio::test]
async fn an_invalid_spec_is_degraded_published_once_counted_and_not_hot_looped() {
    let md = unservable();
    let (client, api) = mock();
    let mut api = api.holding(MLP, &md);
    let ctx = context(client);
    ctx.control.upsert(served(&deployment(1, true, false)));
    assert!(ctx.control.view("demo/mlp").is_some());
    let message = "resources.cpu 1000000000000m is too large";
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = api.next().await;
        assert_eq!(method, "PATCH");
        assert!(uri.contains("/modeldeployments/mlp/status?"), "{uri}");
        assert_eq!(body["status"]["state"], "Degraded");
        let scheduled = &body["status"]["conditions"][1];
        assert_eq!(
            (scheduled["status"].as_str(), scheduled["reason"].as_str(), scheduled["message"].as_str()),
            (Some("False"), Some("InvalidSpec"), Some(message))
        );
        let stored = api.objects[MLP].clone();
        respond(send, StatusCode::OK, &stored);
        let (method, uri, event, send) = api.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("POST", "/apis/events.k8s.io/v1/namespaces/demo/events?"));
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("InvalidSpec")));
        assert_eq!(event["note"].as_str().unwrap(), format!("the spec cannot be served: {message}"));
        assert_eq!(event["action"], "Reconciling");
        assert_eq!(event["regarding"]["name"], "mlp");
        respond(send, StatusCode::CREATED, &event);
        // The second failure: the status already says it, the Event was published: nothing is written.
        api.expect_silence(Duration::from_millis(300)).await;
        stored
    });
    let error = reconcile(Arc::new(md.clone()), Arc::clone(&ctx)).await.unwrap_err();
    assert!(matches!(error, kiln_controller::k8s::reconcile::Error::InvalidSpec(_)), "{error:?}");
    assert_eq!((error.category(), error.is_retryable()), ("invalid_spec", false));
    assert!(ctx.control.view("demo/mlp").is_none(), "the earlier valid version is withdrawn");
    let wait = error_policy(Arc::new(md.clone()), &error, Arc::clone(&ctx));
    assert_eq!(wait, Action::requeue(Duration::from_secs(3600)), "not retried until the object changes");

    let mut md = md;
    md.status = Some(invalid_status(&md));
    let again = reconcile(Arc::new(md.clone()), Arc::clone(&ctx)).await.unwrap_err();
    assert_eq!(again.to_string(), error.to_string());
    assert_eq!(error_policy(Arc::new(md), &again, Arc::clone(&ctx)), Action::requeue(Duration::from_secs(3600)));
    let stored = verifier.await.unwrap();
    assert_eq!(stored["status"]["state"], "Degraded");
    assert_eq!(reconcile_errors(&ctx, "invalid_spec"), 2);
}

/// The status an unservable `md` gets (what the first reconcile wrote), computed as the reconciler does.
fn invalid_status(md: &ModelDeployment) -> kiln_k8s_api::model_deployment::ModelDeploymentStatus {
    let error = kiln_controller::spec::translate("demo/mlp".into(), "3".into(), &md.spec).unwrap_err();
    kiln_controller::k8s::status::deployment_status(Some(3), Err(&error), None, Timestamp::now())
}

/// API server failures back off per object — 5 s, 10 s, 20 s for one object while another starts at 5 s — publish
/// one Warning Event (not one per retry), and count under `apiserver`; a successful reconcile resets both, so the
/// next failure waits 5 s and is published again.
#[tokio::test]
async fn api_server_errors_back_off_per_object_and_are_published_once_until_a_success() {
    let (client, api) = mock();
    let mut api = api.holding(MLP, &deployment(0, true, false));
    let ctx = context(client);
    let verifier = tokio::spawn(async move {
        let unavailable = api_error(500, "InternalError", "etcdserver: request timed out");
        for attempt in 0..3 {
            let (method, uri, _, send) = api.next().await;
            assert_eq!(method, "PATCH");
            assert!(uri.contains("/modeldeployments/mlp/status?"), "{uri}");
            respond(send, StatusCode::INTERNAL_SERVER_ERROR, &unavailable);
            if attempt == 0 {
                let (method, uri, event, send) = api.next().await;
                assert_eq!((method.as_str(), uri.as_str()), ("POST", "/apis/events.k8s.io/v1/namespaces/demo/events?"));
                assert_eq!(
                    (event["type"].as_str(), event["reason"].as_str()),
                    (Some("Warning"), Some("ApiServerError"))
                );
                assert!(event["note"].as_str().unwrap().contains("etcdserver: request timed out"), "{event}");
                respond(send, StatusCode::CREATED, &event);
            }
        }
        // The API server is back: the status is written.
        let (_, uri, _, send) = api.next().await;
        assert!(uri.contains("/modeldeployments/mlp/status?"), "{uri}");
        respond(send, StatusCode::OK, &api.objects[MLP].clone());
        // It fails again: news again after the success (the recorder sends the repeat as a series update).
        let (_, _, _, send) = api.next().await;
        respond(send, StatusCode::INTERNAL_SERVER_ERROR, &unavailable);
        let (method, uri, event, send) = api.next().await;
        assert!(uri.starts_with("/apis/events.k8s.io/v1/namespaces/demo/events"), "{method} {uri}");
        respond(send, StatusCode::OK, &event);
        api.expect_silence(Duration::from_millis(200)).await;
    });
    let md = Arc::new(deployment(0, true, false));
    let mut other = deployment(0, true, false);
    other.metadata.name = Some("other".into());
    let mut waits = Vec::new();
    for _ in 0..3 {
        let error = reconcile(Arc::clone(&md), Arc::clone(&ctx)).await.unwrap_err();
        assert_eq!((error.category(), error.is_retryable()), ("apiserver", true), "{error}");
        waits.push(error_policy(Arc::clone(&md), &error, Arc::clone(&ctx)));
        if waits.len() == 3 {
            let first = error_policy(Arc::new(other.clone()), &error, Arc::clone(&ctx));
            assert_eq!(first, Action::requeue(Duration::from_secs(5)), "another object has its own backoff");
        }
    }
    let secs = |n: u64| Action::requeue(Duration::from_secs(n));
    assert_eq!(waits, [secs(5), secs(10), secs(20)]);
    assert_eq!(reconcile(Arc::clone(&md), Arc::clone(&ctx)).await.unwrap(), Action::requeue(Duration::from_secs(5)));
    let error = reconcile(Arc::clone(&md), Arc::clone(&ctx)).await.unwrap_err();
    assert_eq!(error_policy(Arc::clone(&md), &error, Arc::clone(&ctx)), secs(5), "the success reset the backoff");
    verifier.await.unwrap();
    assert_eq!(reconcile_errors(&ctx, "apiserver"), 4);
}

/// A failed finalizer write keeps its source (the API server's answer) and is categorised by it: a 409 is a
/// conflict, retried after the backoff, published with reason `Conflict`.
#[tokio::test]
async fn a_failed_finalizer_write_keeps_its_source_and_counts_as_a_conflict() {
    let md = deployment(0, false, false);
    let (client, api) = mock();
    let mut api = api.holding(MLP, &md);
    let ctx = context(client);
    let verifier = tokio::spawn(async move {
        let (method, uri, _, send) = api.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("PATCH", format!("{MLP}?").as_str()));
        respond(send, StatusCode::CONFLICT, &api_error(409, "Conflict", "the object has been modified"));
        let (_, uri, event, send) = api.next().await;
        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/demo/events?");
        assert_eq!(event["reason"], "Conflict");
        respond(send, StatusCode::CREATED, &event);
    });
    let error = reconcile(Arc::new(md.clone()), Arc::clone(&ctx)).await.unwrap_err();
    verifier.await.unwrap();
    assert!(matches!(error, kiln_controller::k8s::reconcile::Error::Finalizer(_)), "{error:?}");
    assert_eq!((error.category(), error.reason(), error.is_retryable()), ("conflict", "Conflict", true));
    let finalizer = std::error::Error::source(&error).expect("the finalizer error is kept");
    let api_error = finalizer.source().expect("and the API server's answer under it");
    assert!(api_error.to_string().contains("the object has been modified"), "{api_error}");
    assert_eq!(error_policy(Arc::new(md), &error, Arc::clone(&ctx)), Action::requeue(Duration::from_secs(5)));
    assert_eq!(reconcile_errors(&ctx, "conflict"), 1);
}

fn lease(holder: &str, renewed: Timestamp, version: &str) -> Value {
    serde_json::to_value(Lease {
        metadata: ObjectMeta {
            name: Some("kiln-controller".into()),
            namespace: Some("kiln-system".into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(renewed)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(4),
            ..LeaseSpec::default()
        }),
    })
    .unwrap()
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kiln-system/leases/kiln-controller";

#[tokio::test]
async fn leader_election_creates_a_missing_lease_and_then_leads() {
    let (client, mut api) = mock();
    let elector = LeaderElector::new(client, "kiln-system", "kiln-controller", "pod-a", Duration::from_secs(15));
    let verifier = tokio::spawn(async move {
        let (method, uri, _, send) = api.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("GET", LEASE));
        respond(send, StatusCode::NOT_FOUND, &not_found("kiln-controller"));
        let (method, uri, body, send) = api.next().await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/kiln-system/leases?")
        );
        assert_eq!(body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        respond(send, StatusCode::CREATED, &body);
    });
    assert!(elector.try_lead().await.unwrap());
    verifier.await.unwrap();
}

#[tokio::test]
async fn leader_election_follows_a_fresh_holder_and_takes_over_an_expired_one() {
    let (client, mut api) = mock();
    let elector = LeaderElector::new(client, "kiln-system", "kiln-controller", "pod-a", Duration::from_secs(15));
    let verifier = tokio::spawn(async move {
        // Fresh: follow, write nothing.
        let (_, uri, _, send) = api.next().await;
        assert_eq!(uri, LEASE);
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now(), "10"));
        // Expired: replace, guarded by the resourceVersion read.
        let (_, _, _, send) = api.next().await;
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now() - SignedDuration::from_secs(60), "11"));
        let (method, uri, body, send) = api.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("PUT", format!("{LEASE}?").as_str()));
        assert_eq!(body["metadata"]["resourceVersion"], "11");
        assert_eq!(body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(body["spec"]["leaseTransitions"], 5);
        // Another replica won the race: 409, so not the leader.
        respond(
            send,
            StatusCode::CONFLICT,
            &json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                     "message": "the object has been modified" }),
        );
    });
    assert!(!elector.try_lead().await.unwrap(), "a fresh holder is followed");
    assert!(!elector.try_lead().await.unwrap(), "a lost race is not leadership");
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_clean_shutdown_releases_the_lease_it_holds_and_leaves_others_alone() {
    let (client, mut api) = mock();
    let elector = LeaderElector::new(client, "kiln-system", "kiln-controller", "pod-a", Duration::from_secs(15));
    let verifier = tokio::spawn(async move {
        let (_, uri, _, send) = api.next().await;
        assert_eq!(uri, LEASE);
        respond(send, StatusCode::OK, &lease("pod-a", Timestamp::now(), "20"));
        let (method, _, body, send) = api.next().await;
        assert_eq!(method, "PUT");
        assert_eq!(body["metadata"]["resourceVersion"], "20");
        assert!(body["spec"].get("holderIdentity").is_none_or(Value::is_null), "{body}");
        respond(send, StatusCode::OK, &body);
        // Held by another: nothing written.
        let (_, _, _, send) = api.next().await;
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now(), "21"));
    });
    assert!(elector.release().await.unwrap());
    assert!(!elector.release().await.unwrap());
    verifier.await.unwrap();
}

/// A registry holding one agent registered over a real `Connect` stream on loopback (two simulated H100s, one
/// cached model); the sender keeps the session open.
async fn registry_with_agent(node: &str) -> (Registry, tokio::sync::mpsc::Sender<kiln_proto::v1::AgentMessage>) {
    use kiln_proto::v1::{
        self, agent_message, agent_service_client::AgentServiceClient, agent_service_server::AgentServiceServer,
    };
    let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(kiln_controller::registry::AgentServer(registry.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let gpu = |index: u32| v1::Gpu {
        index,
        uuid: format!("GPU-{index}"),
        model: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 80 << 30,
        health: v1::GpuHealth::Healthy as i32,
        ..Default::default()
    };
    let register = v1::Register {
        node_name: node.into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: vec![gpu(0), gpu(1)],
        cached_models: vec![v1::CachedModel {
            model_uri: "file:///models/mlp.safetensors".into(),
            size_bytes: 1 << 30,
            tier: v1::CacheTier::Disk as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage { seq: 1, body: Some(agent_message::Body::Register(register)) }).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = AgentServiceClient::new(channel);
    let mut replies = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = replies.message().await {} });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while registry.node(node).is_none() {
        assert!(std::time::Instant::now() < deadline, "{node} did not register");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (registry, tx)
}

/// The `GpuNode` of a registered agent: the object with an empty `spec` (owning nothing in it), then its status,
/// both by server-side apply under the controller's field manager, and both valid against the CRD — a real
/// apiserver rejected the earlier object patch without `spec` (`spec: Required value`).
#[tokio::test]
async fn a_registered_agent_gets_a_gpu_node_the_crd_accepts() {
    let (client, mut api) = mock();
    let (registry, _session) = registry_with_agent("node-a").await;
    let control = ControlPlane::new(registry.clone(), ControlConfig::default());
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = api.next().await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("PATCH", "/apis/kiln.dev/v1alpha1/gpunodes/node-a?&force=true&fieldManager=kiln-controller")
        );
        assert_eq!(
            body,
            json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode", "metadata": { "name": "node-a" },
                    "spec": {} }),
            "the object patch owns no field inside spec: spec.unschedulable stays the operators'"
        );
        respond(send, StatusCode::OK, &api.objects["/apis/kiln.dev/v1alpha1/gpunodes/node-a"].clone());
        let (method, uri, body, send) = api.next().await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("PATCH", "/apis/kiln.dev/v1alpha1/gpunodes/node-a/status?&force=true&fieldManager=kiln-controller")
        );
        let status = &body["status"];
        assert_eq!((status["gpuCount"].as_i64(), status["freeGpus"].as_i64()), (Some(2), Some(2)));
        assert_eq!(status["gpus"][1]["uuid"], "GPU-1");
        assert_eq!(status["gpus"][1]["memoryMib"], 80 * 1024);
        assert_eq!(status["cachedModels"][0]["tier"], "Disk");
        assert_eq!(status["conditions"][0]["type"], "Ready");
        assert_eq!(status["conditions"][0]["status"], "True");
        let stored = api.objects["/apis/kiln.dev/v1alpha1/gpunodes/node-a"].clone();
        assert_eq!(stored["status"], *status, "the mock stored what the apiserver would");
        respond(send, StatusCode::OK, &stored);
        api.expect_silence(Duration::from_millis(200)).await;
    });
    let mut writes = kiln_controller::k8s::NodeWrites::default();
    let written = kiln_controller::k8s::sync_gpu_nodes(&client, &registry, &control, &mut writes).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(written, ["node-a"]);
}

/// The mock's check is what catches a body the CRD rejects: the object patch the controller sent before (no
/// `spec`) fails it with the apiserver's message.
#[tokio::test]
#[should_panic(expected = "GpuNode.kiln.dev \"node-a\" is invalid: spec: Required value")]
async fn the_mock_apiserver_rejects_a_gpu_node_without_spec() {
    let (_client, mut api) = mock();
    let old = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode", "metadata": { "name": "node-a" } });
    api.check_write(
        "PATCH",
        "/apis/kiln.dev/v1alpha1/gpunodes/node-a?&force=true&fieldManager=kiln-controller",
        "application/apply-patch+yaml",
        &old,
    );
}

/// A status written to a deployment must keep the whole object valid, and a transition rule or a schema check on
/// the status (here an unknown state) is caught by the mock as by the apiserver.
#[tokio::test]
#[should_panic(expected = "status.state: Unsupported value: \"Sleeping\"")]
async fn the_mock_apiserver_rejects_an_invalid_deployment_status() {
    let (_client, api) = mock();
    let mut api = api.holding(MLP, &deployment(0, true, false));
    api.check_write(
        "PATCH",
        &format!("{MLP}/status?&force=true&fieldManager=kiln-controller"),
        "application/apply-patch+yaml",
        &json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "status": { "state": "Sleeping" } }),
    );
}

fn secret_list(items: &[(&str, &str, &str)]) -> Value {
    use base64::Engine as _;
    let items: Vec<Value> = items
        .iter()
        .map(|(namespace, name, key)| {
            json!({ "metadata": { "name": name, "namespace": namespace,
                                  "labels": { "kiln.dev/api-key": "true" } },
                    "data": { "key": base64::engine::general_purpose::STANDARD.encode(key) } })
        })
        .collect();
    json!({ "kind": "SecretList", "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items })
}

/// API keys are read only in the configured namespaces (one list per namespace, the only Secret access the chart's
/// default Roles grant); with no namespace configured, one cluster-wide list.
#[tokio::test]
async fn api_keys_are_read_only_in_the_configured_namespaces() {
    use kiln_controller::k8s::{KeyNamespaces, api_keys};
    let (client, mut api) = mock();
    let verifier = tokio::spawn(async move {
        for namespace in ["team-a", "team-b"] {
            let (method, uri, _, send) = api.next().await;
            assert_eq!(
                (method.as_str(), uri.as_str()),
                (
                    "GET",
                    format!("/api/v1/namespaces/{namespace}/secrets?&labelSelector=kiln.dev%2Fapi-key%3Dtrue").as_str()
                )
            );
            respond(send, StatusCode::OK, &secret_list(&[(namespace, "k", &format!("{namespace}-key-0123456789"))]));
        }
        let (_, uri, _, send) = api.next().await;
        assert_eq!(uri, "/api/v1/secrets?&labelSelector=kiln.dev%2Fapi-key%3Dtrue");
        respond(send, StatusCode::OK, &secret_list(&[("x", "k", "short"), ("y", "k", "y-key-0123456789")]));
    });
    let only = KeyNamespaces::from_list(&["team-b".into(), " team-a".into(), "team-b".into()]);
    assert_eq!(only, KeyNamespaces::Only(vec!["team-a".into(), "team-b".into()]));
    let keys = api_keys(&client, &only, "kiln-system").await.unwrap();
    assert_eq!(
        keys,
        [("team-a-key-0123456789".into(), "team-a".into()), ("team-b-key-0123456789".into(), "team-b".into())]
    );
    assert_eq!(KeyNamespaces::from_list(&[String::new()]), KeyNamespaces::All);
    let keys = api_keys(&client, &KeyNamespaces::All, "kiln-system").await.unwrap();
    assert_eq!(keys, [("y-key-0123456789".to_owned(), "y".to_owned())], "a key under 16 characters is skipped");
    verifier.await.unwrap();
}

/// An operator key is a Secret labelled `kiln.dev/operator-key=true` in the controller's own namespace; the same
/// label in a tenant's namespace (where tenants may create Secrets) does not make an operator.
#[tokio::test]
async fn operator_keys_come_only_from_the_controllers_namespace() {
    use base64::Engine as _;
    use kiln_controller::k8s::{KeyNamespaces, api_keys};
    let (client, mut api) = mock();
    let verifier = tokio::spawn(async move {
        let (_, uri, _, send) = api.next().await;
        assert_eq!(uri, "/api/v1/secrets?&labelSelector=kiln.dev%2Fapi-key%3Dtrue");
        let secret = |namespace: &str, key: &str| {
            json!({ "metadata": { "name": "k", "namespace": namespace,
                                  "labels": { "kiln.dev/api-key": "true", "kiln.dev/operator-key": "true" } },
                    "data": { "key": base64::engine::general_purpose::STANDARD.encode(key) } })
        };
        let list = json!({ "kind": "SecretList", "apiVersion": "v1", "metadata": { "resourceVersion": "1" },
                           "items": [secret("kiln-system", "ops-key-0123456789"), secret("team-x", "sneaky-key-0123456789")] });
        respond(send, StatusCode::OK, &list);
    });
    let keys = api_keys(&client, &KeyNamespaces::All, "kiln-system").await.unwrap();
    assert_eq!(
        keys,
        [
            ("ops-key-0123456789".to_owned(), kiln_controller::gateway::OPERATOR.to_owned()),
            ("sneaky-key-0123456789".to_owned(), "team-x".to_owned())
        ]
    );
    verifier.await.unwrap();
}

/// Replicate's deployments API in Kubernetes mode (`k8s::changes`): a create copies the named deployment into a new
/// `ModelDeployment` (POSTed, checked by the mock against the CRD schema and CEL rules), an update is a merge patch
/// carrying the live `resourceVersion` (merged and checked the same way), a delete deletes; a change the schema
/// refuses never reaches the apiserver, and the apiserver's refusals become Replicate-shaped errors.
#[tokio::test]
async fn deployment_changes_are_written_as_validated_model_deployments() {
    use kiln_controller::{
        gateway::{ChangeError, ChangeKind, DeploymentChange},
        k8s::changes::KubeDeployments,
    };
    const COPY: &str = "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments/copy";
    let (client, server) = mock();
    let mut server = server.holding(MLP, &deployment(0, true, false));
    let kube = KubeDeployments::new(client);
    let fleet = vec!["NVIDIA H100 80GB HBM3".to_owned()];
    let change = |kind, min: Option<u32>, max: Option<u32>| DeploymentChange {
        name: "copy".into(),
        kind,
        model: Some("mlp".into()),
        hardware: None,
        min_instances: min,
        max_instances: max,
    };
    let run = |change: DeploymentChange| {
        let (kube, fleet) = (kube.clone(), fleet.clone());
        tokio::spawn(async move { kube.change("demo", &change, &fleet).await })
    };

    // Create: the copy's own metadata, no status, the scaling and hardware asked for.
    let create = DeploymentChange {
        hardware: Some("gpu-h100-80gb-hbm3".into()),
        ..change(ChangeKind::Create, Some(1), Some(3))
    };
    let task = run(create.clone());
    let (method, uri, _, send) = server.next().await;
    assert_eq!((method.as_str(), uri.as_str()), ("GET", MLP));
    respond(send, StatusCode::OK, &server.objects[MLP].clone());
    let (method, uri, body, send) = server.next().await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("POST", "/apis/kiln.dev/v1alpha1/namespaces/demo/modeldeployments?&fieldManager=kiln-gateway")
    );
    assert_eq!(body["metadata"], json!({ "name": "copy", "namespace": "demo" }), "nothing of mlp's metadata");
    assert!(body.get("status").is_none());
    let scaling =
        |o: &Value| (o["spec"]["scaling"]["minReplicas"].clone(), o["spec"]["scaling"]["maxReplicas"].clone());
    assert_eq!(scaling(&body), (json!(1), json!(3)));
    assert_eq!(body["spec"]["gpu"]["models"], json!(["NVIDIA H100 80GB HBM3"]));
    assert_eq!(body["spec"]["model"], server.objects[MLP]["spec"]["model"], "the model source copied");
    let mut stored = server.objects[COPY].clone();
    stored["metadata"]["resourceVersion"] = json!("11");
    server.objects.insert(COPY.into(), stored.clone());
    respond(send, StatusCode::CREATED, &stored);
    task.await.unwrap().unwrap();

    // Update: a merge patch of the fields asked for, conditional on the version read.
    let task = run(change(ChangeKind::Update, None, Some(5)));
    let (method, uri, _, send) = server.next().await;
    assert_eq!((method.as_str(), uri.as_str()), ("GET", COPY));
    respond(send, StatusCode::OK, &stored);
    let (method, uri, body, send) = server.next().await;
    assert_eq!((method.as_str(), uri.as_str()), ("PATCH", format!("{COPY}?&fieldManager=kiln-gateway").as_str()));
    assert_eq!(body, json!({ "spec": { "scaling": { "maxReplicas": 5 } }, "metadata": { "resourceVersion": "11" } }));
    assert_eq!(scaling(&server.objects[COPY]), (json!(1), json!(5)), "what the apiserver stores");
    respond(send, StatusCode::OK, &server.objects[COPY].clone());
    task.await.unwrap().unwrap();

    // An update the CEL rules refuse (minReplicas above maxReplicas) is not sent.
    let task = run(change(ChangeKind::Update, Some(9), None));
    let (_, _, _, send) = server.next().await;
    respond(send, StatusCode::OK, &server.objects[COPY].clone());
    server.expect_silence(Duration::from_millis(200)).await;
    let Err(ChangeError::Invalid(message)) = task.await.unwrap() else { panic!("an invalid update was accepted") };
    assert!(message.contains("minReplicas"), "{message}");

    // The apiserver's refusals: changed meanwhile (409), exists already (409), not found (404), forbidden (403).
    let task = run(change(ChangeKind::Update, None, Some(4)));
    let (_, _, _, send) = server.next().await;
    respond(send, StatusCode::OK, &server.objects[COPY].clone());
    let (_, _, _, send) = server.next().await;
    let conflict = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                           "message": "the object has been modified" });
    respond(send, StatusCode::CONFLICT, &conflict);
    let Err(ChangeError::Conflict(message)) = task.await.unwrap() else { panic!("a conflict was not one") };
    assert!(message.contains("changed meanwhile"), "{message}");

    let task = run(change(ChangeKind::Create, None, None));
    let (_, _, _, send) = server.next().await;
    respond(send, StatusCode::OK, &server.objects[MLP].clone());
    let (_, _, _, send) = server.next().await;
    let exists = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                         "code": 409, "message": "modeldeployments.kiln.dev \"copy\" already exists" });
    respond(send, StatusCode::CONFLICT, &exists);
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "deployment demo/copy exists already");

    let task = run(DeploymentChange { model: Some("gone".into()), ..change(ChangeKind::Create, None, None) });
    let (_, uri, _, send) = server.next().await;
    assert!(uri.ends_with("/modeldeployments/gone"), "{uri}");
    respond(send, StatusCode::NOT_FOUND, &not_found("gone"));
    let Err(ChangeError::Invalid(message)) = task.await.unwrap() else { panic!("copied a missing deployment") };
    assert!(message.contains("no deployment demo/gone to copy"), "{message}");

    // Delete, then delete again: not found.
    for (status, body) in [(StatusCode::OK, server.objects[COPY].clone()), (StatusCode::NOT_FOUND, not_found("copy"))] {
        let task = run(change(ChangeKind::Delete, None, None));
        let (method, uri, _, send) = server.next().await;
        assert_eq!((method.as_str(), uri.as_str()), ("DELETE", format!("{COPY}?").as_str()));
        respond(send, status, &body);
        match task.await.unwrap() {
            Ok(()) => assert_eq!(status, StatusCode::OK),
            Err(ChangeError::NotFound(key)) => assert_eq!((status, key.as_str()), (StatusCode::NOT_FOUND, "demo/copy")),
            Err(other) => panic!("{other}"),
        }
    }

    let task = run(change(ChangeKind::Delete, None, None));
    let (_, _, _, send) = server.next().await;
    let forbidden = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                            "code": 403, "message": "cannot delete resource \"modeldeployments\"" });
    respond(send, StatusCode::FORBIDDEN, &forbidden);
    assert!(matches!(task.await.unwrap(), Err(ChangeError::Forbidden(m)) if m.contains("cannot delete")));
}
