//! Rentals inside the control loop: which GPUs a rental holds, the serverless work that must leave them, the
//! deployments pinned to them, and lending them while their owner runs nothing.
//!
//! The lifecycle (phases, billing times, notices) is [`crate::rental::Rental`]'s; this module carries out its
//! effects on the fleet the control loop places on, and feeds it the facts it observes:
//! - **Fence**: the rental takes `count` healthy GPUs of its model on connected, uncordoned nodes that no other rental
//!   holds — on one node when they fit there (the node whose GPUs run the fewest serverless replicas, then the best
//!   fit), else across the fewest nodes. Serverless replicas on them are stopped ([`StopReason::Fenced`]); their
//!   deployments get replacements elsewhere, or scale to zero, at the same reconcile. From then on the placement
//!   engine sees those GPUs as unavailable to general work. When fewer GPUs than needed are free of other rentals,
//!   none are taken and the reason says so (the lifecycle shows it while Pending).
//! - **Pinned deployments** (`spec.gpu.rental`) place only on the rental's healthy GPUs ([`PlacementEngine::place_on`]
//!   with the rental's GPU mask), only while it is Active; when it ends, their replicas stop
//!   ([`StopReason::RentalEnded`]).
//! - **Lending** (`lendWhenIdle`): while an Active rental's pinned deployments want nothing (no replica, no request,
//!   no minimum), its GPUs are open to the serverless pool; serverless replicas placed there are borrowers. As soon as
//!   a pinned deployment wants a replica, lending stops and the borrowers are stopped ([`StopReason::Reclaimed`]; the
//!   runtime gives them the reclaim notice as their grace), and the owner's replica is placed. Lending is per rental,
//!   all of its GPUs at once.
//! - **Replacement**: an unhealthy GPU (or one on a lost node) of a Degraded rental is dropped and another taken.
//!
//! Stops are immediate in the control loop's books (the GPUs are free for the rental's own work at once); the
//! runtime stops the processes with their grace.
//!
//! [`PlacementEngine::place_on`]: crate::placement::PlacementEngine::place_on

use std::collections::BTreeMap;

use super::{Action, Control, DeploymentSpec, NodeId, Replica, StopReason, Unschedulable, describe};
use crate::{
    placement::{Placement, Request, Unplaceable},
    rental::{Fleet, Rental, RentalConfig, RentalEvent, RentalFacts, RentalPhase, RentalSpec, RentalState},
};

/// A rental as the control loop keeps it.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) rental: Rental,
    /// The object was deleted (a cancel); the slot goes once the rental is in a final phase.
    deleted: bool,
    /// GPUs are wanted (a `Fence` was issued and not released).
    fencing: bool,
    /// GPUs held, in the order taken.
    gpus: Vec<(NodeId, u32)>,
    /// GPUs to take first, by node name (what status recorded before a controller restart).
    wanted: Vec<(String, u32)>,
    /// Its GPUs are open to serverless work now.
    pub(super) lent: bool,
    /// Why GPUs could not all be taken, at the last try.
    unplaced: Option<String>,
}

/// A rental restored after a controller restart: its state and the GPUs it held, as its status recorded them.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredRental {
    /// The lifecycle state.
    pub state: RentalState,
    /// GPUs held: (node name, GPU index).
    pub gpus: Vec<(String, u32)>,
}

/// What the control loop shows of a rental.
#[derive(Debug, Clone)]
pub struct RentalView<'a> {
    /// The lifecycle.
    pub rental: &'a Rental,
    /// GPUs held: (node name, GPU index), in the order taken.
    pub gpus: Vec<(String, u32)>,
    /// Open to serverless work now.
    pub lent: bool,
    /// Why not all GPUs could be taken, at the last try.
    pub unplaced: Option<&'a str>,
}

/// What a rental step decided.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RentalStep {
    /// Lifecycle events, per rental key, in order.
    pub events: Vec<(String, RentalEvent)>,
    /// Replicas to stop now (fenced, reclaimed, or their rental ended).
    pub actions: Vec<Action>,
    /// Rentals forgotten at this step (deleted, and now in a final phase), as they ended: their last bill.
    pub forgotten: Vec<(String, Rental)>,
}

impl Control {
    /// Lifecycle settings of rentals created from now on.
    pub fn set_rental_config(&mut self, config: RentalConfig) {
        self.rental_config = config;
    }

