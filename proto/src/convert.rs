//! Conversions between `kiln.agent.v1` and Kiln's domain types, in one place.
//!
//! The protocol stores enums as `i32` (as protobuf does) and leaves optional fields unset; the domain types in
//! `kiln-core` are closed Rust enums and plain values. This module is the only place that crosses between them:
//! - cache tiers: [`v1::CacheTier`] and the core's [`Tier`] (where a replica's weights come from) convert both ways
//!   (`From` / `TryFrom`); a [`v1::CachedModel`] converts to the placement engine's [`PlacementTier`];
//! - enum fields read from the wire: [`enum_value`], [`optional_tier`] and [`required_tier`] turn an `i32` into the
//!   enum it encodes, or say which field held what;
//! - time: [`timestamp`] and [`system_time`] between `SystemTime` and `google.protobuf.Timestamp`.
//!
//! A value that does not convert is a [`ConvertError`] naming the field; nothing here panics or falls back
//! silently. (The generated getters, e.g. `CachedModel::tier()`, remain the lenient choice: an unknown value reads
//! as `UNSPECIFIED`.)

use std::time::{Duration, SystemTime};

use kiln_core::{autoscale::coldstart::Tier, placement::CacheTier as PlacementTier};

use crate::v1;

/// Why a protocol value does not convert to its domain type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// An enum field holds a number the schema does not define (a newer peer, or a corrupt message).
    #[error("{field}: {value} is not a known {enum_name} value")]
    UnknownEnumValue {
        /// The field, e.g. `"PrefetchModel.target_tier"`.
        field: &'static str,
        /// The protobuf enum, e.g. `"CacheTier"`.
        enum_name: &'static str,
        /// The number received.
        value: i32,
    },
    /// An enum field is `UNSPECIFIED` where the conversion needs a value.
    #[error("{field} is unspecified")]
    Unspecified {
        /// The field.
        field: &'static str,
    },
    /// A field the conversion needs is not set.
    #[error("{field} is missing")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A value that is valid in the protocol but has no counterpart in the domain type (e.g. a copy in the remote
    /// store as a placement cache hint, or a GPU index past the placement engine's mask).
    #[error("{field}: {value} has no {target} counterpart")]
    NoCounterpart {
        /// The field.
        field: &'static str,
        /// The value, as the protocol names it.
        value: String,
        /// The domain type.
        target: &'static str,
    },
}

/// Results of this module.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

/// The protobuf enum `E` that `value` encodes; `field` names the field in the error.
pub fn enum_value<E>(field: &'static str, value: i32) -> Result<E>
where
    E: TryFrom<i32, Error = prost::UnknownEnumValue>,
{
    E::try_from(value).map_err(|_| ConvertError::UnknownEnumValue {
        field,
        enum_name: std::any::type_name::<E>().rsplit("::").next().unwrap_or("enum"),
        value,
    })
}

impl From<Tier> for v1::CacheTier {
    fn from(tier: Tier) -> Self {
        match tier {
            Tier::Gpu => v1::CacheTier::Gpu,
            Tier::HostRam => v1::CacheTier::Host,
            Tier::Disk => v1::CacheTier::Disk,
            Tier::Remote => v1::CacheTier::Remote,
        }
    }
}

impl TryFrom<v1::CacheTier> for Tier {
    type Error = ConvertError;

    fn try_from(tier: v1::CacheTier) -> Result<Self> {
        match tier {
            v1::CacheTier::Gpu => Ok(Tier::Gpu),
            v1::CacheTier::Host => Ok(Tier::HostRam),
            v1::CacheTier::Disk => Ok(Tier::Disk),
            v1::CacheTier::Remote => Ok(Tier::Remote),
            v1::CacheTier::Unspecified => Err(ConvertError::Unspecified { field: "CacheTier" }),
        }
    }
}

/// The tier a `CacheTier` field holds, `None` for `CACHE_TIER_UNSPECIFIED` (the fields where unspecified means
/// "every tier" or "the agent's default", e.g. `EvictModel.tier`, `PrefetchModel.target_tier`).
pub fn optional_tier(field: &'static str, value: i32) -> Result<Option<Tier>> {
    match enum_value::<v1::CacheTier>(field, value)? {
        v1::CacheTier::Unspecified => Ok(None),
        tier => Tier::try_from(tier).map(Some),
    }
}

/// The tier a `CacheTier` field holds, which must be specified (e.g. `WorkerReady.source_tier`).
pub fn required_tier(field: &'static str, value: i32) -> Result<Tier> {
    optional_tier(field, value)?.ok_or(ConvertError::Unspecified { field })
}

/// The protocol's lower-case name of `tier`: `gpu`, `host`, `disk` or `remote` (log fields and metric labels).
pub fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Gpu => "gpu",
        Tier::HostRam => "host",
        Tier::Disk => "disk",
        Tier::Remote => "remote",
    }
}

