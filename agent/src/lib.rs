//! The Kiln node agent: one per GPU node (a DaemonSet in a cluster; in-process under `kiln up`).
//!
//! It owns everything that touches the GPU: NVML telemetry and Xid health ([`gpu`], [`telemetry`]), the simulated
//! backend used when NVML is absent, Prometheus metrics under dcgm-exporter's names ([`metrics`]), the model
//! replicas ([`workers`]: the native runtime of [`model`] on the CPU or, through [`cuda`], a GPU; external model
//! servers through [`process`]), the tiered weight cache ([`cache`]), the `kiln.agent.v1` session to the
//! controller ([`session`], [`commands`], [`register`]) and its HTTP endpoints ([`http`]).
//!
//! It is the only crate allowed `unsafe` code (FFI into CUDA and NVML). The workspace denies `unsafe_code`; the
//! agent's FFI modules opt in one by one with `#[allow(unsafe_code)]` ([`cuda`], [`allocator`]), and every
//! `unsafe` block carries a `// SAFETY:` comment. (NVML is reached through `nvml-wrapper`, which needs none here.)

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
pub mod parallel;
pub mod process;
pub mod register;
pub mod session;
pub mod telemetry;
pub mod workers;
