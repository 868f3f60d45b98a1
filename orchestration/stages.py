"""The stages of an iteration, as plain calls over the started actors.

Each stage takes what the one before returned and gives back a table (or a reference to one:
tables move between actors as ``ObjectRef``s, and the driver pulls a batch only where it must,
the advantage math) and every wait is bounded and named (``orchestration.calls``). The loop
(``orchestration.loop``) calls them in order; a test can hand it stand-ins with the same
methods. Advantages are a pure function (``orchestration.advantages``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from actors.generator import SAMPLE_SEED, StaleWeightsError
from actors.vllm_engine import Sampling
from orchestration import calls, specs
from orchestration.advantages import Advantages, advantages
from orchestration.config import RunConfig
from orchestration.generators import Faults, GeneratorPool, Submitted, concat_refs
from orchestration.placement import Actors
from orchestration.reward_stage import RewardStage, Scored, enough_groups, select_groups
from orchestration.sync import WeightSync, weight_sync_for
from rollout import schema as S
from rollout.ops import concat, split_rows


@dataclass
class Passes:
    """Scoring passes in flight (``Stages.start_passes``): their refs by name, and when they
    started."""

    jobs: dict[str, list[ray.ObjectRef]]
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class Trained:
    """What the train stage reports: the metrics (averaged over ranks), and how many updates
    in a row the learner has dropped for non-finite values (the numerical-fault guard's
    input)."""

    metrics: dict[str, float]
    skipped_in_a_row: int


@ray.remote(num_cpus=0)
def _join_candidates(generated: pa.Table, extra: pa.Table, offset: int) -> pa.Table:
    """The samples, then more candidates (beams, dataset responses) with ``sample_index``
    moved up by ``offset``, in the columns both have (the samples' ``sample_seed`` is the
    generator's, and the others have no seed)."""
    if offset:
        index = S.column_array(extra, S.SAMPLE_INDEX).to_numpy() + offset
        at = extra.column_names.index(S.SAMPLE_INDEX)
        extra = extra.set_column(at, extra.schema.field(at), pa.array(index, pa.int32()))
    columns = [c for c in generated.column_names if c in extra.column_names]
    return concat([generated.select(columns), extra.select(columns)])


class Stages:
    """The run's stages over ``actors`` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, actors: Actors, pad_token_id: int):
        self.cfg, self.actors, self.pad_token_id = cfg, actors, pad_token_id
        self.timeout = cfg.cluster.call_timeout_s
        self.faults = Faults()
        self.sampling = specs.sampling(cfg)
        self.advantage_spec = specs.advantage_spec(cfg, pad_token_id)
        self.rewards = RewardStage(specs.shaping_spec(cfg), actors.scorers, self.timeout)
        self.pool = GeneratorPool.for_run(cfg, actors, weight_sync_for(cfg, actors), self.faults)
        ds = cfg.reward.dynamic_sampling
        self.dynamic = ds if ds.enabled else None
        self.on_policy = specs.on_policy(cfg)

    @property
    def sync(self) -> WeightSync:
        return self.pool.sync

    def _wait(self, refs, stage: str):
        return calls.wait(refs, stage, self.timeout)

    # ------------------------------------------------------------------ rollout

    def generate(self, prompts: pa.Table) -> ray.ObjectRef:
        return self.pool.generate(prompts, self.sampling)

    def submit(self, prompts: pa.Table) -> Submitted:
        """Start generating ``prompts`` without waiting (``GeneratorPool.submit``)."""
        return self.pool.submit(prompts, self.sampling)

    def collect(self, submitted: Submitted) -> ray.ObjectRef:
        """The table of a :meth:`submit` (``GeneratorPool.collect``)."""
        return self.pool.collect(submitted, self.sampling)

    def with_beams(self, generated: ray.ObjectRef, prompts: pa.Table, width: int) -> ray.ObjectRef:
        """``generated`` and ``width`` beam-search candidates per prompt, in one table (the
        beams' ``sample_index`` after the samples'). Candidates for ranking only: beams are
        not samples of the policy."""
        beams = self.pool.beam_search(prompts, width, self.sampling.max_new_tokens)
        return _join_candidates.remote(generated, beams, self.sampling.n)

    def with_dataset_responses(
        self, generated: ray.ObjectRef, prompts: pa.Table, responses, first_index: int
    ) -> ray.ObjectRef:
        """``generated`` and the dataset responses of ``prompts`` (``responses[dataset_row]``),
        from ``sample_index`` ``first_index`` on (``candidates.dataset_candidates``)."""
        from orchestration.candidates import dataset_candidates

        rows = dataset_candidates(prompts, responses, first_index, self.pool.version)
        return _join_candidates.remote(generated, ray.put(rows), 0)

    def reference_logprobs(self, table: pa.Table) -> pa.Table:
        """``table`` (prompt and response rows) with the frozen reference's ``ref_logprobs``."""
        return self._wait(self.actors.reference.logprobs.remote(table), "reference")

    def reward(self, generated: ray.ObjectRef) -> Scored:
        return self.rewards.score(generated)

    def enough(self, rounds: list[Scored], wanted: int) -> bool:
        """Whether the rounds so far make the batch: always without dynamic sampling, else when
        ``wanted`` groups have a score spread or the rounds are used up."""
        if not self.dynamic or len(rounds) == self.dynamic.max_rounds:
            return True
        return enough_groups(rounds, wanted, self.dynamic.min_std)

    def select(self, rounds: list[Scored], wanted: int) -> tuple[ray.ObjectRef, dict]:
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
        return concat_refs(parts, "select", self.timeout), metrics | selection

    @property
    def early_passes(self) -> bool:
        """Whether the scoring passes start on the generated batch, while it is rewarded: the
        batch is final (no dynamic sampling), the generators keep their GPUs (not
        ``cluster.colocate=all``, where they sleep first), and the reference has a GPU of its
        own. On CPU every actor shares the node's cores, and scoring during the reward stage
        only slows both (benchmarks/bench_shapes.py W1 on 2 cores: the step no faster, the
        reference 1.39x its time alone)."""
        cl = self.cfg.cluster
        return not self.dynamic and cl.colocate != "all" and cl.reference.num_gpus > 0

    def start_passes(self, table: ray.ObjectRef) -> Passes:
        """Start the scoring passes over ``table``, at once on their own actors: the frozen
        reference's ``ref_logprobs`` and, unless the update is on-policy (``specs.on_policy``:
        the train stage takes its own first forward's instead), the learner's own
        log-probabilities (and values), rows split over ranks."""
        jobs = {"reference": [self.actors.reference.logprobs.remote(table)]}
        if not self.on_policy:
            jobs["learner_forward"] = self._learner_forward(table)
        return Passes(jobs)

    def finish_passes(self, passes: Passes, scored: ray.ObjectRef) -> tuple[pa.Table, dict]:
        """The scored batch (the rows the passes ran on, in their order), pulled here for the
        advantage math, with the passes' columns; and each pass's seconds from its start until
        the driver saw it done as ``timing/reference`` and ``timing/learner_forward`` (they
        overlap each other and, started early, the reward stage)."""
        offset = passes.elapsed
        done = calls.wait_each(passes.jobs | {"batch": [scored]}, self.timeout)
        whole = done.pop("batch")[0][0]
        for name, (tables, _) in done.items():
            part = concat(tables)
            same = part.num_rows == whole.num_rows and part[S.PROMPT_ID].equals(whole[S.PROMPT_ID])
            if not same:
                raise RuntimeError(f"{name} ran on other rows than the scored batch's")
            for column in part.column_names:
                if column not in whole.column_names:
                    whole = whole.append_column(part.schema.field(column), part[column])
        return whole, {f"timing/{k}": offset + t for k, (_, t) in done.items()}

    def _learner_forward(self, table: ray.ObjectRef) -> list[ray.ObjectRef]:
        learners = self.actors.learners
        if len(learners) == 1:
            return [learners[0].compute_old.remote(table)]
        whole = self._wait(table, "learner_forward")
        parts = split_rows(whole, -(-whole.num_rows // len(learners)))
        return [r.compute_old.remote(p) for r, p in zip(learners, parts, strict=True)]

    def learner_forward(self, table) -> pa.Table:
        """The learner's own log-probabilities (and values) for ``table`` (a table or ref)."""
        return concat(self._wait(self._learner_forward(table), "learner_forward"))

    # ------------------------------------------------------------------ update

    def advantages(self, table: pa.Table, kl_coef: float) -> Advantages:
        return advantages(table, self.advantage_spec, kl_coef, self.pool.version)

    def train(
        self, table: pa.Table, settings: dict[str, float], ptx: pa.Table | None = None
    ) -> Trained:
        """Epochs x mini-batches of the objective on every learner rank (``settings``: the
        objective's per-step values, such as the current KL coefficient; ``ptx``: the PTX
        term's examples, split over the ranks like the rollouts)."""
        learners = self.actors.learners
        parts = split_rows(table, table.num_rows // len(learners))
        extra = [None] * len(learners)
        if ptx is not None:
            extra = split_rows(ptx, ptx.num_rows // len(learners))
        refs = [
            r.train.remote(p, settings, x) for r, p, x in zip(learners, parts, extra, strict=True)
        ]
        results = self._wait(refs, "train")
        metrics = {k: float(np.mean([m[k] for m in results])) for k in results[0]}
        skipped = max(int(m["learner/skipped_in_a_row"]) for m in results)
        return Trained(metrics=metrics, skipped_in_a_row=skipped)

    def sleep(self) -> None:
        self.sync.sleep()

    def sync_weights(self, wait: bool = True) -> dict[str, float]:
        return self.pool.update(wait)

    # ------------------------------------------------------------------ around the loop

    def verify_served(self, batch: pa.Table) -> None:
        """``weight_sync.verify_checksum``: beyond the bytes, check what each generator computes
        with. Every replica samples one probe prompt (the first of ``batch``) under the new
        version, the learner scores the same tokens, and the mean gap between their
        log-probabilities must stay within ``generator.max_logprob_mismatch``. A weight that
        arrived but does not reach the engine's kernels (a tied output head, say) fails here."""
        from orchestration.guards import max_mismatch

        first = batch.slice(0, 1)
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
            episodes=None,  # one turn: a probe of the weights, not of an environment
        )
        bound, version = max_mismatch(self.cfg), self.pool.version
        for i, g in enumerate(self.actors.generators):
            for attempt in (1, 2):  # a replica that died since the sync is brought back first
                call = g.generate_checked.options(num_returns=2)
                table, served = call.remote(probe, sampling, version)
                try:
                    self._wait(served, "verify (generate)")
                    break
                except (ray.exceptions.RayActorError, StaleWeightsError):
                    if attempt == 2:
                        raise
                    self.pool.recover(version)
            scored = self.learner_forward(table)
            rollout, old = (
                np.concatenate(S.column_array(scored, c).to_numpy(zero_copy_only=False))
                for c in (S.ROLLOUT_LOGPROBS, S.OLD_LOGPROBS)
            )
            gap = float(np.abs(rollout - old).mean()) if rollout.size else 0.0
            if not gap <= bound:
                raise RuntimeError(
                    f"weight sync {version}: generator {i} computes with other weights than "
                    f"the learner's: on a probe prompt its log-probabilities are {gap:.3g} away "
                    f"on average (generator.max_logprob_mismatch={bound:g}), though the bytes "
                    "arrived intact"
                )

    def reference_baselines(self, prompts: pa.Table) -> dict[str, float]:
        """ChatGLM-RLHF's baseline: the generators still serve the initial (reference) weights;
        sample ``reward.reference_baseline_samples`` responses per prompt and record their
        mean combined score per dataset row. Call before the first iteration."""
        if self.pool.version != 0:
            raise RuntimeError("reference baselines need the initial weights (version 0)")
        n = self.cfg.reward.reference_baseline_samples
        generated = self.pool.generate(prompts, dataclasses.replace(self.sampling, n=n))
        return self.rewards.set_baselines(generated)

    def evaluate(self, prompts: pa.Table, sampling: Sampling) -> pa.Table:
        """The current policy's responses to ``prompts`` with ``sampling``, with one
        ``reward/<name>`` column per reward component (unshaped: no running statistics or
        baselines move)."""
        seeds = self.cfg.seed * 2**20 + np.arange(prompts.num_rows, dtype=np.int64) * sampling.n
        generated = self.pool.generate(prompts, sampling, seeds)  # the same every evaluation
        columns, _ = self.rewards.components(generated)
        table = self._wait(generated, "evaluate")
        for name in columns.column_names:
            table = table.append_column(name, columns[name])
        return table
