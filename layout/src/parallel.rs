//! The `[parallel]` table of a run: the layout of a pipeline/expert-parallel job, parsed
//! once and typed ([`ParallelConfig`]), and its proto form `Layout`, which carries every
//! key of the table to the workers.
//!
//! The table: `pp` (pipeline stages, required), `ep` (expert-parallel degree, default 1),
//! `dp` (replicas of each expert shard, default 1), `schedule` (`"dualpipe"` by default,
//! `"dualpipev"`, `"1f1b"`, `"zb1p"`), `micro_batches` (per pipeline per step, required)
//! and `overlap` (default true: whether DualPipe's overlapped pairs run on two threads).
//! The rules, in the order they are checked, each error naming its key:
//! - no other keys; every number an integer ≥ 1 that fits in 32 bits; `pp = "auto"` is
//!   refused (`flotilla plan` chooses pp for a cluster); `overlap` a boolean; `schedule` a
//!   known name;
//! - DualPipe and DualPipeV need an even pp ≥ 2 ([`ScheduleKind::check_stages`]).
//!
//! What needs the model or the cluster (pp ≤ layers, ep divides the routed experts, the
//! world size against the workers, the schedule compiling) is checked by the coordinator.

use std::collections::BTreeMap;
use std::fmt;

use flotilla_proto::v1::Layout;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::ScheduleKind;

/// A `[parallel]` table, or a `Layout`, that breaks a rule: the key at fault (its full
/// path, `parallel.pp`, `layout.schedule_kind`, `batch_size`) and why.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{key}: {reason}")]
pub struct ParallelError {
    pub key: String,
    pub reason: String,
}

impl ParallelError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> ParallelError {
        ParallelError { key: key.into(), reason: reason.into() }
    }
}

/// A run's parallel layout: its `[parallel]` table, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawParallel")]
pub struct ParallelConfig {
    /// Pipeline stages (layer groups).
    pub pp: u32,
    /// Expert-parallel degree: ranks sharing one copy of each layer's routed experts.
    pub ep: u32,
    /// Data-parallel replicas of each expert shard.
    pub dp: u32,
    /// The pipeline schedule.
    pub schedule: ScheduleKind,
    /// Micro-batches per pipeline per step.
    pub micro_batches: u32,
    /// Run the two chunks of DualPipe's overlapped forward&backward pairs on two threads,
    /// so one's all-to-all waits while the other computes (default); `false` runs them one
    /// after the other, for measuring what the overlap hides.
    pub overlap: bool,
}

