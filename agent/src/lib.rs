//! The Kiln node agent: one per GPU node (a DaemonSet in a cluster; in-process under `kiln up`).
//!
//! It owns everything that touches the GPU: NVML telemetry and Xid health ([`gpu`], [`telemetry`]), the simulated
//! backend used when NVML is absent, Prometheus metrics under dcgm-exporter's names ([`metrics`]), the native
//! model runtime ([`model`]), and the messages it sends the controller ([`register`]). Still to come (issue 5):
//! the `kiln.agent.v1` session to the controller, worker processes and the tiered weight cache.
//!
//! It is the only crate allowed `unsafe` code (FFI into CUDA and NVML). The workspace denies `unsafe_code`; the
//! agent's FFI modules opt in one by one with `#[allow(unsafe_code)]`, and every `unsafe` block carries a
//! `// SAFETY:` comment. (NVML is reached through `nvml-wrapper`, which needs none here.)

pub mod allocator;
pub mod bench;
pub mod cache;
pub mod commands;
pub mod cuda;
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod model;
pub mod node;
pub mod process;
pub mod register;
pub mod session;
pub mod telemetry;
pub mod workers;
