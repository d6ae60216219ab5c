//! Leader election on a `coordination.k8s.io/v1` Lease, so that two controller replicas never both act.
//!
//! The decision is pure ([`decide`]): take a missing Lease, renew our own, wait while another holder's is fresh,
//! take over one that expired. Writes are optimistic: a create or a replace carrying the `resourceVersion` that was
//! read; a 409 from the API server means another replica won the race, and this one stays a follower.
//! [`LeaderElector::run`] keeps trying every third of the lease duration and reports leadership on a watch
//! channel; the controller acts only while it reads true, and exits when it loses the Lease (a restarted process
//! starts clean, as client-go's `OnStoppedLeading` advises).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// What to do about the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder's Lease is fresh: follow.
    Follow {
        /// The holder.
        holder: String,
    },
    /// The holder's Lease expired (or names no holder): take it over.
    TakeOver,
}

/// The decision for `me` at `now`, given the Lease's spec (`None`: no Lease).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp, default_duration: Duration) -> Decision {
    let Some(spec) = spec else { return Decision::Create };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .map_or(default_duration, |s| Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1)));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    match renewed {
        Some(at) if at + SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX) > now => {
            Decision::Follow { holder: holder.to_owned() }
        }
        _ => Decision::TakeOver,
    }
}

/// Elects one controller replica through a Lease.
#[derive(Debug, Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// Competes for Lease `name` in `namespace` as `identity` (e.g. the pod name), holding it `duration`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    /// One round: reads the Lease and acts on [`decide`]; returns whether this replica leads now.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now, self.duration);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Follow { .. }, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // The resourceVersion read above makes this a compare-and-swap.
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it (on a clean shutdown), so a standby takes over at once instead
    /// of after the lease duration. Returns whether it was released.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(false) };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(self.identity.as_str()))
        else {
            return Ok(false);
        };
        spec.holder_identity = None;
        spec.renew_time = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Keeps competing; sends whether this replica leads after every round. Returns when the receiver is gone.
    /// A round that fails on the API keeps the leadership while the last renewal is less than two thirds of the
    /// lease duration old (no other replica can have taken it over yet).
    pub async fn run(self, leading: watch::Sender<bool>) {
        let mut renewed: Option<std::time::Instant> = None;
        loop {
            let now_leading = match self.try_lead().await {
                Ok(true) => {
                    renewed = Some(std::time::Instant::now());
                    true
                }
                Ok(false) => {
                    renewed = None;
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: the Lease could not be read or written");
                    renewed.is_some_and(|t| t.elapsed() < self.duration * 2 / 3)
                }
            };
            if leading.send(now_leading).is_err() {
                return;
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_s_ago: i64) -> LeaseSpec {
        let now = Timestamp::from_second(1_790_000_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_s_ago))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn the_lease_is_created_renewed_followed_or_taken_over() {
        let now = Timestamp::from_second(1_790_000_000).unwrap();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", now, d), Decision::Create);
        assert_eq!(decide(Some(&spec(Some("a"), 100)), "a", now, d), Decision::Renew, "ours, even if late");
        assert_eq!(decide(Some(&spec(Some("b"), 5)), "a", now, d), Decision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&spec(Some("b"), 16)), "a", now, d), Decision::TakeOver, "expired");
        assert_eq!(decide(Some(&spec(None, 1)), "a", now, d), Decision::TakeOver, "released");
    }
}