impl ParallelConfig {
    /// The keys a `[parallel]` table may have.
    pub const KEYS: [&'static str; 6] = ["pp", "ep", "dp", "schedule", "micro_batches", "overlap"];

    /// Pipeline ranks: `pp`, or `pp / 2` under DualPipeV.
    pub fn pipeline_ranks(&self) -> u32 {
        self.schedule.ranks_for(self.pp)
    }

    /// World ranks the layout needs: pipeline ranks × ep × dp (in 64 bits: it may not fit
    /// in 32).
    pub fn world_size(&self) -> u64 {
        u64::from(self.pipeline_ranks()) * u64::from(self.ep) * u64::from(self.dp)
    }

    /// Micro-batches in a step's global batch: ep × dp pipelines × `micro_batches`.
    pub fn global_micro_batches(&self) -> u64 {
        u64::from(self.ep) * u64::from(self.dp) * u64::from(self.micro_batches)
    }

    /// The sequences in each micro-batch when a step's global batch is `batch_size`: each
    /// of the ep × dp pipelines runs the same number in every micro-batch, so `batch_size`
    /// must be a multiple of [`ParallelConfig::global_micro_batches`].
    pub fn check_batch(&self, batch_size: u64) -> Result<u64, ParallelError> {
        let per_step = self.global_micro_batches();
        if per_step == 0 || !batch_size.is_multiple_of(per_step) {
            return Err(ParallelError::new(
                "batch_size",
                format!(
                    "{batch_size} cannot be split evenly into ep × dp = {} pipelines × {} micro-batches = {per_step} equal micro-batches",
                    u64::from(self.ep) * u64::from(self.dp),
                    self.micro_batches
                ),
            ));
        }
        Ok(batch_size / per_step)
    }

    /// The rules that hold between the fields (see the module docs); `table` prefixes the
    /// keys in errors (`parallel`, `layout`).
    fn check(&self, table: &str) -> Result<(), ParallelError> {
        for (key, value) in
            [("pp", self.pp), ("ep", self.ep), ("dp", self.dp), ("micro_batches", self.micro_batches)]
        {
            if value == 0 {
                return Err(ParallelError::new(format!("{table}.{key}"), "must be at least 1, got 0"));
            }
        }
        self.schedule
            .check_stages(self.pp)
            .map_err(|e| ParallelError::new(format!("{table}.pp"), e.to_string()))
    }

    /// The `[parallel]` table as written, checked (see the module docs).
    pub fn from_raw(raw: &RawParallel) -> Result<ParallelConfig, ParallelError> {
        let table = &raw.0;
        let key = |k: &str| format!("parallel.{k}");
        if let Some(unknown) = table.keys().find(|k| !Self::KEYS.contains(&k.as_str())) {
            return Err(ParallelError::new(
                key(unknown),
                format!("is not a [parallel] key (expected {})", Self::KEYS.join(", ")),
            ));
        }
        if let Some(RawValue::String(pp)) = table.get("pp") {
            let reason = if pp == "auto" {
                "\"auto\" is not supported in a run's config: choosing pp needs the cluster's GPUs, \
                 memory and links, which `flotilla plan` searches over; run `flotilla plan` and give pp \
                 (and ep) as integers"
                    .to_string()
            } else {
                format!("must be a positive integer, got the string {pp:?}")
            };
            return Err(ParallelError::new(key("pp"), reason));
        }
        let positive = |k: &str| -> Result<Option<u32>, ParallelError> {
            match table.get(k) {
                None => Ok(None),
                Some(&RawValue::Integer(n)) if n > 0 => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| ParallelError::new(key(k), format!("{n} is too large"))),
                Some(RawValue::Integer(n)) => {
                    Err(ParallelError::new(key(k), format!("must be at least 1, got {n}")))
                }
                Some(other) => Err(ParallelError::new(
                    key(k),
                    format!("must be a positive integer, got a {}", other.type_name()),
                )),
            }
        };
        let required = |k: &str| positive(k)?.ok_or_else(|| ParallelError::new(key(k), "is missing"));
        let pp = required("pp")?;
        let ep = positive("ep")?.unwrap_or(1);
        let dp = positive("dp")?.unwrap_or(1);
        let micro_batches = required("micro_batches")?;
        let overlap = match table.get("overlap") {
            None => true,
            Some(&RawValue::Boolean(b)) => b,
            Some(other) => {
                return Err(ParallelError::new(
                    key("overlap"),
                    format!("must be true or false, got a {}", other.type_name()),
                ));
            }
        };
        let schedule = match table.get("schedule") {
            None => ScheduleKind::DualPipe,
            Some(RawValue::String(name)) => name
                .parse()
                .map_err(|e: crate::ScheduleKindError| ParallelError::new(key("schedule"), e.to_string()))?,
            Some(other) => {
                return Err(ParallelError::new(
                    key("schedule"),
                    format!("must be a string, got a {}", other.type_name()),
                ));
            }
        };
        let parallel = ParallelConfig { pp, ep, dp, schedule, micro_batches, overlap };
        parallel.check("parallel")?;
        Ok(parallel)
    }

    /// The proto form, carried in every rank's assignment.
    pub fn layout(&self) -> Layout {
        Layout {
            pp: self.pp,
            ep: self.ep,
            dp: self.dp,
            micro_batches: self.micro_batches,
            schedule_kind: flotilla_proto::v1::ScheduleKind::from(self.schedule) as i32,
            overlap: self.overlap,
        }
    }

