"""The single-controller driver loop: one synchronous iteration, stage by stage.

generate -> score -> reference -> old logprobs (+ values) -> advantages -> train -> sync weights.
Each stage is one method with a timer. PPO and GRPO share the loop; what differs (critic or not,
KL in the reward or in the loss, the estimator) is fixed at setup from the estimator's
``EstimatorSpec``. Tables move between actors as ``ObjectRef``s; the driver pulls the batch only
where it must (the advantage math). Overlapping generation with training later means running
:meth:`Trainer.rollout` for iteration k+1 while :meth:`Trainer.update` runs for k.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from actors.generator import SAMPLE_SEED, StaleWeightsError
from actors.vllm_engine import Sampling
from learner.algorithms import (
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    compute_advantages,
    kl_estimate,
    masked_mean,
    token_rewards,
)
from orchestration import calls
from orchestration.config import RunConfig
from orchestration.data import PromptSampler
from orchestration.metrics import StageTimer
from orchestration.placement import Actors, kl_kind, open_sync_group
from orchestration.reward_stage import RewardStage, Scored, enough_groups, select_groups
from rollout import schema as S
from rollout.ops import append_columns, concat, group_ids, split_rows
from rollout.tensors import to_list_column, to_padded


@ray.remote(num_cpus=0)  # joins tables; must not wait for a CPU the actors hold
def _concat(*tables: pa.Table) -> pa.Table:
    return concat(list(tables))


@dataclass
class Rollout:
    """What the rollout half of an iteration hands to the update half."""

    table: pa.Table  # scored, with ref_logprobs, old_logprobs (+ values)
    metrics: dict[str, float]


class Trainer:
    """Runs synchronous iterations of the configured algorithm on started actors."""

    def __init__(self, cfg: RunConfig, actors: Actors, prompts: PromptSampler, pad_token_id: int):
        self.cfg, self.actors, self.prompts = cfg, actors, prompts
        self.pad_token_id = pad_token_id
        self.spec = cfg.algorithm.spec  # estimator -> critic?, KL placement, loss aggregation
        self.kl_kind = kl_kind(cfg)
        algo = cfg.algorithm
        self.kl_ctl = (
            AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
            if algo.kl_target is not None
            else FixedKLController(algo.kl_coef)
        )
        self.sampling = Sampling(
            n=cfg.generator.samples_per_prompt,
            temperature=cfg.generator.temperature,
            max_new_tokens=cfg.generator.max_new_tokens,
        )
        self.timeout = cfg.cluster.call_timeout_s
        self.version = 0
        self.sync_enabled = True  # tests turn it off to show what a missed sync looks like
        self.colocated = cfg.cluster.colocate == "all"
        self.rewards = RewardStage(cfg, actors.scorers, self.timeout)
        ds = cfg.reward.dynamic_sampling
        self.dynamic = ds if ds.enabled else None
        self.last_batch: pa.Table | None = None
        self.requests = 0  # prompts sent for sampling so far: seeds each prompt's sampling
        self._generator_pids: list[int] | None = None
        self.faults: dict[str, float] = {}  # faults/* counters of recoveries, and their seconds

    # ------------------------------------------------------------------ one iteration

    def iteration(self) -> dict[str, float]:
        """One synchronous step; returns its metrics (including ``timing/*``)."""
        if self._generator_pids is None:
            self._restarted()  # the processes a restart would replace
        timer = StageTimer()
        with timer("iteration"):
            rollout = self.rollout(timer)
            metrics = rollout.metrics | self.update(rollout.table, timer)
        return metrics | timer.timings | throughput(metrics, timer.timings) | self.faults

    def rollout(self, timer: StageTimer) -> Rollout:
        """Generate, score, and add reference and old log-probabilities."""
        wanted = self.cfg.data.prompts_per_iteration
        rounds: list[Scored] = []
        while True:  # one round, or more under dynamic sampling until enough groups teach
            with timer("generate"):
                generated = self.generate(self.prompts.next_batch(wanted))
            with timer("reward"):
                rounds.append(self.rewards.score(generated))
            if not self.dynamic or len(rounds) == self.dynamic.max_rounds:
                break
            if enough_groups(rounds, wanted, self.dynamic.min_std):
                break
        if self.colocated:  # the learner and reference need the GPUs until the next sync
            self._wait([g.sleep.remote() for g in self.actors.generators], "sleep generators")
        scored, reward_metrics = self.select(rounds, wanted)
        with timer("reference"):
            with_ref = self.reference(scored)
        with timer("learner_forward"):
            table = self.learner_forward(with_ref)
        return Rollout(table=table, metrics=reward_metrics)

    def update(self, table: pa.Table, timer: StageTimer) -> dict[str, float]:
        """Advantages, training, and pushing the new weights to the generators."""
        with timer("advantages"):
            batch, metrics = self.advantages(table)
        self.last_batch = batch  # the iteration's whole table, for rollouts/iter_<k>.parquet
        with timer("train"):
            metrics |= self.train(batch)
        with timer("sync"):
            if self.sync_enabled:
                metrics |= self.sync_weights()
        return metrics

    # ------------------------------------------------------------------ stages

    def _wait(self, refs, stage: str):
        """``ray.get`` with the call timeout; a hang becomes an error naming ``stage``."""
        return calls.wait(refs, stage, self.timeout)

    def _ready(self, ref: ray.ObjectRef, stage: str) -> ray.ObjectRef:
        """Wait until ``ref`` is computed, without pulling it here; the stage timer needs it."""
        return calls.ready(ref, stage, self.timeout)

    def _count(self, fault: str, seconds: float) -> None:
        self.faults[f"faults/{fault}"] = self.faults.get(f"faults/{fault}", 0.0) + 1
        key = f"faults/{fault}_seconds"
        self.faults[key] = self.faults.get(key, 0.0) + seconds

    def seeds(self, rows: int, n: int) -> np.ndarray:
        """Sampling seeds for the next ``rows`` prompts: prompt r of the run's stream samples
        from seeds ``base + r*n ... base + r*n + n-1`` (vLLM adds the sample index), so its
        tokens depend on the run's seed and its place in the stream only, never on which
        replica served it or whether the run was resumed."""
        first = self.requests
        self.requests += rows
        base = (self.cfg.generator.seed * 1_000_003) % 2**40 * 2**20
        return base + (first + np.arange(rows, dtype=np.int64)) * n

    def generate(
        self, prompts: pa.Table, sampling: Sampling | None = None, seeds: np.ndarray | None = None
    ) -> ray.ObjectRef:
        """Prompts in chunks to whichever replica is free (a slow replica takes fewer chunks
        instead of stalling the batch); one rollout table (ref) back, in prompt order.

        Each prompt samples with its own seed (``seeds``, else the next of :meth:`seeds`). A
        replica that died (Ray restarts it) or serves other weights is re-synced to the current
        version and its chunk re-issued; the tokens come out the same."""
        gens, sampling = self.actors.generators, sampling or self.sampling
        if seeds is None:
            seeds = self.seeds(prompts.num_rows, sampling.n)
        prompts = prompts.append_column(SAMPLE_SEED, pa.array(seeds, pa.int64()))
        chunks = 1 if len(gens) == 1 else len(gens) * self.cfg.generator.chunks_per_replica
        parts = split_rows(prompts, max(1, -(-prompts.num_rows // chunks)))
        results: list[ray.ObjectRef | None] = [None] * len(parts)
        idle, busy, todo = list(range(len(gens))), {}, list(range(len(parts)))[::-1]
        retries = 0
        while todo or busy:
            while idle and todo:
                k, i = todo.pop(), idle.pop()
                call = gens[i].generate_checked.options(num_returns=2)
                table, version = call.remote(parts[k], sampling, self.version)
                busy[version] = (i, k, table)
            done, _ = ray.wait(list(busy), timeout=self.timeout)
            if not done:
                raise TimeoutError(
                    f"generate: no replica answered within cluster.call_timeout_s={self.timeout:g}"
                )
            i, k, table = busy.pop(done[0])
            try:
                ray.get(done[0], timeout=self.timeout)
            except (ray.exceptions.RayActorError, StaleWeightsError) as e:
                retries += 1
                if retries > self.cfg.cluster.max_actor_restarts * len(gens):
                    raise
                print(
                    f"generator {i}: {type(e).__name__} during generate; re-syncing it to weight "
                    f"version {self.version} and re-issuing its {parts[k].num_rows} prompts",
                    flush=True,
                )
                self.recover_generators(self.version)
                todo.append(k)
            else:
                results[k] = table
            idle.append(i)
        if len(results) == 1:
            return results[0]
        return self._ready(_concat.remote(*results), "generate")

    def _restarted(self) -> bool:
        """Whether any generator process changed since the last look (Ray restarted it)."""
        pids = self._wait([g.process_id.remote() for g in self.actors.generators], "generator pids")
        changed = self._generator_pids is not None and pids != self._generator_pids
        self._generator_pids = pids
        return changed

    def recover_generators(self, version: int) -> None:
        """Bring every generator to ``version`` after one died: wait for Ray to restart it
        (calls queue until it is back), push the learner's current weights to each generator
        serving another version, and, for collective sync, rebuild the sync group (the old one
        lost a member)."""
        start = time.perf_counter()
        gens, learners = self.actors.generators, self.actors.learners
        served = [self._when_back(g) for g in gens]
        behind = [g for g, v in zip(gens, served, strict=True) if v != version]
        if behind:
            weights = [r.policy_weights.remote() for r in learners]  # collective (ZeRO-3)
            refs = [g.update_weights.remote(version, weights[0], True) for g in behind]
            self._wait(refs, "re-sync generator")
            self._wait(weights[1:], "re-sync generator")
        if self.cfg.weight_sync.method == "collective":
            open_sync_group(self.actors, self.cfg.generator.tensor_parallel_size, self.timeout)
        self._restarted()  # remember the new processes
        self._count("generator_recoveries", time.perf_counter() - start)

    def _when_back(self, generator) -> int:
        """The weight version ``generator`` serves, once it answers (Ray may be restarting it:
        calls fail as unavailable until it is back)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return ray.get(generator.weight_version.remote(), timeout=self.timeout)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        "restart generator: not back within cluster.call_timeout_s="
                        f"{self.timeout:g}"
                    ) from None
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as e:
                raise RuntimeError(
                    "a generator died and Ray did not restart it (cluster.max_actor_restarts="
                    f"{self.cfg.cluster.max_actor_restarts}): {e}"
                ) from e
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"restart generator: no answer within cluster.call_timeout_s={self.timeout:g}"
                ) from None

    def push_weights(self, version: int) -> None:
        """Every generator serves the learner's current weights as ``version`` (after a resume
        or a rollback: versions may go back). Waits for generators Ray is restarting."""
        start = time.perf_counter()
        gens, learners = self.actors.generators, self.actors.learners
        for g in gens:
            self._when_back(g)
        weights = [r.policy_weights.remote() for r in learners]
        served = self._wait(
            [g.update_weights.remote(version, weights[0], True) for g in gens], "resume sync"
        )
        self._wait(weights[1:], "resume sync")
        if set(served) != {version}:
            raise RuntimeError(f"generators serve versions {served} after restoring {version}")
        self.version = version
        if self._generator_pids is not None and self._restarted():  # one died meanwhile
            if self.cfg.weight_sync.method == "collective":
                tp = self.cfg.generator.tensor_parallel_size
                open_sync_group(self.actors, tp, self.timeout)
            self._count("generator_recoveries", time.perf_counter() - start)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What the driver holds that the next iteration depends on."""
        return {
            "weight_version": self.version,
            "requests": self.requests,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_shaper": self.rewards.shaper.state_dict(),
            "sampler": self.prompts.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the generators are not touched (see :meth:`push_weights`)."""
        self.requests = int(state["requests"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.rewards.shaper.load_state_dict(state["reward_shaper"])
        self.prompts.load_state_dict(state["sampler"])

    def select(self, rounds: list[Scored], wanted: int) -> tuple[ray.ObjectRef, dict[str, float]]:
        """The scored batch: the one round as it is, or under dynamic sampling ``wanted``
        groups with a score spread, taken over the rounds (``reward_stage.select_groups``)."""
        metrics = {
            k: float(np.mean([r.metrics[k] for r in rounds if k in r.metrics]))
            for k in {k for r in rounds for k in r.metrics}
        }
        if not self.dynamic:
            return rounds[0].finish(), metrics
        keep, selection = select_groups(rounds, wanted, self.dynamic.min_std)
        parts = [r.finish(k) for r, k in zip(rounds, keep, strict=True) if len(k)]
        return self._ready(_concat.remote(*parts), "select"), metrics | selection

    def reference_baselines(self, prompts: pa.Table) -> dict[str, float]:
        """ChatGLM-RLHF's baseline: the generators still serve the initial (reference) weights;
        sample ``reward.reference_baseline_samples`` responses per prompt and record their
        mean combined score per dataset row. Call before the first iteration."""
        if self.version != 0:
            raise RuntimeError("reference baselines need the initial weights (version 0)")
        sampling = dataclasses.replace(self.sampling, n=self.cfg.reward.reference_baseline_samples)
        generated = self.generate(prompts, sampling)
        return self.rewards.set_baselines(generated)

    def evaluate(self, prompts: pa.Table, sampling: Sampling) -> pa.Table:
        """The current policy's responses to ``prompts`` with ``sampling``, with one
        ``reward/<name>`` column per reward component (unshaped: no running statistics or
        baselines move)."""
        seeds = self.cfg.seed * 2**20 + np.arange(prompts.num_rows, dtype=np.int64) * sampling.n
        generated = self.generate(prompts, sampling, seeds)  # the same seeds every evaluation
        columns, _ = self.rewards.components(generated)
        table = self._wait(generated, "evaluate")
        for name in columns.column_names:
            table = table.append_column(name, columns[name])
        return table

    def reference(self, table: ray.ObjectRef) -> ray.ObjectRef:
        """Frozen reference policy -> ``ref_logprobs``."""
        return self._ready(self.actors.reference.logprobs.remote(table), "reference")

    def learner_forward(self, table: ray.ObjectRef) -> pa.Table:
        """The learner's own log-probabilities (and values) for the batch, rows split over ranks.
        The batch is pulled here: the advantage math runs in the driver."""
        learners = self.actors.learners
        if len(learners) == 1:
            return self._wait(learners[0].compute_old.remote(table), "learner_forward")
        whole = self._wait(table, "learner_forward")
        parts = split_rows(whole, -(-whole.num_rows // len(learners)))
        refs = [r.compute_old.remote(p) for r, p in zip(learners, parts, strict=True)]
        return concat(self._wait(refs, "learner_forward"))

    def advantages(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """Pure math from ``learner.algorithms``: KL, token rewards, the estimator."""
        versions = pc.unique(S.column_array(table, S.WEIGHT_VERSION)).to_pylist()
        if versions != [self.version]:
            raise RuntimeError(
                f"rollout mixes or misses weight versions {versions}; expected only {self.version}"
            )
        columns = [S.ROLLOUT_LOGPROBS, S.OLD_LOGPROBS, S.REF_LOGPROBS]
        if self.spec.needs_critic:
            columns.append(S.VALUES)
        batch = to_padded(table, pad_token_id=self.pad_token_id, per_token_columns=columns)
        t, mask = batch.per_token, batch.response_mask
        score_col = S.column_array(table, S.SCORE)
        scores = torch.from_numpy(
            np.array(score_col.fill_null(float("nan")).to_numpy(zero_copy_only=False), np.float32)
        )
        kl = kl_estimate(t[S.OLD_LOGPROBS], t[S.REF_LOGPROBS], self.kl_kind)
        inputs = AdvantageInputs(
            response_mask=mask,
            scores=scores,
            group_ids=group_ids(table),
            token_rewards=token_rewards(scores, kl, mask, self.kl_ctl.value)
            if self.spec.kl_in_reward
            else None,
            values=t.get(S.VALUES),
            gamma=self.cfg.algorithm.gamma,
            lam=self.cfg.algorithm.lam,
            whiten_advantages=self.cfg.algorithm.whiten_advantages,
        )
        adv, returns = compute_advantages(self.cfg.algorithm.estimator, inputs)
        kl_ref = float(masked_mean(t[S.OLD_LOGPROBS] - t[S.REF_LOGPROBS], mask))
        self.kl_ctl.update(kl_ref, n_steps=table.num_rows)
        scorable = torch.isfinite(scores)
        mismatch = (t[S.ROLLOUT_LOGPROBS] - t[S.OLD_LOGPROBS]).abs()
        finish = S.column_array(table, S.FINISH_REASON)
        lengths = batch.response_lengths
        prompt_tokens = pc.sum(pc.list_value_length(S.column_array(table, S.PROMPT_TOKEN_IDS)))
        metrics = {
            "reward/score_mean": float(scores[scorable].mean()) if scorable.any() else float("nan"),
            "reward/score_max": float(scores[scorable].max()) if scorable.any() else float("nan"),
            "reward/unscorable_fraction": float((~scorable).float().mean()),
            "actor/kl_ref": kl_ref,
            "actor/kl_coef": self.kl_ctl.value,
            "rollout/samples": float(table.num_rows),
            "rollout/response_length": float(lengths.float().mean()),
            "rollout/response_tokens": float(lengths.sum()),
            "rollout/prompt_tokens": float(prompt_tokens.as_py()),
            "rollout/stop_fraction": float(pc.mean(pc.equal(finish, "stop")).as_py()),
            "rollout/truncated_fraction": float(pc.mean(pc.equal(finish, "length")).as_py()),
            "reward/zero_spread_groups": zero_spread_fraction(scores.numpy(), inputs.group_ids),
            "rollout/logprob_mismatch": float(masked_mean(mismatch, mask)),
            "rollout/logprob_mismatch_max": float(torch.where(mask, mismatch, 0).max()),
            "rollout/weight_version": float(self.version),
            "advantage/mean": float(masked_mean(adv, mask)),
            "advantage/abs_mean": float(masked_mean(adv.abs(), mask)),
        }
        new = {
            S.ADVANTAGES: to_list_column(adv, mask),
            S.RETURNS: to_list_column(returns, mask),
        }
        return append_columns(table, new), metrics

    def train(self, table: pa.Table) -> dict[str, float]:
        """PPO epochs x mini-batches on every learner rank; metrics averaged over ranks."""
        learners = self.actors.learners
        parts = split_rows(table, table.num_rows // len(learners))
        refs = [r.train.remote(p) for r, p in zip(learners, parts, strict=True)]
        results = self._wait(refs, "train")
        return {k: float(np.mean([m[k] for m in results])) for k in results[0]}

    def sync_weights(self) -> dict[str, float]:
        """Learner weights -> every generator as version+1, by the configured path. A generator
        that dies on the way is restarted by Ray and given the new weights through the object
        store (``recover_generators``)."""
        version = self.version + 1
        start = time.perf_counter()
        try:
            sent = self._sync(version)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # A generator that died mid-sync breaks the learner's send too; anything else is a
            # real error.
            if not isinstance(e, ray.exceptions.RayActorError) and not self._restarted():
                raise
            print(
                f"weight sync {version}: {type(e).__name__}; re-syncing the generators",
                flush=True,
            )
            self.recover_generators(version)
            sent = float("nan")
        seconds = time.perf_counter() - start
        self.version = version
        if self.cfg.weight_sync.verify_checksum:
            self.verify_served()
        return {
            "sync/bytes": float(sent),
            "sync/seconds": seconds,
            "sync/gbytes_per_s": sent / seconds / 1e9,
        }

    def verify_served(self) -> None:
        """``weight_sync.verify_checksum``: beyond the bytes, check what each generator computes
        with. Every replica samples one probe prompt (the first of the last batch) under the new
        version, the learner scores the same tokens, and the mean gap between their
        log-probabilities must stay within ``generator.max_logprob_mismatch``. A weight that
        arrived but does not reach the engine's kernels (a tied output head, say) fails here."""
        from orchestration.guards import max_mismatch

        if self.last_batch is None:
            return
        first = self.last_batch.slice(0, 1)
        probe = pa.table(
            {
                S.PROMPT_ID: pa.array([0], pa.int64()),
                S.PROMPT_TOKEN_IDS: S.column_array(first, S.PROMPT_TOKEN_IDS),
                SAMPLE_SEED: pa.array([self.cfg.seed], pa.int64()),
            }
        )
        sampling = dataclasses.replace(
            self.sampling,
            n=len(self.actors.learners),
            max_new_tokens=min(8, self.sampling.max_new_tokens),
        )
        bound = max_mismatch(self.cfg)
        for i, g in enumerate(self.actors.generators):
            table, _ = g.generate_checked.options(num_returns=2).remote(
                probe, sampling, self.version
            )
            scored = self.learner_forward(table)
            rollout = np.concatenate(
                S.column_array(scored, S.ROLLOUT_LOGPROBS).to_numpy(zero_copy_only=False)
            )
            old = np.concatenate(
                S.column_array(scored, S.OLD_LOGPROBS).to_numpy(zero_copy_only=False)
            )
            gap = float(np.abs(rollout - old).mean()) if rollout.size else 0.0
            if not gap <= bound:
                raise RuntimeError(
                    f"weight sync {self.version}: generator {i} computes with other weights than "
                    f"the learner's: on a probe prompt its log-probabilities are {gap:.3g} away "
                    f"on average (generator.max_logprob_mismatch={bound:g}), though the bytes "
                    "arrived intact"
                )

    def _sync(self, version: int) -> float:
        gens, learners, plan = self.actors.generators, self.actors.learners, self.actors.sync_plan
        if self.colocated:
            self._wait([g.wake_up.remote() for g in gens], "wake generators")
        method = self.cfg.weight_sync.method
        if method == "collective":
            verify = self.cfg.weight_sync.verify_checksum
            sends = [r.broadcast_weights.remote(plan, verify) for r in learners]  # ZeRO-3 gathers
            received = self._wait(
                [g.receive_weights.remote(version, plan, verify) for g in gens], "sync (receive)"
            )
            sent, digest = self._wait(sends, "sync (send)")[0]
            served = [v for v, _ in received]
            digests = {d for _, worker_digests in received for d in worker_digests}
            if verify and digests != {digest}:
                raise RuntimeError(
                    f"weight sync {version}: checksums differ: sent {digest}, got {digests}"
                )
        elif method == "cuda_ipc":  # learner rank i and generator i share GPU i
            handles = self._wait([r.share_ipc.remote(plan) for r in learners], "sync (share)")
            served = self._wait(
                [
                    g.receive_ipc.remote(version, plan, h)
                    for g, h in zip(gens, handles, strict=True)
                ],
                "sync (receive)",
            )
            self._wait([r.release_ipc.remote() for r in learners], "sync (release)")
            sent = plan.num_bytes * len(gens)
        else:  # the object store: rank 0's state dict, put once, read by every replica
            weights = [r.policy_weights.remote() for r in learners]  # collective (ZeRO-3)
            served = self._wait(
                [g.update_weights.remote(version, weights[0]) for g in gens], "sync (receive)"
            )
            self._wait(weights[1:], "sync (send)")
            sent = plan.num_bytes
        if set(served) != {version}:
            raise RuntimeError(f"generators serve versions {served} after syncing {version}")
        return float(sent)


def zero_spread_fraction(scores: np.ndarray, groups: torch.Tensor) -> float:
    """Fraction of prompt groups whose finite scores are all equal: with group baselines (GRPO,
    RLOO) they get zero advantage and teach nothing. Groups with fewer than two finite scores
    are left out; NaN when no group has two."""
    gid = groups.numpy()
    flat, total = 0, 0
    for g in np.unique(gid):
        s = scores[(gid == g) & np.isfinite(scores)]
        if len(s) >= 2:
            total += 1
            flat += bool(np.ptp(s) == 0)
    return flat / total if total else float("nan")


def throughput(metrics: dict[str, float], timings: dict[str, float]) -> dict[str, float]:
    """``perf/``: samples and tokens (prompt + response) per second of the whole iteration, and
    generated tokens per second of the generate stage."""
    seconds = timings["timing/iteration"]
    tokens = metrics["rollout/prompt_tokens"] + metrics["rollout/response_tokens"]
    return {
        "perf/samples_per_s": metrics["rollout/samples"] / seconds,
        "perf/tokens_per_s": tokens / seconds,
        "perf/generated_tokens_per_s": metrics["rollout/response_tokens"]
        / timings["timing/generate"],
    }
