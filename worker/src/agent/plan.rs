//! An assignment checked into a [`JobPlan`]: everything a job task needs before it touches
//! the network. Nothing in an assignment can panic the worker: ranks, peers, the run's
//! configuration, the pipeline layout and a resume are checked here, and a refusal is a
//! [`JobError::Assignment`] naming the field. So are its paths: every directory and file
//! the job would open or create (output, checkpoints, the checkpoint it resumes from and
//! its shard names, the data, the tokenizer, `init_from`) must lie under this worker's
//! allowed roots (`flotilla_model::paths`), whatever the coordinator checked, before
//! anything is opened.

use std::path::{Path, PathBuf};

use flotilla_model::config::ModelConfig;
use flotilla_model::paths::{AllowedRoots, check_file_name};
use flotilla_model::train::TrainConfig;
use flotilla_proto::v1::{Assignment, ResumeFrom};

use super::WorkerOptions;
use super::connect::host_name;
use super::error::JobError;
use crate::comm::{DataPlaneLimits, DataPlaneSecret};
use crate::pipeline::PipelinePlan;

/// An assignment, checked: everything a job task needs before it touches the network.
pub(super) struct JobPlan {
    pub(super) job_id: String,
    /// The assignment epoch, carried back in every job message (see `report`).
    pub(super) epoch: u64,
    pub(super) rank: usize,
    pub(super) world: usize,
    /// Rank `p`'s data-plane address as the coordinator gave it (this rank's is unused).
    pub(super) peers: Vec<String>,
    pub(super) session: u64,
    /// The rendezvous's secret (redacted in `Debug`; never logged).
    pub(super) secret: DataPlaneSecret,
    /// The job's frame and buffer bounds on the data plane.
    pub(super) limits: DataPlaneLimits,
    pub(super) config: TrainConfig,
    pub(super) model: ModelConfig,
    pub(super) output_dir: Option<PathBuf>,
    /// Pipeline/expert-parallel jobs: this rank's stages, shard and instruction stream.
    pub(super) pipeline: Option<PipelinePlan>,
    /// Where this rank writes its checkpoint shards (`step-{s:08}/` below it); `None`:
    /// the job takes no checkpoints.
    pub(super) checkpoint_root: Option<PathBuf>,
    /// The committed checkpoint to restore before acknowledging.
    pub(super) resume: Option<ResumeFrom>,
}

