//! Offline validation of Kiln manifests against the generated CRD schemas, as the apiserver would do it on
//! `kubectl apply`: defaulting, OpenAPI schema validation (types, required fields, enums, ranges, lengths,
//! patterns, unknown fields as with kubectl's default strict field validation) and then the CEL rules
//! (`x-kubernetes-validations`, through kube's client-side CEL engine).
//!
//! Messages follow the apiserver's `field: Invalid value: ...` form so that a person sees the same message offline
//! as from a cluster. Used by `kiln validate` and the example tests; meant for `kiln up`'s manifest-directory mode.
//!
//! Supported Kubernetes versions: 1.30 and later (what the CRDs' CEL rules need). The wording is that of
//! kube-apiserver 1.35 and later; the one difference from 1.30 to 1.34 is how a failed CEL rule names the value
//! (see [`ExpectedError`]).
//!
//! [`Validator::validate_apply`] and [`Validator::validate_status_apply`] check a server-side apply patch the way
//! the apiserver does: merged into the live object first, then the whole result validated (for the status
//! subresource too, so a `spec` the schema requires matters there as well). The mock-apiserver tests of the
//! controller run every body they receive through them.
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

/// One `# expect-error:` line of an invalid example: a message its rejection must contain, as kube-apiserver 1.35
/// and later (and `kiln validate`) word it, with the wording of 1.30 to 1.34 where that differs, from a
/// `# expect-error-before-1.35:` line right after it. A failed CEL rule on an object reads
/// `spec: Invalid value: set exactly one of ...` from 1.35 on and `spec: Invalid value: "object": set exactly one of
/// ...` before; on a string field `Invalid value: "80GB": ...` from 1.35 on and `Invalid value: "string": ...` before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedError<'a> {
    /// The current wording (kube-apiserver >= 1.35, `kiln validate`).
    pub message: &'a str,
    /// The wording of kube-apiserver 1.30 to 1.34, when it differs.
    pub before_1_35: Option<&'a str>,
}

impl ExpectedError<'_> {
    /// Whether an apiserver's rejection (of any supported version) carries this message.
    pub fn found_in(&self, rejection: &str) -> bool {
        rejection.contains(self.message) || self.before_1_35.is_some_and(|older| rejection.contains(older))
    }
}

/// The `# expect-error:` lines of an invalid example (each with its `# expect-error-before-1.35:` line, if any).
pub fn expected_errors(text: &str) -> Vec<ExpectedError<'_>> {
    let mut expected: Vec<ExpectedError<'_>> = Vec::new();
    for line in text.lines() {
        if let Some(message) = line.strip_prefix("# expect-error: ") {
            expected.push(ExpectedError { message, before_1_35: None });
        } else if let Some(older) = line.strip_prefix("# expect-error-before-1.35: ")
            && let Some(last) = expected.last_mut()
        {
            last.before_1_35 = Some(older);
        }
    }
    expected
}

/// Validates objects against a set of CRDs.
pub struct Validator {
    kinds: Vec<Kind>,
    /// Every `pattern` in the schemas, compiled once (`Err` keeps a pattern that does not compile).
    patterns: HashMap<String, Result<Regex, regex::Error>>,
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

    /// A server-side apply patch (`PATCH` with `application/apply-patch+yaml`) to the main resource, merged into
    /// `live` (`None`: the patch creates the object), then validated as a whole; returns the object the apiserver
    /// would store. The patch must name its `apiVersion` and `kind` (and, when it creates the object,
    /// `metadata.name`); its `status`, if any, is ignored, as the main resource ignores status changes of a kind
    /// with a status subresource.
    ///
    /// The merge approximates server-side apply without field ownership: maps merge field by field, lists and
    /// scalars are replaced, and fields the patch omits keep their live value (as if another manager owned them).
    pub fn validate_apply(&self, patch: &Value, live: Option<&Value>) -> Result<Value, Invalid> {
        self.check_apply_patch(patch)?;
        let mut merged = live.cloned().unwrap_or_else(|| Value::Object(Default::default()));
        let mut patch = patch.clone();
        if let Some(fields) = patch.as_object_mut() {
            fields.remove("status");
        }
        merge(&mut merged, &patch);
        self.validate_update(&merged, live)?;
        Ok(merged)
    }

