//! The spec source without a cluster: a directory of the same YAML manifests `kubectl apply` takes, watched for
//! changes (as the kubelet watches its static-pod directory). Every document is checked as the apiserver would
//! check it (schema, defaults, CEL rules: [`kiln_k8s_api::validate::Validator`]); an invalid one is reported with its
//! file and the apiserver's message and left out, and the valid ones are served regardless.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use kiln_k8s_api::{model_deployment::ModelDeployment, validate::Validator};
use serde::Deserialize;

/// A deployment read from a manifest.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Namespace (`default` when the manifest has none).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Identifies the spec: changes whenever the spec does (the predictions API's `version`).
    pub version: String,
    /// The resource.
    pub resource: ModelDeployment,
    /// Where it came from.
    pub file: PathBuf,
}

impl Deployment {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A manifest that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// File.
    pub file: PathBuf,
    /// Document in the file, from 1.
    pub document: usize,
    /// What is wrong (the apiserver's message for invalid resources).
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {}): {}", self.file.display(), self.document, self.message)
    }
}

/// What a directory holds.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    /// Valid deployments by `namespace/name`.
    pub deployments: BTreeMap<String, Deployment>,
    /// Documents left out.
    pub errors: Vec<ManifestError>,
}

fn version_of(value: &serde_json::Value) -> String {
    // FNV-1a over the canonical JSON of the spec (serde_json sorts no keys, but a spec read from the same text
    // always serialises the same way; a changed spec changes the version).
    let text = value.to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Deepest nesting of flow collections a manifest may have. The YAML parser refuses more than 128 levels too, but
/// only after scanning them in time quadratic in the depth: a 128 KB file of `[` held the loader for half a minute.
pub const MAX_FLOW_DEPTH: usize = 128;

/// Where `text`'s flow collections (`[`, `{`) first nest deeper than `limit`, as (document from 1, line from 1):
/// brackets are counted outside quoted scalars and comments. Conservative: a bracket inside a block scalar counts
/// too, so a manifest with over `limit` unclosed brackets in one is refused with a message saying why.
pub fn too_deep(text: &str, limit: usize) -> Option<(usize, usize)> {
    #[derive(PartialEq)]
    enum In {
        Plain,
        Double,
        Single,
        Comment,
    }
    let (mut state, mut depth, mut line, mut document, mut prev) = (In::Plain, 0usize, 1usize, 1usize, '\n');
    let mut at_line_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if at_line_start && c == '-' && text_at(&mut chars.clone(), "--") && line > 1 && state == In::Plain {
            document += 1;
        }
        at_line_start = c == '\n';
        match state {
            In::Comment if c == '\n' => state = In::Plain,
            In::Comment => {}
            In::Double if c == '\\' => {
                if chars.next() == Some('\n') {
                    line += 1;
                }
            }
            In::Double if c == '"' => state = In::Plain,
            In::Single if c == '\'' => state = In::Plain,
            In::Double | In::Single => {}
            In::Plain => {
                // A quote or comment only where one can start (after a blank or an indicator), so that `don't`
                // cannot hide the brackets after it.
                let boundary = prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':');
                match c {
                    '"' if boundary => state = In::Double,
                    '\'' if boundary => state = In::Single,
                    '#' if boundary => state = In::Comment,
                    '[' | '{' => {
                        depth += 1;
                        if depth > limit {
                            return Some((document, line));
                        }
                    }
                    ']' | '}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
        }
        if c == '\n' {
            line += 1;
        }
        prev = c;
    }
    None
}

/// Whether the next characters are `s`.
fn text_at(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, s: &str) -> bool {
    s.chars().all(|c| chars.next() == Some(c))
}

/// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive).
pub fn load_dir(dir: &Path, validator: &Validator) -> io::Result<ManifestSet> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut set = ManifestSet::default();
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                set.errors.push(ManifestError { file, document: 0, message: format!("cannot read: {e}") });
                continue;
            }
        };
        if let Some((document, line)) = too_deep(&text, MAX_FLOW_DEPTH) {
            let message = format!(
                "flow collections ([...] or {{...}}) nested deeper than {MAX_FLOW_DEPTH} levels at line {line} \
                 (the whole file is skipped)"
            );
            set.errors.push(ManifestError { file, document, message });
            continue;
        }
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let error = |message: String| ManifestError { file: file.clone(), document: index + 1, message };
            let value = match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => continue,
                Ok(value) => value,
                Err(e) => {
                    // The YAML parser cannot resynchronise after a syntax error: the rest of the file is unread.
                    set.errors.push(error(format!("not valid YAML (rest of the file skipped): {e}")));
                    break;
                }
            };
            if value.get("kind").and_then(|k| k.as_str()) != Some("ModelDeployment") {
                continue; // other kinds (GpuRental, GpuNode) are not served from manifests
            }
            if let Err(invalid) = validator.validate(&value) {
                set.errors.push(error(invalid.to_string()));
                continue;
            }
            let resource: ModelDeployment = match serde_json::from_value(value.clone()) {
                Ok(r) => r,
                Err(e) => {
                    set.errors.push(error(format!("does not read as a ModelDeployment: {e}")));
                    continue;
                }
            };
            let name = resource.metadata.name.clone().unwrap_or_default();
            let namespace = resource.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
            let deployment =
                Deployment { version: version_of(&value["spec"]), namespace, name, resource, file: file.clone() };
            let key = deployment.key();
            if let Some(first) = set.deployments.get(&key) {
                let message = format!("{key} is already defined in {}", first.file.display());
                set.errors.push(error(message));
                continue;
            }
            set.deployments.insert(key, deployment);
        }
    }
    Ok(set)
}

