//! Serialization round trips, defaults, the CRD metadata operators see, and rules that need an update to check.

#![allow(clippy::unwrap_used)]

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kiln_k8s_api::{
    GpuRental, ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus,
    crdgen::crds,
    model_deployment::{
        CacheTier, ColdStart, ColdStartPhase, ColdStartPhaseName, DeploymentState, GpuRequirement, KeepAlive,
        KeepAlivePolicy, ModelSource, ProcessRuntime, ReplicaCounts, ReplicaResources, Runtime, Scaling,
    },
    validate::Validator,
};
use serde_json::json;

fn deployment() -> ModelDeployment {
    let mut md = ModelDeployment::new(
        "llm",
        ModelDeploymentSpec {
            model: ModelSource {
                uri: "s3://models/llm/".into(),
                size: Some(Quantity("140Gi".into())),
                runtime: Runtime::Process,
                process: Some(ProcessRuntime {
                    command: vec!["vllm".into(), "serve".into()],
                    args: vec!["$(MODEL_PATH)".into()],
                    env: vec![],
                    port: 8000,
                    readiness_path: "/health".into(),
                    startup_timeout: "15m".parse().unwrap(),
                }),
            },
            gpu: GpuRequirement { count: 2, memory_per_gpu: Quantity("80Gi".into()), models: vec![], rental: None },
            scaling: Scaling {
                min_replicas: 0,
                max_replicas: 3,
                target_concurrency: 16,
                keep_alive: KeepAlive { policy: KeepAlivePolicy::Fixed, duration: Some("10m".parse().unwrap()) },
            },
            cold_start_budget: Some("2m".parse().unwrap()),
            resources: Some(ReplicaResources { cpu: Some(Quantity("8".into())), memory: None }),
        },
    );
    md.metadata.namespace = Some("default".into());
    md.status = Some(ModelDeploymentStatus {
        observed_generation: Some(3),
        state: Some(DeploymentState::Ready),
        replicas: ReplicaCounts { desired: 1, loading: 0, ready: 1, idle: 0 },
        last_cold_start: Some(ColdStart {
            started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-25T10:00:00Z".parse().unwrap()),
            duration: "41.2s".into(),
            duration_ms: 41_200,
            node: "gpu-a1".into(),
            source: CacheTier::Host,
            phases: vec![
                ColdStartPhase { name: ColdStartPhaseName::HostToDevice, duration_ms: 3_100 },
                ColdStartPhase { name: ColdStartPhaseName::Init, duration_ms: 38_100 },
            ],
        }),
        ..Default::default()
    });
    md
}

#[test]
fn model_deployment_round_trips_through_json_and_yaml_in_camel_case() {
    let md = deployment();
    let value = serde_json::to_value(&md).unwrap();
    assert_eq!(value["apiVersion"], "kiln.dev/v1alpha1");
    assert_eq!(value["spec"]["gpu"]["memoryPerGpu"], "80Gi");
    assert_eq!(value["spec"]["scaling"]["keepAlive"], json!({"policy": "fixed", "duration": "600s"}));
    assert_eq!(value["spec"]["model"]["process"]["startupTimeout"], "900s");
    assert_eq!(value["status"]["lastColdStart"]["phases"][0], json!({"name": "HostToDevice", "durationMs": 3100}));
    assert_eq!(serde_json::from_value::<ModelDeployment>(value).unwrap(), md);

    let yaml = serde_yaml::to_string(&md).unwrap();
    assert_eq!(serde_yaml::from_str::<ModelDeployment>(&yaml).unwrap(), md);
}

#[test]
fn a_minimal_spec_gets_the_documented_defaults() {
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"uri": "file:///m.safetensors"}, "gpu": {"memoryPerGpu": "1Gi"}},
    }))
    .unwrap();
    assert_eq!(md.spec.model.runtime, Runtime::Native);
    assert_eq!(md.spec.gpu.count, 1);
    assert_eq!(md.spec.scaling, Scaling::default());
    assert_eq!(md.spec.scaling.min_replicas, 0, "scale to zero is the default");
    assert_eq!(md.spec.scaling.keep_alive.policy, KeepAlivePolicy::Adaptive);
    assert_eq!(md.spec.cold_start_budget, None);
}

#[test]
fn serialized_deployments_pass_the_schema_and_rules() {
    let validator = Validator::default();
    let value = serde_json::to_value(deployment()).unwrap();
    validator.validate(&value).unwrap();
}

