//! Rentals' status without a cluster: what a `GpuRental`'s status would hold in Kubernetes (when it was created, its
//! lifecycle, the GPUs it holds), kept in a JSON file in the state directory, so that `kiln up` restarted resumes a
//! rental where it was — an Active rental is not delivered (and billed) again.
//!
//! The manifest watcher ([`crate::server`]) reads the file once, gives each rental its record when it first serves
//! it, and writes the file back whenever a rental's record changes (atomically: a temporary file renamed over it).
//! It owns nothing else; the lifecycle is the core's.

use std::{collections::BTreeMap, fs, io, path::Path};

use serde::{Deserialize, Serialize};

use crate::control::RentalStatusView;

/// One rental's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RentalRecord {
    /// When the controller first saw the rental, seconds since the Unix epoch (a manifest has no creation time).
    pub created_at: f64,
    /// The lifecycle state ([`crate::control::lifecycle_from_json`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<String>,
    /// GPUs held: (node, index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<(String, u32)>,
}

/// Every rental's record, by `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RentalRecords {
    /// Records by key.
    pub rentals: BTreeMap<String, RentalRecord>,
}

impl RentalRecords {
    /// Reads the file; a missing file is an empty set. An unreadable one is an error that names the file.
    pub fn load(path: &Path) -> io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a rental record file: {e}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)
    }

    /// Takes the control plane's current views into the records; returns whether anything changed. Records of
    /// rentals that neither the manifests (`declared`) nor the control plane know any more are dropped.
    pub fn update(&mut self, views: &[RentalStatusView], declared: &[String]) -> bool {
        let before = self.clone();
        for v in views {
            if let Some(r) = self.rentals.get_mut(&v.key) {
                r.lifecycle = Some(v.lifecycle.clone());
                r.gpus = v.gpus.iter().map(|g| (g.node.clone(), g.index)).collect();
            }
        }
        self.rentals.retain(|k, _| declared.contains(k) || views.iter().any(|v| &v.key == k));
        *self != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_round_trip_and_a_broken_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("kiln-rental-records-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rentals.json");
        assert_eq!(RentalRecords::load(&path).unwrap(), RentalRecords::default());
        let mut records = RentalRecords::default();
        records.rentals.insert(
            "t/r".into(),
            RentalRecord { created_at: 1.5, lifecycle: Some("{}".into()), gpus: vec![("n".into(), 3)] },
        );
        records.save(&path).unwrap();
        assert_eq!(RentalRecords::load(&path).unwrap(), records);
        fs::write(&path, "not json").unwrap();
        assert!(RentalRecords::load(&path).unwrap_err().to_string().contains("rentals.json"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
