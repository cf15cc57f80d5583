//! The schedule kinds: their names, their proto enum, and the rules of which pipeline
//! ranks run which stages.

use std::fmt;

use flotilla_proto::v1 as proto;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The schedules flotilla compiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// One-forward-one-backward (PipeDream-flush / Megatron), fused backward.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Zero-bubble ZB-H1 (Qi et al. 2023): backward split into B and W, W deferred into the
    /// cool-down bubble, the same activation memory as 1F1B.
    Zb1p,
    /// DeepSeek-V3's bidirectional DualPipe: micro-batches enter from both ends, rank r
    /// hosts stages r and PP−1−r, forward and backward chunks overlap in pairs.
    DualPipe,
    /// DualPipe cut in half ("V" shape): PP stages on PP/2 ranks, rank r hosting stages r
    /// and PP−1−r; every micro-batch enters at rank 0 and ends there.
    DualPipeV,
}

/// A schedule name or proto value that names no [`ScheduleKind`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ScheduleKindError {
    #[error("unknown schedule kind {0:?}: expected 1f1b, zb1p, dualpipe or dualpipev")]
    UnknownName(String),
    #[error("schedule kind {0} is not a known schedule kind")]
    UnknownValue(i32),
    #[error("the schedule kind is unspecified")]
    Unspecified,
}

/// Why a schedule cannot run `pp` stages.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StagesError {
    #[error("pp must be at least 1")]
    Zero,
    #[error("{} needs an even pp ≥ 2 (each pipeline rank hosts two stages), got {pp}", kind.title())]
    NotEven { kind: ScheduleKind, pp: u32 },
}

impl ScheduleKind {
    /// All kinds, in the order tables print them.
    pub const ALL: [ScheduleKind; 4] =
        [ScheduleKind::OneFOneB, ScheduleKind::Zb1p, ScheduleKind::DualPipe, ScheduleKind::DualPipeV];

    /// The name used in configs, on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Zb1p => "zb1p",
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// The name people write: `1F1B`, `ZB1P`, `DualPipe`, `DualPipeV`.
    pub fn title(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1F1B",
            ScheduleKind::Zb1p => "ZB1P",
            ScheduleKind::DualPipe => "DualPipe",
            ScheduleKind::DualPipeV => "DualPipeV",
        }
    }

    /// Whether each pipeline rank hosts two stages (DualPipe, DualPipeV).
    pub fn is_dual(self) -> bool {
        matches!(self, ScheduleKind::DualPipe | ScheduleKind::DualPipeV)
    }

    /// Pipeline ranks (devices) that run `pp` stages: PP/2 for DualPipeV, PP otherwise.
    /// Unchecked; see [`ScheduleKind::check_stages`].
    pub fn ranks_for(self, pp: u32) -> u32 {
        match self {
            ScheduleKind::DualPipeV => pp / 2,
            _ => pp,
        }
    }

    /// Stages that `ranks` pipeline ranks run: the inverse of [`ScheduleKind::ranks_for`]
    /// (in 64 bits: twice a `u32` under DualPipeV).
    pub fn stages_for(self, ranks: u32) -> u64 {
        match self {
            ScheduleKind::DualPipeV => 2 * u64::from(ranks),
            _ => u64::from(ranks),
        }
    }

    /// Whether the schedule can run `pp` stages: at least one, and an even number ≥ 2
    /// under DualPipe and DualPipeV (each pipeline rank hosts two stages).
    pub fn check_stages(self, pp: u32) -> Result<(), StagesError> {
        if pp == 0 {
            return Err(StagesError::Zero);
        }
        if self.is_dual() && (pp < 2 || !pp.is_multiple_of(2)) {
            return Err(StagesError::NotEven { kind: self, pp });
        }
        Ok(())
    }

    /// The pipeline ranks hosting stage `stage` of `pp`, ascending: DualPipe, `stage` and
    /// `pp−1−stage`; DualPipeV, `min(stage, pp−1−stage)`; 1F1B and ZB1P, `stage`. Empty
    /// when `stage ≥ pp`.
    pub fn hosts(self, pp: u32, stage: u32) -> Vec<u32> {
        if stage >= pp {
            return Vec::new();
        }
        let mirror = pp - 1 - stage;
        let mut hosts = match self {
            ScheduleKind::DualPipe => vec![stage, mirror],
            ScheduleKind::DualPipeV => vec![stage.min(mirror)],
            ScheduleKind::OneFOneB | ScheduleKind::Zb1p => vec![stage],
        };
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// The stages of `pp` that pipeline rank `rank` hosts, ascending.
    pub fn stages_of(self, pp: u32, rank: u32) -> Vec<u32> {
        (0..pp).filter(|&s| self.hosts(pp, s).contains(&rank)).collect()
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = ScheduleKindError;

    /// A config name, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| ScheduleKindError::UnknownName(s.to_string()))
    }
}

impl From<ScheduleKind> for proto::ScheduleKind {
    fn from(kind: ScheduleKind) -> proto::ScheduleKind {
        match kind {
            ScheduleKind::OneFOneB => proto::ScheduleKind::OneFOneB,
            ScheduleKind::Zb1p => proto::ScheduleKind::Zb1p,
            ScheduleKind::DualPipe => proto::ScheduleKind::DualPipe,
            ScheduleKind::DualPipeV => proto::ScheduleKind::DualPipeV,
        }
    }
}

