//! Against a real cluster: install the CRDs and check that the apiserver accepts the examples and rejects the
//! invalid ones with the same messages as the offline validator (a server-side dry run: nothing is stored).
//!
//! Runs only when `KILN_E2E_KUBECONFIG` names a kubeconfig file (any cluster, Kubernetes >= 1.30); otherwise it
//! prints why it was skipped and passes. Cluster-scoped CRDs are applied with server-side apply under the field
//! manager `kiln-e2e`; the test leaves them installed.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln_e2e::{expected_errors, repo_root};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

const KUBECONFIG_VAR: &str = "KILN_E2E_KUBECONFIG";

#[tokio::test]
async fn apiserver_agrees_with_the_offline_validator() -> Result<()> {
    let Some(path) = std::env::var_os(KUBECONFIG_VAR) else {
        eprintln!("SKIPPED: set {KUBECONFIG_VAR}=<kubeconfig file> to run this test against a real cluster");
        return Ok(());
    };
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {path:?}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;

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
                for want in expected_errors(&text) {
                    if !message.contains(want) {
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
