//! Checks that a CRD's OpenAPI schema is *structural*, as the apiserver requires of `apiextensions.k8s.io/v1`
//! CRDs (and as pruning, defaulting and CEL rules assume).
//!
//! The rules checked, from the Kubernetes documentation on structural schemas:
//! - every node has a non-empty `type`, except where `x-kubernetes-int-or-string` or
//!   `x-kubernetes-preserve-unknown-fields` is set;
//! - no `$ref` and no `definitions` (everything is inlined);
//! - no `anyOf`/`oneOf`/`allOf`/`not`, except the exact int-or-string form (`anyOf: [{type: integer}, {type:
//!   string}]`) under `x-kubernetes-int-or-string` — an untyped junctor is exactly what makes a schema
//!   non-structural;
//! - `properties` and `additionalProperties` are not both set;
//! - `metadata` at the root constrains at most `name` and `generateName`;
//! - `x-kubernetes-list-type: map` has `x-kubernetes-list-map-keys`, each a required scalar property of the items.
//!
//! And, for the CEL rules (`x-kubernetes-validations`), what the apiserver checks when the CRD is created: each rule
//! compiles, uses only the variables of CRD validation (`self`, `oldSelf`), and its estimated cost stays within the
//! per-rule budget (kube's client-side estimator; coarser than the apiserver's).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{self, ScopeContext, WarningKind};
use serde_json::Value;

/// Problems with every version's schema of `crd`, one line each; empty when all are structural.
pub fn check_crd(crd: &CustomResourceDefinition) -> Vec<String> {
    let mut problems = Vec::new();
    for version in &crd.spec.versions {
        let Some(schema) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else {
            problems.push(format!("version {}: no openAPIV3Schema", version.name));
            continue;
        };
        match serde_json::to_value(schema) {
            Ok(value) => {
                problems.extend(check_schema(&value).into_iter().map(|p| format!("version {}: {p}", version.name)))
            }
            Err(err) => problems.push(format!("version {}: schema does not serialize: {err}", version.name)),
        }
    }
    problems
}

/// Problems with one root schema (`openAPIV3Schema`), each prefixed with the JSON path of the offending node.
pub fn check_schema(root: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    walk(root, "", true, &mut problems);
    if let Some(metadata) = root.pointer("/properties/metadata") {
        check_root_metadata(metadata, &mut problems);
    }
    problems
}

fn walk(node: &Value, path: &str, is_root: bool, problems: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    let Some(obj) = node.as_object() else {
        problems.push(format!("{at}: schema is not an object"));
        return;
    };
    let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
    let int_or_string = flag("x-kubernetes-int-or-string");
    let preserve_unknown = flag("x-kubernetes-preserve-unknown-fields");

    for key in ["$ref", "definitions", "$defs"] {
        if obj.contains_key(key) {
            problems.push(format!("{at}: `{key}` is not allowed; schemas must be inlined"));
        }
    }
    for junctor in ["anyOf", "oneOf", "allOf", "not"] {
        if let Some(branches) = obj.get(junctor)
            && !(int_or_string && junctor == "anyOf" && is_int_or_string_any_of(branches))
        {
            problems.push(format!(
                "{at}: untyped `{junctor}`; a structural schema states the type outside logical junctors"
            ));
        }
    }

    let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if ty.is_empty() && !int_or_string && !preserve_unknown {
        problems.push(format!("{at}: missing `type`"));
    }
    if is_root && ty != "object" {
        problems.push(format!("{at}: the root schema must be of type object"));
    }

    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{at}: `properties` and `additionalProperties` are mutually exclusive"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(child, &format!("{path}.{name}"), false, problems);
        }
    }
    if let Some(additional) = obj.get("additionalProperties")
        && additional.is_object()
    {
        walk(additional, &format!("{path}[*]"), false, problems);
    }
    if let Some(items) = obj.get("items") {
        walk(items, &format!("{path}[]"), false, problems);
    }
    if let Some(rules) = obj.get("x-kubernetes-validations").and_then(Value::as_array) {
        check_rules(node, rules, at, problems);
    }
    if ty == "array" && !obj.contains_key("items") {
        problems.push(format!("{at}: arrays must declare `items`"));
    }

    if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        check_list_map(obj, at, problems);
    }
}

