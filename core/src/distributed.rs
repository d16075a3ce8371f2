//! Data-parallel training: which rank this process is ([`World`], from the environment that
//! `trellis run --nproc`, torchrun or srun sets) and what the ranks do together ([`Dist`]) on
//! torch.distributed's c10d, through `trellis-dist`.
//!
//! The ranks keep identical weights the way DistributedDataParallel does: rank 0's parameters
//! and buffers are broadcast at the start (and after pruning), every backward pass's gradients
//! are all-reduced in buckets, and every rank then takes the same optimizer step. Each rank
//! trains on its slice of the global batch ([`crate::data::Shard::Rows`]); its gradient is
//! weighted by its share of the batch before the sum, so the result is the gradient of the
//! global batch's mean loss even when the slices differ in size.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};
use trellis_dist::{BackendKind, Op, ProcessGroup, Store};

use crate::config::{DistBackend, DistributedConfig};

/// This process's place among the ranks of a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among those on this machine: which GPU it takes.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Where the rank came from, for messages.
const TORCHRUN_VARS: &str = "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (LOCAL_RANK optional)";

impl World {
    /// The world that torchrun (or `trellis run --nproc`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`) or Slurm's srun (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`,
    /// `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` if set) describes; `None` for a run of
    /// one process. Slurm's job-wide `SLURM_NTASKS` is not read: a batch script of a job with
    /// several tasks has it too, and a `trellis run` there without srun is one process.
    pub fn from_env() -> Result<Option<World>> {
        World::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        anyhow!("the environment variable {name}={v:?} is not a whole number")
                    })
                })
                .transpose()
        };
        let (rank, world_size, local_rank, launcher) =
            match (number("RANK")?, number("WORLD_SIZE")?) {
                (Some(rank), Some(world)) => (rank, world, number("LOCAL_RANK")?, "torchrun"),
                (None, None) => match (number("SLURM_PROCID")?, number("SLURM_STEP_NUM_TASKS")?) {
                    (Some(rank), Some(world)) => (rank, world, number("SLURM_LOCALID")?, "srun"),
                    _ => return Ok(None),
                },
                _ => bail!(
                    "only one of RANK and WORLD_SIZE is set\n  help: a data-parallel rank needs \
                     {TORCHRUN_VARS}; use `trellis run --nproc N` or torchrun to set them"
                ),
            };
        if world_size <= 1 {
            return Ok(None);
        }
        if rank >= world_size {
            bail!("the {launcher} environment gives rank {rank} of a world of {world_size}");
        }
        let master_addr = match (var("MASTER_ADDR"), launcher) {
            (Some(addr), _) => addr,
            // srun started the tasks from the job's first node, which runs rank 0.
            (None, "srun") => var("SLURM_LAUNCH_NODE_IPADDR").ok_or_else(|| {
                anyhow!(
                    "under srun, set MASTER_ADDR to the host of rank 0\n  help: in the batch \
                     script, `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" \
                     | head -n 1)`"
                )
            })?,
            (None, _) => bail!("RANK is set but MASTER_ADDR is not\n  help: set {TORCHRUN_VARS}"),
        };
        let master_port = match (number("MASTER_PORT")?, number("SLURM_JOB_ID")?) {
            (Some(port), _) => port,
            // One port per job, so two jobs sharing a node do not meet at each other's store.
            (None, Some(job)) if launcher == "srun" => 20000 + job % 20000,
            _ => bail!("RANK is set but MASTER_PORT is not\n  help: set {TORCHRUN_VARS}"),
        };
        let master_port = u16::try_from(master_port)
            .map_err(|_| anyhow!("MASTER_PORT={master_port} is not a TCP port"))?;
        Ok(Some(World {
            rank,
            world_size,
            local_rank: local_rank.unwrap_or(rank),
            master_addr,
            master_port,
        }))
    }
}

/// The variables [`World::from_env`] reads: a process that starts runs of its own (a sweep, the
/// `--nproc` launcher) removes them from its children's environment, which it sets itself.
pub const WORLD_VARIABLES: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
];

/// The process group of a data-parallel run and what the training loop asks of it.
pub struct Dist {
    group: ProcessGroup,
    world: World,
    /// Where collectives run: the CPU for Gloo, this rank's GPU for NCCL.
    device: Device,
    bucket_bytes: usize,
    /// Fault injection for the tests that show a broken average or a missing broadcast is
    /// caught (`TRELLIS_FAULT_UNWEIGHTED_GRADIENTS`, `TRELLIS_FAULT_NO_BROADCAST`), read once.
    fault_unweighted: bool,
    fault_no_broadcast: bool,
}

impl Dist {
    /// Meets the other ranks at rank 0's TCPStore and makes the process group the config asks
    /// for (Gloo on the CPU, NCCL on GPUs).
    pub fn connect(world: World, config: &DistributedConfig, device: Device) -> Result<Dist> {
        let backend = match (config.backend, device) {
            (DistBackend::Auto, Device::Cuda(_)) | (DistBackend::Nccl, Device::Cuda(_)) => {
                BackendKind::Nccl
            }
            (DistBackend::Nccl, _) => bail!(
                "distributed.backend = \"nccl\" needs train.device = \"cuda\"\n  help: NCCL reduces \
                 CUDA tensors only; use backend = \"gloo\" (or \"auto\") on the CPU"
            ),
            _ => BackendKind::Gloo,
        };
        let timeout = Duration::from_secs_f64(config.timeout_s);
        let store = Store::tcp(
            &world.master_addr,
            world.master_port,
            world.world_size,
            world.rank == 0,
            timeout,
        )?;
        let group = match backend {
            BackendKind::Gloo => ProcessGroup::gloo(&store, world.rank, world.world_size, timeout)?,
            BackendKind::Nccl => ProcessGroup::nccl(&store, world.rank, world.world_size, timeout)?,
        };
        Ok(Dist {
            group,
            world,
            device,
            bucket_bytes: ((config.bucket_mb * 1024.0 * 1024.0) as usize).max(1),
            fault_unweighted: std::env::var_os("TRELLIS_FAULT_UNWEIGHTED_GRADIENTS").is_some(),
            fault_no_broadcast: std::env::var_os("TRELLIS_FAULT_NO_BROADCAST").is_some(),
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn world_size(&self) -> usize {
        self.world.world_size
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// What a failed collective means for a training run, beside c10d's own words.
    fn lost(&self, e: trellis_dist::Error) -> anyhow::Error {
        let others = match self.world_size() {
            2 => format!("rank {}", 1 - self.rank()),
            n => format!("one of the other {} ranks", n - 1),
        };
        anyhow!(
            "{e}\n  help: {others} stopped, hangs or cannot be reached (its output says why); \
             the run goes on from its last checkpoint with --resume, with any number of ranks"
        )
    }

    /// Overwrites `tensors` on every rank with rank 0's, in buckets.
    pub fn broadcast_from_rank0(&self, tensors: &[Tensor]) -> Result<()> {
        if self.fault_no_broadcast {
            return Ok(());
        }
        let _no_grad = tch::no_grad_guard();
        for bucket in buckets(tensors, self.bucket_bytes) {
            let mut flat = flatten(&bucket, self.device);
            self.group
                .broadcast(&mut flat, 0)
                .map_err(|e| self.lost(e))?;
            unflatten(&flat, &bucket);
        }
        Ok(())
    }

    /// The weight of a rank's mean loss over its `rows` of a global batch of `global_rows`: the
    /// weighted losses of the ranks sum to the global batch's mean loss.
    pub fn gradient_share(&self, rows: i64, global_rows: i64) -> f64 {
        if self.fault_unweighted {
            return 1.0;
        }
        rows as f64 / global_rows as f64
    }

    /// Sums each rank's gradient of `params` (of its loss weighted by
    /// [`Dist::gradient_share`]) into every rank's, in buckets. Parameters without a gradient
    /// are left out (the same on every rank: every rank runs the same network).
    pub fn reduce_gradients(&self, params: &[Tensor]) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        for bucket in buckets(&grads, self.bucket_bytes) {
            let mut flat = flatten(&bucket, self.device);
            self.group
                .all_reduce(&mut flat, Op::Sum)
                .map_err(|e| self.lost(e))?;
            unflatten(&flat, &bucket);
        }
        Ok(())
    }

    /// The sums over the ranks of a few numbers: the loss and sample count of a stretch of
    /// steps, whether any rank was interrupted. Every rank gets the same answer, so every rank
    /// takes the same decision.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut t = Tensor::from_slice(values).to_device(self.device);
        self.group
            .all_reduce(&mut t, Op::Sum)
            .map_err(|e| self.lost(e))?;
        Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu))?)
    }

    /// Whether `flag` is set on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.sum(&[f64::from(u8::from(flag))])?[0] > 0.0)
    }

    /// Passes each rank's outcome of a step that may fail (opening the run directory, setting
    /// up, loading the checkpoint) through unchanged when every rank succeeded; otherwise every
    /// rank fails: rank 0 with its own error in full, the others with theirs in one line when
    /// rank 0 failed too (a bad config fails every rank the same way), else in full.
    pub fn agree<T>(&self, outcome: Result<T>, what: &str) -> Result<T> {
        let failed = outcome.is_err();
        let flags = [failed, failed && self.rank() == 0].map(|f| f64::from(u8::from(f)));
        let sums = self.sum(&flags)?;
        let (any_failed, rank0_failed) = (sums[0] > 0.0, sums[1] > 0.0);
        match outcome {
            Err(e) if self.rank() > 0 && rank0_failed => {
                let first_line = format!("{e:#}");
                let first_line = first_line.lines().next().unwrap_or_default();
                Err(anyhow!(
                    "rank {} failed too while {what}: {first_line}",
                    self.rank()
                ))
            }
            Err(e) => Err(e),
            Ok(_) if any_failed => Err(anyhow!(
                "rank {} stops: another rank failed while {what} (its output says why)",
                self.rank()
            )),
            Ok(value) => Ok(value),
        }
    }

    /// Batch normalisation in training mode over every rank's batch (see
    /// [`trellis_dist::ProcessGroup::sync_batch_norm`]).
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        self.group
            .sync_batch_norm(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
            )
            .map_err(|e| self.lost(e))
    }

    /// Rank 0's `bytes` on every rank (what other ranks pass is ignored).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut len = Tensor::from_slice(&[bytes.len() as i64]).to_device(self.device);
        self.group
            .broadcast(&mut len, 0)
            .map_err(|e| self.lost(e))?;
        let len = len.int64_value(&[0]) as usize;
        let mut data = if self.rank() == 0 {
            Tensor::from_slice(bytes)
        } else {
            Tensor::zeros([len as i64], (Kind::Uint8, Device::Cpu))
        }
        .to_device(self.device);
        if len > 0 {
            self.group
                .broadcast(&mut data, 0)
                .map_err(|e| self.lost(e))?;
        }
        Ok(Vec::<u8>::try_from(&data.to_device(Device::Cpu))?)
    }

    /// Every rank's `tensor` (or nothing), in rank order. The tensors may differ in their first
    /// dimension (a short last batch) and a rank may have none (no batch left in the round);
    /// the others must agree in kind and in their other dimensions.
    pub fn gather_rows(&self, tensor: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        const MAX_DIMS: usize = 6;
        let mut descriptor = vec![0i64; 3 + MAX_DIMS];
        if let Some(t) = tensor {
            let size = t.size();
            if size.is_empty() || size.len() > MAX_DIMS {
                bail!(
                    "cannot gather a tensor of {} dimensions across ranks",
                    size.len()
                );
            }
            descriptor[0] = 1;
            descriptor[1] = kind_code(t.kind())?;
            descriptor[2] = size.len() as i64;
            descriptor[3..3 + size.len()].copy_from_slice(&size);
        }
        let descriptors: Vec<Vec<i64>> = self
            .group
            .all_gather(&Tensor::from_slice(&descriptor).to_device(self.device))
            .map_err(|e| self.lost(e))?
            .iter()
            .map(|t| Vec::<i64>::try_from(&t.to_device(Device::Cpu)))
            .collect::<std::result::Result<_, _>>()?;
        let present: Vec<&Vec<i64>> = descriptors.iter().filter(|d| d[0] == 1).collect();
        let Some(first) = present.first() else {
            return Ok((0..self.world_size()).map(|_| None).collect());
        };
        if present
            .iter()
            .any(|d| d[1..3] != first[1..3] || d[4..] != first[4..])
        {
            bail!("the ranks' tensors to gather differ in kind or shape: {descriptors:?}");
        }
        let ndim = first[2] as usize;
        let rows = present.iter().map(|d| d[3]).max().unwrap_or(0);
        let mut shape = first[3..3 + ndim].to_vec();
        shape[0] = rows;
        let kind = code_kind(first[1])?;
        let padded = match tensor {
            Some(t) if t.size()[0] == rows => t.to_device(self.device),
            Some(t) => {
                let pad = Tensor::zeros(&shape, (kind, self.device));
                pad.narrow(0, 0, t.size()[0]).copy_(t);
                pad
            }
            None => Tensor::zeros(&shape, (kind, self.device)),
        };
        let gathered = self.group.all_gather(&padded).map_err(|e| self.lost(e))?;
        Ok(gathered
            .into_iter()
            .zip(&descriptors)
            .map(|(t, d)| (d[0] == 1).then(|| t.narrow(0, 0, d[3])))
            .collect())
    }

    /// Fails unless every rank holds the same `tensors`, bit for bit (compared through their
    /// sums and sums of squares in f64): ranks that diverge train different models.
    pub fn check_identical(&self, tensors: &[Tensor], when: &str) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let mut digest = Vec::with_capacity(2 * tensors.len());
        for t in tensors {
            let t = t.to_kind(Kind::Double);
            digest.push(t.sum(Kind::Double));
            digest.push(t.square().sum(Kind::Double));
        }
        if digest.is_empty() {
            return Ok(());
        }
        let digest = Tensor::stack(&digest, 0).to_device(self.device);
        let all = self.group.all_gather(&digest).map_err(|e| self.lost(e))?;
        let rank0 = &all[0];
        for (rank, theirs) in all.iter().enumerate().skip(1) {
            if !theirs.equal(rank0) {
                bail!(
                    "the weights of rank {rank} differ from rank 0's {when}\n  help: the ranks no \
                     longer train one model; this is a bug in trellis or a plugin that changes \
                     weights differently on each rank (a random draw not taken from the run's seed)"
                );
            }
        }
        Ok(())
    }
}

/// Consecutive runs of `tensors` of one kind and device, each of about `bytes` at most (a
/// tensor larger than that is a bucket of its own).
fn buckets(tensors: &[Tensor], bytes: usize) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut filled = 0usize;
    for t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let joins = out.last().is_some_and(|b| {
            let last = &b[0];
            last.kind() == t.kind() && last.device() == t.device() && filled + size <= bytes
        });
        if joins {
            filled += size;
            out.last_mut()
                .expect("checked above")
                .push(t.shallow_clone());
        } else {
            filled = size;
            out.push(vec![t.shallow_clone()]);
        }
    }
    out
}

fn flatten(bucket: &[Tensor], device: Device) -> Tensor {
    let flat: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
    Tensor::cat(&flat, 0).to_device(device)
}

fn unflatten(flat: &Tensor, bucket: &[Tensor]) {
    let mut offset = 0;
    for t in bucket {
        let n = t.numel() as i64;
        let mut target = t.shallow_clone();
        target.copy_(&flat.narrow(0, offset, n).view_as(t));
        offset += n;
    }
}

const KINDS: [Kind; 8] = [
    Kind::Float,
    Kind::Double,
    Kind::Int64,
    Kind::BFloat16,
    Kind::Half,
    Kind::Int,
    Kind::Uint8,
    Kind::Bool,
];

fn kind_code(kind: Kind) -> Result<i64> {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .map(|i| i as i64)
        .ok_or_else(|| anyhow!("cannot gather a {kind:?} tensor across ranks"))
}

fn code_kind(code: i64) -> Result<Kind> {
    KINDS
        .get(code as usize)
        .copied()
        .ok_or_else(|| anyhow!("rank sent an unknown tensor kind {code}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<World>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_world_comes_from_torchrun_or_slurm_and_one_process_is_none() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        let torchrun = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
            // torchrun's variables win over Slurm's when srun started torchrun.
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            torchrun,
            World {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "node7".into(),
                master_port: 29500
            }
        );
        let srun = world(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((srun.rank, srun.world_size, srun.local_rank), (5, 8, 1));
        assert_eq!(srun.master_addr, "10.0.0.4");
        assert_eq!(srun.master_port, 23456, "20000 + the job id modulo 20000");
        // A Slurm job step of one task (a sweep's array job) is a run of one process, and so is
        // the batch script of a job with several tasks, which srun has not split.
        assert_eq!(
            world(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]).unwrap(),
            None
        );
        assert_eq!(
            world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(),
            None
        );
    }

    #[test]
    fn a_half_described_world_is_refused_with_what_to_set() {
        let err = |vars: &[(&str, &str)]| format!("{:#}", world(vars).unwrap_err());
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
                .contains("MASTER_PORT")
        );
        assert!(err(&[("RANK", "two"), ("WORLD_SIZE", "2")]).contains("RANK=\"two\""));
        assert!(err(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .contains("rank 2 of a world of 2"));
    }

    #[test]
    fn buckets_keep_kinds_apart_and_round_trip() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::arange(4, (Kind::Float, Device::Cpu));
        let c = Tensor::arange(3, (Kind::Double, Device::Cpu));
        let d = Tensor::arange(100, (Kind::Float, Device::Cpu));
        let groups = buckets(&[a.shallow_clone(), b.shallow_clone(), c, d], 64);
        let sizes: Vec<Vec<i64>> = groups
            .iter()
            .map(|g| g.iter().map(Tensor::numel).map(|n| n as i64).collect())
            .collect();
        // 24 + 16 bytes of f32 share a bucket; the f64 starts another; 400 bytes stand alone.
        assert_eq!(sizes, vec![vec![6, 4], vec![3], vec![100]]);
        let flat = flatten(&groups[0], Device::Cpu) * 2.0;
        unflatten(&flat, &groups[0]);
        assert_eq!(
            Vec::<f32>::try_from(&a.reshape([-1])).unwrap(),
            [0., 2., 4., 6., 8., 10.]
        );
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [0., 2., 4., 6.]);
    }
}
