"""The run, top to bottom: every iteration's stages in order, and what is due around them.

Per iteration ``k``:

1. evaluate the current weights, if due (``eval.every``);
2. rollout: generate and reward (more rounds under dynamic sampling, until enough groups
   teach), the generators sleep when colocated; the scoring passes run at once, on the
   generated batch while it is rewarded when it is final (else on the selected one): the
   reference's log-probabilities and the learner's own (skipped when the update is exactly
   on-policy: the train stage's first forward gives them);
3. advantages (a pure function) and the KL controller's update;
4. train the objective on every learner rank, with the controller's current KL coefficient;
5. sync: the new weights to every generator as the next version (with partial rollouts it runs
   behind the next iteration's rollout and is waited for before its advantages:
   ``timing/sync_wait``, and its ``sync/*`` metrics are that iteration's);
6. log, then the run-health checks (``orchestration.guards``): a numerical-fault stop comes from
   the train stage's typed result;
7. the rollout file, export and checkpoint, when due.

The stages are plain calls over the started actors (``orchestration.stages``); a learner rank
that dies sends the run back to its last checkpoint (``orchestration.recovery``). The entry
point (``orchestration.train``) builds all of it with :func:`start_loop`.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from pathlib import Path

import pyarrow as pa

from orchestration import specs
from orchestration.advantages import throughput
from orchestration.config import RunConfig
from orchestration.guards import Guards, RunStopped
from orchestration.metrics import StageTimer
from orchestration.recovery import Recovery
from orchestration.sampler import PromptSampler, all_prompts
from rollout import schema as S


class Loop:
    """Synchronous iterations of the configured algorithm over ``stages``."""

    sync_behind = False  # see __init__ (the supervised stages sync nothing)

    def __init__(
        self,
        cfg: RunConfig,
        stages,
        sampler: PromptSampler,
        run_dir: Path,
        eval_prompts=None,
        recovery: Recovery | None = None,
        ptx=None,
    ):
        self.cfg, self.stages, self.sampler, self.run_dir = cfg, stages, sampler, run_dir
        # The PTX term's examples (``orchestration.sft_data.SupervisedSet``) and their sampler.
        self.ptx = ptx
        self.ptx_sampler = PromptSampler(ptx, cfg.data.seed + 1) if ptx is not None else None
        self.kl_ctl = specs.kl_controller(cfg)
        self.guards = Guards(cfg, lambda: stages.rewards.describe_unscorable())
        self.recovery = recovery
        self.sync_enabled = True  # tests turn it off to show what a missed sync looks like
        # Partial rollouts: each sync runs behind the next rollout, settled before advantages.
        self.sync_behind = cfg.max_staleness > 0 and cfg.partial_rollouts == "continue"
        self.last_batch: pa.Table | None = None  # the iteration's whole table
        self.pending: deque = deque()  # max_staleness > 0: the generations running ahead
        self.eval_table = None
        if eval_prompts is not None:
            table, limit = all_prompts(eval_prompts), cfg.eval.max_prompts
            self.eval_table = table.slice(0, limit) if limit else table
            self.eval_sampling = specs.eval_sampling(cfg)

    @property
    def version(self) -> int:
        """The weight version the generators serve."""
        return self.stages.pool.version

    @property
    def actors(self):
        return self.stages.actors

    # ------------------------------------------------------------------ the run

    def run(self, log, start: int = 0) -> None:
        """Iterations ``start`` .. ``iterations - 1``, then the final evaluation."""
        cfg = self.cfg
        if start == 0 and self.recovery is not None:
            self.recovery.remember(self)
        try:
            self._run(log, start)
        finally:  # a weight update still under way must end before Ray does
            if self.sync_behind:
                self.stages.pool.settle(raise_errors=False)
        if self.eval_table is not None:  # the final weights, as their own record
            log.log(cfg.iterations, self.evaluate(cfg.iterations))

    def _run(self, log, start: int) -> None:
        cfg, k = self.cfg, start
        while k < cfg.iterations:
            try:
                metrics, skipped = self.step(k)
            except Exception as e:  # noqa: BLE001 - only a dead learner rank is handled
                if self.recovery is None or not self.recovery.learner_died(e, self.actors.learners):
                    raise
                k = self.recovery.rollback(self, log, e)
                continue
            log.log(k, metrics)
            try:
                self.guards.numerical(k, skipped)
                for warning in self.guards.check(k, metrics):
                    print(warning, flush=True)
            except RunStopped as stop:
                path = self.save_checkpoint(k)
                raise type(stop)(f"{stop} (checkpoint: {path})") from None
            every = cfg.checkpoint.every
            if k == cfg.iterations - 1 or (every and (k + 1) % every == 0):
                self.save_checkpoint(k)
            k += 1

    def step(self, k: int) -> tuple[dict[str, float], int]:
        """Iteration ``k`` with its evaluation, rollout file and export as due; returns its
        metrics and the learner's dropped updates in a row."""
        cfg, last = self.cfg, self.cfg.iterations - 1
        metrics: dict[str, float] = {}
        if self.eval_table is not None and k % cfg.eval.every == 0:
            metrics |= self.evaluate(k)
        iteration, skipped = self._iterate()
        metrics |= iteration | {"data/epoch": self.sampler.progress}
        every = cfg.logging.rollouts_every
        if every and (k == 0 or k == last or k % every == 0):
            from orchestration.evaluation import write_table

            write_table(self.last_batch, self.run_dir / "rollouts" / f"iter_{k:06d}.parquet")
        if cfg.export.every and (k + 1) % cfg.export.every == 0 and k != last:
            start = time.perf_counter()
            self.export(self.run_dir / "exports" / f"iter_{k:06d}")
            self.prune_exports()
            metrics["timing/export"] = time.perf_counter() - start
        return metrics, skipped

    def iteration(self) -> dict[str, float]:
        """One synchronous iteration; its metrics (including ``timing/*`` and ``faults/*``)."""
        return self._iterate()[0]

    def _iterate(self) -> tuple[dict[str, float], int]:
        stages, timer = self.stages, StageTimer()
        wanted = self.cfg.data.prompts_per_iteration
        with timer("iteration"):
            rounds, passes = [], None
            while True:  # one round, or more under dynamic sampling until enough groups teach
                with timer("generate"):
                    generated = self._generated(wanted)
                if stages.early_passes:  # the batch is final: score it while it is rewarded
                    passes = stages.start_passes(generated)
                with timer("reward"):
                    rounds.append(stages.reward(generated))
                if stages.enough(rounds, wanted):
                    break
            stages.sleep()  # colocated: the learner and reference take the GPUs until the sync
            scored, metrics = stages.select(rounds, wanted)
            if passes is None:  # a final batch's passes need not wait for its scores
                passes = stages.start_passes(scored if stages.dynamic else generated)
            with timer("passes"):  # the reference's and the learner's, at once
                table, pass_timings = stages.finish_passes(passes, scored)
            if self.sync_behind:  # the last iteration's sync, which ran during this rollout
                with timer("sync_wait"):
                    stages.pool.settle()
                    if self.cfg.weight_sync.verify_checksum:
                        self.verify_served()
                metrics |= stages.pool.take_sync_metrics()
            with timer("advantages"):
                adv = stages.advantages(table, self.kl_ctl.value)
                if adv.kl_ref is not None:
                    self.kl_ctl.update(adv.kl_ref, n_steps=table.num_rows)
            self.last_batch = adv.table
            metrics |= adv.metrics | {"actor/kl_coef": self.kl_ctl.value}
            with timer("train"):
                settings = {"kl_coef": self.kl_ctl.value}
                trained = stages.train(adv.table, settings, self.ptx_rows())
            metrics |= trained.metrics
            with timer("sync"):
                if self.sync_enabled:
                    metrics |= stages.sync_weights(wait=not self.sync_behind)
                    if self.cfg.weight_sync.verify_checksum and not self.sync_behind:
                        self.verify_served()
        timings = timer.timings | pass_timings
        metrics |= timings | throughput(metrics, timings) | stages.faults.metrics
        return metrics, trained.skipped_in_a_row

    def _generated(self, wanted: int):
        """This iteration's generated batch (ref), once per round (dynamic sampling may take
        several). Synchronous (``max_staleness`` 0): sampled now by the current weights. With
        ``max_staleness = k``: the next generations start first, so k run ahead of this one
        (each by the weights served when it started; with partial rollouts, newer ones from
        the first update that reaches it), then the oldest is collected: at most k behind."""
        k = self.cfg.max_staleness
        if not k:
            return self.stages.generate(self.sampler.next_batch(wanted))
        while len(self.pending) < k + 1:
            self.pending.append(self.stages.submit(self.sampler.next_batch(wanted)))
        return self.stages.collect(self.pending.popleft())

    def _pending_tables(self) -> dict[str, pa.Table]:
        """The generations running ahead, waited for, as tables (for a checkpoint)."""
        import ray

        tables = {}
        for j, submitted in enumerate(self.pending):
            if submitted.table is None:
                ref = self.stages.collect(submitted)
                submitted.table = ray.get(ref, timeout=self.cfg.cluster.call_timeout_s)
            tables[f"pending_{j}"] = submitted.table
        return tables

    def ptx_rows(self) -> pa.Table | None:
        """This iteration's PTX examples (``ptx.rows_per_iteration``), None without a PTX
        term."""
        if self.ptx_sampler is None:
            return None
        from orchestration.sft_data import supervised_table

        ids, rows = self.ptx_sampler.next_rows(self.cfg.ptx.rows_per_iteration)
        return supervised_table(self.ptx, rows.tolist(), int(ids[0]) if len(ids) else 0)

    def verify_served(self) -> None:
        """Every generator computes with the learner's weights (``Stages.verify_served``)."""
        if self.last_batch is not None:
            self.stages.verify_served(self.last_batch)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What the driver holds that the next iteration depends on."""
        return {
            "weight_version": self.version,
            "requests": self.stages.pool.requests,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_shaper": self.stages.rewards.shaper.state_dict(),
            "sampler": self.sampler.state_dict(),
        } | ({"ptx_sampler": self.ptx_sampler.state_dict()} if self.ptx_sampler else {})

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the generators are not touched (``GeneratorPool.restore``
        gives them the learner's weights)."""
        self.stages.pool.requests = int(state["requests"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.stages.rewards.shaper.load_state_dict(state["reward_shaper"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ptx_sampler is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])
        self.pending.clear()  # the state's prompts were drawn after them: they are gone
        self.stages.pool.forget_in_flight()

    def save_checkpoint(self, k: int) -> Path:
        """Checkpoint after iteration ``k`` (committed), keeping the newest
        ``checkpoint.keep``."""
        from orchestration import checkpoint

        state = self.state_dict() | {"rng": checkpoint.rng_states()}
        config = self.cfg.model_dump(mode="json")
        timeout = self.cfg.cluster.call_timeout_s
        tables = self._pending_tables()  # max_staleness > 0: resumed, they train as they would
        learners = self.actors.learners
        path = checkpoint.save(self.run_dir, k, state, config, learners, timeout, tables)
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep)
        return path

    def restore(self, path: Path) -> int:
        """Load checkpoint ``path`` into the learner ranks and the driver, and give the
        generators its weights before they generate again. Returns its iteration."""
        from orchestration import calls, checkpoint

        state = checkpoint.check_compatible(path, self.cfg.model_dump(mode="json"))
        loads = [r.load_checkpoint.remote(str(path / "learner")) for r in self.actors.learners]
        calls.wait(loads, "restore checkpoint", self.cfg.cluster.call_timeout_s)
        self.load_state_dict(state)
        checkpoint.set_rng_states(state["rng"])
        self.stages.pool.restore(state["weight_version"])
        self.pending.extend(checkpoint.pending_generations(path))
        return int(state["iteration"])

    # ------------------------------------------------------------------ outputs

    def evaluate(self, k: int) -> dict[str, float]:
        """The eval set under the current weights -> ``eval/*`` metrics and
        ``eval/iter_<k>.parquet``."""
        from orchestration.evaluation import eval_metrics, write_table

        start = time.perf_counter()
        table = self.stages.evaluate(self.eval_table, self.eval_sampling)
        write_table(table, self.run_dir / "eval" / f"iter_{k:06d}.parquet")
        metrics = eval_metrics(table, self.cfg.eval_component, self.cfg.eval.correct_threshold)
        return metrics | {"timing/eval": time.perf_counter() - start}

    def export(self, path: Path) -> None:
        """The learner's current policy as a Hugging Face directory (every rank takes part
        under ZeRO-3; rank 0 writes)."""
        from orchestration import calls

        refs = [a.save_policy.remote(str(path)) for a in self.actors.learners]
        calls.wait(refs, "export", self.cfg.cluster.call_timeout_s)

    def prune_exports(self) -> None:
        keep = self.cfg.export.keep
        exports = sorted((self.run_dir / "exports").glob("iter_*[0-9]"))
        for old in exports[:-keep] if keep else []:
            shutil.rmtree(old)


def start_loop(cfg: RunConfig, actors, sampler: PromptSampler, prep) -> Loop:
    """The loop over started ``actors``: its stages, generator pool, weight sync (opened) and
    learner recovery. ``prep``: the entry point's ``Prepared`` (run directory, model path, pad
    token, eval prompts)."""
    from orchestration.stages import Stages

    stages = Stages(cfg, actors, prep.pad_token_id)
    stages.sync.open()
    recovery = Recovery(cfg, prep.model_path, prep.pad_token_id, prep.run_dir)
    kind = Loop if cfg.stage == "rl" else SampledLoop
    return kind(cfg, stages, sampler, prep.run_dir, prep.eval_prompts, recovery, prep.ptx)


class SampledLoop(Loop):
    """``stage: rrhf``, ``stage: rs`` and online ``stage: dpo``: the run of :class:`Loop`
    (evaluation, checkpoints, resume, guards, exports) with an iteration of its own. Per
    iteration:

    1. generate ``generator.samples_per_prompt`` samples per prompt (rrhf: and
       ``rrhf.beam_width`` beams and the prompt's ``rrhf.dataset_responses``, candidates
       only);
    2. reward them (the run's reward actors and shaping);
    3. build the training batch from the scores (``orchestration.candidates``): each prompt's
       best and worst sample as a DPO pair (with the reference's summed log-probabilities),
       its ranked candidates (RRHF), or its best sample when it clears ``rs.threshold``;
    4. train the stage's objective on the batch (``rs.steps`` passes for rs), then sync the
       new weights to the generators. An iteration that yields nothing to train on (every
       prompt's samples tied) trains and syncs nothing, and says so in
       ``learner/empty_batch``.
    """

    def _iterate(self) -> tuple[dict[str, float], int]:
        from orchestration import calls, candidates

        cfg, stages, timer = self.cfg, self.stages, StageTimer()
        with timer("iteration"):
            with timer("generate"):
                prompts = self.sampler.next_batch(cfg.data.prompts_per_iteration)
                generated = stages.generate(prompts)
                if cfg.stage == "rrhf" and cfg.rrhf.beam_width:
                    generated = stages.with_beams(generated, prompts, cfg.rrhf.beam_width)
                if cfg.stage == "rrhf" and cfg.rrhf.dataset_responses:
                    first = self._sources["dataset"]
                    answers = self.sampler.prompts.responses
                    generated = stages.with_dataset_responses(generated, prompts, answers, first)
            with timer("reward"):
                scored = stages.reward(generated)
                table = calls.wait(scored.finish(), "reward", self.cfg.cluster.call_timeout_s)
            self.last_batch = table
            metrics = scored.metrics | _score_metrics(self._sample_scores(table))
            if cfg.stage == "rrhf" and self._sources:
                metrics |= candidates.best_sources(table, self._sources)
            with timer("select"):
                batch, chosen = self._training_batch(table)
            metrics |= chosen
            parts = len(self.actors.learners) * cfg.learner.num_mini_batches
            batch = candidates.trim_to(batch, parts)
            metrics["learner/empty_batch"] = float(batch.num_rows == 0)
            skipped = 0
            if batch.num_rows:
                with timer("train"):
                    trained = stages.train(batch, {})
                metrics |= trained.metrics
                skipped = trained.skipped_in_a_row
                with timer("sync"):
                    metrics |= stages.sync_weights()
        return metrics | timer.timings | stages.faults.metrics, skipped

    def _sample_scores(self, table: pa.Table):
        """The scores of the policy's samples (NaN: unscorable), not the other candidates'."""
        score = S.column_array(table, S.SCORE).to_numpy(zero_copy_only=False).astype(float)
        index = S.column_array(table, S.SAMPLE_INDEX).to_numpy()
        return score[index < self.cfg.generator.samples_per_prompt]

    @property
    def _sources(self) -> dict[str, int]:
        """The candidate sources after the samples, each with its first ``sample_index``."""
        n, rrhf, sources = self.cfg.generator.samples_per_prompt, self.cfg.rrhf, {}
        if self.cfg.stage == "rrhf" and rrhf.beam_width:
            sources["beams"] = n
        if self.cfg.stage == "rrhf" and rrhf.dataset_responses:
            sources["dataset"] = n + rrhf.beam_width
        return sources

    def _training_batch(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        from orchestration import candidates

        cfg = self.cfg
        if cfg.stage == "rs":
            return candidates.best_of_n(table, cfg.rs.threshold)
        if cfg.stage == "rrhf":
            return candidates.ranked_groups(table)
        pairs, metrics = candidates.best_worst_pairs(table, cfg.dpo.min_score_gap)
        if pairs.num_rows:
            pairs = candidates.with_reference_logps(pairs, self.stages.reference_logprobs)
        return pairs, metrics


def _score_metrics(score) -> dict[str, float]:
    """The sampled batch's score statistics (NaN: unscorable)."""
    import numpy as np

    ok = np.isfinite(score)
    return {
        "reward/score_mean": float(score[ok].mean()) if ok.any() else float("nan"),
        "reward/score_max": float(score[ok].max()) if ok.any() else float("nan"),
        "reward/unscorable_fraction": float(1 - ok.mean()) if len(score) else 0.0,
        "rollout/samples": float(len(score)),
    }


class SupervisedLoop(Loop):
    """``stage: sft``, ``stage: rm`` and offline ``stage: dpo``: the same run (checkpoints,
    resume, guards, exports, metrics) with an iteration of its own. Per iteration ``k``:

    1. evaluate on the held-out set, if due (``eval.every``): ``eval/sft_*``, ``eval/rm_*``
       or ``eval/dpo_*``;
    2. draw ``sft.rows_per_step`` examples (or ``rm.groups_per_step`` / ``dpo.groups_per_step``
       prompt groups) from the training set, in seeded passes (``PromptSampler``); for DPO the
       frozen reference adds each response's summed log-probability;
    3. train: the rows split over the learner ranks, one optimizer step per mini-batch.

    No generators or reward actors run; the stages are
    ``orchestration.supervised.SupervisedStages``.
    """

    def __init__(self, cfg: RunConfig, stages, inputs, run_dir: Path):
        self.cfg, self.stages, self.inputs, self.run_dir = cfg, stages, inputs, run_dir
        self.sampler = PromptSampler(inputs, cfg.data.seed, shuffle=cfg.data.shuffle)
        self.guards = Guards(cfg)
        self.recovery = None
        self.last_batch = None
        self.pending: deque = deque()  # nothing is generated ahead (Loop's checkpoints read it)
        self.dpo = cfg.stage == "dpo"
        self.eval_table = self._with_reference(inputs.held_out)
        self.batch_size = {
            "sft": cfg.sft.rows_per_step,
            "rm": cfg.rm.groups_per_step,
            "dpo": cfg.dpo.groups_per_step,
        }[cfg.stage]

    def _with_reference(self, groups: pa.Table | None) -> pa.Table | None:
        """DPO's groups with the reference's summed log-probabilities; others as they are."""
        if not self.dpo or groups is None or not groups.num_rows:
            return groups
        from orchestration.candidates import with_reference_logps

        return with_reference_logps(groups, self.stages.reference_logprobs)

    @property
    def version(self) -> int:
        return 0  # no generator serves these weights

    def _iterate(self) -> tuple[dict[str, float], int]:
        timer = StageTimer()
        with timer("iteration"):
            ids, rows = self.sampler.next_rows(self.batch_size)
            self.last_batch = self.inputs.table(rows.tolist(), int(ids[0]))
            if self.dpo:
                with timer("reference"):
                    self.last_batch = self._with_reference(self.last_batch)
            with timer("train"):
                trained = self.stages.train(self.last_batch)
        return trained.metrics | timer.timings, trained.skipped_in_a_row

    def evaluate(self, k: int) -> dict[str, float]:
        """The objective's loss and accuracy on the held-out set as ``eval/*``."""
        start = time.perf_counter()
        metrics = self.stages.evaluate(self.eval_table)
        out = {"eval/" + name.replace("/", "_"): v for name, v in metrics.items()}
        return out | {"timing/eval": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def restore(self, path: Path) -> int:
        from orchestration import calls, checkpoint

        state = checkpoint.check_compatible(path, self.cfg.model_dump(mode="json"))
        loads = [r.load_checkpoint.remote(str(path / "learner")) for r in self.actors.learners]
        calls.wait(loads, "restore checkpoint", self.cfg.cluster.call_timeout_s)
        self.load_state_dict(state)
        checkpoint.set_rng_states(state["rng"])
        return int(state["iteration"])