    /// A server-side apply patch to the status subresource (`.../status`), merged into `live`'s status; everything
    /// else comes from `live`, as the status endpoint ignores other changes. The apiserver validates the whole
    /// merged object, so an object without a `spec` its schema requires cannot get a status either. Returns the
    /// object the apiserver would store.
    pub fn validate_status_apply(&self, patch: &Value, live: &Value) -> Result<Value, Invalid> {
        self.check_apply_patch(patch)?;
        let mut merged = live.clone();
        if let (Some(status), Some(fields)) = (patch.get("status"), merged.as_object_mut()) {
            merge(fields.entry("status").or_insert_with(|| Value::Object(Default::default())), status);
        }
        self.validate_update(&merged, Some(live))?;
        Ok(merged)
    }

    fn check_apply_patch(&self, patch: &Value) -> Result<(), Invalid> {
        let text = |pointer: &str| patch.pointer(pointer).and_then(Value::as_str).unwrap_or("");
        let missing: Vec<&str> = [("/apiVersion", "apiVersion"), ("/kind", "kind")]
            .into_iter()
            .filter(|(pointer, _)| text(pointer).is_empty())
            .map(|(_, field)| field)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Invalid {
            resource: format!("{} {}", text("/apiVersion"), text("/kind")).trim().to_owned(),
            name: text("/metadata/name").to_owned(),
            errors: missing
                .into_iter()
                .map(|field| FieldError {
                    path: field.to_owned(),
                    message: format!("{field}: Required value: a server-side apply patch must set it"),
                })
                .collect(),
        })
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
            // kube's CEL engine can panic on values far outside any real range (its quantity comparison
            // overflows on exponents like `1e99999`); such an object is refused, never a crash of the caller.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.cel.validate(&kind.schema, &defaulted, old.as_ref())
            }));
            let Ok(result) = result else {
                errors.push(FieldError {
                    path: "spec".to_owned(),
                    message: "spec: Invalid value: the validation rules could not be evaluated (a value is out of \
                              range)"
                        .to_owned(),
                });
                return Err(Invalid { resource, name, errors });
            };
            if let Err(failures) = result {
                for failure in failures.iter() {
                    let path = failure.field_path.trim_start_matches('.').to_owned();
                    let body = cel_failure_body(value_at(&defaulted, &path), &failure.message);
                    let message = if path.is_empty() { body } else { format!("{path}: {body}") };
                    errors.push(FieldError { path, message });
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(Invalid { resource, name, errors }) }
    }
}

/// Merges `patch` into `target`: maps field by field, anything else replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, patch) => *target = patch.clone(),
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

fn collect_patterns(schema: &Value, out: &mut HashMap<String, Result<Regex, regex::Error>>) {
    match schema {
        Value::Object(map) => {
            if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
                out.entry(pattern.to_owned()).or_insert_with(|| Regex::new(pattern));
            }
            map.values().for_each(|v| collect_patterns(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}

struct SchemaWalker<'a> {
    errors: &'a mut Vec<FieldError>,
    patterns: &'a HashMap<String, Result<Regex, regex::Error>>,
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

/// The body of a CEL rule failure as kube-apiserver 1.35 and later words it (kubernetes#132798, #133832): the
/// failing value when it is a string, number, boolean or null (`Invalid value: "80GB": must be ...`), and no value
/// for an object or a list (`Invalid value: set exactly one of ...`). Versions 1.30 to 1.34 printed the value's
/// type instead (`Invalid value: "object": ...`); see [`ExpectedError`].
fn cel_failure_body(value: Option<&Value>, detail: &str) -> String {
    match value {
        Some(Value::Object(_) | Value::Array(_)) | None => format!("Invalid value: {detail}"),
        Some(Value::Null) => format!("Invalid value: \"null\": {detail}"),
        Some(scalar) => format!("Invalid value: {}: {detail}", show(scalar)),
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