impl TryFrom<&v1::CachedModel> for PlacementTier {
    type Error = ConvertError;

    /// Where on its node a cache entry holds the weights, as a placement hint: a GPU copy becomes the one-GPU mask
    /// of its `gpu_index`. A copy in the remote store is no hint (`NoCounterpart`).
    fn try_from(model: &v1::CachedModel) -> Result<Self> {
        const FIELD: &str = "CachedModel.tier";
        match required_tier(FIELD, model.tier)? {
            Tier::Gpu => {
                let index = model.gpu_index.ok_or(ConvertError::MissingField { field: "CachedModel.gpu_index" })?;
                let mask = 1u16.checked_shl(index).ok_or_else(|| ConvertError::NoCounterpart {
                    field: "CachedModel.gpu_index",
                    value: index.to_string(),
                    target: "placement GPU mask",
                })?;
                Ok(PlacementTier::Gpu(mask))
            }
            Tier::HostRam => Ok(PlacementTier::HostRam),
            Tier::Disk => Ok(PlacementTier::Disk),
            Tier::Remote => Err(ConvertError::NoCounterpart {
                field: FIELD,
                value: "CACHE_TIER_REMOTE".into(),
                target: "placement cache tier",
            }),
        }
    }
}

/// `time` as a protobuf timestamp; an instant before the Unix epoch becomes the epoch.
pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The instant a protobuf timestamp names; one before the Unix epoch becomes the epoch, nanoseconds out of range
/// are clamped to `0..1e9`.
pub fn system_time(timestamp: &prost_types::Timestamp) -> SystemTime {
    let seconds = u64::try_from(timestamp.seconds).unwrap_or(0);
    let nanos = u32::try_from(timestamp.nanos.clamp(0, 999_999_999)).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_round_trip_and_unspecified_is_no_tier() {
        for tier in Tier::ALL {
            let wire = v1::CacheTier::from(tier) as i32;
            assert_eq!(required_tier("t", wire), Ok(tier));
            assert_eq!(optional_tier("t", wire), Ok(Some(tier)));
        }
        assert_eq!(optional_tier("t", 0), Ok(None));
        assert_eq!(required_tier("f", 0), Err(ConvertError::Unspecified { field: "f" }));
        let unknown = optional_tier("PrefetchModel.target_tier", 42).unwrap_err();
        assert_eq!(
            unknown,
            ConvertError::UnknownEnumValue { field: "PrefetchModel.target_tier", enum_name: "CacheTier", value: 42 }
        );
        assert_eq!(unknown.to_string(), "PrefetchModel.target_tier: 42 is not a known CacheTier value");
    }

    #[test]
    fn tier_names_are_the_protocol_names() {
        for tier in Tier::ALL {
            let wire = v1::CacheTier::from(tier).as_str_name().trim_start_matches("CACHE_TIER_").to_lowercase();
            assert_eq!(tier_name(tier), wire);
        }
    }

    #[test]
    fn cached_models_become_placement_hints() {
        let model = |tier: v1::CacheTier, gpu_index: Option<u32>| v1::CachedModel {
            tier: tier as i32,
            gpu_index,
            ..Default::default()
        };
        let hint = |m: &v1::CachedModel| PlacementTier::try_from(m);
        assert_eq!(hint(&model(v1::CacheTier::Gpu, Some(3))), Ok(PlacementTier::Gpu(1 << 3)));
        assert_eq!(hint(&model(v1::CacheTier::Host, None)), Ok(PlacementTier::HostRam));
        assert_eq!(hint(&model(v1::CacheTier::Disk, None)), Ok(PlacementTier::Disk));
        assert!(matches!(hint(&model(v1::CacheTier::Remote, None)), Err(ConvertError::NoCounterpart { .. })));
        assert!(matches!(hint(&model(v1::CacheTier::Gpu, None)), Err(ConvertError::MissingField { .. })));
        assert!(matches!(hint(&model(v1::CacheTier::Gpu, Some(16))), Err(ConvertError::NoCounterpart { .. })));
        assert!(matches!(hint(&model(v1::CacheTier::Unspecified, None)), Err(ConvertError::Unspecified { .. })));
    }

    #[test]
    fn timestamps_round_trip_and_clamp() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(system_time(&timestamp(t)), t);
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(5)), prost_types::Timestamp::default());
        let odd = prost_types::Timestamp { seconds: -3, nanos: 2_000_000_000 };
        assert_eq!(system_time(&odd), SystemTime::UNIX_EPOCH + Duration::new(0, 999_999_999));
    }
}