/// Notices changes to a directory's manifests by polling names, sizes and modification times.
#[derive(Debug, Default)]
pub struct DirWatcher {
    seen: Option<BTreeMap<PathBuf, (Option<SystemTime>, u64)>>,
}

impl DirWatcher {
    /// Whether anything changed in `dir` since the last call (the first call says yes).
    pub fn changed(&mut self, dir: &Path) -> io::Result<bool> {
        let mut now = BTreeMap::new();
        for entry in fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                continue;
            }
            let meta = entry.metadata()?;
            now.insert(path, (meta.modified().ok(), meta.len()));
        }
        let changed = self.seen.as_ref() != Some(&now);
        self.seen = Some(now);
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: mlp
  namespace: demo
spec:
  model:
    uri: file:///models/mlp.safetensors
  gpu:
    count: 1
    memoryPerGpu: 1Gi
  scaling:
    minReplicas: 0
    maxReplicas: 2
"#;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-manifests-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn valid_deployments_are_served_and_invalid_ones_reported_without_disturbing_them() {
        let d = dir("mixed");
        fs::write(d.join("a.yaml"), VALID).unwrap();
        let invalid = VALID.replace("name: mlp", "name: broken").replace("maxReplicas: 2", "maxReplicas: -1");
        fs::write(d.join("b.yaml"), invalid).unwrap();
        fs::write(d.join("c.yaml"), VALID).unwrap();
        fs::write(d.join("d.yml"), "kind: [unclosed").unwrap();
        fs::write(d.join("notes.txt"), "ignored").unwrap();
        let set = load_dir(&d, &Validator::default()).unwrap();
        assert_eq!(set.deployments.keys().collect::<Vec<_>>(), vec!["demo/mlp"]);
        let mlp = &set.deployments["demo/mlp"];
        assert_eq!(mlp.resource.spec.scaling.max_replicas, 2);
        assert_eq!(mlp.version.len(), 16);
        let messages: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(
            messages[0].contains("b.yaml (document 1): ModelDeployment.kiln.dev \"broken\" is invalid"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("c.yaml") && messages[1].contains("demo/mlp is already defined in"),
            "{messages:?}"
        );
        assert!(messages[2].contains("d.yml") && messages[2].contains("not valid YAML"), "{messages:?}");
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn the_watcher_notices_edits_and_the_version_follows_the_spec() {
        let d = dir("watch");
        let mut w = DirWatcher::default();
        assert!(w.changed(&d).unwrap(), "the first look counts as a change");
        assert!(!w.changed(&d).unwrap());
        fs::write(d.join("a.yaml"), VALID).unwrap();
        assert!(w.changed(&d).unwrap());
        let v1 = load_dir(&d, &Validator::default()).unwrap().deployments["demo/mlp"].version.clone();
        fs::write(d.join("a.yaml"), VALID.replace("maxReplicas: 2", "maxReplicas: 3")).unwrap();
        assert!(w.changed(&d).unwrap());
        let v2 = load_dir(&d, &Validator::default()).unwrap().deployments["demo/mlp"].version.clone();
        assert_ne!(v1, v2);
        fs::remove_dir_all(&d).ok();
    }
}
