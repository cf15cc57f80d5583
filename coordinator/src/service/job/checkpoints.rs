//! Checkpoints: committing the ones every rank reported durable, and choosing the one an
//! attempt resumes from.
//!
//! With a `[checkpoint]` interval and an output directory, each assignment names the run's
//! checkpoint root (`output_dir/checkpoints/<run id>`, see `crate::checkpoint`); every rank
//! writes its shard of step s's state there in the background and reports it durable
//! (`CheckpointShard`). Once every rank's shard of a step is in, the actor commits the
//! checkpoint: writes its manifest atomically, deletes the ones beyond `checkpoint.keep`,
//! and publishes `CheckpointCommitted`. A shard that could not be written leaves that
//! checkpoint uncommitted; training goes on.
//!
//! Invariants: a checkpoint is committed only once every rank of the current attempt has
//! reported its shard written; a checkpoint a worker could not load is never chosen again;
//! the record's `checkpoint_step` and `checkpoint_dir` change only with a written
//! `CheckpointCommitted` event.

use std::collections::BTreeMap;

use flotilla_proto::v1::{
    Ack, CheckpointCommitted, CheckpointShard, JobState, RecoveryCause, ResumeFrom, ShardFile, job_event,
};

use super::JobActor;
use crate::checkpoint::{self as ckpt, Manifest, ShardEntry};
use crate::service::error::ServiceError;
use crate::store::StateStore;

/// A checkpoint's shards as the ranks report them durable.
#[derive(Default)]
struct PendingCheckpoint {
    shards: Vec<Option<CheckpointShard>>,
    /// A rank could not write its shard: the checkpoint will not be committed.
    failed: bool,
}

/// The checkpoints whose shards are being reported, by step: a pure collector the actor
/// owns.
#[derive(Default)]
pub(super) struct PendingCheckpoints {
    by_step: BTreeMap<u64, PendingCheckpoint>,
}

impl PendingCheckpoints {
    /// Forgets every checkpoint under way (their attempt is over).
    pub(super) fn clear(&mut self) {
        self.by_step.clear();
    }

    /// A rank of `ranks` could not write its shard of `step`'s checkpoint: it will not be
    /// committed.
    pub(super) fn fail(&mut self, step: u64, ranks: usize) {
        self.entry(step, ranks).failed = true;
    }

    /// Takes `rank`'s shard of `step`'s checkpoint (of `ranks` ranks). Once every rank's is
    /// in, and none failed, returns them in rank order and forgets that checkpoint and every
    /// older one (each rank writes its checkpoints in order: none will complete now).
    pub(super) fn add(
        &mut self,
        step: u64,
        rank: usize,
        ranks: usize,
        shard: CheckpointShard,
    ) -> Option<Vec<CheckpointShard>> {
        let pending = self.entry(step, ranks);
        if let Some(slot) = pending.shards.get_mut(rank) {
            *slot = Some(shard);
        }
        if pending.failed || pending.shards.iter().any(Option::is_none) {
            return None;
        }
        let complete = self.by_step.remove(&step)?;
        self.by_step.retain(|&s, _| s > step);
        Some(complete.shards.into_iter().flatten().collect())
    }

