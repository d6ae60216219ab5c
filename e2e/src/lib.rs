//! Helpers for Kiln's end-to-end tests (in `tests/`), which start real processes or talk to a real cluster.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e lives in the workspace").to_owned()
}