impl TryFrom<proto::ScheduleKind> for ScheduleKind {
    type Error = ScheduleKindError;

    fn try_from(kind: proto::ScheduleKind) -> Result<ScheduleKind, ScheduleKindError> {
        Ok(match kind {
            proto::ScheduleKind::Unspecified => return Err(ScheduleKindError::Unspecified),
            proto::ScheduleKind::OneFOneB => ScheduleKind::OneFOneB,
            proto::ScheduleKind::Zb1p => ScheduleKind::Zb1p,
            proto::ScheduleKind::DualPipe => ScheduleKind::DualPipe,
            proto::ScheduleKind::DualPipeV => ScheduleKind::DualPipeV,
        })
    }
}

impl TryFrom<i32> for ScheduleKind {
    type Error = ScheduleKindError;

    /// A proto field's raw value (`Layout::schedule_kind`).
    fn try_from(value: i32) -> Result<ScheduleKind, ScheduleKindError> {
        let kind =
            proto::ScheduleKind::try_from(value).map_err(|_| ScheduleKindError::UnknownValue(value))?;
        ScheduleKind::try_from(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_in_any_case_and_unknown_ones_are_refused() {
        for kind in ScheduleKind::ALL {
            assert_eq!(kind.name().parse::<ScheduleKind>(), Ok(kind));
            assert_eq!(kind.title().parse::<ScheduleKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
        }
        let err = "gpipe".parse::<ScheduleKind>().unwrap_err();
        assert_eq!(err, ScheduleKindError::UnknownName("gpipe".into()));
        assert!(err.to_string().contains("expected 1f1b, zb1p, dualpipe or dualpipev"), "{err}");
    }

    #[test]
    fn the_proto_enum_round_trips_and_refuses_unknown_values() {
        for kind in ScheduleKind::ALL {
            let wire = proto::ScheduleKind::from(kind);
            assert_eq!(ScheduleKind::try_from(wire), Ok(kind));
            assert_eq!(ScheduleKind::try_from(wire as i32), Ok(kind));
        }
        assert_eq!(ScheduleKind::try_from(0), Err(ScheduleKindError::Unspecified));
        assert_eq!(ScheduleKind::try_from(99), Err(ScheduleKindError::UnknownValue(99)));
        assert_eq!(ScheduleKind::try_from(-1), Err(ScheduleKindError::UnknownValue(-1)));
    }

    #[test]
    fn dualpipev_runs_pp_stages_on_half_the_ranks() {
        assert_eq!(ScheduleKind::DualPipeV.ranks_for(8), 4);
        assert_eq!(ScheduleKind::DualPipeV.stages_for(4), 8);
        for kind in [ScheduleKind::DualPipe, ScheduleKind::OneFOneB, ScheduleKind::Zb1p] {
            assert_eq!(kind.ranks_for(8), 8);
            assert_eq!(kind.stages_for(8), 8);
        }
    }

    #[test]
    fn dual_schedules_need_an_even_pp() {
        for kind in [ScheduleKind::DualPipe, ScheduleKind::DualPipeV] {
            assert_eq!(kind.check_stages(4), Ok(()));
            for pp in [1, 3, 5] {
                let err = kind.check_stages(pp).unwrap_err();
                assert_eq!(err, StagesError::NotEven { kind, pp });
                assert!(
                    err.to_string().starts_with(&format!("{} needs an even pp ≥ 2", kind.title())),
                    "{err}"
                );
            }
        }
        for kind in [ScheduleKind::OneFOneB, ScheduleKind::Zb1p] {
            assert_eq!(kind.check_stages(3), Ok(()));
        }
        for kind in ScheduleKind::ALL {
            assert_eq!(kind.check_stages(0), Err(StagesError::Zero));
        }
    }

    #[test]
    fn hosts_and_stages_of_are_inverse() {
        assert_eq!(ScheduleKind::DualPipe.hosts(4, 0), vec![0, 3]);
        assert_eq!(ScheduleKind::DualPipe.hosts(4, 2), vec![1, 2]);
        assert_eq!(ScheduleKind::DualPipe.stages_of(4, 1), vec![1, 2]);
        assert_eq!(ScheduleKind::DualPipeV.hosts(4, 3), vec![0]);
        assert_eq!(ScheduleKind::DualPipeV.stages_of(4, 1), vec![1, 2]);
        assert_eq!(ScheduleKind::Zb1p.stages_of(3, 2), vec![2]);
        assert!(ScheduleKind::OneFOneB.hosts(3, 3).is_empty());
        for kind in ScheduleKind::ALL {
            let pp = 6;
            for rank in 0..kind.ranks_for(pp) {
                for stage in kind.stages_of(pp, rank) {
                    assert!(kind.hosts(pp, stage).contains(&rank), "{kind}: stage {stage}, rank {rank}");
                }
            }
            // Every stage has a host among the schedule's ranks.
            for stage in 0..pp {
                let hosts = kind.hosts(pp, stage);
                assert!(
                    !hosts.is_empty() && hosts.iter().all(|&r| r < kind.ranks_for(pp)),
                    "{kind}: {hosts:?}"
                );
            }
        }
    }
}
