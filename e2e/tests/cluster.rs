//! Against a real cluster: install the CRDs and check that the apiserver accepts the examples and rejects the
//! invalid ones with the same messages as the offline validator (a server-side dry run: nothing is stored); run the
//! reconciler, the `GpuNode` writer (a registered agent's object and status, and an operator's cordon that the
//! controller leaves alone) and the Lease (follow, hand over on release and on expiry).
//!
//! These tests are `#[ignore]`d: without a cluster they show as ignored, never as passed. Against any cluster
//! (Kubernetes >= 1.30) run them with one command:
//!
//! ```sh
//! KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all
//! ```
//!
//! Run ignored without `KILN_E2E_KUBECONFIG`, they fail saying so. CRDs are applied with server-side apply under the
//! field manager `kiln-e2e` and left installed; the objects the tests create are removed.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln_e2e::repo_root;
use kiln_k8s_api::validate::expected_errors;
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

const KUBECONFIG_VAR: &str = "KILN_E2E_KUBECONFIG";

#[tokio::test]
#[ignore = "needs a cluster: KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all"]
async fn apiserver_agrees_with_the_offline_validator() -> Result<()> {
    let client = client_from_env().await?;

    install_crds(&client).await?;

    for (file, invalid) in examples()? {
        let text = fs::read_to_string(&file)?;
        let mut object: serde_json::Value = serde_yaml::from_str(&text)?;
        if object["kind"] == "GpuNode" {
            continue; // cluster-scoped status object: written by the controller through the status subresource
        }
        object["metadata"]["namespace"] = "default".into();
        let result = dry_run_create(&client, object).await;
        match (invalid, result) {
            (false, Ok(())) => {}
            (false, Err(err)) => bail!("{} was rejected by the apiserver: {err}", file.display()),
            (true, Ok(())) => bail!("{} was accepted by the apiserver", file.display()),
            (true, Err(err)) => {
                let message = err.to_string();
                // Either wording: kube-apiserver >= 1.35, or 1.30-1.34 where an example gives it.
                for want in expected_errors(&text) {
                    if !want.found_in(&message) {
                        bail!("{}: apiserver said {message:?}, expected it to contain {want:?}", file.display());
                    }
                }
            }
        }
    }
    Ok(())
}

async fn install_crds(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("kiln-e2e").force();
    for crd in kiln_k8s_api::crdgen::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd)).await.with_context(|| format!("applying CRD {name}"))?;
        let established = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(crds.clone(), &name, established),
        )
        .await
        .with_context(|| format!("CRD {name} not established within 30s"))??;
    }
    Ok(())
}

/// `kubectl create --dry-run=server --validate=strict`: a POST with `dryRun=All&fieldValidation=Strict`, so unknown
/// fields are errors as they are for kubectl users, and nothing is stored.
async fn dry_run_create(client: &Client, object: serde_json::Value) -> Result<()> {
    let (group, version) = object["apiVersion"].as_str().unwrap_or_default().split_once('/').unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let url = format!(
        "/apis/{group}/{version}/namespaces/default/{}?dryRun=All&fieldValidation=Strict&fieldManager=kiln-e2e",
        resource.plural
    );
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&object)?)?;
    client.request::<DynamicObject>(request).await?;
    Ok(())
}

/// Every example file, and whether it is one of the invalid ones.
fn examples() -> Result<Vec<(PathBuf, bool)>> {
    let mut files = Vec::new();
    for (dir, invalid) in [("examples", false), ("examples/invalid", true)] {
        for entry in fs::read_dir(repo_root().join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push((path, invalid));
            }
        }
    }
    files.sort();
    Ok(files)
}

