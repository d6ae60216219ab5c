//! Kiln's Kubernetes API: the custom resources of group `kiln.dev`, version `v1alpha1`.
//!
//! - [`ModelDeployment`] (namespaced, `md`): a model served on GPUs, scaled by Kiln, possibly to zero.
//! - [`GpuRental`] (namespaced, `rental`): whole GPUs rented by a tenant for a number of hours.
//! - [`GpuNode`] (cluster-scoped): a GPU node's inventory, health and weight cache, from its agent.
//!
//! This crate owns the wire types, their OpenAPI schema (with CEL validation rules), the CRD manifests generated
//! from them ([`crdgen`]), a structural-schema check ([`structural`]) and an offline validator that applies the
//! same schema and CEL rules as the apiserver ([`validate`]). It does no I/O and talks to no cluster: reconcilers
//! live in the controller's runtime crates.

#![warn(missing_docs)]
// `#[kube(printcolumn(type_ = "integer", ...), printcolumn(type_ = "integer", ...))]` repeats keys by design.
#![allow(clippy::duplicated_attributes)]

pub mod crdgen;
pub mod gpu_node;
pub mod gpu_rental;
pub mod model_deployment;
pub mod quantity;
mod schema;
pub mod structural;
pub mod validate;

pub use gpu_node::{GpuNode, GpuNodeSpec, GpuNodeStatus};
pub use gpu_rental::{GpuRental, GpuRentalSpec, GpuRentalStatus};
pub use model_deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
pub use schema::DURATION_PATTERN;

/// API group of every Kiln resource.
pub const GROUP: &str = "kiln.dev";
/// API version of every Kiln resource.
pub const VERSION: &str = "v1alpha1";

/// Condition types used in the resources' `status.conditions`.
pub mod condition {
    /// The resource does what its spec asks (a deployment serves, a rental's GPUs are handed over, a node
    /// heartbeats).
    pub const READY: &str = "Ready";
    /// Every desired replica of a deployment has a placement.
    pub const SCHEDULED: &str = "Scheduled";
    /// The deployment has no replica and waits for traffic.
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// Something the schema could not catch prevents the spec from being served as written.
    pub const DEGRADED: &str = "Degraded";
}

/// Crate errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRD could not be rendered to YAML.
    #[error("rendering CRD {name} to YAML: {source}")]
    Render {
        /// CRD name.
        name: String,
        /// Cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// A generated schema is not structural.
    #[error("CRD {name} does not have a structural schema:\n  {}", problems.join("\n  "))]
    NotStructural {
        /// CRD name.
        name: String,
        /// What is wrong, one line each.
        problems: Vec<String>,
    },
    /// A quantity string could not be parsed.
    #[error("invalid quantity {0:?}: expected a number with an optional suffix such as Ki, Mi, Gi, k, M or G")]
    InvalidQuantity(String),
}

/// Crate result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
