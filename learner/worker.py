"""The DeepSpeed learner: one data-parallel rank of the policy (and, for PPO, the critic).

A plain class; ``actors`` wraps it in a Ray actor, one per rank. Each rank gets its share of the
rollout rows from the driver, and the ranks agree on every loss denominator with one small
all-reduce per mini-batch, so the loss (and gradient) of a mini-batch is the same however its rows
are spread over ranks and micro-batches (see ``learner.losses.aggregate``).

Gradient accumulation runs in DeepSpeed's unmanaged mode (``managed_gradient_accumulation:
false``): micro-batches are cut by tokens, so their number varies; ``backward`` only accumulates,
and ``step`` (once per mini-batch) reduces across ranks and updates.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner import weight_sync
from learner.losses import aggregate, kl_loss, policy_loss, value_loss
from learner.models import CriticModel, critic_forward, load_causal_lm, policy_forward
from rollout import schema as S
from rollout.ops import append_columns, split_by_tokens
from rollout.tensors import PaddedBatch, to_list_column, to_padded


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW and its learning-rate schedule for one model.

    ``schedule``: linear warm-up over ``warmup_steps`` optimizer steps, then ``constant`` or
    ``cosine`` decay to ``min_lr_ratio * lr`` at ``total_steps``.
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class LossSpec:
    """Which losses a training step adds up, and their coefficients (see ``learner.losses``)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0  # GRPO-style KL to the reference as a loss term; 0 = off
    kl_kind: str = "k3"
    value_clip: float | None = 0.2


@dataclass(frozen=True)
class LearnerSpec:
    """What one learner rank needs (the orchestration config narrows itself to this)."""

    model_path: str
    policy_optim: OptimizerSpec
    loss: LossSpec
    critic_optim: OptimizerSpec | None = None  # None: no critic (GRPO, RLOO, ...)
    dtype: str = "float32"
    trust_remote_code: bool = False
    zero_stage: int = 0
    temperature: float = 1.0
    micro_batch_tokens: int = 4096
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    pad_token_id: int = 0
    seed: int = 0
    collective_timeout_s: float = 600.0  # a collective waiting longer (a dead rank) fails


# Metrics that are this micro-batch's share of the mini-batch loss (global denominators, see
# ``learner.losses.aggregate``): summed over micro-batches and ranks, not averaged.
_ADDITIVE = frozenset({"actor/pg_loss", "actor/entropy", "actor/kl_loss", "critic/value_loss"})


def _lr_lambda(spec: OptimizerSpec):
    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        span = max(spec.total_steps - spec.warmup_steps, 1)
        progress = min((step - spec.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine

    return factor


def _deepspeed_engine(model: torch.nn.Module, spec: OptimizerSpec, zero_stage: int, dtype: str):
    import deepspeed

    optimizer = torch.optim.AdamW(  # a torch instance: DeepSpeed then builds no fused/cpu_adam op
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec))
    config = {
        "train_micro_batch_size_per_gpu": 1,  # unused: batches are cut by tokens, see module doc
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    if zero_stage == 0 and dtype == "float32":
        _record_grad_norm(engine)
    return engine


def export_hf(model, weights: dict[str, torch.Tensor], spec: LearnerSpec, path: str) -> None:
    """``model``'s config and generation config, ``weights`` as safetensors and the tokenizer of
    ``spec.model_path``, into ``path`` (replacing what is there) via a temporary directory."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer, GenerationConfig

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True)
    if not (tmp / "generation_config.json").exists():  # a model class that cannot generate
        GenerationConfig.from_model_config(model.config).save_pretrained(str(tmp))
    tokenizer = AutoTokenizer.from_pretrained(
        spec.model_path, trust_remote_code=spec.trust_remote_code
    )
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _record_grad_norm(engine) -> None:
    """Without ZeRO, fp32 DeepSpeed clips the reduced gradient but drops its norm. Keep it, so
    ``get_global_grad_norm`` reports the norm of the gradient of the whole batch on every rank."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping()
        )
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def _init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float = 600.0
) -> str:
    """Join the learner's process group (collectives fail after ``timeout_s``); returns the
    torch device name."""
    from datetime import timedelta

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK="0",  # one device per rank: Ray gives each actor its own GPU as cuda:0
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    import deepspeed

    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, timeout=timeout
    )
    # DeepSpeed reduces gradients on its own clone of the world group, made without a timeout
    # (torch's default: 30 min on gloo). Make the clone now, with ours; every rank is here.
    import torch.distributed as dist
    from deepspeed.utils import groups

    groups._WORLD_GROUP = dist.new_group(ranks=list(range(world_size)), timeout=timeout)
    return "cuda:0" if on_gpu else "cpu"


