//! Against a real cluster: install the CRDs and check that the apiserver accepts the examples and rejects the
//! invalid ones with the same messages as the offline validator (a server-side dry run: nothing is stored).
//!
//! Runs only when `KILN_E2E_KUBECONFIG` names a kubeconfig file (any cluster, Kubernetes >= 1.30); otherwise it
//! prints why it was skipped and passes. Cluster-scoped CRDs are applied with server-side apply under the field
//! manager `kiln-e2e`; the test leaves them installed.

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
async fn apiserver_agrees_with_the_offline_validator() -> Result<()> {
    let Some(client) = client_from_env().await? else { return Ok(()) };

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

async fn client_from_env() -> Result<Option<Client>> {
    let Some(path) = std::env::var_os(KUBECONFIG_VAR) else {
        eprintln!("SKIPPED: set {KUBECONFIG_VAR}=<kubeconfig file> to run this test against a real cluster");
        return Ok(None);
    };
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {path:?}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Some(Client::try_from(config)?))
}

/// The reconciler against a real API server: the finalizer goes on first, then the status is applied (scaled to
/// zero, observed generation), and deleting the object takes the finalizer off so it goes away. Then the Lease:
/// one identity leads, another follows.
#[tokio::test]
async fn the_reconciler_and_leader_election_work_on_a_real_cluster() -> Result<()> {
    use kiln_controller::{
        control::{ControlConfig, ControlPlane},
        k8s::{lease::LeaderElector, reconcile},
        registry::{MonotonicClock, Registry, RegistryConfig},
    };
    use kiln_k8s_api::model_deployment::{DeploymentState, ModelDeployment};
    use std::sync::Arc;

    let Some(client) = client_from_env().await? else { return Ok(()) };
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