async fn client_from_env() -> Result<Client> {
    let Some(path) = std::env::var_os(KUBECONFIG_VAR) else {
        bail!("set {KUBECONFIG_VAR}=<kubeconfig file> to run the real-cluster tests");
    };
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {path:?}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The reconciler against a real API server: the finalizer goes on first, then the status is applied (scaled to
/// zero, observed generation), and deleting the object takes the finalizer off so it goes away. Then the Lease:
/// one identity leads, another follows.
#[tokio::test]
#[ignore = "needs a cluster: KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all"]
async fn the_reconciler_and_leader_election_work_on_a_real_cluster() -> Result<()> {
    use kiln_controller::{
        control::{ControlConfig, ControlPlane},
        k8s::{lease::LeaderElector, reconcile},
        registry::{MonotonicClock, Registry, RegistryConfig},
    };
    use kiln_k8s_api::model_deployment::{DeploymentState, ModelDeployment};
    use std::sync::Arc;

    let client = client_from_env().await?;
    install_crds(&client).await?;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    let name = format!("kiln-e2e-{}", std::process::id());
    let md: ModelDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "model": { "uri": "file:///models/m.safetensors" }, "gpu": { "count": 1, "memoryPerGpu": "1Gi" } }
    }))?;
    api.create(&Default::default(), &md).await?;
    let control =
        ControlPlane::new(Registry::new(RegistryConfig::default(), MonotonicClock::system()), ControlConfig::default());
    let ctx = Arc::new(reconcile::Context::new(client.clone(), Arc::clone(&control), Some("kiln-e2e".into())));

    // First pass: the finalizer. Second: served, status applied.
    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;
    let md = api.get(&name).await?;
    assert!(md.metadata.finalizers.iter().flatten().any(|f| f == reconcile::FINALIZER), "finalizer: {md:?}");
    reconcile::reconcile(Arc::new(md), Arc::clone(&ctx)).await?;
    let md = api.get(&name).await?;
    let status = md.status.clone().context("no status written")?;
    assert_eq!(status.state, Some(DeploymentState::ScaledToZero));
    assert_eq!(status.observed_generation, md.metadata.generation);
    assert!(control.view(&format!("default/{name}")).is_some());

    // Delete: the cleanup pass takes the finalizer off and the object goes.
    api.delete(&name, &Default::default()).await?;
    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.get_opt(&name).await?.is_some() {
        if std::time::Instant::now() > deadline {
            bail!("{name} still exists 30 s after its finalizer was removed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(control.view(&format!("default/{name}")).is_none());

    // Leader election: a, then b follows; the Lease is removed afterwards.
    let lease = format!("kiln-e2e-lease-{}", std::process::id());
    let a = LeaderElector::new(client.clone(), "default", &lease, "a", Duration::from_secs(15));
    let b = LeaderElector::new(client.clone(), "default", &lease, "b", Duration::from_secs(15));
    assert!(a.try_lead().await?, "a takes the free Lease");
    assert!(!b.try_lead().await?, "b follows while a's Lease is fresh");
    assert!(a.try_lead().await?, "a renews");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "default");
    leases.delete(&lease, &Default::default()).await?;
    Ok(())
}

/// Leadership changes hands on a real apiserver: at once when the leader releases the Lease (a clean shutdown), and
/// when a leader stops renewing, once its lease duration has passed.
#[tokio::test]
#[ignore = "needs a cluster: KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all"]
async fn the_lease_is_handed_over_on_release_and_on_expiry() -> Result<()> {
    use kiln_controller::k8s::lease::LeaderElector;

    let client = client_from_env().await?;
    let lease = format!("kiln-e2e-handover-{}", std::process::id());
    let a = LeaderElector::new(client.clone(), "default", &lease, "a", Duration::from_secs(2));
    let b = LeaderElector::new(client.clone(), "default", &lease, "b", Duration::from_secs(2));
    assert!(a.try_lead().await?, "a takes the free Lease");
    assert!(!b.try_lead().await?, "b follows while a's Lease is fresh");
    assert!(a.release().await?, "a releases the Lease it holds");
    assert!(b.try_lead().await?, "b takes a released Lease at once, without waiting for it to expire");
    assert!(!a.try_lead().await?, "a now follows b");
    // b stops renewing (as a leader that hangs or dies would): a takes over once b's 2 s have passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.try_lead().await?, "a takes over the expired Lease");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "default");
    let held = leases.get(&lease).await?;
    let spec = held.spec.context("Lease without spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert!(spec.lease_transitions.unwrap_or_default() >= 2, "two hand-overs counted: {spec:?}");
    leases.delete(&lease, &Default::default()).await?;
    Ok(())
}

/// What the runtime writes for a registered agent: a `GpuNode` object and its status, accepted by the apiserver
/// (a real apiserver once rejected the object patch: `spec: Required value`), and a cordon an operator sets in
/// `spec.unschedulable` survives the controller's next forced apply and reaches the control plane.
#[tokio::test]
#[ignore = "needs a cluster: KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all"]
async fn a_registered_agent_gets_its_gpu_node_and_an_operators_cordon_stays() -> Result<()> {
    use kiln_controller::{
        control::{ControlConfig, ControlPlane},
        k8s::{NodeWrites, sync_gpu_nodes},
    };
    use kiln_k8s_api::gpu_node::{GpuHealth, GpuNode};

    let client = client_from_env().await?;
    install_crds(&client).await?;
    let node = format!("kiln-e2e-node-{}", std::process::id());
    let (registry, session, _commands) = registry_with_agent(&node, 2).await?;
    let control = ControlPlane::new(registry.clone(), ControlConfig::default());
    let nodes: Api<GpuNode> = Api::all(client.clone());

    let written = sync_gpu_nodes(&client, &registry, &control, &mut NodeWrites::default()).await?;
    assert!(written.contains(&node), "{written:?}");
    let stored = nodes.get(&node).await?;
    assert!(!stored.spec.unschedulable, "defaulted by the apiserver");
    let status = stored.status.clone().context("no status written")?;
    assert_eq!((status.gpu_count, status.free_gpus, status.healthy_gpus), (2, 2, 2));
    assert_eq!(status.gpus[1].uuid, "GPU-e2e-1");
    assert_eq!(status.gpus[0].health, GpuHealth::Healthy);
    assert!(status.simulated);
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"), "{status:?}");

    // An operator cordons the node with a field manager of their own.
    let cordon = serde_json::json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode",
                                     "metadata": { "name": node }, "spec": { "unschedulable": true } });
    nodes.patch(&node, &PatchParams::apply("kiln-e2e-operator"), &Patch::Apply(&cordon)).await?;
    // The controller writes again (a fresh NodeWrites: every node is due), forcing its fields.
    let written = sync_gpu_nodes(&client, &registry, &control, &mut NodeWrites::default()).await?;
    assert!(written.contains(&node), "{written:?}");
    let stored = nodes.get(&node).await?;
    assert!(stored.spec.unschedulable, "the controller's apply took the operator's cordon: {:?}", stored.spec);
    let owners: Vec<String> = stored
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:unschedulable").is_some()))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(owners, ["kiln-e2e-operator"], "only the operator owns spec.unschedulable");

    drop(session);
    nodes.delete(&node, &Default::default()).await?;
    Ok(())
}

