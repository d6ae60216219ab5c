//! Kiln's pure core: the decisions of the control plane, as functions of a snapshot and a time.
//!
//! This crate owns the placement engine (which node and GPUs a replica or rental gets), the autoscaler (how many
//! replicas a deployment needs and how long an idle one stays warm), the control loop's decisions (`control`), the
//! rentals' lifecycle (`rental`) and money and metering (`money`, `billing`): what the controller runs. The research
//! harness that replays traces through it (the serving simulator, the trace parsers, the placement experiment) is
//! the `kiln-sim` crate.
//!
//! What it must not touch: no I/O, no async runtime, no Kubernetes, gRPC or HTTP types. Inputs are plain data
//! and a time passed in (seconds on the caller's clock); outputs are plans that the adapters (reconcilers, gRPC server,
//! gateway) carry out. The crate's manifest has no such dependency, so reaching for one is a compile error, and
//! `.ci/run` fails if one appears in its dependency tree. That is what lets `kiln simulate` run the very code the
//! controller runs, on a virtual clock, millions of times faster than real time.

pub mod autoscale;
pub mod billing;
pub mod control;
pub mod money;
pub mod placement;
pub mod rental;
pub mod rng;
