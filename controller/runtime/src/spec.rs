//! The spec port: what the control plane serves ([`ServedSpec`]) and the one translation into it from the API's
//! `ModelDeployment` spec ([`translate`]), with its typed error ([`SpecError`]).
//!
//! Both spec sources feed the control plane through here: the manifest directory ([`crate::manifests`]) and the
//! Kubernetes watcher ([`crate::k8s::reconcile`]). The translation happens once, at this boundary: the control plane
//! ([`crate::control`]) takes [`ServedSpec`]s and never sees a `kiln_k8s_api` type. This module owns the defaults the
//! translation fills in (keep-alive, replica CPU and memory, the native runtime's copy streams) and must not touch
//! the control plane's state.

use kiln_core::{
    autoscale::{ScalingConfig, keepalive},
    control::DeploymentSpec,
    placement::GpuDemand,
};
use kiln_k8s_api::{
    model_deployment::{
        DEFAULT_REPLICA_CPU_MILLI, DEFAULT_REPLICA_MEMORY_BYTES, KeepAlivePolicy, ModelDeploymentSpec, Runtime,
    },
    quantity::{parse_bytes, parse_milli},
};
use kiln_proto::v1::{self, model_source};

/// A deployment as the control plane serves it: the core's view of it and what the agent needs to load it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedSpec {
    /// `namespace/name`.
    pub key: String,
    /// Identifies the spec: changes whenever the spec does (the predictions API's `version`).
    pub version: String,
    /// What the core decides with: resources, GPU demand, scaling, keep-alive, model URI and size, concurrency.
    pub core: DeploymentSpec,
    /// The model as the agent loads it: URI, size, runtime.
    pub source: v1::ModelSource,
    /// GPU memory a replica may use on each of its GPUs, bytes (`gpu.memoryPerGpu`).
    pub gpu_memory_bytes: u64,
}

/// Why a spec that passed the schema cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A quantity does not parse (the schema's pattern is looser than the parser).
    #[error("{field}: {source}")]
    Quantity {
        /// The field, as written in the spec (`gpu.memoryPerGpu`).
        field: &'static str,
        /// The parser's error.
        #[source]
        source: kiln_k8s_api::Error,
    },
    /// A value parses but does not fit what the runtime can represent.
    #[error("{field} {amount}{unit} is too large")]
    TooLarge {
        /// The field (`gpu.count`, `resources.cpu`, ...).
        field: &'static str,
        /// The value, in `unit`.
        amount: u64,
        /// The unit as written after the amount (`""`, `"m"`, `" bytes"`).
        unit: &'static str,
    },
    /// `runtime: process` without the `process` section that says what to run.
    #[error("runtime process needs model.process")]
    MissingProcess,
}

impl SpecError {
    /// The category (metric label): always `invalid_spec`.
    pub fn category(&self) -> &'static str {
        "invalid_spec"
    }

    /// Whether translating again may succeed: never, only a changed spec can.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Result of a translation.
pub type Result<T, E = SpecError> = std::result::Result<T, E>;

/// A deployment a spec source declares but that cannot be served, and why.
#[derive(Debug)]
pub struct Rejected {
    /// `namespace/name`.
    pub key: String,
    /// Why.
    pub error: SpecError,
}

/// The key of a deployment: `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn bytes(field: &'static str, quantity: &str) -> Result<u64> {
    parse_bytes(quantity).map_err(|source| SpecError::Quantity { field, source })
}

fn too_large(field: &'static str, amount: u64, unit: &'static str) -> SpecError {
    SpecError::TooLarge { field, amount, unit }
}