impl JobPlan {
    /// Checks `a` against itself and this worker's options; every refusal is a
    /// [`JobError::Assignment`] naming the field.
    pub(super) fn from_assignment(a: &Assignment, options: &WorkerOptions) -> Result<JobPlan, JobError> {
        if a.job_id.is_empty() {
            return Err(JobError::Assignment("the assignment has no job id".into()));
        }
        let world = a.dp_size as usize;
        let rank = a.dp_rank as usize;
        if world == 0 || rank >= world {
            return Err(JobError::Assignment(format!("dp_rank {rank} is not below dp_size {world}")));
        }
        // Every other rank must be listed, so a huge dp_size cannot make us allocate much.
        if world > a.peers.len() + 1 {
            return Err(JobError::Assignment(format!(
                "dp_size is {world} but only {} peers are listed",
                a.peers.len()
            )));
        }
        let mut peers: Vec<Option<String>> = vec![None; world];
        for peer in &a.peers {
            let slot = peers.get_mut(peer.rank as usize).ok_or_else(|| {
                JobError::Assignment(format!(
                    "peer {} has rank {}, not below dp_size {world}",
                    peer.worker_id, peer.rank
                ))
            })?;
            if slot.replace(peer.data_plane_address.clone()).is_some() {
                return Err(JobError::Assignment(format!(
                    "rank {} is listed twice among the peers",
                    peer.rank
                )));
            }
        }
        let peers = peers
            .into_iter()
            .enumerate()
            .map(|(p, addr)| match addr {
                Some(addr) => Ok(addr),
                None if p == rank => Ok(String::new()),
                None => Err(JobError::Assignment(format!("rank {p} is missing from the peers"))),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (mut config, model) = TrainConfig::from_toml(&a.config_toml, &options.config_base)
            .map_err(|e| JobError::Assignment(e.to_string()))?;
        if let Some(threads) = options.threads {
            config.threads = Some(threads);
        }
        let pipeline = match &a.pipeline {
            Some(p) => {
                // Every rank's node (this one's as it registered), for node-aware MoE traffic.
                let mut nodes = vec![String::new(); world];
                for peer in &a.peers {
                    if let Some(slot) = nodes.get_mut(peer.rank as usize) {
                        slot.clone_from(&peer.node_id);
                    }
                }
                if nodes[rank].is_empty() {
                    nodes[rank] = options.node_id.clone().unwrap_or_else(host_name);
                }
                // The pipeline's own checks report text; every one of them is about the assignment.
                let plan = PipelinePlan::from_assignment(p, rank, world, &model)
                    .and_then(|plan| plan.with_nodes(nodes))
                    .map_err(JobError::Assignment)?;
                Some(plan)
            }
            None => {
                if !config.batch_size.is_multiple_of(world) {
                    return Err(JobError::Assignment(format!(
                        "`batch_size` {} cannot be split evenly over {world} data-parallel ranks",
                        config.batch_size
                    )));
                }
                None
            }
        };
        let output_dir = (!a.output_dir.is_empty()).then(|| PathBuf::from(&a.output_dir));
        let checkpoint_root = (!a.checkpoint_root.is_empty()).then(|| PathBuf::from(&a.checkpoint_root));
        if let Some(resume) = &a.resume {
            if resume.dir.is_empty() {
                return Err(JobError::Assignment(
                    "resume.dir is empty: the checkpoint to resume from has no directory".into(),
                ));
            }
            if resume.shards.is_empty() {
                return Err(JobError::Assignment(format!(
                    "resume.shards is empty: checkpoint {} lists no shard",
                    resume.dir
                )));
            }
            // At `steps` exactly, nothing is left to run but saving and finishing.
            if resume.step > config.steps {
                return Err(JobError::Assignment(format!(
                    "cannot resume from checkpoint {} at step {}: the run has only `steps` = {}",
                    resume.dir, resume.step, config.steps
                )));
            }
        }
        confine_paths(a, &config, options)?;
        let secret = DataPlaneSecret::from_bytes(&a.data_plane_secret)
            .map_err(|e| JobError::Assignment(e.to_string()))?;
        let limits = DataPlaneLimits::for_job(&model, &config);
        Ok(JobPlan {
            job_id: a.job_id.clone(),
            epoch: a.epoch,
            rank,
            world,
            peers,
            session: a.data_plane_session,
            secret,
            limits,
            config,
            model,
            output_dir,
            pipeline,
            checkpoint_root,
            resume: a.resume.clone(),
        })
    }
}

/// Refuses the assignment if any path it names escapes this worker's allowed roots
/// (relative paths are relative to the working directory; the config's data paths were
/// made relative to `config_base` by the parse).
fn confine_paths(a: &Assignment, config: &TrainConfig, options: &WorkerOptions) -> Result<(), JobError> {
    let refuse = |e: flotilla_model::paths::PathError| JobError::Assignment(e.to_string());
    let roots = AllowedRoots::new(&options.allowed_roots, Path::new(".")).map_err(refuse)?;
    let mut paths: Vec<(&str, PathBuf)> = vec![
        ("output_dir", PathBuf::from(&a.output_dir)),
        ("checkpoint_root", PathBuf::from(&a.checkpoint_root)),
    ];
    if let Some(resume) = &a.resume {
        paths.push(("resume.dir", PathBuf::from(&resume.dir)));
        for shard in &resume.shards {
            check_file_name("resume.shards.file", &shard.file).map_err(refuse)?;
        }
    }
    paths.extend(config.data.paths());
    paths.extend(config.init_from.iter().map(|dir| ("init_from", dir.clone())));
    for (field, path) in paths.iter().filter(|(_, p)| !p.as_os_str().is_empty()) {
        roots.confine(field, path).map_err(refuse)?;
    }
    Ok(())
}
