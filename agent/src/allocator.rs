//! Process-wide settings of the C allocator for Kiln's long-running processes (`kiln up`, `kiln controller`,
//! `kiln agent`). glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
//! blocks of a few MiB — request bodies, model inputs and outputs — come from the heap arenas and are kept there
//! when freed: under large predictions the resident size ratchets up round after round although nothing is live
//! (measured with `kiln bench abuse`: 1.5, 2.1, 2.3 GiB after three rounds of 2,000 × 1.9 MB predictions; about
//! 0.2 GiB, flat, with the threshold fixed). A fixed threshold keeps large blocks in their own mappings, returned
//! to the system when freed.

#![allow(unsafe_code)]

/// Blocks from this size up get their own mapping (glibc's initial default, kept fixed).
pub const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// Fixes the allocator's mmap threshold. Call it first thing in `main`, before threads start. Returns whether the
/// allocator took the setting (false on a C library without `mallopt`'s `M_MMAP_THRESHOLD`).
pub fn bound_retention() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes a parameter of glibc's allocator; it takes plain integers, touches no
        // memory of ours, and is called before other threads allocate.
        let ok = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        ok == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_fixed_threshold() {
        assert_eq!(super::bound_retention(), cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
