//! Helpers for Kiln's end-to-end tests (in `tests/`), which start real processes or talk to a real cluster.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e lives in the workspace").to_owned()
}

/// The `# expect-error:` lines of an invalid example: messages its rejection must contain.
pub fn expected_errors(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# expect-error: ")).collect()
}
