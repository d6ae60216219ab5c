//! Kiln's research harness, beside the core it exercises: the serving simulator (`serving`), which replays request
//! traces through the controller's own control loop ([`kiln_core::control::Control`]) on a virtual clock, with the
//! agents' behaviour (loads by cache tier, per-node weight caches, idle copies in GPU memory) simulated; the trace
//! parsers it and `kiln simulate` read (`traces`: ServeGen and Azure LLM; `openb`: the Alibaba GPU cluster trace);
//! the arrival process of ServeGen rate windows (`arrivals`); and the FGD paper's placement experiment as a pure
//! function (`experiment`), with the pod-list variants it is run on (`variant`).
//!
//! What it must not touch: like `kiln-core`, no I/O, no async runtime, no Kubernetes, gRPC or HTTP types; the
//! caller reads the files and passes their text. `.ci/run` checks its dependency tree as it checks the core's.

pub mod arrivals;
pub mod experiment;
pub mod openb;
pub mod serving;
pub mod traces;
pub mod variant;
