//! The Kiln controller's runtime: the adapters around the pure core — the agent registry, the controller's side of
//! `kiln.agent.v1` (`registry`); the control loop that turns the core's decisions into agent commands and serves
//! the gateway's backend (`control`); the predictions API (`gateway`, `webhook`, `limits`, `connections`), a
//! prediction's state as data (`prediction`) and what survives a restart (`store`); the spec port (`spec`: what the control plane serves, translated once from the
//! `ModelDeployment` spec) and the spec sources that feed it (`manifests`, and `k8s`: reconciler, `GpuNode` objects,
//! API keys, Lease); metrics (`metrics`); the billing service (`billing`: prices, ledger, meter, the usage read side); and the server that wires them into one process (`server`).

pub mod billing;
pub mod connections;
pub mod control;
pub mod gateway;
pub mod k8s;
pub mod limits;
pub mod manifests;
pub mod metrics;
pub mod prediction;
pub mod registry;
pub mod rental_records;
pub mod server;
pub mod spec;
pub mod store;
pub mod webhook;