    fn entry(&mut self, step: u64, ranks: usize) -> &mut PendingCheckpoint {
        self.by_step
            .entry(step)
            .or_insert_with(|| PendingCheckpoint { shards: vec![None; ranks], failed: false })
    }
}

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// Where this run's checkpoints go: `output_dir/checkpoints/<run id>`; none without an
    /// output directory.
    pub(super) fn checkpoint_root(&self) -> Option<std::path::PathBuf> {
        let dir = &self.record.output_dir;
        (!dir.is_empty()).then(|| ckpt::run_root(std::path::Path::new(dir), &self.record.run_id()))
    }

    /// The checkpoint to start from: this run's newest committed one that no worker failed
    /// to load, else the one the job was submitted to resume from, else none (the seeded
    /// initialization, which every layout reproduces). The error says why the job cannot
    /// start: the checkpoint it was submitted with cannot be loaded.
    pub(super) async fn choose_checkpoint(&self) -> Result<Option<ResumeFrom>, String> {
        let root = self.checkpoint_root();
        let resume_from = self.record.resume_from.clone();
        let bad = self.bad_checkpoints.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Option<ckpt::Committed>, String> {
            if let Some(root) = root {
                match ckpt::list_committed(&root) {
                    Ok(committed) => {
                        let usable =
                            committed.into_iter().rev().find(|c| !bad.contains(&c.dir.display().to_string()));
                        if usable.is_some() {
                            return Ok(usable);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "listing the job's checkpoints"),
                }
            }
            if resume_from.is_empty() {
                return Ok(None);
            }
            if bad.contains(&resume_from) {
                return Err(format!("the checkpoint the job resumes from, {resume_from}, cannot be loaded"));
            }
            let dir = std::path::PathBuf::from(&resume_from);
            let manifest =
                ckpt::read_manifest(&dir).map_err(|e| format!("cannot resume from {resume_from}: {e}"))?;
            Ok(Some(ckpt::Committed { dir, manifest }))
        })
        .await
        .map_err(|e| format!("looking for checkpoints: {e}"))??;
        Ok(found.map(|c| ResumeFrom {
            dir: c.dir.display().to_string(),
            step: c.manifest.step,
            shards: c
                .manifest
                .shards
                .iter()
                .map(|s| ShardFile { file: s.file.clone(), bytes: s.bytes, crc32: s.crc32 })
                .collect(),
        }))
    }

    /// A rank's shard of a checkpoint is durable (or failed). Once every rank's is, the
    /// checkpoint is committed: its manifest written atomically, older ones beyond
    /// `checkpoint.keep` deleted, and the commit published.
    pub(super) async fn on_checkpoint_shard(
        &mut self,
        rank: usize,
        shard: CheckpointShard,
    ) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&shard.job_id, false) {
            return Ok(());
        }
        let step = shard.step;
        if step <= self.record.checkpoint_step || step > self.record.total_steps {
            // Redone after a recovery and committed already, or nonsense.
            return Ok(());
        }
        let n = self.crew.len();
        if !shard.error.is_empty() {
            let worker = &self.crew[rank].worker_id;
            tracing::warn!(job = %self.record.id, step, %worker, error = %shard.error, "a checkpoint shard could not be written; the checkpoint will not be committed");
            self.shards.fail(step, n);
            return Ok(());
        }
        if let Some(reason) = ckpt::bad_file_name(&shard.file) {
            let worker = &self.crew[rank].worker_id;
            tracing::warn!(job = %self.record.id, step, %worker, file = %shard.file.escape_debug(), %reason, "a checkpoint shard's file name is refused; the checkpoint will not be committed");
            self.shards.fail(step, n);
            return Ok(());
        }
        let Some(shards) = self.shards.add(step, rank, n, shard) else { return Ok(()) };
        self.commit_checkpoint(step, shards).await
    }

    pub(super) async fn commit_checkpoint(
        &mut self,
        step: u64,
        shards: Vec<CheckpointShard>,
    ) -> Result<(), ServiceError> {
        let Some(root) = self.checkpoint_root() else { return Ok(()) };
        let dir = flotilla_model::shard::step_dir(&root, step);
        let bytes = shards.iter().map(|s| s.bytes).fold(0, u64::saturating_add);
        let snapshot_seconds = shards.iter().map(|s| s.snapshot_seconds).fold(0.0, f64::max);
        let write_seconds = shards.iter().map(|s| s.write_seconds).fold(0.0, f64::max);
        let manifest = Manifest {
            format: ckpt::MANIFEST_FORMAT.into(),
            job_id: self.record.id.clone(),
            run_id: self.record.run_id(),
            step,
            created_unix_ms: self.record.created_unix_ms,
            workers: shards.len() as u32,
            layout: self.layout_name(),
            config_toml: self.record.config_toml.clone(),
            shards: shards
                .iter()
                .enumerate()
                .map(|(rank, s)| ShardEntry {
                    rank: rank as u32,
                    file: s.file.clone(),
                    bytes: s.bytes,
                    crc32: s.crc32,
                })
                .collect(),
            bytes,
        };
        let keep = self.policy.checkpoint.keep as usize;
        let commit_dir = dir.clone();
        let committed = tokio::task::spawn_blocking(move || {
            ckpt::commit(&commit_dir, &manifest).map_err(|e| e.to_string())?;
            // The commit stands even if clean-up fails; the next commit tries again.
            Ok::<_, String>(ckpt::retain(&root, keep).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "deleting old checkpoints");
                Vec::new()
            }))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let deleted_steps = match committed {
            Ok(deleted) => deleted,
            Err(e) => {
                // Training goes on: the previous committed checkpoint still stands.
                tracing::error!(job = %self.record.id, step, error = %e, "committing a checkpoint");
                return Ok(());
            }
        };
        let before = (self.record.checkpoint_step, std::mem::take(&mut self.record.checkpoint_dir));
        self.record.checkpoint_step = step;
        self.record.checkpoint_dir = dir.display().to_string();
        let event = CheckpointCommitted {
            step,
            dir: self.record.checkpoint_dir.clone(),
            shards: shards.len() as u32,
            bytes,
            snapshot_seconds,
            write_seconds,
            deleted_steps,
        };
        if let Err(e) = self.append(job_event::Event::CheckpointCommitted(event)).await {
            (self.record.checkpoint_step, self.record.checkpoint_dir) = before;
            return Err(e);
        }
        Ok(())
    }

    /// The job's layout in a manifest: "pp 2 ep 2 dp 1 dualpipe, 4 micro-batches" or
    /// "data-parallel 2".
    pub(super) fn layout_name(&self) -> String {
        match &self.placement {
            Ok(Some(placement)) => {
                let l = placement.parallel();
                format!(
                    "pp {} ep {} dp {} {}, {} micro-batches",
                    l.pp, l.ep, l.dp, l.schedule, l.micro_batches
                )
            }
            _ => format!("data-parallel {}", self.crew.len()),
        }
    }

    /// A rank could not load the checkpoint it was assigned (a shard missing, truncated or
    /// failing its checksum, or from another model): it is never tried again, and the job
    /// rendezvouses anew from the committed checkpoint before it. A job submitted to resume
    /// from that very checkpoint fails instead: starting over would silently drop it.
    pub(super) async fn on_bad_checkpoint(&mut self, rank: usize, ack: Ack) -> Result<(), ServiceError> {
        let worker = self.crew[rank].worker_id.clone();
        let dir = ack.bad_checkpoint;
        tracing::warn!(job = %self.record.id, %worker, checkpoint = %dir, error = %ack.error, "a checkpoint cannot be loaded");
        if !self.bad_checkpoints.contains(&dir) {
            self.bad_checkpoints.push(dir.clone());
        }
        if dir == self.record.resume_from && self.recovery.is_none() {
            return self
                .fail(format!("worker {worker} cannot load the checkpoint to resume from: {}", ack.error))
                .await;
        }
        let cause = format!("worker {worker} cannot load the checkpoint {dir}: {}", ack.error);
        self.begin_recovery(cause, RecoveryCause::CheckpointUnloadable, false).await?;
        if let Some(recovery) = &mut self.recovery
            && !recovery.skipped.contains(&dir)
        {
            recovery.skipped.push(dir);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(step: u64, rank: u32) -> CheckpointShard {
        CheckpointShard { step, file: format!("rank-{rank}"), ..CheckpointShard::default() }
    }

    #[test]
    fn a_checkpoint_completes_once_every_rank_reported_and_drops_older_ones() {
        let mut pending = PendingCheckpoints::default();
        assert_eq!(pending.add(4, 0, 2, shard(4, 0)), None);
        assert_eq!(pending.add(8, 1, 2, shard(8, 1)), None);
        let done = pending.add(8, 0, 2, shard(8, 0)).expect("both ranks reported step 8");
        assert_eq!(done.iter().map(|s| s.file.as_str()).collect::<Vec<_>>(), ["rank-0", "rank-1"]);
        // Step 4 is older than the committed step 8: forgotten, so it never completes.
        assert_eq!(pending.add(4, 1, 2, shard(4, 1)), None);
        assert!(!pending.by_step.contains_key(&8));
    }

    #[test]
    fn a_failed_shard_keeps_its_checkpoint_from_committing() {
        let mut pending = PendingCheckpoints::default();
        pending.fail(3, 2);
        assert_eq!(pending.add(3, 0, 2, shard(3, 0)), None);
        assert_eq!(pending.add(3, 1, 2, shard(3, 1)), None);
        pending.clear();
        assert_eq!(pending.add(3, 0, 1, shard(3, 0)).map(|s| s.len()), Some(1));
    }
}