    /// A layout from the wire, checked as a `[parallel]` table is; errors name the field
    /// (`layout.schedule_kind`, `layout.pp`, …).
    pub fn from_layout(layout: &Layout) -> Result<ParallelConfig, ParallelError> {
        let schedule = ScheduleKind::try_from(layout.schedule_kind)
            .map_err(|e| ParallelError::new("layout.schedule_kind", e.to_string()))?;
        let parallel = ParallelConfig {
            pp: layout.pp,
            ep: layout.ep,
            dp: layout.dp,
            schedule,
            micro_batches: layout.micro_batches,
            overlap: layout.overlap,
        };
        parallel.check("layout")?;
        Ok(parallel)
    }
}

impl TryFrom<RawParallel> for ParallelConfig {
    type Error = ParallelError;

    fn try_from(raw: RawParallel) -> Result<ParallelConfig, ParallelError> {
        ParallelConfig::from_raw(&raw)
    }
}

/// A `[parallel]` table as written, before its checks: any keys, any values. Deserialize
/// it from whatever holds the table, then [`ParallelConfig::from_raw`] gives the typed
/// table or the key at fault.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct RawParallel(pub BTreeMap<String, RawValue>);

/// A value of a raw table: scalars as written, arrays and tables by their kind only.
#[derive(Clone, Debug, PartialEq)]
pub enum RawValue {
    Integer(i128),
    Float(f64),
    Boolean(bool),
    String(String),
    Array,
    Table,
}

