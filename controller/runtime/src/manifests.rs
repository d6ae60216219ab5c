//! The spec source without a cluster: a directory of the same YAML manifests `kubectl apply` takes, watched for
//! changes (as the kubelet watches its static-pod directory). Every document is checked as the apiserver would
//! check it (schema, defaults, CEL rules: [`kiln_k8s_api::validate::Validator`]); an invalid one is reported with its
//! file and the apiserver's message and left out, and the valid ones are served regardless.
//!
//! What the control plane serves comes out through the spec port: [`ManifestSet::served`] translates each valid
//! deployment with [`crate::spec::translate`], and lists those that cannot be served.
//!
//! Only regular files are read, and only up to [`MAX_MANIFEST_BYTES`]: a FIFO, a device, a socket, a directory, a
//! symlink to one of them or a symlink loop is reported as invalid without being read, so nothing in the directory
//! can block the reader or fill memory (see [`read_manifest`]).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use kiln_k8s_api::{GpuRental, model_deployment::ModelDeployment, validate::Validator};
use serde::Deserialize;

use crate::spec::{self, Rejected, ServedSpec};

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
        spec::key(&self.namespace, &self.name)
    }

    /// What the control plane serves of it, or why it cannot be served.
    pub fn served(&self) -> spec::Result<ServedSpec> {
        spec::translate(self.key(), self.version.clone(), &self.resource.spec)
    }
}

/// A rental read from a manifest.
#[derive(Debug, Clone)]
pub struct RentalManifest {
    /// Namespace (`default` when the manifest has none).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The resource.
    pub resource: GpuRental,
    /// Where it came from.
    pub file: PathBuf,
}

impl RentalManifest {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        spec::key(&self.namespace, &self.name)
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
    /// Valid rentals by `namespace/name`.
    pub rentals: BTreeMap<String, RentalManifest>,
    /// Documents left out.
    pub errors: Vec<ManifestError>,
}

impl ManifestSet {
    /// The valid deployments translated for the control plane, and those whose spec cannot be served, with why.
    pub fn served(&self) -> (Vec<ServedSpec>, Vec<Rejected>) {
        let mut served = Vec::new();
        let mut rejected = Vec::new();
        for (key, d) in &self.deployments {
            match d.served() {
                Ok(spec) => served.push(spec),
                Err(error) => rejected.push(Rejected { key: key.clone(), error }),
            }
        }
        (served, rejected)
    }
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

/// Largest manifest file read (1 MiB): far above any real `ModelDeployment` (a few KiB), small enough that a
/// directory of them cannot exhaust memory. A larger file is listed as invalid and not read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Why a manifest file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not a regular file (the target's kind, for a symlink).
    #[error("not a regular file ({kind}); only regular files are read")]
    NotRegular {
        /// What it is: "a FIFO", "a character device", ...
        kind: &'static str,
    },
    /// A symlink that leads back to itself.
    #[error("a symbolic link loop (too many levels of symbolic links)")]
    SymlinkLoop,
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("larger than the limit of {limit} bytes per manifest file")]
    TooLarge {
        /// [`MAX_MANIFEST_BYTES`].
        limit: u64,
    },
    /// Not UTF-8 text.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// Opening or reading failed.
    #[error("cannot read: {0}")]
    Io(#[source] io::Error),
}

fn kind_of(file_type: fs::FileType) -> Option<&'static str> {
    if file_type.is_file() {
        None
    } else if file_type.is_fifo() {
        Some("a FIFO")
    } else if file_type.is_char_device() {
        Some("a character device")
    } else if file_type.is_block_device() {
        Some("a block device")
    } else if file_type.is_socket() {
        Some("a socket")
    } else if file_type.is_dir() {
        Some("a directory")
    } else {
        Some("not a file")
    }
}

fn io_error(e: io::Error) -> ReadError {
    if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) { ReadError::SymlinkLoop } else { ReadError::Io(e) }
}

/// Reads one manifest file without ever blocking or reading more than `limit` bytes: a look at what the path leads
/// to refuses special files before they are opened (opening some devices has effects), then the file is opened with
/// `O_NONBLOCK` (a FIFO swapped in meanwhile cannot block the open) and `O_NOCTTY`, and the opened descriptor is
/// checked again (`fstat`: what was opened is what is read, whatever the path points to by then), and at most
/// `limit + 1` bytes are read, so a file that grows after the check is still refused.
pub fn read_manifest(path: &Path, limit: u64) -> Result<String, ReadError> {
    let check = |meta: &fs::Metadata| match kind_of(meta.file_type()) {
        Some(kind) => Err(ReadError::NotRegular { kind }),
        None if meta.len() > limit => Err(ReadError::TooLarge { limit }),
        None => Ok(()),
    };
    check(&fs::metadata(path).map_err(io_error)?)?;
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY;
    let file = fs::OpenOptions::new().read(true).custom_flags(flags.bits()).open(path).map_err(io_error)?;
    check(&file.metadata().map_err(ReadError::Io)?)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8)
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

/// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive); see [`read_manifest`] for which files are read.
pub fn load_dir(dir: &Path, validator: &Validator) -> io::Result<ManifestSet> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut set = ManifestSet::default();
    for file in files {
        let text = match read_manifest(&file, MAX_MANIFEST_BYTES) {
            Ok(text) => text,
            Err(e) => {
                set.errors.push(ManifestError { file, document: 0, message: e.to_string() });
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
            let kind = value.get("kind").and_then(|k| k.as_str());
            if !matches!(kind, Some("ModelDeployment" | "GpuRental")) {
                continue; // other kinds (GpuNode) come from the agents
            }
            if let Err(invalid) = validator.validate(&value) {
                set.errors.push(error(invalid.to_string()));
                continue;
            }
            if kind == Some("GpuRental") {
                let resource: GpuRental = match serde_json::from_value(value.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        set.errors.push(error(format!("does not read as a GpuRental: {e}")));
                        continue;
                    }
                };
                let name = resource.metadata.name.clone().unwrap_or_default();
                let namespace = resource.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
                let rental = RentalManifest { namespace, name, resource, file: file.clone() };
                let key = rental.key();
                if let Some(first) = set.rentals.get(&key) {
                    let message = format!("rental {key} is already defined in {}", first.file.display());
                    set.errors.push(error(message));
                    continue;
                }
                set.rentals.insert(key, rental);
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

    /// Rentals are read beside deployments: a valid one is kept (its spec as written), one that breaks a CEL rule is
    /// reported with the apiserver's message, and a second definition of a rental's name is refused.
    #[test]
    fn rentals_are_read_and_checked_like_deployments() {
        let d = dir("rentals");
        let rental = "apiVersion: kiln.dev/v1alpha1\nkind: GpuRental\nmetadata:\n  name: train\n  namespace: t\n\
                      spec:\n  gpuModel: H100\n  count: 2\n  hours: 3\n  lendWhenIdle: true\n";
        fs::write(d.join("a.yaml"), format!("{VALID}---\n{rental}")).unwrap();
        let both = rental
            .replace("name: train", "name: both")
            .replace("hours: 3", "hours: 3\n  endTime: \"2026-12-01T00:00:00Z\"");
        fs::write(d.join("b.yaml"), both).unwrap();
        fs::write(d.join("c.yaml"), rental).unwrap();
        let set = load_dir(&d, &Validator::default()).unwrap();
        assert_eq!(set.deployments.keys().collect::<Vec<_>>(), vec!["demo/mlp"]);
        assert_eq!(set.rentals.keys().collect::<Vec<_>>(), vec!["t/train"]);
        let train = &set.rentals["t/train"].resource.spec;
        assert_eq!((train.count, train.hours, train.lend_when_idle), (2, Some(3), true));
        let messages: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].contains("b.yaml") && messages[0].contains("set exactly one of hours or endTime"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("c.yaml") && messages[1].contains("rental t/train is already defined"),
            "{messages:?}"
        );
        fs::remove_dir_all(&d).ok();
    }

    /// A FIFO, symlinks to a device and to a directory, a symlink loop, a socket and a file over the limit beside a
    /// valid manifest: each is listed with why, none is read (a FIFO read would block this test forever, `/dev/zero`
    /// would fill memory), and the valid manifest is served.
    #[test]
    fn special_files_and_huge_files_are_reported_without_being_read() {
        let d = dir("special");
        fs::write(d.join("a-valid.yaml"), VALID).unwrap();
        nix::unistd::mkfifo(&d.join("b-fifo.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("c-zero.yaml")).unwrap();
        std::os::unix::fs::symlink("e-loop.yaml", d.join("d-loop.yaml")).unwrap();
        std::os::unix::fs::symlink("d-loop.yaml", d.join("e-loop.yaml")).unwrap();
        let huge = format!("{VALID}\n#{}\n", "x".repeat(MAX_MANIFEST_BYTES as usize));
        fs::write(d.join("f-huge.yaml"), huge).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(d.join("g-socket.yaml")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("h-dir.yaml")).unwrap();
        std::os::unix::fs::symlink("/dev/null", d.join("i-null.yml")).unwrap();

        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.clone();
        std::thread::spawn(move || tx.send(load_dir(&dir, &Validator::default()).unwrap()));
        let set = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("load_dir blocked");
        assert_eq!(set.deployments.keys().collect::<Vec<_>>(), vec!["demo/mlp"]);
        let by_file: BTreeMap<String, String> = set
            .errors
            .iter()
            .map(|e| (e.file.file_name().unwrap().to_string_lossy().into_owned(), e.message.clone()))
            .collect();
        let expect = [
            ("b-fifo.yaml", "not a regular file (a FIFO)"),
            ("c-zero.yaml", "not a regular file (a character device)"),
            ("d-loop.yaml", "a symbolic link loop"),
            ("e-loop.yaml", "a symbolic link loop"),
            ("f-huge.yaml", "larger than the limit of 1048576 bytes per manifest file"),
            ("g-socket.yaml", "not a regular file (a socket)"),
            ("h-dir.yaml", "not a regular file (a directory)"),
            ("i-null.yml", "not a regular file (a character device)"),
        ];
        assert_eq!(by_file.len(), expect.len(), "{by_file:#?}");
        for (file, message) in expect {
            assert!(by_file.get(file).is_some_and(|m| m.starts_with(message)), "{file}: {by_file:#?}");
        }
        assert!(set.errors.iter().all(|e| e.document == 0));
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_file_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let d = dir("limit");
        let path = d.join("a.yaml");
        fs::write(&path, "x".repeat(64)).unwrap();
        assert_eq!(read_manifest(&path, 64).unwrap().len(), 64);
        assert!(matches!(read_manifest(&path, 63), Err(ReadError::TooLarge { limit: 63 })));
        fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_manifest(&path, 64), Err(ReadError::NotUtf8)));
        // A symlink to a regular file is read (ConfigMap volumes are symlinks).
        fs::write(d.join("target"), "kind: x").unwrap();
        std::os::unix::fs::symlink(d.join("target"), d.join("link.yaml")).unwrap();
        assert_eq!(read_manifest(&d.join("link.yaml"), 64).unwrap(), "kind: x");
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
