//! `crds/` and the Helm chart's copy must be exactly what the Rust types generate: change a field without running
//! `cargo xtask codegen` and this fails.

use std::{fs, path::PathBuf};

#[test]
fn checked_in_crds_match_the_rust_types() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let manifests = kiln_k8s_api::crdgen::render().expect("CRDs render");
    assert_eq!(manifests.len(), 3);
    for dir in ["crds", "charts/kiln/crds"] {
        for manifest in &manifests {
            let path = root.join(dir).join(&manifest.file_name);
            let on_disk = fs::read_to_string(&path).unwrap_or_default();
            assert!(on_disk == manifest.contents, "{} is stale or missing; run `cargo xtask codegen`", path.display());
        }
        let count = fs::read_dir(root.join(dir)).unwrap().count();
        assert_eq!(count, manifests.len(), "{dir} holds files that are not generated; run `cargo xtask codegen`");
    }
}