    /// Adds or updates a rental (`key`: `namespace/name`) created at `created_at` (wall-clock seconds). A new rental
    /// starts Pending, or from `restored` after a controller restart. An update changes what may change — times,
    /// `cancel`, `lendWhenIdle` —; the GPU model and count stay as first given once GPUs are held.
    pub fn upsert_rental(&mut self, key: &str, spec: RentalSpec, created_at: f64, restored: Option<RestoredRental>) {
        if let Some(slot) = self.rentals.get_mut(key) {
            let mut spec = spec;
            if slot.fencing || slot.rental.phase() != RentalPhase::Pending {
                spec.gpu_model.clone_from(&slot.rental.spec.gpu_model);
                spec.gpu_count = slot.rental.spec.gpu_count;
            }
            slot.rental.spec = spec;
            return;
        }
        let mut rental = Rental::new(spec, created_at, self.rental_config);
        let mut wanted = Vec::new();
        if let Some(r) = restored {
            rental.state = r.state;
            wanted = r.gpus;
        }
        let fencing = rental.state.fenced;
        self.rentals.insert(
            key.to_owned(),
            Slot { rental, deleted: false, fencing, gpus: Vec::new(), wanted, lent: false, unplaced: None },
        );
    }

    /// The rental's object was deleted: a cancel (free before delivery; started hours billed after). Its GPUs are
    /// released at the next [`Control::step_rentals`], and it is forgotten once final.
    pub fn remove_rental(&mut self, key: &str) {
        if let Some(slot) = self.rentals.get_mut(key) {
            slot.deleted = true;
        }
    }