/// Translates the spec of deployment `key` at `version` into what the control plane serves.
pub fn translate(key: String, version: String, spec: &ModelDeploymentSpec) -> Result<ServedSpec> {
    let per_gpu = bytes("gpu.memoryPerGpu", &spec.gpu.memory_per_gpu.0)?;
    let gpu = match spec.gpu.count {
        n if n > 1 => GpuDemand::Whole(
            u8::try_from(n).map_err(|_| too_large("gpu.count", u64::try_from(n).unwrap_or(u64::MAX), ""))?,
        ),
        _ => GpuDemand::Memory(u32::try_from(per_gpu.div_ceil(1 << 20)).unwrap_or(u32::MAX).max(1)),
    };
    let weights_bytes = match &spec.model.size {
        Some(q) => bytes("model.size", &q.0)?,
        None => per_gpu,
    };
    let s = &spec.scaling;
    let seconds = s.keep_alive.duration.map(|d| std::time::Duration::from(d).as_secs_f64());
    let (keep_alive, cap) = match s.keep_alive.policy {
        KeepAlivePolicy::Fixed => {
            let t = seconds.unwrap_or(300.0);
            (keepalive::Policy::Fixed(t), f64::INFINITY)
        }
        KeepAlivePolicy::Adaptive => {
            (keepalive::Policy::Adaptive(keepalive::AdaptiveConfig::default()), seconds.unwrap_or(f64::INFINITY))
        }
    };
    let target = u32::try_from(s.target_concurrency.max(1)).unwrap_or(1);
    let resources = spec.resources.clone().unwrap_or_default();
    let cpu_milli = match &resources.cpu {
        Some(q) => parse_milli(&q.0).map_err(|source| SpecError::Quantity { field: "resources.cpu", source })?,
        None => DEFAULT_REPLICA_CPU_MILLI,
    };
    let memory_bytes = match &resources.memory {
        Some(q) => bytes("resources.memory", &q.0)?,
        None => DEFAULT_REPLICA_MEMORY_BYTES,
    };
    let core = DeploymentSpec {
        cpu_milli: u32::try_from(cpu_milli).map_err(|_| too_large("resources.cpu", cpu_milli, "m"))?.max(1),
        memory_mib: u32::try_from(memory_bytes.div_ceil(1 << 20))
            .map_err(|_| too_large("resources.memory", memory_bytes, " bytes"))?,
        gpu,
        gpu_models: spec.gpu.models.clone(),
        scaling: ScalingConfig {
            target_concurrency: f64::from(target),
            min_replicas: u32::try_from(s.min_replicas.max(0)).unwrap_or(0),
            max_replicas: u32::try_from(s.max_replicas.max(1)).unwrap_or(1),
            ..ScalingConfig::default()
        },
        keep_alive,
        keep_alive_cap_s: cap,
        model_uri: spec.model.uri.clone(),
        weights_bytes,
        max_concurrency: target,
        rental: None,
    };
    let runtime = match (spec.model.runtime, &spec.model.process) {
        (Runtime::Native, _) => model_source::Runtime::Native(v1::NativeRuntime { copy_streams: 4 }),
        (Runtime::Process, Some(p)) => model_source::Runtime::Process(v1::ProcessRuntime {
            command: p.command.clone(),
            args: p.args.clone(),
            env: p.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect(),
            port: u32::try_from(p.port).unwrap_or(0),
            readiness_path: p.readiness_path.clone(),
            startup_timeout_ms: std::time::Duration::from(p.startup_timeout).as_millis() as u32,
            termination_grace_ms: 10_000,
        }),
        (Runtime::Process, None) => return Err(SpecError::MissingProcess),
    };
    let source = v1::ModelSource {
        uri: spec.model.uri.clone(),
        size_bytes: weights_bytes,
        digest: String::new(),
        runtime: Some(runtime),
    };
    Ok(ServedSpec { key, version, core, source, gpu_memory_bytes: per_gpu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_k8s_api::model_deployment::ModelDeployment;

    fn spec(edit: impl FnOnce(&mut serde_json::Value)) -> ModelDeploymentSpec {
        let mut value = serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": { "name": "mlp", "namespace": "demo" },
            "spec": {
                "model": { "uri": "file:///models/mlp.safetensors" },
                "gpu": { "count": 1, "memoryPerGpu": "1Gi" },
                "scaling": { "minReplicas": 0, "maxReplicas": 2 }
            }
        });
        edit(&mut value);
        serde_json::from_value::<ModelDeployment>(value).unwrap().spec
    }

    #[test]
    fn a_spec_becomes_the_cores_view_and_the_agents_model_source() {
        let served = translate(key("demo", "mlp"), "7".into(), &spec(|_| {})).unwrap();
        assert_eq!((served.key.as_str(), served.version.as_str()), ("demo/mlp", "7"));
        assert_eq!(served.core.gpu, GpuDemand::Memory(1024));
        assert_eq!((served.core.cpu_milli, served.core.memory_mib), (250, 1024));
        assert!(matches!(served.core.keep_alive, keepalive::Policy::Adaptive(_)), "the API's default");
        assert_eq!(served.core.keep_alive_cap_s, f64::INFINITY);
        assert_eq!((served.core.scaling.min_replicas, served.core.scaling.max_replicas), (0, 2));
        assert_eq!((served.gpu_memory_bytes, served.source.size_bytes), (1 << 30, 1 << 30));
        assert!(matches!(served.source.runtime, Some(model_source::Runtime::Native(_))));
    }

    #[test]
    fn what_the_schema_lets_through_but_the_runtime_cannot_serve_is_a_typed_error() {
        let cpu = translate(key("demo", "mlp"), "1".into(), &spec(|v| v["spec"]["resources"]["cpu"] = "1e9".into()));
        let error = cpu.unwrap_err();
        assert!(matches!(error, SpecError::TooLarge { field: "resources.cpu", .. }), "{error:?}");
        assert_eq!(error.to_string(), "resources.cpu 1000000000000m is too large");
        assert_eq!((error.category(), error.is_retryable()), ("invalid_spec", false));
        let process =
            translate(key("demo", "mlp"), "1".into(), &spec(|v| v["spec"]["model"]["runtime"] = "process".into()));
        assert_eq!(process.unwrap_err().to_string(), "runtime process needs model.process");
        let size = translate(key("demo", "mlp"), "1".into(), &spec(|v| v["spec"]["model"]["size"] = "lots".into()));
        let error = size.unwrap_err();
        assert!(error.to_string().starts_with("model.size: invalid quantity \"lots\""), "{error}");
        assert!(std::error::Error::source(&error).is_some(), "the parser's error is kept as the source");
    }
}
