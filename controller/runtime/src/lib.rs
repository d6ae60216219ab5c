//! The Kiln controller's runtime: the adapters around the pure core. Today: the agent registry, the controller's
//! side of `kiln.agent.v1` (`registry`), the manifest-directory spec source (`manifests`) and the gateway's
//! predictions API over a backend (`gateway`). To come (issue 6): the reconcilers, and the control loop that turns
//! placement and autoscaling decisions into agent commands and serves the gateway's backend.

pub mod connections;
pub mod control;
pub mod gateway;
pub mod k8s;
pub mod limits;
pub mod manifests;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod webhook;