    /// A rental and the GPUs it holds.
    pub fn rental(&self, key: &str) -> Option<RentalView<'_>> {
        let slot = self.rentals.get(key)?;
        Some(RentalView {
            rental: &slot.rental,
            gpus: slot.gpus.iter().map(|&(n, g)| (self.engine.cluster().name(n).to_owned(), g)).collect(),
            lent: slot.lent,
            unplaced: slot.unplaced.as_deref(),
        })
    }

    /// Every rental's key.
    pub fn rental_keys(&self) -> impl Iterator<Item = &str> {
        self.rentals.keys().map(String::as_str)
    }

    /// The fleet's GPU models and counts: every node that ever registered, connected or not.
    pub fn fleet(&self) -> Fleet {
        let cluster = self.engine.cluster();
        self.nodes.values().fold(Fleet::new(), |fleet, &id| {
            let t = cluster.node_type(cluster.node(id).type_id);
            fleet.with(self.node_model(id), u32::from(t.gpu_count))
        })
    }

    /// Advances every rental to `wall` (wall-clock seconds; `now` is the same instant on the loop's clock) and carries
    /// out what the lifecycle decides. `settled`: every node of the fleet had its chance to register (after a
    /// controller restart, the registry's grace has passed); until then a Pending rental waits instead of failing for
    /// lack of a GPU model the fleet may still report.
    pub fn step_rentals(&mut self, now: f64, wall: f64, settled: bool) -> RentalStep {
        self.tick(now);
        self.wall_offset = wall - now;
        let fleet = self.fleet();
        let mut out = RentalStep::default();
        let keys: Vec<String> = self.rentals.keys().cloned().collect();
        for key in keys {
            // A fence that completes delivers at once, which may warn at once: step again while the facts change.
            for _ in 0..4 {
                if self.rentals.get(&key).is_some_and(|s| s.fencing) {
                    self.fence_more(&key, &mut out.actions);
                }
                let Some(slot) = self.rentals.get(&key) else { break };
                if slot.rental.phase() == RentalPhase::Pending && !settled && !slot.deleted && !slot.rental.spec.cancel
                {
                    self.rentals.get_mut(&key).expect("present").rental.state.reason =
                        "waiting for the fleet's nodes to register".into();
                    break;
                }
                let counts = self.rental_counts(&key);
                let unplaced = slot.unplaced.clone();
                let facts = RentalFacts {
                    fleet: &fleet,
                    assigned: counts.0,
                    healthy: counts.1,
                    unplaced_reason: unplaced.as_deref(),
                    deleted: slot.deleted,
                };
                let events = self.rentals.get_mut(&key).expect("present").rental.step(wall, &facts);
                for e in &events {
                    self.carry_out_rental(&key, e, &mut out.actions);
                }
                let changed = self.rental_counts(&key) != counts;
                let stepped = !events.is_empty();
                out.events.extend(events.into_iter().map(|e| (key.clone(), e)));
                if !changed || !stepped {
                    break;
                }
            }
            self.update_lending(&key, &mut out.actions);
            if self.rentals.get(&key).is_some_and(|s| s.deleted && s.rental.phase().is_terminal()) {
                self.release_gpus(&key);
                if let Some(slot) = self.rentals.remove(&key) {
                    out.forgotten.push((key.clone(), slot.rental));
                }
            }
        }
        out
    }

    /// (GPUs held, of those healthy on a connected node).
    fn rental_counts(&self, key: &str) -> (u32, u32) {
        let Some(slot) = self.rentals.get(key) else { return (0, 0) };
        let healthy = slot.gpus.iter().filter(|&&(n, g)| self.gpu_usable_by_owner(n, g)).count();
        (slot.gpus.len() as u32, healthy as u32)
    }

    fn gpu_usable_by_owner(&self, node: NodeId, gpu: u32) -> bool {
        self.gpu_is_healthy(node, gpu) && self.connected.contains(self.engine.cluster().name(node))
    }

    fn carry_out_rental(&mut self, key: &str, event: &RentalEvent, actions: &mut Vec<Action>) {
        match event {
            RentalEvent::Fence { .. } => {
                if let Some(slot) = self.rentals.get_mut(key) {
                    slot.fencing = true;
                }
                self.fence_more(key, actions);
            }
            RentalEvent::ReplaceGpus { .. } => {
                let Some(slot) = self.rentals.get(key) else { return };
                let lost: Vec<(NodeId, u32)> =
                    slot.gpus.iter().copied().filter(|&(n, g)| !self.gpu_usable_by_owner(n, g)).collect();
                for (n, g) in lost {
                    self.held_by.remove(&(n, g));
                    if let Some(slot) = self.rentals.get_mut(key) {
                        slot.gpus.retain(|&x| x != (n, g));
                    }
                    self.sync_gpu(n, g);
                }
                self.fence_more(key, actions);
            }
            RentalEvent::StopWork { .. } => {
                let pinned: Vec<String> = self
                    .replicas
                    .iter()
                    .filter(|(_, r)| r.rental.as_deref() == Some(key))
                    .map(|(id, _)| id.clone())
                    .collect();
                self.stop_all(pinned, StopReason::RentalEnded, actions);
            }
            RentalEvent::Release => self.release_gpus(key),
            RentalEvent::PhaseChanged { .. } | RentalEvent::Notice { .. } => {}
        }
    }

    /// Returns every GPU of the rental to the pool.
    fn release_gpus(&mut self, key: &str) {
        let Some(slot) = self.rentals.get(key) else { return };
        let held = slot.gpus.clone();
        self.close_spans_on(&held);
        let Some(slot) = self.rentals.get_mut(key) else { return };
        let gpus = std::mem::take(&mut slot.gpus);
        slot.fencing = false;
        slot.lent = false;
        slot.unplaced = None;
        for (n, g) in gpus {
            self.held_by.remove(&(n, g));
            self.sync_gpu(n, g);
        }
    }

    fn stop_all(&mut self, replicas: Vec<String>, reason: StopReason, actions: &mut Vec<Action>) {
        for id in replicas {
            if let Some(r) = self.replica_gone(&id) {
                actions.push(Action::Stop { replica: id, deployment: r.deployment, node: r.node, reason });
            }
        }
    }

    /// Takes GPUs for a fencing rental until it holds its count, stopping the serverless replicas on them.
    fn fence_more(&mut self, key: &str, actions: &mut Vec<Action>) {
        let Some(slot) = self.rentals.get(key) else { return };
        let (model, count) = (slot.rental.spec.gpu_model.clone(), slot.rental.spec.gpu_count);
        let need = count.saturating_sub(slot.gpus.len() as u32) as usize;
        if need == 0 {
            if let Some(slot) = self.rentals.get_mut(key) {
                slot.unplaced = None;
            }
            return;
        }
        // Replicas on each GPU (what taking it would stop), counted once.
        let mut on_gpu: std::collections::HashMap<(NodeId, u32), usize> = std::collections::HashMap::new();
        for r in self.replicas.values() {
            for g in (0..16u32).filter(|g| r.placement.gpus & (1 << g) != 0) {
                *on_gpu.entry((r.node_id, g)).or_default() += 1;
            }
        }
        // Candidate GPUs per node, cheapest (fewest replicas to stop) first.
        let mut nodes: Vec<(&String, NodeId)> = self.nodes.iter().map(|(n, &id)| (n, id)).collect();
        nodes.sort_by_key(|&(_, id)| id);
        let mut candidates: BTreeMap<NodeId, Vec<(usize, u32)>> = BTreeMap::new();
        for (name, id) in nodes {
            if !self.connected.contains(name) || self.cordoned.contains(name) || self.node_model(id) != model {
                continue;
            }
            let t = self.engine.cluster().node_type(self.engine.cluster().node(id).type_id);
            for g in 0..u32::from(t.gpu_count) {
                if !self.gpu_is_healthy(id, g) || self.held_by.contains_key(&(id, g)) {
                    continue;
                }
                candidates.entry(id).or_default().push((on_gpu.get(&(id, g)).copied().unwrap_or(0), g));
            }
        }
        for list in candidates.values_mut() {
            list.sort_unstable();
        }
        let mut chosen: Vec<(NodeId, u32)> = Vec::new();
        // What status recorded before a restart comes first, where it is still free.
        let wanted = slot.wanted.clone();
        for (name, g) in wanted {
            let Some(&id) = self.nodes.get(&name) else { continue };
            if chosen.len() < need
                && let Some(list) = candidates.get_mut(&id)
                && let Some(pos) = list.iter().position(|&(_, x)| x == g)
            {
                list.remove(pos);
                chosen.push((id, g));
            }
        }
        let need_more = need - chosen.len();
        let total: usize = candidates.values().map(Vec::len).sum();
        if total < need_more {
            if let Some(slot) = self.rentals.get_mut(key) {
                slot.unplaced = Some(format!(
                    "{total} healthy GPUs of {model} on connected nodes are free of other rentals; {need_more} more \
                     are needed"
                ));
            }
            return;
        }
        let cost_of = |list: &[(usize, u32)], k: usize| list.iter().take(k).map(|&(c, _)| c).sum::<usize>();
        let one = candidates
            .iter()
            .filter(|(_, list)| list.len() >= need_more)
            .min_by_key(|(id, list)| (cost_of(list, need_more), list.len(), **id))
            .map(|(&id, _)| id);
        match one {
            Some(id) => chosen.extend(candidates[&id].iter().take(need_more).map(|&(_, g)| (id, g))),
            None => {
                // The fewest nodes: those with the most candidates first.
                let mut order: Vec<(&NodeId, &Vec<(usize, u32)>)> = candidates.iter().collect();
                order.sort_by_key(|(id, list)| (std::cmp::Reverse(list.len()), cost_of(list, list.len()), **id));
                let mut left = need_more;
                for (&id, list) in order {
                    let take = left.min(list.len());
                    chosen.extend(list.iter().take(take).map(|&(_, g)| (id, g)));
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        // The serverless replicas there stop first (their GPU-time up to now is theirs), then the GPUs are held.
        let doomed: Vec<String> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.rental.as_deref() != Some(key))
            .filter(|(_, r)| chosen.iter().any(|&(n, g)| r.node_id == n && r.placement.gpus & (1 << g) != 0))
            .map(|(id, _)| id.clone())
            .collect();
        self.stop_all(doomed, StopReason::Fenced, actions);
        for &(n, g) in &chosen {
            self.held_by.insert((n, g), key.to_owned());
            self.sync_gpu(n, g);
        }
        if let Some(slot) = self.rentals.get_mut(key) {
            slot.gpus.extend(chosen.iter().copied());
            slot.unplaced = None;
            slot.wanted.clear();
        }
    }

    /// Whether a deployment pinned to the rental wants GPU now: a replica, a request, or a minimum.
    fn pinned_demand(&self, key: &str) -> bool {
        self.deployments.values().any(|d| {
            d.spec.rental.as_deref() == Some(key)
                && (d.replicas > 0 || d.demand() > 0 || d.desired > 0 || d.spec.scaling.min_replicas > 0)
        })
    }

    /// Opens an idle lending rental's GPUs to serverless work, or takes them back (stopping the borrowers) when its
    /// owner wants them or it is no longer Active.
    fn update_lending(&mut self, key: &str, actions: &mut Vec<Action>) {
        let Some(slot) = self.rentals.get(key) else { return };
        let want = slot.rental.phase() == RentalPhase::Active
            && slot.rental.spec.lend_when_idle
            && !slot.gpus.is_empty()
            && !self.pinned_demand(key);
        if want == slot.lent {
            return;
        }
        let gpus = slot.gpus.clone();
        if !want {
            // The borrowers stop while the GPUs are still lent: their time up to now is credited to the owner.
            let borrowers: Vec<String> = self
                .replicas
                .iter()
                .filter(|(_, r)| r.rental.as_deref() != Some(key))
                .filter(|(_, r)| gpus.iter().any(|&(n, g)| r.node_id == n && r.placement.gpus & (1 << g) != 0))
                .map(|(id, _)| id.clone())
                .collect();
            self.stop_all(borrowers, StopReason::Reclaimed, actions);
        }
        if let Some(slot) = self.rentals.get_mut(key) {
            slot.lent = want;
        }
        for &(n, g) in &gpus {
            self.sync_gpu(n, g);
        }
    }

    /// Why a replica may not stay on its GPUs because of a rental: they belong to a rental it is not pinned to (and
    /// that does not lend them), or it is pinned to a rental that no longer holds them or is not Active.
    pub(super) fn rental_conflict(&self, r: &Replica) -> Option<StopReason> {
        for g in (0..16u32).filter(|g| r.placement.gpus & (1 << g) != 0) {
            match self.held_by.get(&(r.node_id, g)) {
                Some(k) if Some(k) == r.rental.as_ref() => {}
                Some(k) => {
                    let slot = self.rentals.get(k);
                    if !slot.is_some_and(|s| s.lent) {
                        let lender = slot
                            .is_some_and(|s| s.rental.spec.lend_when_idle && s.rental.phase() == RentalPhase::Active);
                        return Some(if lender { StopReason::Reclaimed } else { StopReason::Fenced });
                    }
                }
                None if r.rental.is_some() => return Some(StopReason::RentalEnded),
                None => {}
            }
        }
        let k = r.rental.as_ref()?;
        self.rentals.get(k).is_none_or(|s| s.rental.phase() != RentalPhase::Active).then_some(StopReason::RentalEnded)
    }

    /// Places a replica of a deployment pinned to rental `key` on the rental's healthy GPUs.
    pub(super) fn place_on_rental(
        &mut self,
        key: &str,
        spec: &DeploymentSpec,
        request: &Request,
    ) -> Result<Placement, Unschedulable> {
        let refuse = |why: String| Unschedulable::Rental { needs: describe(spec), rental: key.to_owned(), why };
        let Some(slot) = self.rentals.get(key) else {
            return Err(refuse("no such rental in the deployment's namespace".into()));
        };
        if slot.rental.phase() != RentalPhase::Active {
            return Err(refuse(format!("the rental is {:?}: {}", slot.rental.phase(), slot.rental.state.reason)));
        }
        if slot.lent {
            return Err(refuse("its GPUs are lent to serverless work; they are being reclaimed".into()));
        }
        let mut by_node: BTreeMap<NodeId, u16> = BTreeMap::new();
        for &(n, g) in &slot.gpus {
            if self.gpu_usable_by_owner(n, g) {
                *by_node.entry(n).or_default() |= 1 << g;
            }
        }
        let count = slot.rental.spec.gpu_count;
        let mut impossible = None;
        for (node, mask) in by_node {
            match self.engine.place_on(request, node, mask) {
                Ok(p) => return Ok(p),
                Err(Unplaceable::Impossible(why)) => impossible = Some(why),
                Err(Unplaceable::NoFit) => {}
            }
        }
        let running = self.replicas.values().filter(|r| r.rental.as_deref() == Some(key)).count();
        let wants_more = match request.gpu {
            crate::placement::GpuDemand::Whole(k) => u32::from(k) > count,
            _ => false,
        };
        Err(refuse(if wants_more {
            format!("a replica needs more GPUs than the rental's {count}")
        } else if let Some(why) = impossible {
            why
        } else {
            format!("its {count} GPUs have no room for another replica ({running} running on them)")
        }))
    }
}
