//! Schema fragments shared by the three custom resources: quantities, durations and condition lists.
//!
//! Used through `#[schemars(schema_with = "...")]`. Each fragment carries the validation the apiserver enforces
//! (pattern, length, CEL rule) so that a malformed value is rejected at `kubectl apply` time with a message a
//! person understands, instead of surfacing later as a reconcile error.

use schemars::{Schema, SchemaGenerator, json_schema};

/// Go `time.ParseDuration` syntax, as accepted by `metav1.Duration` and `kube::core::Duration`, without sign.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A memory or byte size written by a person, e.g. `40Gi` or `80G`.
///
/// A string (not int-or-string) so that the CEL `quantity()` library can check it; the rule rejects anything that
/// is not a positive Kubernetes quantity.
pub(crate) fn byte_quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 32,
        "x-kubernetes-validations": [{
            "rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
            "message": "must be a positive size such as 40Gi or 80G"
        }]
    })
}

/// A CPU amount as a Kubernetes quantity (`500m`, `2`), positive.
pub(crate) fn cpu_quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 32,
        "x-kubernetes-validations": [{
            "rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
            "message": "must be a positive CPU amount such as 500m or 2"
        }]
    })
}

/// A duration such as `60s`, `5m` or `1h30m`.
pub(crate) fn duration(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 32,
        "pattern": DURATION_PATTERN,
    })
}

/// `metav1.Condition` list, keyed by `type` for server-side apply (one owner per condition type).
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "maxItems": 16,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

#[cfg(test)]
mod tests {
    use super::DURATION_PATTERN;

    #[test]
    fn duration_pattern_accepts_go_durations_and_rejects_the_rest() {
        let re = regex::Regex::new(DURATION_PATTERN).unwrap();
        for ok in ["60s", "5m", "1h30m", "1.5h", "250ms", "10us", "10µs"] {
            assert!(re.is_match(ok), "{ok} should be a duration");
        }
        for bad in ["", "60", "-5s", "5 m", "1d", "s", "ten seconds"] {
            assert!(!re.is_match(bad), "{bad} should not be a duration");
        }
    }
}