/// What the controller sends the test's agent.
type Commands = tokio::sync::mpsc::UnboundedReceiver<kiln_proto::v1::ControllerMessage>;

/// A registry holding one agent with `gpus` simulated H100s, registered over a real `Connect` stream on loopback;
/// dropping the returned sender ends the session; the receiver gets what the controller sends the agent.
async fn registry_with_agent(
    node: &str,
    gpus: u32,
) -> Result<(kiln_controller::registry::Registry, tokio::sync::mpsc::Sender<kiln_proto::v1::AgentMessage>, Commands)> {
    use kiln_controller::registry::{AgentServer, MonotonicClock, Registry, RegistryConfig};
    use kiln_proto::v1::{
        self, agent_message, agent_service_client::AgentServiceClient, agent_service_server::AgentServiceServer,
    };
    let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(AgentServer(registry.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let register = v1::Register {
        node_name: node.into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: (0..gpus)
            .map(|index| v1::Gpu {
                index,
                uuid: format!("GPU-e2e-{index}"),
                model: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                health: v1::GpuHealth::Healthy as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage { seq: 1, body: Some(agent_message::Body::Register(register)) }).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut replies =
        AgentServiceClient::new(channel).connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let (forward, commands) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(message)) = replies.message().await {
            let _ = forward.send(message);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while registry.node(node).is_none() {
        if std::time::Instant::now() > deadline {
            bail!("{node} did not register");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((registry, tx, commands))
}

/// A deployment whose replica fails to load: on a real apiserver its status turns `Degraded` with the agent's reason
/// in the `Degraded` condition, and a Warning Event says why (the agent is a stand-in on loopback that answers the
/// `StartWorker` with `ModelNotFound`, as a real agent does for a missing file).
#[tokio::test]
#[ignore = "needs a cluster: KILN_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p kiln-e2e --run-ignored all"]
async fn a_deployment_that_cannot_start_is_degraded_with_a_warning_event() -> Result<()> {
    use k8s_openapi::api::events::v1::Event;
    use kiln_controller::{
        control::{ControlConfig, ControlPlane},
        k8s::reconcile,
    };
    use kiln_k8s_api::model_deployment::{DeploymentState, ModelDeployment};
    use kiln_proto::v1::{self, agent_message, command, controller_message, worker_event};
    use std::sync::Arc;

    let client = client_from_env().await?;
    install_crds(&client).await?;
    let node = format!("kiln-e2e-failing-node-{}", std::process::id());
    let (registry, session, mut commands) = registry_with_agent(&node, 1).await?;
    let control = ControlPlane::new(registry, ControlConfig::default());
    let ctx = Arc::new(reconcile::Context::new(client.clone(), Arc::clone(&control), Some("kiln-e2e".into())));
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    let name = format!("kiln-e2e-failing-{}", std::process::id());
    let md: ModelDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "model": { "uri": "file:///nonexistent/m.safetensors" }, "gpu": { "count": 1, "memoryPerGpu": "1Gi" },
                  "scaling": { "minReplicas": 1, "maxReplicas": 1 } }
    }))?;
    api.create(&Default::default(), &md).await?;
    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;
    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;

    // minReplicas 1: the control loop starts a replica; the stand-in agent fails it as a missing file.
    control.step();
    let start = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = commands.recv().await {
            if let Some(controller_message::Body::Command(c)) = message.body
                && let Some(command::Action::StartWorker(s)) = c.action
            {
                return Some((c.command_id, s.replica_id));
            }
        }
        None
    })
    .await?
    .context("no StartWorker came")?;
    let (command_id, replica_id) = start;
    let ack = v1::CommandAck {
        command_id: command_id.clone(),
        status: v1::AckStatus::Accepted as i32,
        message: String::new(),
    };
    session.send(v1::AgentMessage { seq: 2, body: Some(agent_message::Body::Ack(ack)) }).await?;
    let failed = v1::WorkerEvent {
        replica_id,
        command_id,
        time: None,
        event: Some(worker_event::Event::Failed(v1::WorkerFailed {
            reason: "ModelNotFound".into(),
            message: "/nonexistent/m.safetensors: No such file or directory".into(),
            retryable: true,
            ..Default::default()
        })),
    };
    session.send(v1::AgentMessage { seq: 3, body: Some(agent_message::Body::WorkerEvent(failed)) }).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.view(&format!("default/{name}")).is_none_or(|v| v.failure.is_none()) {
        if std::time::Instant::now() > deadline {
            bail!("the failed start never reached the control plane");
        }
        control.step();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;
    let status = api.get(&name).await?.status.context("no status written")?;
    assert_eq!(status.state, Some(DeploymentState::Degraded));
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").context("no Degraded condition")?;
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ModelNotFound"), "{degraded:?}");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let warning = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                && e.reason.as_deref() == Some("ModelNotFound")
        })
        .context("no ModelNotFound Event")?;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));

    api.delete(&name, &Default::default()).await?;
    reconcile::reconcile(Arc::new(api.get(&name).await?), Arc::clone(&ctx)).await?;
    drop(session);
    Ok(())
}