class Learner:
    """One rank of the policy (+ critic) learner."""

    def __init__(
        self, spec: LearnerSpec, *, rank: int, world_size: int, master_addr: str, master_port: int
    ):
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.device = _init_distributed(
            rank, world_size, master_addr, master_port, spec.collective_timeout_s
        )
        torch.manual_seed(spec.seed)
        self._rng = np.random.default_rng(spec.seed + rank)

        policy = load_causal_lm(
            spec.model_path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
        )
        self.policy = _deepspeed_engine(policy, spec.policy_optim, spec.zero_stage, spec.dtype)
        self.critic = None
        if spec.critic_optim is not None:
            critic = CriticModel.from_pretrained(
                spec.model_path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
            )
            self.critic = _deepspeed_engine(critic, spec.critic_optim, spec.zero_stage, spec.dtype)
        # No dropout anywhere: the ratio old/new must compare the same function of the weights.
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        self.skipped_steps = {"actor": 0, "critic": 0}
        self.skipped_in_a_row = 0  # mini-batches in a row whose update was dropped
        self._bad_step = False
        self._sync_group = None  # rank 0 only: the collective weight-sync group
        self._send_buffers, self._send_plan = None, None  # rank 0: reused packing buffers

    # ------------------------------------------------------------------ helpers

    def _pad(self, table: pa.Table, columns: tuple[str, ...] = ()) -> PaddedBatch:
        batch = to_padded(table, pad_token_id=self.spec.pad_token_id, per_token_columns=columns)
        return batch if self.device == "cpu" else batch.to(self.device)

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def _loss_mask(self, table: pa.Table, response_mask: torch.Tensor) -> torch.Tensor:
        # Unscorable rows (null score) teach nothing: they leave every loss term.
        if S.SCORE not in table.column_names:
            return response_mask
        valid = pc.is_valid(S.column_array(table, S.SCORE)).to_numpy(zero_copy_only=False)
        return response_mask & torch.from_numpy(valid).to(response_mask.device).unsqueeze(1)

    # ------------------------------------------------------------------ scoring passes

    @torch.no_grad()
    def compute_old(self, table: pa.Table) -> pa.Table:
        """Append ``old_logprobs`` (and, with a critic, ``values``) for this rank's rows."""
        logprobs, values = [], []
        for part in split_by_tokens(table, self.spec.micro_batch_tokens):
            batch = self._pad(part)
            out = policy_forward(self.policy.module, batch, temperature=self.spec.temperature)
            logprobs.append(to_list_column(out.logprobs, batch.response_mask))
            if self.critic is not None:
                v = critic_forward(self.critic.module, batch)
                values.append(to_list_column(v, batch.response_mask))
        new = {S.OLD_LOGPROBS: pa.chunked_array(logprobs, S.PER_TOKEN_TYPE)}
        if self.critic is not None:
            new[S.VALUES] = pa.chunked_array(values, S.PER_TOKEN_TYPE)
        return append_columns(table, new)

    # ------------------------------------------------------------------ training

    def _step(self, name: str, engine, bad_loss: bool) -> dict[str, float]:
        """Reduce and apply the accumulated gradient, unless a loss or the gradient norm is not
        finite on any rank; then drop it and count a skipped step."""
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        local_sq = float(sum(g.float().pow(2).sum() for g in grads)) if grads else 0.0
        bad = bad_loss or not math.isfinite(local_sq)
        import torch.distributed as dist

        (any_bad,) = self._all_reduce([float(bad)], op=dist.ReduceOp.MAX)
        if any_bad:
            engine.zero_grad()
            engine.optimizer.zero_grad()
            self.skipped_steps[name] += 1
            self._bad_step = True
            return {}
        engine.step()
        norm = engine.get_global_grad_norm()
        return {f"{name}/grad_norm": float(norm), f"{name}/lr": engine.get_lr()[0]}

    def _mini_batches(self, table: pa.Table) -> list[pa.Table]:
        order = self._rng.permutation(table.num_rows)
        parts = np.array_split(order, self.spec.num_mini_batches)
        return [table.take(pa.array(p)) for p in parts]

    def train(self, table: pa.Table) -> dict[str, float]:
        """PPO epochs x mini-batches x micro-batches on this rank's rows; returns mean metrics.

        ``table`` needs ``old_logprobs`` and ``advantages``; ``ref_logprobs`` when the KL is a
        loss term; ``values`` and ``returns`` with a critic.
        """
        spec = self.spec
        columns = [S.OLD_LOGPROBS, S.ADVANTAGES]
        if spec.loss.kl_loss_coef > 0:
            columns.append(S.REF_LOGPROBS)
        if self.critic is not None:
            columns += [S.VALUES, S.RETURNS]
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        partial: dict[str, float] = defaultdict(float)  # this mini-batch's loss parts (additive)

        def record(metrics: dict) -> None:
            for k, v in metrics.items():
                if k in _ADDITIVE:  # a share of the mini-batch's loss: add up, then one value
                    partial[k] += float(v)
                else:  # a rate over the micro-batch's tokens (clipfrac, ...): mean of them
                    sums[k] += float(v)
                    counts[k] += 1

        for _ in range(spec.ppo_epochs):
            for mini in self._mini_batches(table):
                micro = split_by_tokens(mini, spec.micro_batch_tokens) if mini.num_rows else []
                padded = [self._pad(m, tuple(columns)) for m in micro]
                masks = [
                    self._loss_mask(m, b.response_mask) for m, b in zip(micro, padded, strict=True)
                ]
                local = [
                    float(sum(int(k.sum()) for k in masks)),
                    float(sum(int((k.sum(1) > 0).sum()) for k in masks)),
                ]
                n_tok, n_seq = self._all_reduce(local)
                if n_tok == 0:  # nothing to learn from (say, all unscorable): no update at all
                    continue
                bad_actor = bad_critic = False
                self._bad_step = False
                for batch, mask in zip(padded, masks, strict=True):
                    metrics, bad = self._actor_micro(batch, mask, n_tok, n_seq)
                    bad_actor |= bad
                    record(metrics)
                    if self.critic is not None:
                        metrics, bad = self._critic_micro(batch, mask, n_tok, n_seq)
                        bad_critic |= bad
                        record(metrics)
                record(self._step("actor", self.policy, bad_actor))
                if self.critic is not None:
                    record(self._step("critic", self.critic, bad_critic))
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if self._bad_step else 0
                names = sorted(partial)
                for k, v in zip(names, self._all_reduce([partial[k] for k in names]), strict=True):
                    sums[k] += v  # the whole mini-batch's loss, over every rank
                    counts[k] += 1
                partial.clear()
        out = {k: sums[k] / counts[k] for k in sums}
        for name in ("actor", "critic") if self.critic is not None else ("actor",):
            out[f"{name}/skipped_steps"] = float(self.skipped_steps[name])  # a count, not a mean
        out["learner/skipped_in_a_row"] = float(self.skipped_in_a_row)
        return out

    def _actor_micro(self, batch: PaddedBatch, mask, n_tok, n_seq) -> tuple[dict, bool]:
        loss_spec, agg = self.spec.loss, self.spec.loss.agg
        out = policy_forward(
            self.policy.module, batch, temperature=self.spec.temperature, with_entropy=True
        )
        t = batch.per_token
        pg_loss, metrics = policy_loss(
            out.logprobs,
            t[S.OLD_LOGPROBS],
            t[S.ADVANTAGES],
            mask,
            clip_low=loss_spec.clip_low,
            clip_high=loss_spec.clip_high,
            dual_clip=loss_spec.dual_clip,
            agg=agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
        )
        entropy = aggregate(out.entropy, mask, agg, num_tokens=n_tok, num_seqs=n_seq)
        loss = pg_loss - loss_spec.entropy_coef * entropy
        metrics["actor/pg_loss"] = pg_loss.detach()
        metrics["actor/entropy"] = entropy.detach()
        if loss_spec.kl_loss_coef > 0:
            kl, kl_metrics = kl_loss(
                out.logprobs, t[S.REF_LOGPROBS], mask, loss_spec.kl_kind, agg, n_tok, n_seq
            )
            loss = loss + loss_spec.kl_loss_coef * kl
            metrics |= kl_metrics
        # Ranks' gradients are averaged; the global denominators make them sum: scale back up.
        return metrics, self._backward(self.policy, loss * self.world_size)

    def _critic_micro(self, batch: PaddedBatch, mask, n_tok, n_seq) -> tuple[dict, bool]:
        t = batch.per_token
        values = critic_forward(self.critic.module, batch)
        loss, metrics = value_loss(
            values,
            t[S.VALUES],
            t[S.RETURNS],
            mask,
            clip=self.spec.loss.value_clip,
            num_tokens=n_tok,
            num_seqs=n_seq,
        )
        metrics["critic/value_loss"] = loss.detach()
        return metrics, self._backward(self.critic, loss * self.world_size)

    def _backward(self, engine, loss: torch.Tensor) -> bool:
        """Backward unless the loss is not finite; returns True when it was not."""
        if not torch.isfinite(loss):
            return True
        engine.backward(loss)
        return False

    # ------------------------------------------------------------------ weights

    def policy_weights(self) -> dict[str, torch.Tensor] | None:
        """The full policy state dict in Hugging Face names (CPU tensors) on rank 0, None on other
        ranks. Every rank must call it: under ZeRO-3 the parameters are gathered collectively."""
        module = self.policy.module
        if self.spec.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return weights if self.rank == 0 else None

    def save_policy(self, path: str) -> None:
        """Write the policy as a Hugging Face directory from rank 0: safetensors weights, config,
        generation config and the tokenizer, loadable as is by transformers and vLLM. Written
        beside ``path`` and renamed into place, so ``path`` is never half written. Every rank
        calls it (under ZeRO-3 the weights are gathered collectively)."""
        weights = self.policy_weights()
        if self.rank == 0:
            export_hf(self.policy.module, weights, self.spec, path)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        """The engines' state (weights, optimizer, scheduler) and this rank's RNG states and
        counters under ``path`` (see ``learner.checkpoint``). Every rank calls it."""
        from pathlib import Path

        from learner import checkpoint

        root = Path(path)
        checkpoint.save_engine(self.policy, root / "policy")
        if self.critic is not None:
            checkpoint.save_engine(self.critic, root / "critic")
        state = {
            "rank": self.rank,
            "world_size": self.world_size,
            "zero_stage": self.spec.zero_stage,
            "critic": self.critic is not None,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "rng": checkpoint.rng_state(self._rng),
        }
        checkpoint.write_json(root / f"rank_{self.rank}.json", state)

    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote. The checkpoint must come from as many
        ranks at the same ZeRO stage (DeepSpeed's partitions are per rank)."""
        import json
        from pathlib import Path

        from learner import checkpoint

        root = Path(path)
        state = json.loads((root / f"rank_{self.rank}.json").read_text())
        wrote = (state["world_size"], state["zero_stage"], state["critic"])
        have = (self.world_size, self.spec.zero_stage, self.critic is not None)
        if wrote != have:
            raise ValueError(
                f"checkpoint {root.parent}: written by {wrote[0]} learner ranks at ZeRO stage "
                f"{wrote[1]} (critic: {wrote[2]}); this run has {have[0]} at stage {have[1]} "
                f"(critic: {have[2]}). Resume with the same learner.num_ranks, "
                "learner.zero_stage and algorithm"
            )
        checkpoint.load_engine(self.policy, root / "policy")
        if self.critic is not None:
            checkpoint.load_engine(self.critic, root / "critic")
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        self.skipped_steps = dict(state["skipped_steps"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        checkpoint.set_rng_state(self._rng, state["rng"])

    # ------------------------------------------------------------------ collective weight sync

    def sync_plan(self, bucket_bytes: int) -> weight_sync.SyncPlan:
        """The bucket layout every sync uses (parameters only; tied weights appear once)."""
        params = dict(self.policy.module.named_parameters())
        return weight_sync.plan_buckets(weight_sync.describe(params), bucket_bytes)

    def open_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the sync group as its root (and hosts its store at ``host:port``)."""
        if self.rank != 0:
            raise RuntimeError("only learner rank 0 joins the weight-sync group")
        self._sync_group = weight_sync.open_group(
            host, port, 0, world_size, device=self.device, timeout_s=timeout_s
        )

    def broadcast_weights(
        self, plan: weight_sync.SyncPlan, verify: bool = False
    ) -> tuple[int, str | None]:
        """Send the policy to the sync group, bucket by bucket. Every rank calls it (under ZeRO-3
        each bucket's parameters are gathered collectively); rank 0 sends. Returns the bytes sent
        and, with ``verify``, a checksum of them (rank 0; ``(0, None)`` elsewhere)."""
        buffers = self._packed_buckets(plan)
        if self.rank != 0:
            for _ in buffers:  # take part in the ZeRO-3 gathers
                pass
            return 0, None
        if self._sync_group is None:
            raise RuntimeError("broadcast_weights before open_sync_group")
        checksum = weight_sync.Checksum() if verify else None
        sent = weight_sync.send(self._sync_group, buffers, checksum)
        return sent, checksum.hexdigest() if checksum else None

    def share_ipc(self, plan: weight_sync.SyncPlan) -> list:
        """Pack the policy into GPU buffers and return their CUDA IPC handles, for the generator
        on this rank's GPU (full colocation: every rank serves its own). The buffers live until
        :meth:`release_ipc`. Costs one copy of the policy in GPU memory while shared."""
        from torch.multiprocessing.reductions import reduce_tensor

        if self.device == "cpu":
            raise RuntimeError("CUDA IPC weight sync needs GPUs; use weight_sync.method=collective")
        self._ipc_buffers = list(self._packed_buckets(plan, every_rank=True))
        torch.cuda.synchronize()
        return [reduce_tensor(b) for b in self._ipc_buffers]

    def release_ipc(self) -> None:
        self._ipc_buffers = None
        torch.cuda.empty_cache()

    @torch.no_grad()
    def _packed_buckets(self, plan: weight_sync.SyncPlan, every_rank: bool = False):
        """Each bucket packed (on rank 0, or on every rank for IPC), gathered first under
        ZeRO-3. The broadcast path reuses two send buffers; IPC needs every bucket at once."""
        params = dict(self.policy.module.named_parameters())
        packs = every_rank or self.rank == 0
        reuse = packs and not every_rank
        if reuse and self._send_plan != plan:
            self._send_buffers = weight_sync.SendBuffers(plan, self.device)
            self._send_plan = plan

        def pack(i: int, bucket: weight_sync.Bucket):
            if not packs:
                return None
            out = self._send_buffers.get(i, bucket) if reuse else None
            return weight_sync.pack(bucket, params, self.device, out=out)

        for i, bucket in enumerate(plan.buckets):
            if self.spec.zero_stage == 3:
                import deepspeed

                group = [params[m.name] for m in bucket.tensors]
                with deepspeed.zero.GatheredParameters(group):
                    yield pack(i, bucket)
            else:
                yield pack(i, bucket)