#[test]
fn crds_carry_names_scope_and_printer_columns_for_operators() {
    let by_kind = |kind: &str| crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    let columns = |kind: &str| -> Vec<String> {
        by_kind(kind).spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name)
            .collect()
    };

    let md = by_kind("ModelDeployment");
    assert_eq!(md.metadata.name.as_deref(), Some("modeldeployments.kiln.dev"));
    assert_eq!(md.spec.scope, "Namespaced");
    assert_eq!(md.spec.names.short_names, Some(vec!["md".to_owned()]));
    assert_eq!(columns("ModelDeployment"), ["Ready", "Desired", "GPUs", "GPU-Mem", "State", "Cold-Start", "Age"]);

    let rental = by_kind("GpuRental");
    assert_eq!(rental.spec.names.short_names, Some(vec!["rental".to_owned()]));
    assert_eq!(columns("GpuRental"), ["Phase", "GPUs", "Model", "Start", "End", "Billed", "Amount", "Age"]);

    let node = by_kind("GpuNode");
    assert_eq!(node.spec.scope, "Cluster");
    assert_eq!(columns("GpuNode"), ["GPUs", "Free", "Healthy", "Model", "Heartbeat", "Age"]);

    for crd in crds() {
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let status = version.subresources.as_ref().and_then(|s| s.status.as_ref());
        assert!(status.is_some(), "{} must have the status subresource", crd.spec.names.kind);
    }
}

#[test]
fn the_schema_carries_the_cel_rules_with_their_messages() {
    let md = serde_json::to_value(&crds()[0]).unwrap();
    let scaling =
        &md["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["scaling"];
    assert_eq!(
        scaling["x-kubernetes-validations"],
        json!([{"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not be greater than maxReplicas"}])
    );
    assert_eq!(scaling["properties"]["minReplicas"]["minimum"], json!(0.0));
}

fn rental(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "GpuRental", "metadata": {"name": "r"}, "spec": spec})
}

#[test]
fn rental_times_are_compared_as_timestamps() {
    let validator = Validator::default();
    let ok = rental(json!({"gpuModel": "H100", "count": 1,
        "startTime": "2026-12-01T00:00:00Z", "endTime": "2026-12-01T08:00:00Z"}));
    validator.validate(&ok).unwrap();
    let backwards = rental(json!({"gpuModel": "H100", "count": 1,
        "startTime": "2026-12-01T08:00:00Z", "endTime": "2026-12-01T00:00:00Z"}));
    let err = validator.validate(&backwards).unwrap_err().to_string();
    assert!(err.contains("endTime must be after startTime"), "{err}");
    let neither = rental(json!({"gpuModel": "H100", "count": 1}));
    let err = validator.validate(&neither).unwrap_err().to_string();
    assert!(err.contains("set exactly one of hours or endTime"), "{err}");
}

#[test]
fn a_rental_cannot_change_its_gpus_after_creation() {
    let validator = Validator::default();
    let old = rental(json!({"gpuModel": "H100", "count": 2, "hours": 4}));
    let longer = rental(json!({"gpuModel": "H100", "count": 2, "hours": 8}));
    validator.validate_update(&longer, Some(&old)).unwrap();
    let more = rental(json!({"gpuModel": "H100", "count": 4, "hours": 4}));
    let err = validator.validate_update(&more, Some(&old)).unwrap_err().to_string();
    assert!(err.contains("gpuModel and count cannot change after creation"), "{err}");
    // On create there is no oldSelf: the transition rule does not apply.
    validator.validate(&more).unwrap();
    let _: GpuRental = serde_json::from_value(more).unwrap();
}

#[test]
fn object_names_must_be_dns_subdomains() {
    let validator = Validator::default();
    let mut bad = rental(json!({"gpuModel": "H100", "count": 1, "hours": 1}));
    bad["metadata"]["name"] = "My_Rental".into();
    let err = validator.validate(&bad).unwrap_err().to_string();
    assert!(err.contains("metadata.name: Invalid value: \"My_Rental\": a lowercase RFC 1123 subdomain"), "{err}");
}

#[test]
fn cache_tiers_convert_to_and_from_the_core_tier() {
    use kiln_core::autoscale::coldstart::Tier;
    let pairs = [(Tier::Gpu, CacheTier::Gpu), (Tier::HostRam, CacheTier::Host), (Tier::Disk, CacheTier::Disk)];
    for (core, api) in pairs.into_iter().chain([(Tier::Remote, CacheTier::Remote)]) {
        assert_eq!(CacheTier::from(core), api);
        assert_eq!(Tier::from(api), core);
    }
}
