//! Renders the CustomResourceDefinitions from the Rust types. The manifests in `crds/` (and the Helm chart's copy)
//! are exactly [`render`]'s output; `cargo xtask codegen` writes them and a test fails when they are stale.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{Error, GpuNode, GpuRental, ModelDeployment, Result, structural};

/// First lines of every generated manifest.
pub const HEADER: &str = "# Generated from controller/k8s/api by `cargo xtask codegen`. Do not edit.\n";

/// Every Kiln CRD, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ModelDeployment::crd(), GpuRental::crd(), GpuNode::crd()]
}

/// One generated manifest: its file name (`<group>_<plural>.yaml`, as controller-gen names them) and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// File name, without directory.
    pub file_name: String,
    /// YAML document, with [`HEADER`].
    pub contents: String,
}

/// Renders every CRD to YAML, refusing any whose schema is not structural.
pub fn render() -> Result<Vec<Manifest>> {
    crds().into_iter().map(|crd| render_one(&crd)).collect()
}

fn render_one(crd: &CustomResourceDefinition) -> Result<Manifest> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let problems = structural::check_crd(crd);
    if !problems.is_empty() {
        return Err(Error::NotStructural { name, problems });
    }
    let yaml = serde_yaml::to_string(crd).map_err(|source| Error::Render { name: name.clone(), source })?;
    Ok(Manifest {
        file_name: format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural),
        contents: format!("{HEADER}{yaml}"),
    })
}