impl RawValue {
    /// The value's kind as TOML names it: `integer`, `float`, `boolean`, `string`,
    /// `array`, `table`.
    pub fn type_name(&self) -> &'static str {
        match self {
            RawValue::Integer(_) => "integer",
            RawValue::Float(_) => "float",
            RawValue::Boolean(_) => "boolean",
            RawValue::String(_) => "string",
            RawValue::Array => "array",
            RawValue::Table => "table",
        }
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawValue, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RawValue, E> {
                Ok(RawValue::Boolean(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawValue, E> {
                Ok(RawValue::Integer(n.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawValue, E> {
                Ok(RawValue::Integer(n.into()))
            }
            fn visit_i128<E: de::Error>(self, n: i128) -> Result<RawValue, E> {
                Ok(RawValue::Integer(n))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<RawValue, E> {
                Ok(RawValue::Float(x))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawValue, E> {
                Ok(RawValue::String(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<RawValue, E> {
                Ok(RawValue::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawValue::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawValue::Table)
            }
        }
        deserializer.deserialize_any(Any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ParallelConfig, ParallelError> {
        let raw: RawParallel = toml::from_str(text).expect("a TOML table");
        ParallelConfig::from_raw(&raw)
    }

    #[test]
    fn defaults_fill_the_optional_keys() {
        let p = parse("pp = 4\nmicro_batches = 8").unwrap();
        assert_eq!(
            p,
            ParallelConfig {
                pp: 4,
                ep: 1,
                dp: 1,
                schedule: ScheduleKind::DualPipe,
                micro_batches: 8,
                overlap: true
            }
        );
        let v = parse("pp = 4\nep = 2\ndp = 3\nschedule = \"DualPipeV\"\nmicro_batches = 4\noverlap = false")
            .unwrap();
        assert_eq!((v.schedule, v.ep, v.dp, v.overlap), (ScheduleKind::DualPipeV, 2, 3, false));
        assert_eq!(v.pipeline_ranks(), 2);
        assert_eq!(v.world_size(), 12);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("pp = 2\nmicro_batches = 4\ntp = 2", "parallel.tp", "is not a [parallel] key"),
            ("micro_batches = 4", "parallel.pp", "is missing"),
            ("pp = \"auto\"\nmicro_batches = 4", "parallel.pp", "flotilla plan"),
            ("pp = \"two\"\nmicro_batches = 4", "parallel.pp", "got the string \"two\""),
            ("pp = 0\nmicro_batches = 4", "parallel.pp", "must be at least 1, got 0"),
            ("pp = 2\nep = -1\nmicro_batches = 4", "parallel.ep", "must be at least 1, got -1"),
            ("pp = 2\ndp = 1.5\nmicro_batches = 4", "parallel.dp", "positive integer, got a float"),
            ("pp = 2\ndp = [1]\nmicro_batches = 4", "parallel.dp", "positive integer, got a array"),
            ("pp = 5000000000\nmicro_batches = 4", "parallel.pp", "is too large"),
            ("pp = 2", "parallel.micro_batches", "is missing"),
            ("pp = 2\nmicro_batches = 4\noverlap = 1", "parallel.overlap", "true or false, got a integer"),
            (
                "pp = 2\nmicro_batches = 4\nschedule = \"gpipe\"",
                "parallel.schedule",
                "unknown schedule kind \"gpipe\"",
            ),
            ("pp = 2\nmicro_batches = 4\nschedule = 1", "parallel.schedule", "must be a string"),
            ("pp = 3\nmicro_batches = 6", "parallel.pp", "DualPipe needs an even pp ≥ 2"),
            (
                "pp = 3\nschedule = \"dualpipev\"\nmicro_batches = 6",
                "parallel.pp",
                "DualPipeV needs an even pp",
            ),
        ];
        for &(text, key, reason) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.key, key, "{text}: {err}");
            assert!(err.reason.contains(reason), "{text}: {:?} lacks {reason:?}", err.reason);
        }
        // Odd pp is fine without DualPipe.
        assert_eq!(parse("pp = 3\nschedule = \"1f1b\"\nmicro_batches = 6").unwrap().pipeline_ranks(), 3);
    }

    #[test]
    fn serde_uses_the_same_rules() {
        #[derive(Debug, Deserialize, Serialize, PartialEq)]
        struct Run {
            parallel: ParallelConfig,
        }
        let run: Run = toml::from_str("[parallel]\npp = 2\nschedule = \"1f1b\"\nmicro_batches = 2").unwrap();
        assert_eq!(run.parallel.schedule, ScheduleKind::OneFOneB);
        let text = toml::to_string(&run).unwrap();
        assert!(text.contains("schedule = \"1f1b\""), "{text}");
        assert_eq!(toml::from_str::<Run>(&text).unwrap(), run);
        let err = toml::from_str::<Run>("[parallel]\npp = 3\nmicro_batches = 6").unwrap_err();
        assert!(err.to_string().contains("parallel.pp: DualPipe needs an even pp"), "{err}");
        let err = toml::from_str::<Run>("[parallel]\npp = 2\nmicro_batches = 4\nx = 1").unwrap_err();
        assert!(err.to_string().contains("parallel.x: is not a [parallel] key"), "{err}");
    }

    #[test]
    fn the_layout_round_trips_and_refuses_what_the_table_would() {
        let p = parse("pp = 4\nep = 2\nschedule = \"zb1p\"\nmicro_batches = 3\noverlap = false").unwrap();
        let layout = p.layout();
        assert_eq!(layout.schedule_kind(), flotilla_proto::v1::ScheduleKind::Zb1p);
        assert_eq!(ParallelConfig::from_layout(&layout), Ok(p));
        let err = ParallelConfig::from_layout(&Layout { schedule_kind: 0, ..layout }).unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.reason.as_str()),
            ("layout.schedule_kind", "the schedule kind is unspecified")
        );
        let err = ParallelConfig::from_layout(&Layout { schedule_kind: 17, ..layout }).unwrap_err();
        assert!(err.reason.contains("17 is not a known schedule kind"), "{err}");
        let err = ParallelConfig::from_layout(&Layout { dp: 0, ..layout }).unwrap_err();
        assert_eq!(err.key, "layout.dp");
        let v = ParallelConfig { schedule: ScheduleKind::DualPipeV, pp: 5, ..p };
        let err = ParallelConfig::from_layout(&v.layout()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layout.pp: DualPipeV needs an even pp ≥ 2 (each pipeline rank hosts two stages), got 5"
        );
    }

    #[test]
    fn the_batch_splits_into_equal_micro_batches() {
        let p = parse("pp = 2\nep = 2\ndp = 2\nmicro_batches = 4").unwrap();
        assert_eq!(p.global_micro_batches(), 16);
        assert_eq!(p.check_batch(32), Ok(2));
        let err = p.check_batch(20).unwrap_err();
        assert_eq!(err.key, "batch_size");
        assert!(err.reason.contains("= 16 equal micro-batches"), "{err}");
    }
}
