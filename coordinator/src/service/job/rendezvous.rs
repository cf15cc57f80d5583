//! Rendezvous: starting an attempt of the job on the crew the cluster actor gave it, and
//! running its steps once every rank has accepted its assignment.
//!
//! A pipeline job (one with a `[parallel]` table) is placed when it is submitted (see
//! `crate::placement`): at rendezvous its workers are ordered into world ranks by (node,
//! local rank, worker id), and each one's assignment carries the layout, every rank's
//! coordinates, every stage and its pipeline rank's compiled stream (`dp_rank` and
//! `dp_size` are then the world rank and size). A data-parallel job keeps the cluster
//! actor's order (worker ids).
//!
//! Invariants: assignments go out only after the Rendezvous state and its `WorkerJoined`
//! events are written, and `RunSteps` only after Running is; a job refused before
//! anything was sent fails without aborting anyone; each rendezvous gets a fresh
//! data-plane session id, so a peer left over from an earlier one is refused, and a new
//! assignment epoch, so a job message left over from an earlier one is refused. A refused
//! assignment is decided on by the `Ack`'s `FailureKind`, never its text:
//! `FAILURE_KIND_CHECKPOINT` (naming the directory) falls back to the checkpoint before,
//! any other refusal fails the job.

use flotilla_proto::v1::{
    Ack, Assignment, FailureKind, JobState, Peer, ResumeFrom, RunSteps, WorkerInfo, WorkerJoined,
    coordinator_message, job_event,
};
use tokio::time::Instant;

use super::steps::StepTracker;
use super::{CommandKind, JobActor, Rank};
use crate::placement::{Placement, WorkerKey, world_order};
use crate::service::error::ServiceError;
use crate::service::ids::{data_plane_secret, random_u64};
use crate::service::messages::Member;
use crate::service::timeline::{JobTimelines, RankInfo};
use crate::store::StateStore;

