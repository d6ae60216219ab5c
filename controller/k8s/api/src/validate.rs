//! Offline validation of Kiln manifests against the generated CRD schemas, as the apiserver would do it on
//! `kubectl apply`: defaulting, OpenAPI schema validation (types, required fields, enums, ranges, lengths,
//! patterns, unknown fields as with kubectl's default strict field validation) and then the CEL rules
//! (`x-kubernetes-validations`, through kube's client-side CEL engine).
//!
//! Messages follow the apiserver's `field: Invalid value: ...` form so that a person sees the same message offline
//! as from a cluster. Used by `kiln validate` and the example tests; meant for `kiln up`'s manifest-directory mode.
//!
//! What this does not do: admission webhooks (Kiln has none), `metadata` validation beyond the object name, and
//! CEL cost-budget estimation.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::LazyLock,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel;
use regex::Regex;
use serde_json::Value;

/// One field-level validation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.scaling.minReplicas` (empty for the object itself).
    pub path: String,
    /// Full message in the apiserver's form, e.g. `spec.count: Invalid value: 0: ...`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// An object that the apiserver would reject, with every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `<Kind>.<group>`, e.g. `ModelDeployment.kiln.dev`, or the apiVersion/kind as written when unknown.
    pub resource: String,
    /// `metadata.name`, when present.
    pub name: String,
    /// Why, one entry per failed check.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid: ", self.resource, self.name)?;
        let messages: Vec<&str> = self.errors.iter().map(|e| e.message.as_str()).collect();
        if messages.len() == 1 { f.write_str(messages[0]) } else { write!(f, "[{}]", messages.join(", ")) }
    }
}

impl std::error::Error for Invalid {}

static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").expect("valid regex")
});

static RFC3339: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$").expect("valid regex")
});

struct Kind {
    group: String,
    version: String,
    kind: String,
    schema: Value,
}

/// Validates objects against a set of CRDs.
pub struct Validator {
    kinds: Vec<Kind>,
    /// Every `pattern` in the schemas, compiled once (`Err` keeps a pattern that does not compile).
    patterns: HashMap<String, Result<Regex, String>>,
    cel: cel::Validator,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self.kinds.iter().map(|k| format!("{}/{}/{}", k.group, k.version, k.kind)).collect();
        f.debug_struct("Validator").field("kinds", &kinds).finish()
    }
}

impl Default for Validator {
    fn default() -> Self {
        Self::new(&crate::crdgen::crds())
    }
}

impl Validator {
    /// A validator for the given CRDs (every served version).
    pub fn new(crds: &[CustomResourceDefinition]) -> Self {
        let mut kinds = Vec::new();
        for crd in crds {
            for version in crd.spec.versions.iter().filter(|v| v.served) {
                let schema = version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or(Value::Null);
                kinds.push(Kind {
                    group: crd.spec.group.clone(),
                    version: version.name.clone(),
                    kind: crd.spec.names.kind.clone(),
                    schema,
                });
            }
        }
        let mut patterns = HashMap::new();
        for kind in &kinds {
            collect_patterns(&kind.schema, &mut patterns);
        }
        Self { kinds, patterns, cel: cel::Validator::new() }
    }

    /// Validates a new object (create).
    pub fn validate(&self, object: &Value) -> Result<(), Invalid> {
        self.validate_update(object, None)
    }

