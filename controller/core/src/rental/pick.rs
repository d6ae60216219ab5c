//! Splitting a rental's whole GPUs over nodes: one node when N fit on one, else the fewest nodes.
//!
//! A helper for the controller, not placement: it only looks at free healthy whole GPUs of the rental's model per
//! node, as the [`placement`](crate::placement) engine reports them; the engine still reserves each part as a
//! `GpuDemand::Whole(k)` gang.

/// Chooses nodes for `n` whole GPUs from `(node, free whole GPUs)`: the node with the fewest free GPUs that still
/// fits all `n` (best fit, ties to the first listed), else the nodes with the most free GPUs first, which uses
/// the fewest nodes. `None` when the nodes together have fewer than `n` free, or `n` is 0.
pub fn pick_nodes<'a>(free: &[(&'a str, u32)], n: u32) -> Option<Vec<(&'a str, u32)>> {
    if n == 0 {
        return None;
    }
    if let Some(&(node, _)) = free.iter().filter(|(_, f)| *f >= n).min_by_key(|(_, f)| *f) {
        return Some(vec![(node, n)]);
    }
    let mut by_free: Vec<(&'a str, u32)> = free.iter().copied().filter(|(_, f)| *f > 0).collect();
    by_free.sort_by_key(|&(_, f)| std::cmp::Reverse(f));
    let mut left = n;
    let mut parts = Vec::new();
    for (node, f) in by_free {
        let take = f.min(left);
        parts.push((node, take));
        left -= take;
        if left == 0 {
            return Some(parts);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_when_it_fits_best_fit() {
        let free = [("a", 8), ("b", 4), ("c", 2)];
        assert_eq!(pick_nodes(&free, 3), Some(vec![("b", 3)]));
        assert_eq!(pick_nodes(&free, 8), Some(vec![("a", 8)]));
    }

    #[test]
    fn fewest_nodes_when_it_does_not() {
        let free = [("a", 3), ("b", 6), ("c", 1), ("d", 5)];
        assert_eq!(pick_nodes(&free, 10), Some(vec![("b", 6), ("d", 4)]));
        assert_eq!(pick_nodes(&free, 15), Some(vec![("b", 6), ("d", 5), ("a", 3), ("c", 1)]));
        assert_eq!(pick_nodes(&free, 16), None);
        assert_eq!(pick_nodes(&free, 0), None);
    }
}