/// Each rank's worker id and registration, by world rank: what the peers list is made of.
type Peers = Vec<(String, WorkerInfo)>;

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// Rendezvous: records the workers, then sends each its assignment with every peer's
    /// data-plane address. A pipeline job orders its workers into world ranks by (node,
    /// local rank, worker id) and ships each its place in the layout and its stream; a
    /// data-parallel job keeps the cluster actor's order (worker ids).
    pub(super) async fn start(&mut self, members: Vec<Member>) -> Result<(), ServiceError> {
        let Some(recovering) = self.accept_start() else { return Ok(()) };
        let placement = match &self.placement {
            Ok(placement) => placement.clone(),
            Err(why) => {
                // Nothing was sent to the workers: they are free again once the job ends.
                let reason = format!("the job's [parallel] layout cannot be placed: {why}");
                return self.transition(JobState::Failed, reason).await;
            }
        };
        let members = match &placement {
            Some(placement) => match world_ordered(placement, members) {
                Ok(members) => members,
                Err(reason) => return self.transition(JobState::Failed, reason).await,
            },
            None => members,
        };
        let peers = self.form_crew(members);
        let resume = match self.choose_checkpoint().await {
            Ok(resume) => resume,
            // Nothing was sent to the workers: they are free again once the job ends.
            Err(reason) => return self.transition(JobState::Failed, reason).await,
        };
        // Fresh for every rendezvous (every epoch): a rank of an earlier one cannot join.
        let Some(secret) = data_plane_secret() else {
            let reason = "the operating system supplied no randomness for the data-plane secret";
            return self.transition(JobState::Failed, reason.into()).await;
        };
        self.begin_attempt(resume.as_ref(), placement.as_deref());
        self.announce_rendezvous(resume.as_ref(), recovering, placement.is_some()).await?;
        self.send_assignments(peers, placement.as_deref(), resume, secret);
        Ok(())
    }

    /// Whether the job takes a crew now: `Some(recovering)` for a pending job, or a
    /// recovering one that asked for a crew (whose arrival is timed); `None` for a second
    /// start, which is ignored.
    fn accept_start(&mut self) -> Option<bool> {
        let recovering =
            self.record.state == JobState::Recovering && self.recovery.as_ref().is_some_and(|r| r.requeued);
        if recovering && let Some(recovery) = &mut self.recovery {
            recovery.crew_at = Some(Instant::now());
        }
        if !(self.record.state == JobState::Pending || recovering) || !self.crew.is_empty() {
            // The cluster actor starts a job once per request; the workers are released
            // when it ends.
            tracing::warn!(job = %self.record.id, "ignoring a second start");
            return None;
        }
        Some(recovering)
    }

    /// Makes the members the crew, in the order given (rank = position); returns every
    /// rank's worker id and registration for the peers list.
    fn form_crew(&mut self, members: Vec<Member>) -> Peers {
        let peers: Peers = members.iter().map(|m| (m.worker_id.clone(), m.info.clone())).collect();
        self.crew = members
            .into_iter()
            .map(|m| Rank {
                worker_id: m.worker_id,
                host: m.info.host.clone(),
                session: m.session,
                ready: false,
                finished: false,
                lost: false,
            })
            .collect();
        peers
    }

    /// Resets the step accounting for an attempt resuming from `resume` (none: the seeded
    /// initialization), and a pipeline job's timelines for the crew.
    fn begin_attempt(&mut self, resume: Option<&ResumeFrom>, placement: Option<&Placement>) {
        let n = self.crew.len();
        let from = resume.map_or(0, |r| r.step);
        self.resumed_from = from;
        self.epoch += 1;
        // Steps up to the checkpoint's are done (by this job before a failure, or by the run
        // it resumes); after a recovery, those past it are redone and checked.
        self.record.steps_done = self.record.steps_done.max(from);
        self.steps = StepTracker::new(&self.record, from + 1, n, placement.is_some());
        if let Some(placement) = placement {
            let ranks = self
                .crew
                .iter()
                .enumerate()
                .map(|(g, rank)| RankInfo {
                    worker_id: rank.worker_id.clone(),
                    coordinates: placement.coordinates(g as u32),
                })
                .collect();
            let layout = placement.parallel().layout();
            self.timelines = Some(JobTimelines::new(self.record.id.clone(), layout, ranks));
        }
    }

    /// Writes the Rendezvous state (saying where the attempt resumes from, and whether an
    /// elastic data-parallel job goes on with fewer workers) and a `WorkerJoined` event per
    /// rank.
    async fn announce_rendezvous(
        &mut self,
        resume: Option<&ResumeFrom>,
        recovering: bool,
        pipeline: bool,
    ) -> Result<(), ServiceError> {
        let n = self.crew.len();
        let from = self.resumed_from;
        // An elastic data-parallel job may have been given fewer workers than it had.
        let shrunk = (n as u32) < self.record.workers && !pipeline;
        let before = self.record.workers;
        if shrunk {
            self.record.workers = n as u32;
        }
        let assigned = match resume {
            Some(resume) => {
                format!("{n} workers assigned; resuming from the checkpoint at step {from} ({})", resume.dir)
            }
            None if recovering => format!("{n} workers assigned; restarting from the seeded initialization"),
            None => format!("{n} workers assigned"),
        };
        let assigned = if shrunk {
            format!(
                "{assigned}, {} fewer than before (recovery.min_workers = {})",
                before - n as u32,
                self.policy.recovery.min_workers
            )
        } else {
            assigned
        };
        self.transition(JobState::Rendezvous, assigned).await?;
        for rank in 0..n {
            let joined = WorkerJoined {
                worker_id: self.crew[rank].worker_id.clone(),
                rank: rank as u32,
                host: self.crew[rank].host.clone(),
            };
            self.append(job_event::Event::WorkerJoined(joined)).await?;
        }
        Ok(())
    }

    /// Sends every rank its assignment: the peers by world rank, a fresh data-plane
    /// session and the rendezvous's `secret`, a pipeline job's place in the layout, the
    /// checkpoint root and the checkpoint to resume from. The secret goes only into these
    /// commands: never into the job's record, its events or a log.
    fn send_assignments(
        &mut self,
        peers: Peers,
        placement: Option<&Placement>,
        resume: Option<ResumeFrom>,
        secret: Vec<u8>,
    ) {
        let n = self.crew.len();
        let peers: Vec<Peer> = peers
            .into_iter()
            .enumerate()
            .map(|(rank, (worker_id, info))| Peer {
                rank: rank as u32,
                worker_id,
                data_plane_address: info.data_plane_address,
                node_id: if info.node_id.is_empty() { info.host } else { info.node_id },
            })
            .collect();
        // A fresh id per rendezvous: a peer left over from an earlier one is refused on
        // the data plane.
        let data_plane_session = random_u64();
        let mut pipelines = placement.map(|p| p.assignments().into_iter());
        let checkpoint_root = match self.checkpoint_root() {
            Some(root) if self.policy.checkpoint.interval > 0 => root.display().to_string(),
            _ => String::new(),
        };
        for rank in 0..n {
            // dp_rank and dp_size are the world rank and size: `peers` is by world rank.
            let assignment = Assignment {
                job_id: self.record.id.clone(),
                dp_rank: rank as u32,
                dp_size: n as u32,
                peers: peers.clone(),
                config_toml: self.record.config_toml.clone(),
                output_dir: self.record.output_dir.clone(),
                data_plane_session,
                pipeline: pipelines.as_mut().and_then(Iterator::next),
                checkpoint_root: checkpoint_root.clone(),
                resume: resume.clone(),
                epoch: self.epoch,
                data_plane_secret: secret.clone(),
            };
            self.command(
                rank,
                Some(CommandKind::Assignment),
                coordinator_message::Body::Assignment(assignment),
            );
        }
    }

    /// Every rank accepted its assignment: run the steps.
    pub(super) async fn run_steps(&mut self) -> Result<(), ServiceError> {
        let n = self.crew.len();
        let ready = match &mut self.recovery {
            Some(recovery) => {
                recovery.rendezvous_done = Some(Instant::now());
                format!("all {n} workers ready; running again from step {}", self.steps.next)
            }
            None => format!("all {n} workers ready"),
        };
        self.transition(JobState::Running, ready).await?;
        self.steps.last = Instant::now();
        let first_step = self.steps.next;
        let count = self.steps.end - first_step;
        for rank in 0..n {
            let run = RunSteps { job_id: self.record.id.clone(), first_step, count };
            self.command(rank, Some(CommandKind::RunSteps), coordinator_message::Body::RunSteps(run));
        }
        Ok(())
    }

    pub(super) async fn on_ack(&mut self, rank: usize, ack: Ack) -> Result<(), ServiceError> {
        if self.stopping.get(&ack.command_id).is_some_and(|&(owner, _)| owner == rank) {
            // The rank stopped the aborted step.
            self.stopping.remove(&ack.command_id);
            return Ok(());
        }
        let Some(&(owner, kind)) = self.awaiting.get(&ack.command_id) else { return Ok(()) };
        if owner != rank {
            return Ok(());
        }
        self.awaiting.remove(&ack.command_id);
        // The kind decides, never the text: a checkpoint that cannot be loaded is fallen
        // back from (when the worker names it), every other refusal fails the job.
        if !ack.error.is_empty()
            && ack.kind() == FailureKind::Checkpoint
            && !ack.bad_checkpoint.is_empty()
            && self.record.state == JobState::Rendezvous
        {
            return self.on_bad_checkpoint(rank, ack).await;
        }
        if !ack.error.is_empty() {
            let worker = &self.crew[rank].worker_id;
            let kind = match kind {
                CommandKind::Assignment => "its assignment",
                CommandKind::RunSteps => "the steps to run",
            };
            return self.fail(format!("worker {worker} refused {kind}: {}", ack.error)).await;
        }
        if let CommandKind::Assignment = kind {
            self.crew[rank].ready = true;
            if self.record.state == JobState::Rendezvous && self.crew.iter().all(|r| r.ready) {
                return self.run_steps().await;
            }
        }
        Ok(())
    }
}

/// A pipeline job's members in world order, by (node, local rank, worker id); or why they
/// cannot run the layout (a different number of workers than it needs).
fn world_ordered(placement: &Placement, members: Vec<Member>) -> Result<Vec<Member>, String> {
    if members.len() != placement.world_size() as usize {
        return Err(format!(
            "the layout needs {} workers, but the job was given {}",
            placement.world_size(),
            members.len()
        ));
    }
    let keys: Vec<WorkerKey<'_>> = members
        .iter()
        .map(|m| WorkerKey {
            node_id: if m.info.node_id.is_empty() { &m.info.host } else { &m.info.node_id },
            local_rank: m.info.local_rank,
            worker_id: &m.worker_id,
        })
        .collect();
    let order = world_order(&keys);
    let mut slots: Vec<Option<Member>> = members.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}
