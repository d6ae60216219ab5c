//! The reconcilers and the leader election against kube's mock API server (`tower_test::mock::pair` +
//! `Client::new`, the ApiServerVerifier pattern of kube-rs/controller-rs): every request the controller makes is
//! checked — method, path, query and body — and answered as the API server would.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{sync::Arc, time::Duration};

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
        reconcile::{Context, reconcile},
    },
    registry::{MonotonicClock, Registry, RegistryConfig},
};
use kiln_k8s_api::model_deployment::ModelDeployment;
use kube::{Client, client::Body, runtime::controller::Action};
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

type Api = Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Api) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
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

fn context(client: Client) -> Arc<Context> {
    let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
    let control = ControlPlane::new(registry, ControlConfig::default());
    Arc::new(Context::new(client, control, Some("kiln-controller-0".into())))
}

/// Takes the next request: (method, path and query, JSON body).
async fn next(api: &mut Api) -> (String, String, Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
        .await
        .expect("the controller made no request")
        .expect("the client is gone");
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (method, uri, body, send)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

fn not_found(name: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
            "message": format!("{name} not found") })
}

#[tokio::test]
async fn a_new_deployment_gets_the_finalizer_before_anything_else() {
    let (client, mut api) = mock();
    let ctx = context(client);
    let md = deployment(0, false, false);
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = next(&mut api).await;
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
    let (client, mut api) = mock();
    let ctx = context(client);
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = next(&mut api).await;
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
        if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await {
            panic!("unexpected request {}", request.uri());
        }
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
    let view = kiln_controller::k8s::status::DeploymentView::default();
    let earlier = Timestamp::now() - SignedDuration::from_secs(60);
    md.status = Some(kiln_controller::k8s::status::deployment_status(Some(3), &view, None, earlier));
    let watcher = tokio::spawn(async move {
        if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_millis(300), api.next_request()).await {
            let uri = request.uri().to_string();
            let body = request.into_body().collect_bytes().await.unwrap();
            panic!("unexpected request {uri}: {}", String::from_utf8_lossy(&body));
        }
    });
    reconcile(Arc::new(md), ctx).await.unwrap();
    watcher.await.unwrap();
}

#[tokio::test]
async fn an_unschedulable_deployment_is_degraded_with_a_warning_event_saying_why() {
    let (client, mut api) = mock();
    let ctx = context(client);
    let md = deployment(1, true, false);
    // The control loop has tried to place the replica minReplicas asks for, on a cluster with no node.
    let d = kiln_controller::manifests::Deployment {
        namespace: "demo".into(),
        name: "mlp".into(),
        version: "3".into(),
        resource: md.clone(),
        file: Default::default(),
    };
    ctx.control.upsert(&d).unwrap();
    ctx.control.step();
    let verifier = tokio::spawn(async move {
        let (_, uri, body, send) = next(&mut api).await;
        assert!(uri.contains("/modeldeployments/mlp/status?"), "{uri}");
        assert_eq!(body["status"]["state"], "Degraded");
        let scheduled = &body["status"]["conditions"][1];
        assert_eq!(
            (scheduled["status"].as_str(), scheduled["reason"].as_str()),
            (Some("False"), Some("Unschedulable"))
        );
        respond(send, StatusCode::OK, &serde_json::to_value(deployment(1, true, false)).unwrap());
        let (method, uri, event, send) = next(&mut api).await;
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
    let (client, mut api) = mock();
    let ctx = context(client);
    let d = kiln_controller::manifests::Deployment {
        namespace: "demo".into(),
        name: "mlp".into(),
        version: "3".into(),
        resource: deployment(0, true, false),
        file: Default::default(),
    };
    ctx.control.upsert(&d).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = next(&mut api).await;
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
        let (method, uri, _, send) = next(&mut api).await;
        assert_eq!((method.as_str(), uri.as_str()), ("GET", LEASE));
        respond(send, StatusCode::NOT_FOUND, &not_found("kiln-controller"));
        let (method, uri, body, send) = next(&mut api).await;
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
        let (_, uri, _, send) = next(&mut api).await;
        assert_eq!(uri, LEASE);
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now(), "10"));
        // Expired: replace, guarded by the resourceVersion read.
        let (_, _, _, send) = next(&mut api).await;
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now() - SignedDuration::from_secs(60), "11"));
        let (method, uri, body, send) = next(&mut api).await;
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
        let (_, uri, _, send) = next(&mut api).await;
        assert_eq!(uri, LEASE);
        respond(send, StatusCode::OK, &lease("pod-a", Timestamp::now(), "20"));
        let (method, _, body, send) = next(&mut api).await;
        assert_eq!(method, "PUT");
        assert_eq!(body["metadata"]["resourceVersion"], "20");
        assert!(body["spec"].get("holderIdentity").is_none_or(Value::is_null), "{body}");
        respond(send, StatusCode::OK, &body);
        // Held by another: nothing written.
        let (_, _, _, send) = next(&mut api).await;
        respond(send, StatusCode::OK, &lease("pod-b", Timestamp::now(), "21"));
    });
    assert!(elector.release().await.unwrap());
    assert!(!elector.release().await.unwrap());
    verifier.await.unwrap();
}
