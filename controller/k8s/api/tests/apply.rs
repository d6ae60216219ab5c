//! The validator's server-side apply entry points: a patch is merged into the live object first and the whole
//! result is validated, for the main resource and for the status subresource.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use kiln_k8s_api::validate::Validator;
use serde_json::json;

fn deployment() -> serde_json::Value {
    json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": { "name": "m", "namespace": "d" },
        "spec": { "model": { "uri": "file:///m" }, "gpu": { "memoryPerGpu": "1Gi" },
                  "scaling": { "minReplicas": 0, "maxReplicas": 2 } }
    })
}

#[test]
fn an_apply_patch_is_merged_into_the_live_object_before_the_cel_rules_run() {
    let validator = Validator::default();
    let live = deployment();
    // Valid on its own, but merged into maxReplicas: 2 it breaks minReplicas <= maxReplicas.
    let patch = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": { "name": "m" },
                        "spec": { "scaling": { "minReplicas": 3 } } });
    let invalid = validator.validate_apply(&patch, Some(&live)).unwrap_err();
    assert!(
        invalid.to_string().contains("spec.scaling: Invalid value: minReplicas must not be greater than maxReplicas"),
        "{invalid}"
    );
    let patch = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": { "name": "m" },
                        "spec": { "scaling": { "minReplicas": 1 } } });
    let stored = validator.validate_apply(&patch, Some(&live)).unwrap();
    assert_eq!(stored["spec"]["scaling"], json!({ "minReplicas": 1, "maxReplicas": 2 }));
    assert_eq!(stored["spec"]["model"]["uri"], "file:///m", "fields the patch omits keep their live value");
}

#[test]
fn an_apply_patch_must_name_its_kind_and_a_status_patch_only_touches_the_status() {
    let validator = Validator::default();
    let live = deployment();
    let invalid = validator.validate_apply(&json!({ "spec": {} }), Some(&live)).unwrap_err();
    assert_eq!(invalid.errors.len(), 2, "{invalid}");
    assert!(invalid.to_string().contains("kind: Required value"), "{invalid}");

    let patch = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment",
                        "spec": { "scaling": { "minReplicas": 5 } }, "status": { "state": "Ready" } });
    let stored = validator.validate_status_apply(&patch, &live).unwrap();
    assert_eq!(stored["status"]["state"], "Ready");
    assert_eq!(stored["spec"], live["spec"], "the status endpoint ignores the spec");
    let bad = json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "status": { "state": "Nope" } });
    let invalid = validator.validate_status_apply(&bad, &live).unwrap_err();
    assert!(invalid.to_string().contains("status.state: Unsupported value: \"Nope\""), "{invalid}");
}