    /// Validates an object; with `old`, also the transition rules (`oldSelf`) of an update from `old`.
    pub fn validate_update(&self, object: &Value, old: Option<&Value>) -> Result<(), Invalid> {
        let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind_name = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned();
        let Some(kind) =
            self.kinds.iter().find(|k| format!("{}/{}", k.group, k.version) == api_version && k.kind == kind_name)
        else {
            let supported: Vec<String> =
                self.kinds.iter().map(|k| format!("{}/{} {}", k.group, k.version, k.kind)).collect();
            return Err(Invalid {
                resource: format!("{api_version} {kind_name}").trim().to_owned(),
                name,
                errors: vec![FieldError {
                    path: String::new(),
                    message: format!(
                        "no matches for kind {kind_name:?} in version {api_version:?} (this validator knows: {})",
                        supported.join(", ")
                    ),
                }],
            });
        };
        let resource = format!("{}.{}", kind.kind, kind.group);

        let mut errors = Vec::new();
        check_name(object, &mut errors);
        let defaulted = cel::apply_defaults(&kind.schema, object);
        let mut walker = SchemaWalker { errors: &mut errors, patterns: &self.patterns };
        walker.check_root(&kind.schema, &defaulted);
        if errors.is_empty() {
            let old = old.map(|o| cel::apply_defaults(&kind.schema, o));
            if let Err(failures) = self.cel.validate(&kind.schema, &defaulted, old.as_ref()) {
                for failure in failures.iter() {
                    let path = failure.field_path.trim_start_matches('.').to_owned();
                    let ty = type_name(value_at(&defaulted, &path));
                    let message = if path.is_empty() {
                        format!("Invalid value: \"{ty}\": {}", failure.message)
                    } else {
                        format!("{path}: Invalid value: \"{ty}\": {}", failure.message)
                    };
                    errors.push(FieldError { path, message });
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(Invalid { resource, name, errors }) }
    }
}

fn check_name(object: &Value, errors: &mut Vec<FieldError>) {
    let path = "metadata.name".to_owned();
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        None | Some("") => {
            errors.push(FieldError { message: format!("{path}: Required value: name is required"), path });
        }
        Some(name) => {
            if name.len() > 253 || !DNS_SUBDOMAIN.is_match(name) {
                errors.push(FieldError {
                    message: format!(
                        "{path}: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
                         alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                    ),
                    path,
                });
            }
        }
    }
}

fn collect_patterns(schema: &Value, out: &mut HashMap<String, Result<Regex, String>>) {
    match schema {
        Value::Object(map) => {
            if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
                out.entry(pattern.to_owned()).or_insert_with(|| Regex::new(pattern).map_err(|e| e.to_string()));
            }
            map.values().for_each(|v| collect_patterns(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}

struct SchemaWalker<'a> {
    errors: &'a mut Vec<FieldError>,
    patterns: &'a HashMap<String, Result<Regex, String>>,
}

impl SchemaWalker<'_> {
    fn fail(&mut self, path: &str, message: String) {
        self.errors.push(FieldError { path: path.to_owned(), message: format!("{path}: {message}") });
    }

    /// As the apiserver's strict field validation (kubectl's default) words it.
    fn unknown_field(&mut self, path: &str) {
        self.errors.push(FieldError { path: path.to_owned(), message: format!("unknown field {path:?}") });
    }

    fn check_root(&mut self, schema: &Value, object: &Value) {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
        let Some(fields) = object.as_object() else {
            self.fail("<root>", "Invalid value: the object must be a map".to_owned());
            return;
        };
        for (key, value) in fields {
            match (key.as_str(), props.get(key)) {
                ("apiVersion" | "kind" | "metadata", _) => {}
                (_, Some(sub)) => self.check(sub, value, key),
                (_, None) => self.unknown_field(key),
            }
        }
        self.check_required(schema, fields, "");
    }

    fn check_required(&mut self, schema: &Value, fields: &serde_json::Map<String, Value>, path: &str) {
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if let Some(key) = required.as_str()
                && !fields.contains_key(key)
            {
                self.fail(&join(path, key), "Required value".to_owned());
            }
        }
    }

    fn check(&mut self, schema: &Value, value: &Value, path: &str) {
        let flag = |key: &str| schema.get(key).and_then(Value::as_bool).unwrap_or(false);
        if value.is_null() {
            if !flag("nullable") {
                let ty = schema.get("type").and_then(Value::as_str).unwrap_or("value");
                self.fail(path, format!("Invalid value: \"null\": {path} in body must be of type {ty}"));
            }
            return;
        }
        let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
        let type_ok = if flag("x-kubernetes-int-or-string") {
            value.is_string() || is_integer(value)
        } else {
            match ty {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => is_integer(value),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                _ => true,
            }
        };
        if !type_ok {
            let shown = if flag("x-kubernetes-int-or-string") { "integer or string" } else { ty };
            self.fail(path, format!("Invalid value: {}: {path} in body must be of type {shown}", show(value)));
            return;
        }

        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let list: Vec<String> = allowed.iter().map(show).collect();
            self.fail(path, format!("Unsupported value: {}: supported values: {}", show(value), list.join(", ")));
        }
        match value {
            Value::Number(n) => self.check_number(schema, n, path),
            Value::String(s) => self.check_string(schema, s, path),
            Value::Array(items) => self.check_array(schema, items, path),
            Value::Object(fields) => self.check_object(schema, fields, path),
            _ => {}
        }
    }

