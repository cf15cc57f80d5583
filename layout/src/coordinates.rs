//! Where a world rank sits in a layout of `ep`-way expert parallelism and `dp` replicas:
//!
//! ```text
//! ep_rank       = g mod ep
//! dp_replica    = (g / ep) mod dp
//! pipeline_rank = g / (ep · dp)
//! ```
//!
//! so the `ep` ranks of an EP group (one pipeline rank, one DP replica, every EP rank) are
//! consecutive, and so are the `ep · dp` ranks of one pipeline rank.

use std::fmt;

use flotilla_proto::v1::RankCoordinates;

/// Where a world rank sits in the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Coordinates {
    pub pipeline_rank: u32,
    pub ep_rank: u32,
    pub dp_replica: u32,
}

impl Coordinates {
    /// The index of this rank's pipeline among the `ep × dp` replicas,
    /// `ep_rank + ep·dp_replica`: pipeline `p` runs windows `p·M .. (p+1)·M` micro-batches
    /// into each step's global batch.
    pub fn pipeline_index(&self, ep: u32) -> u64 {
        u64::from(self.ep_rank) + u64::from(ep) * u64::from(self.dp_replica)
    }
}

impl From<Coordinates> for RankCoordinates {
    fn from(c: Coordinates) -> RankCoordinates {
        RankCoordinates { pipeline_rank: c.pipeline_rank, ep_rank: c.ep_rank, dp_replica: c.dp_replica }
    }
}

impl From<&RankCoordinates> for Coordinates {
    fn from(c: &RankCoordinates) -> Coordinates {
        Coordinates { pipeline_rank: c.pipeline_rank, ep_rank: c.ep_rank, dp_replica: c.dp_replica }
    }
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pp {}, ep {}, dp {}", self.pipeline_rank, self.ep_rank, self.dp_replica)
    }
}

/// World rank `world_rank`'s coordinates under `ep`-way expert parallelism and `dp`
/// replicas (see the module docs). `ep` and `dp` of 0 count as 1.
pub fn coordinates(world_rank: u32, ep: u32, dp: u32) -> Coordinates {
    let (ep, dp) = (ep.max(1), dp.max(1));
    let group = u64::from(ep) * u64::from(dp);
    Coordinates {
        // At most `world_rank`, so it fits.
        pipeline_rank: (u64::from(world_rank) / group) as u32,
        ep_rank: world_rank % ep,
        dp_replica: (world_rank / ep) % dp,
    }
}

/// The world rank at `coordinates`: the inverse of [`coordinates`]. `None` when it does
/// not fit in 32 bits.
pub fn world_rank(coordinates: Coordinates, ep: u32, dp: u32) -> Option<u32> {
    let Coordinates { pipeline_rank, ep_rank, dp_replica } = coordinates;
    let g = (u64::from(pipeline_rank) * u64::from(dp) + u64::from(dp_replica)) * u64::from(ep)
        + u64::from(ep_rank);
    u32::try_from(g).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_put_ep_groups_on_consecutive_ranks() {
        let (ep, dp) = (4, 2);
        let all: Vec<Coordinates> = (0..24).map(|g| coordinates(g, ep, dp)).collect();
        assert_eq!(all[0], Coordinates { pipeline_rank: 0, ep_rank: 0, dp_replica: 0 });
        assert_eq!(all[3], Coordinates { pipeline_rank: 0, ep_rank: 3, dp_replica: 0 });
        assert_eq!(all[4], Coordinates { pipeline_rank: 0, ep_rank: 0, dp_replica: 1 });
        assert_eq!(all[8], Coordinates { pipeline_rank: 1, ep_rank: 0, dp_replica: 0 });
        assert_eq!(all[23], Coordinates { pipeline_rank: 2, ep_rank: 3, dp_replica: 1 });
        for group in all.chunks(ep as usize) {
            assert!(
                group
                    .iter()
                    .all(|c| (c.pipeline_rank, c.dp_replica) == (group[0].pipeline_rank, group[0].dp_replica))
            );
            assert_eq!(group.iter().map(|c| c.ep_rank).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        }
        for (g, c) in all.iter().enumerate() {
            assert_eq!(world_rank(*c, ep, dp), Some(g as u32));
            assert_eq!(Coordinates::from(&RankCoordinates::from(*c)), *c);
        }
        assert_eq!(all[23].pipeline_index(ep), 3 + 4);
        assert_eq!(
            world_rank(Coordinates { pipeline_rank: u32::MAX, ep_rank: 0, dp_replica: 0 }, 2, 1),
            None
        );
    }
}
