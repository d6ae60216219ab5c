//! Xid classification: which driver-reported errors mean the GPU must stop taking work.
//!
//! From NVIDIA's Xid catalogue: errors that implicate the hardware or leave it in an unknown state make the GPU
//! unhealthy until a reset or recovery is observed; errors that usually mean an application fault (an illegal
//! memory access in one process, a graphics exception) are recorded and exported but leave the GPU in service.

/// What an Xid means for scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The GPU must not receive work until it is reset or recovers.
    Critical,
    /// Worth a warning (and a metric); the GPU stays in service.
    Warning,
    /// Usually an application error; recorded only.
    Application,
}

/// The severity and a human-readable description of `xid`.
pub fn classify(xid: u32) -> (Severity, &'static str) {
    match xid {
        48 => (Severity::Critical, "double-bit ECC error"),
        62 => (Severity::Critical, "internal micro-controller halt"),
        63 => (Severity::Warning, "ECC page retirement or row remapping recorded"),
        64 => (Severity::Critical, "ECC page retirement or row remapping failure"),
        74 => (Severity::Critical, "NVLink error"),
        79 => (Severity::Critical, "GPU has fallen off the bus"),
        92 => (Severity::Warning, "high single-bit ECC error rate"),
        94 => (Severity::Warning, "contained ECC error (the affected application was stopped)"),
        95 => (Severity::Critical, "uncontained ECC error"),
        119 | 120 => (Severity::Critical, "GSP firmware error"),
        140 => (Severity::Critical, "unrecovered ECC error"),
        13 => (Severity::Application, "graphics engine exception"),
        31 => (Severity::Application, "GPU memory page fault (usually an illegal access by an application)"),
        43 => (Severity::Application, "GPU stopped processing (an application hit a fault)"),
        45 => (Severity::Application, "preemptive cleanup after a channel was killed"),
        _ => (Severity::Warning, "unclassified Xid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_faults_are_critical_and_application_faults_are_not() {
        for xid in [48, 64, 74, 79, 95, 119] {
            assert_eq!(classify(xid).0, Severity::Critical, "Xid {xid}");
        }
        for xid in [13, 31, 43, 45] {
            assert_eq!(classify(xid).0, Severity::Application, "Xid {xid}");
        }
        assert_eq!(classify(79).1, "GPU has fallen off the bus");
        assert_eq!(classify(9999).0, Severity::Warning);
    }
}
