"""The learner engine: one data-parallel DeepSpeed rank, training whatever objective it is given.

A plain class; ``actors.learner_actor`` wraps it in a Ray actor, one per rank. The engine owns
what every training method shares: the process group, the DeepSpeed engines (the policy, and a
critic when the objective asks for one), micro-batches cut by tokens, the loss denominators
agreed over ranks with one small all-reduce per mini-batch (so a mini-batch's loss and gradient
are the same however its rows are spread over ranks and micro-batches; see
``learner.losses.aggregate``), skip-or-step on non-finite values, checkpoints, the Hugging Face
export, and the weights handed to weight sync. The loss itself is the objective's
(``learner.objectives``).

Gradient accumulation runs in DeepSpeed's unmanaged mode (``managed_gradient_accumulation:
false``): micro-batches are cut by tokens, so their number varies; ``backward`` only accumulates,
and ``step`` (once per mini-batch) reduces across ranks and updates.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from learner import weight_sync
from learner.models import VALUE_HEAD_FILE, CriticModel, load_causal_lm
from learner.objectives import Counts, Micro, Objective
from rollout import schema as S
from rollout.ops import append_columns, split_by_tokens, token_ranges
from rollout.tensors import PaddedBatch, to_list_column, to_padded


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW and its learning-rate schedule for one model.

    ``schedule``: linear warm-up over ``warmup_steps`` optimizer steps, then ``constant``, or
    ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr`` at ``total_steps`` (linear: the N+
    implementation details of RLHF with PPO, arXiv 2403.17031). ``eps``: AdamW's epsilon.
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
class LearnerSpec:
    """What one learner rank needs (``orchestration.specs`` narrows the run config to this).

    ``micro_batch_tokens``: the most prompt + response tokens (unpadded, summed over rows) in one
    forward or forward/backward pass.

    ``policy_optim`` is the optimizer of the objective's first model (the policy, or the reward
    model of a reward-model objective). ``ptx``: the supervised term in RL (InstructGPT's
    PPO-ptx), a next-token objective (``learner.supervised.NextToken``) whose loss on the rows
    ``train`` is given as ``ptx`` is added, times ``ptx_coef``, to the policy's loss in every
    micro-batch.
    """

    model_path: str
    policy_optim: OptimizerSpec
    objective: Objective
    ptx: Objective | None = None
    ptx_coef: float = 0.0
    critic_optim: OptimizerSpec | None = None  # needed when the objective trains a critic
    critic_path: str | None = None  # the critic's starting checkpoint; None: model_path
    dtype: str = "float32"
    trust_remote_code: bool = False
    zero_stage: int = 0
    micro_batch_tokens: int = 4096
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    pad_token_id: int = 0
    seed: int = 0
    collective_timeout_s: float = 600.0  # a collective waiting longer (a dead rank) fails


_CHECKPOINT_DIRS = {"actor": "policy", "critic": "critic", "rm": "reward_model"}

# The engine's own metrics per model: rates (one value per mini-batch, averaged).
_ENGINE_RATES = ("grad_norm", "lr")


def _lr_lambda(spec: OptimizerSpec):
    """``LambdaLR``'s factor of ``spec.lr`` for optimizer step ``step`` (0-based): ``(step + 1)
    / warmup_steps`` during warm-up, then 1 (constant) or falling from 1 at ``warmup_steps`` to
    ``min_lr_ratio`` at ``total_steps`` along a half cosine or a line. The last step of a run,
    ``total_steps - 1``, is one step short of the end, so its learning rate is not 0."""
    if spec.schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr schedule {spec.schedule!r}: give constant, cosine or linear")

    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        span = max(spec.total_steps - spec.warmup_steps, 1)
        progress = min((step - spec.warmup_steps) / span, 1.0)
        if spec.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay

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


def export_hf(
    model,
    weights: dict[str, torch.Tensor],
    spec: LearnerSpec,
    path: str,
    extra: Mapping[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """``model``'s config and generation config, ``weights`` as safetensors and the tokenizer of
    ``spec.model_path``, into ``path`` (replacing what is there) via a temporary directory;
    ``extra``: more safetensors files by name (a reward model's value head)."""
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
    if extra:
        from safetensors.torch import save_file

        for name, tensors in extra.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
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


class Engine:
    """One rank of the learner, training ``spec.objective``."""

    def __init__(
        self, spec: LearnerSpec, *, rank: int, world_size: int, master_addr: str, master_port: int
    ):
        self.spec, self.objective = spec, spec.objective
        models = tuple(self.objective.models)
        wants_critic = "critic" in models
        if wants_critic != (spec.critic_optim is not None):
            raise ValueError(
                f"objective {self.objective.name} {'trains' if wants_critic else 'has no'} a "
                f"critic, but the spec {'has no' if wants_critic else 'has a'} critic optimizer"
            )
        if spec.ptx is not None and "actor" not in models:
            raise ValueError(f"a ptx term needs a policy; objective {self.objective.name} has none")
        self.rank, self.world_size = rank, world_size
        self.device = _init_distributed(
            rank, world_size, master_addr, master_port, spec.collective_timeout_s
        )
        torch.manual_seed(spec.seed)
        self._rng = np.random.default_rng(spec.seed + rank)

        self.engines: dict = {}
        for name in models:
            optim = spec.critic_optim if name == "critic" else spec.policy_optim
            self.engines[name] = _deepspeed_engine(
                self._build(name), optim, spec.zero_stage, spec.dtype
            )
        self.policy = self.engines.get("actor")
        self.critic = self.engines.get("critic")
        # No dropout anywhere: the ratio old/new must compare the same function of the weights,
        # and a reward model trains without it (the N+ details).
        for engine in self.engines.values():
            engine.eval()
        self.skipped_steps = dict.fromkeys(self.engines, 0)
        self.skipped_in_a_row = 0  # mini-batches in a row whose update was dropped
        self.sender = None
        if self.policy is not None:
            self.sender = weight_sync.PolicySender(
                self.policy.module, rank, spec.zero_stage, self.device
            )

    def _build(self, name: str) -> torch.nn.Module:
        """Engine model ``name``: the policy (a causal LM), the critic (a value model from
        ``critic_path``, else the policy's body) or a reward model to train (the policy's body
        and a fresh head, ``CriticModel``)."""
        spec = self.spec
        kwargs = {"dtype": spec.dtype, "trust_remote_code": spec.trust_remote_code}
        if name == "actor":
            return load_causal_lm(spec.model_path, **kwargs)
        if name == "critic":
            return CriticModel.from_pretrained(spec.critic_path or spec.model_path, **kwargs)
        if name == "rm":
            return CriticModel.from_pretrained(spec.model_path, **kwargs)
        raise ValueError(f"objective {self.objective.name}: unknown model {name!r}")

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: engine.module for name, engine in self.engines.items()}

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

    # ------------------------------------------------------------------ scoring pass

    @torch.no_grad()
    def compute_old(self, table: pa.Table) -> pa.Table:
        """Append the objective's forward-pass columns (for policy gradients ``old_logprobs``
        and, with a critic, ``values``) for this rank's rows, before any update."""
        parts: dict[str, list] = defaultdict(list)
        for part in split_by_tokens(table, self.spec.micro_batch_tokens):
            batch = self._pad(part)
            for name, values in self.objective.forward(self.modules, batch).items():
                parts[name].append(to_list_column(values, batch.response_mask))
        if not parts:
            return table
        new = {k: pa.chunked_array(v, S.PER_TOKEN_TYPE) for k, v in parts.items()}
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
            return {}
        engine.step()
        norm = engine.get_global_grad_norm()
        return {f"{name}/grad_norm": float(norm), f"{name}/lr": engine.get_lr()[0]}

    def _mini_batches(self, table: pa.Table) -> list[pa.Table]:
        order = self._rng.permutation(table.num_rows)
        parts = np.array_split(order, self.spec.num_mini_batches)
        return [table.take(pa.array(p)) for p in parts]

    def _micro_batches(self, objective: Objective, table: pa.Table) -> list[Micro]:
        """``table`` cut into micro-batches of at most ``micro_batch_tokens`` (the objective's
        ``lengths``), each collated by the objective and on this rank's device."""
        if not table.num_rows:
            return []
        ranges = token_ranges(objective.lengths(table), self.spec.micro_batch_tokens)
        return [self._collate(objective, table.slice(r.start, len(r))) for r in ranges]

    def _collate(self, objective: Objective, table: pa.Table) -> Micro:
        micro = objective.collate(table, self.spec.pad_token_id)
        if self.device == "cpu":
            return micro
        mask = micro.mask.to(self.device) if micro.mask is not None else None
        return Micro(micro.batch.to(self.device), mask, micro.tokens, micro.sequences)

    def _ptx_parts(self, ptx: pa.Table | None, minis: int) -> list[pa.Table | None]:
        """The PTX rows of one epoch, one slice per mini-batch (None: no PTX term)."""
        if ptx is None or self.spec.ptx is None or self.spec.ptx_coef == 0 or not ptx.num_rows:
            return [None] * minis
        order = self._rng.permutation(ptx.num_rows)
        return [ptx.take(pa.array(p)) for p in np.array_split(order, minis)]

    def train(
        self,
        table: pa.Table,
        settings: Mapping[str, float] | None = None,
        ptx: pa.Table | None = None,
    ) -> dict:
        """Epochs x mini-batches x micro-batches of the objective on this rank's rows; returns
        the metrics (shares summed per mini-batch over ranks, then every metric averaged over
        the mini-batches). ``settings`` go to the objective (say, the current KL coefficient).

        ``table`` needs the objective's ``columns``. ``ptx``: rows of the supervised term
        (``LearnerSpec.ptx``); each mini-batch takes its share of them, spread over its
        micro-batches, and the policy's loss gains ``ptx_coef`` times their token-mean
        next-token loss (``actor/ptx_loss``, over the PTX tokens of every rank).
        """
        spec, objective, settings = self.spec, self.objective, dict(settings or {})
        shares, maxima = objective.shares, objective.maxima
        if spec.ptx is not None:
            shares = shares | spec.ptx.shares
        rates = objective.rates | {f"{m}/{r}" for m in self.engines for r in _ENGINE_RATES}
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        partial: dict[str, float] = defaultdict(float)  # this mini-batch's loss parts (shares)
        largest: dict[str, float] = {}

        def record(metrics: dict) -> None:
            for k, v in metrics.items():
                if k in shares:  # a share of the mini-batch's loss: add up, then one value
                    partial[k] += float(v)
                elif k in rates:  # a rate over the micro-batch's tokens: mean of them
                    sums[k] += float(v)
                    counts[k] += 1
                elif k in maxima:
                    largest[k] = max(largest.get(k, -math.inf), float(v))
                else:
                    raise KeyError(
                        f"objective {objective.name} reports metric {k!r} without declaring "
                        "how it aggregates (add it to its shares or rates)"
                    )

        for _ in range(spec.ppo_epochs):
            minis = self._mini_batches(table)
            for mini, ptx_rows in zip(minis, self._ptx_parts(ptx, len(minis)), strict=True):
                micro = self._micro_batches(objective, mini)
                extra = self._ptx_micro(ptx_rows, len(micro))
                local = [
                    sum(m.tokens for m in micro),
                    sum(m.sequences for m in micro),
                    sum(m.tokens for m in extra if m is not None),
                ]
                n_tok, n_seq, n_ptx = self._all_reduce(local)
                if n_tok == 0:  # nothing to learn from (say, all unscorable): no update at all
                    continue
                total = Counts(tokens=n_tok, sequences=n_seq)
                bad = dict.fromkeys(self.engines, False)
                for m, p in zip(micro, extra, strict=True):
                    for name, engine in self.engines.items():  # one model's graph at a time
                        loss, metrics = objective.micro_loss(
                            name, self.modules, m.batch, m.mask, total, settings
                        )
                        if name == "actor" and p is not None and n_ptx > 0:
                            ptx_loss, ptx_metrics = spec.ptx.micro_loss(
                                name, self.modules, p.batch, p.mask, Counts(n_ptx, n_ptx), {}
                            )
                            loss = loss + spec.ptx_coef * ptx_loss
                            metrics = metrics | ptx_metrics
                        record(metrics)
                        # Ranks' gradients are averaged; the global denominators make them sum.
                        bad[name] |= self._backward(engine, loss * self.world_size)
                skipped = sum(self.skipped_steps.values())
                for name, engine in self.engines.items():
                    record(self._step(name, engine, bad[name]))
                dropped = sum(self.skipped_steps.values()) > skipped
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if dropped else 0
                names = sorted(partial)
                for k, v in zip(names, self._all_reduce([partial[k] for k in names]), strict=True):
                    sums[k] += v  # the whole mini-batch's loss, over every rank
                    counts[k] += 1
                partial.clear()
        out = {k: sums[k] / counts[k] for k in sums}
        if maxima:
            import torch.distributed as dist

            names = sorted(maxima)
            found = self._all_reduce([largest.get(k, -math.inf) for k in names], dist.ReduceOp.MAX)
            out |= {k: v for k, v in zip(names, found, strict=True) if math.isfinite(v)}
        for name in self.engines:
            out[f"{name}/skipped_steps"] = float(self.skipped_steps[name])  # a count, not a mean
        out["learner/skipped_in_a_row"] = float(self.skipped_in_a_row)
        return out

    def _ptx_micro(self, rows: pa.Table | None, n: int) -> list[Micro | None]:
        """The PTX rows of a mini-batch as ``n`` micro-batches, one beside each of the
        objective's (None where a part is empty)."""
        if rows is None or not n:
            return [None] * n
        parts = np.array_split(np.arange(rows.num_rows), n)
        return [
            self._collate(self.spec.ptx, rows.take(pa.array(p))) if len(p) else None for p in parts
        ]

    @torch.no_grad()
    def evaluate(self, table: pa.Table) -> dict[str, float]:
        """The objective's metrics on ``table`` under the current weights, without an update:
        every rank's rows together (each share over the whole table's loss units)."""
        objective = self.objective
        micro = self._micro_batches(objective, table)
        n_tok, n_seq = self._all_reduce(
            [sum(m.tokens for m in micro), sum(m.sequences for m in micro)]
        )
        sums: dict[str, float] = defaultdict(float)
        if n_tok > 0:
            total = Counts(tokens=n_tok, sequences=n_seq)
            for m in micro:
                for name in self.engines:
                    _, metrics = objective.micro_loss(
                        name, self.modules, m.batch, m.mask, total, {}
                    )
                    for k, v in metrics.items():
                        if k in objective.shares:
                            sums[k] += float(v)
        names = sorted(objective.shares)
        reduced = self._all_reduce([sums.get(k, 0.0) for k in names])
        return dict(zip(names, reduced, strict=True)) if n_tok > 0 else {}

    @torch.no_grad()
    def score(self, table: pa.Table) -> list[list[float]]:
        """A reward model's score of every response of every prompt group in ``table``, per
        group (``learner.supervised.flatten_groups``)."""
        from learner.supervised import RESPONSES, flatten_groups, last_token_scores

        model = self.modules["rm"]
        sizes = [len(r) for r in table.column(RESPONSES).to_pylist()]
        flat: list[float] = []
        for r in token_ranges(self.objective.lengths(table), self.spec.micro_batch_tokens):
            batch = flatten_groups(table.slice(r.start, len(r)), self.spec.pad_token_id)
            if self.device != "cpu":
                batch = batch.to(self.device)
            flat += last_token_scores(model, batch.sequences).cpu().tolist()
        bounds = np.cumsum([0, *sizes])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def shift_rm_bias(self, delta: float) -> float:
        """Add ``delta`` to the reward model's head bias (the N+ bias normalisation: minus the
        mean score of the reference responses, so they score 0 on average); returns the new
        bias. Every rank calls it, with the same ``delta``."""
        head = self.modules["rm"].value_head
        if self.spec.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([head.bias], modifier_rank=0):
                with torch.no_grad():
                    head.bias.add_(delta)
                value = float(head.bias.detach().float().cpu()[0])
            return value
        with torch.no_grad():
            head.bias.add_(delta)
        return float(head.bias.detach().float().cpu()[0])

    def _backward(self, engine, loss: torch.Tensor) -> bool:
        """Backward unless the loss is not finite; returns True when it was not."""
        if not torch.isfinite(loss):
            return True
        engine.backward(loss)
        return False

    # ------------------------------------------------------------------ weights

    def _full_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """Engine model ``name``'s full state dict (CPU tensors) on rank 0, None on other ranks.
        Every rank must call it: under ZeRO-3 the parameters are gathered collectively."""
        module = self.engines[name].module
        if self.spec.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return weights if self.rank == 0 else None

    def policy_weights(self) -> dict[str, torch.Tensor] | None:
        """The full policy state dict in Hugging Face names (CPU tensors) on rank 0, None on other
        ranks. Every rank must call it: under ZeRO-3 the parameters are gathered collectively."""
        return self._full_state("actor")

    def policy_arrays(self) -> weight_sync.HostArrays | None:
        """The full policy for the object store (``weight_sync.to_host_arrays``) on rank 0, None
        on other ranks; every rank calls it. On CPU without ZeRO-3 the arrays are the
        parameters' own memory (no copy here: Ray copies them once when the call returns, before
        this rank trains again)."""
        if self.device == "cpu" and self.spec.zero_stage != 3:
            state = self.policy.module.state_dict() if self.rank == 0 else None
        else:
            state = self.policy_weights()
        return weight_sync.to_host_arrays(state) if state is not None else None

    def save_policy(self, path: str) -> None:
        """Write the trained model as a Hugging Face directory from rank 0: safetensors weights,
        config, generation config and the tokenizer, loadable as is by transformers and vLLM.
        Written beside ``path`` and renamed into place, so ``path`` is never half written. Every
        rank calls it (under ZeRO-3 the weights are gathered collectively). A reward model is
        written as its causal LM (the body trained, the LM head the base model's) with
        ``value_head.safetensors`` beside it, the format ``reward_service.reward_model`` and a
        critic (``learner.critic_init``) load."""
        if self.policy is None:
            self._save_reward_model(path)
            return
        weights = self.policy_weights()
        if self.rank == 0:
            export_hf(self.policy.module, weights, self.spec, path)

    def _save_reward_model(self, path: str) -> None:
        state = self._full_state("rm")
        if self.rank != 0:
            return
        lm = load_causal_lm(
            self.spec.model_path,
            dtype=self.spec.dtype,
            trust_remote_code=self.spec.trust_remote_code,
        )
        body = {k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")}
        lm.get_decoder().load_state_dict(body)
        head = {k.removeprefix("value_head."): v for k, v in state.items() if "value_head." in k}
        weights = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        export_hf(lm, weights, self.spec, path, extra={VALUE_HEAD_FILE: head})

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        """The engines' state (weights, optimizer, scheduler) and this rank's RNG states and
        counters under ``path`` (see ``learner.checkpoint``). Every rank calls it."""
        from pathlib import Path

        from learner import checkpoint

        root = Path(path)
        for name, engine in self.engines.items():
            checkpoint.save_engine(engine, root / _CHECKPOINT_DIRS[name])
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
        for name, engine in self.engines.items():
            checkpoint.load_engine(engine, root / _CHECKPOINT_DIRS[name])
            engine.eval()
        self.skipped_steps = dict(state["skipped_steps"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        checkpoint.set_rng_state(self._rng, state["rng"])

    # ------------------------------------------------------------------ weight sync

    def sync_plan(self, bucket_bytes: int) -> weight_sync.SyncPlan:
        return self.sender.plan(bucket_bytes)

    def open_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        self.sender.open_group(host, port, world_size, timeout_s)

    def broadcast_weights(self, plan: weight_sync.SyncPlan, verify: bool = False):
        return self.sender.broadcast(plan, verify)

    def share_ipc(self, plan: weight_sync.SyncPlan) -> list:
        return self.sender.share_ipc(plan)

    def release_ipc(self) -> None:
        self.sender.release_ipc()