fn check_rules(node: &Value, rules: &[Value], at: &str, problems: &mut Vec<String>) {
    let compiled = cel::compile_schema(node);
    for error in compiled.compilation_errors() {
        problems.push(format!("{at}: CEL rule does not compile: {error}"));
    }
    for rule in rules.iter().filter_map(|r| r.get("rule").and_then(Value::as_str)) {
        for warning in cel::check_rule_scope(rule, ScopeContext::CrdValidation) {
            problems.push(format!("{at}: CEL rule {rule:?}: {}", warning.message));
        }
        for warning in cel::estimate_rule_cost(rule, &compiled) {
            if warning.kind == WarningKind::CostExceeded {
                problems.push(format!("{at}: CEL rule {rule:?}: {}", warning.message));
            }
        }
    }
}

fn is_int_or_string_any_of(branches: &Value) -> bool {
    let types: Vec<_> = branches
        .as_array()
        .map(|bs| bs.iter().map(|b| b.get("type").and_then(Value::as_str).unwrap_or("")).collect())
        .unwrap_or_default();
    types == ["integer", "string"]
}

fn check_list_map(obj: &serde_json::Map<String, Value>, at: &str, problems: &mut Vec<String>) {
    let keys: Vec<&str> = obj
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|ks| ks.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        problems.push(format!("{at}: x-kubernetes-list-type map needs x-kubernetes-list-map-keys"));
        return;
    }
    let items = obj.get("items");
    let required: Vec<&str> = items
        .and_then(|i| i.get("required"))
        .and_then(Value::as_array)
        .map(|rs| rs.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for key in keys {
        let key_type = items.and_then(|i| i.pointer(&format!("/properties/{key}/type"))).and_then(Value::as_str);
        if !matches!(key_type, Some("string" | "integer" | "boolean")) {
            problems.push(format!("{at}: list map key `{key}` must be a scalar property of the items"));
        }
        let defaulted = items.and_then(|i| i.pointer(&format!("/properties/{key}/default"))).is_some();
        if !required.contains(&key) && !defaulted {
            problems.push(format!("{at}: list map key `{key}` must be required or defaulted"));
        }
    }
}

fn check_root_metadata(metadata: &Value, problems: &mut Vec<String>) {
    let Some(obj) = metadata.as_object() else { return };
    let allowed = ["type", "description", "properties"];
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            problems.push(format!(".metadata: `{key}` is not allowed at the root's metadata"));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for name in props.keys() {
            if name != "name" && name != "generateName" {
                problems.push(format!(".metadata: only name and generateName may be constrained, not `{name}`"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_generated_crds_are_structural() {
        for crd in crate::crdgen::crds() {
            let problems = check_crd(&crd);
            assert!(problems.is_empty(), "{}: {problems:#?}", crd.metadata.name.unwrap_or_default());
        }
    }

    #[test]
    fn untyped_any_of_is_reported_with_its_path() {
        let schema = json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "size": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    },
                },
            },
        });
        let problems = check_schema(&schema);
        assert!(problems.iter().any(|p| p.starts_with(".spec.size: untyped `anyOf`")), "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with(".spec.size: missing `type`")), "{problems:?}");
    }

    #[test]
    fn cel_rules_that_do_not_compile_or_reach_outside_self_are_reported() {
        let schema = json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "x-kubernetes-validations": [
                        {"rule": "self.a <= self.b", "message": "fine"},
                        {"rule": "self.a <=", "message": "syntax error"},
                        {"rule": "object.spec.a > 0", "message": "admission-policy variable"},
                    ],
                },
            },
        });
        let problems = check_schema(&schema);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].starts_with(".spec: CEL rule does not compile"), "{problems:#?}");
        assert!(problems[1].contains("variable 'object' is not available"), "{problems:#?}");
    }

    #[test]
    fn int_or_string_is_the_one_allowed_any_of() {
        let schema = json!({
            "type": "object",
            "properties": {
                "port": {
                    "x-kubernetes-int-or-string": true,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                },
            },
        });
        assert_eq!(check_schema(&schema), Vec::<String>::new());
    }

    #[test]
    fn refs_arrays_without_items_and_bad_list_maps_are_reported() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"$ref": "#/definitions/A"},
                "b": {"type": "array"},
                "c": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                    "items": {"type": "object", "properties": {"type": {"type": "string"}}},
                },
                "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            },
        });
        let problems = check_schema(&schema);
        let expected = [
            ".a: `$ref` is not allowed",
            ".b: arrays must declare `items`",
            ".c: list map key `type` must be required or defaulted",
            ".metadata: only name and generateName may be constrained",
        ];
        for e in expected {
            assert!(problems.iter().any(|p| p.starts_with(e)), "missing {e:?} in {problems:#?}");
        }
    }
}