    fn check_number(&mut self, schema: &Value, n: &serde_json::Number, path: &str) {
        let Some(x) = n.as_f64() else { return };
        let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
        let exclusive = |key: &str| schema.get(key).and_then(Value::as_bool).unwrap_or(false);
        if let Some(min) = bound("minimum")
            && (x < min || (exclusive("exclusiveMinimum") && x == min))
        {
            let rel = if exclusive("exclusiveMinimum") { "greater than" } else { "greater than or equal to" };
            self.fail(path, format!("Invalid value: {n}: {path} in body should be {rel} {}", show_num(min)));
        }
        if let Some(max) = bound("maximum")
            && (x > max || (exclusive("exclusiveMaximum") && x == max))
        {
            let rel = if exclusive("exclusiveMaximum") { "less than" } else { "less than or equal to" };
            self.fail(path, format!("Invalid value: {n}: {path} in body should be {rel} {}", show_num(max)));
        }
    }

    fn check_string(&mut self, schema: &Value, s: &str, path: &str) {
        let len = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            self.fail(path, format!("Too long: may not be more than {max} bytes"));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            self.fail(path, format!("Invalid value: {s:?}: {path} in body should be at least {min} chars long"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match self.patterns.get(pattern).expect("collected at construction") {
                Ok(re) if !re.is_match(s) => {
                    self.fail(path, format!("Invalid value: {s:?}: {path} in body should match '{pattern}'"))
                }
                Ok(_) => {}
                Err(err) => {
                    self.fail(path, format!("Internal error: schema pattern {pattern:?} does not compile: {err}"))
                }
            }
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time") && !RFC3339.is_match(s) {
            self.fail(
                path,
                format!("Invalid value: {s:?}: {path} in body must be of type date-time (e.g. 2026-01-02T15:04:05Z)"),
            );
        }
    }

    fn check_array(&mut self, schema: &Value, items: &[Value], path: &str) {
        let count = items.len() as u64;
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && count > max
        {
            self.fail(path, format!("Too many: {count}: must have at most {max} items"));
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && count < min
        {
            self.fail(path, format!("Invalid value: {count}: {path} in body should have at least {min} items"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &format!("{path}[{i}]"));
            }
        }
        match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => {
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        self.fail(&format!("{path}[{i}]"), format!("Duplicate value: {}", show(item)));
                    }
                }
            }
            Some("map") => {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|ks| ks.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<String> = keys.iter().map(|k| item.get(*k).map(show).unwrap_or_default()).collect();
                    if !seen.insert(key.clone()) {
                        self.fail(&format!("{path}[{i}]"), format!("Duplicate value: {{{}}}", key.join(", ")));
                    }
                }
            }
            _ => {}
        }
    }

    fn check_object(&mut self, schema: &Value, fields: &serde_json::Map<String, Value>, path: &str) {
        let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool).unwrap_or(false);
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (key, value) in fields {
                match props.get(key) {
                    Some(sub) => self.check(sub, value, &join(path, key)),
                    None if preserve => {}
                    None => self.unknown_field(&join(path, key)),
                }
            }
        } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            for (key, value) in fields {
                self.check(additional, value, &join(path, key));
            }
        }
        self.check_required(schema, fields, path);
    }
}

/// The value at a dotted path such as `spec.gpu.models[0]`, if present.
fn value_at<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut node = root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indexes) = part.split_once('[').map_or((part, ""), |(k, rest)| (k, rest));
        node = node.get(key)?;
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            node = node.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(node)
}

/// The type name the apiserver prints for a value in CEL failures.
fn type_name(value: Option<&Value>) -> &'static str {
    match value {
        Some(Value::String(_)) => "string",
        Some(Value::Number(n)) if n.is_f64() => "number",
        Some(Value::Number(_)) => "integer",
        Some(Value::Bool(_)) => "boolean",
        Some(Value::Array(_)) => "array",
        Some(Value::Null) => "null",
        Some(Value::Object(_)) | None => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn show_num(x: f64) -> String {
    if x.fract() == 0.0 { format!("{}", x as i64) } else { x.to_string() }
}
