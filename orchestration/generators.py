"""The generator pool: the vLLM replicas as one thing that generates and serves a version.

It dispatches prompts to whichever replica is free, seeds each prompt's sampling by its place
in the run's stream, brings a replica that Ray restarted (or that serves other weights) back to
the current version, and pushes new versions through the run's :class:`WeightSync`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from actors.generator import SAMPLE_SEED, StaleWeightsError
from actors.vllm_engine import Sampling
from orchestration import calls
from orchestration.sync import WeightSync
from rollout.ops import concat, split_rows


@ray.remote(num_cpus=0)  # joins tables; must not wait for a CPU the actors hold
def _concat(*tables: pa.Table) -> pa.Table:
    return concat(list(tables))


def concat_refs(refs: list, stage: str, timeout: float) -> ray.ObjectRef:
    """One table (ref) of the tables behind ``refs``, joined next to them, in order."""
    if len(refs) == 1:
        return refs[0]
    return calls.ready(_concat.remote(*refs), stage, timeout)


class Faults:
    """``faults/<name>`` counters of recoveries and ``faults/<name>_seconds``, in every
    iteration's metrics (counted from the driver's threads: the loop's and a weight update's
    in the background)."""

    def __init__(self):
        self._metrics: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def metrics(self) -> dict[str, float]:
        with self._lock:
            return dict(self._metrics)

    def count(self, fault: str, seconds: float) -> None:
        with self._lock:
            for key, value in ((f"faults/{fault}", 1.0), (f"faults/{fault}_seconds", seconds)):
                self._metrics[key] = self._metrics.get(key, 0.0) + value


@dataclass
class Submitted:
    """A generation running ahead of training (:meth:`GeneratorPool.submit`): the prompts and
    their seeds (to sample them again the same way if a replica fails), one call per replica,
    and the version it was asked for."""

    prompts: pa.Table
    seeds: np.ndarray
    tables: list
    versions: list
    version: int
    table: pa.Table | None = None  # set when it comes from a checkpoint instead
    continuing: bool = False  # a weight update reaches it mid-way (partial rollouts)


class GeneratorPool:
    """The replicas (``actors.generators``), the version they serve and the prompt stream's
    seeds. ``sync`` is the run's weight-sync object; ``faults`` counts recoveries."""

    def __init__(
        self,
        actors,
        sync: WeightSync,
        faults: Faults,
        *,
        timeout: float,
        chunks_per_replica: int = 2,
        max_restarts: int = 3,
        seed: int = 0,
    ):
        self.actors, self.sync, self.faults, self.timeout = actors, sync, faults, timeout
        self.chunks_per_replica, self.max_restarts, self.seed = (
            chunks_per_replica,
            max_restarts,
            seed,
        )
        self._version = 0  # the version every generator serves (see :attr:`version`)
        self._updating: Future | None = None  # an update started by update(wait=False)
        self._executor: ThreadPoolExecutor | None = None
        self._unreported: dict[str, float] = {}  # its metrics, once it has finished
        self.requests = 0  # prompts sent for sampling so far: seeds each prompt's sampling
        self._pids: list[int] | None = None
        self._in_flight: list[Submitted] = []  # submitted, not yet collected

    @classmethod
    def for_run(cls, cfg, actors, sync: WeightSync, faults: Faults) -> GeneratorPool:
        """The pool as the run config sets it (timeout, chunks, restarts, seed)."""
        return cls(
            actors,
            sync,
            faults,
            timeout=cfg.cluster.call_timeout_s,
            chunks_per_replica=cfg.generator.chunks_per_replica,
            max_restarts=cfg.cluster.max_actor_restarts,
            seed=cfg.generator.seed,
        )

    def seeds(self, rows: int, n: int) -> np.ndarray:
        """Sampling seeds for the next ``rows`` prompts: prompt r of the run's stream samples
        from seeds ``base + r*n ... base + r*n + n-1`` (vLLM adds the sample index), so its
        tokens depend on the run's seed and its place in the stream only, never on which
        replica served it or whether the run was resumed."""
        first = self.requests
        self.requests += rows
        base = (self.seed * 1_000_003) % 2**40 * 2**20
        return base + (first + np.arange(rows, dtype=np.int64)) * n

    def generate(
        self, prompts: pa.Table, sampling: Sampling, seeds: np.ndarray | None = None
    ) -> ray.ObjectRef:
        """Prompts in chunks to whichever replica is free (a slow replica takes fewer chunks
        instead of stalling the batch); one rollout table (ref) back, in prompt order.

        Each prompt samples with its own seed (``seeds``, else the next of :meth:`seeds`). A
        replica that died (Ray restarts it) or serves other weights is re-synced to the current
        version and its chunk re-issued; the tokens come out the same."""
        self.settle()
        if self._pids is None:
            self.restarted()  # the processes a restart would replace
        gens = self.actors.generators
        if seeds is None:
            seeds = self.seeds(prompts.num_rows, sampling.n)
        prompts = prompts.append_column(SAMPLE_SEED, pa.array(seeds, pa.int64()))
        chunks = 1 if len(gens) == 1 else len(gens) * self.chunks_per_replica
        parts = split_rows(prompts, max(1, -(-prompts.num_rows // chunks)))
        results: list[ray.ObjectRef | None] = [None] * len(parts)
        idle, busy, todo = list(range(len(gens))), {}, list(range(len(parts)))[::-1]
        retries = 0
        while todo or busy:
            while idle and todo:
                k, i = todo.pop(), idle.pop()
                call = gens[i].generate_checked.options(num_returns=2)
                table, version = call.remote(parts[k], sampling, self._version)
                busy[version] = (i, k, table)
            done = calls.first_ready(list(busy), "generate", self.timeout)
            i, k, table = busy.pop(done)
            try:
                calls.wait(done, "generate", self.timeout)
            except (ray.exceptions.RayActorError, StaleWeightsError) as e:
                retries += 1
                if retries > self.max_restarts * len(gens):
                    raise
                print(
                    f"generator {i}: {type(e).__name__} during generate; re-syncing it to weight "
                    f"version {self._version} and re-issuing its {parts[k].num_rows} prompts",
                    flush=True,
                )
                self.recover(self._version)
                todo.append(k)
            else:
                results[k] = table
            idle.append(i)
        return concat_refs(results, "generate", self.timeout)

    def submit(self, prompts: pa.Table, sampling: Sampling) -> Submitted:
        """Start generating ``prompts`` with the version served now and return at once (the
        asynchronous loop: training runs meanwhile). The prompts are split evenly over the
        replicas, one call each; each replica runs its generations in order. A weight update
        (:meth:`update`) reaches this generation mid-way when ``sampling`` continues across
        updates (partial rollouts), else waits until it has finished with the weights it
        started with. Seeds as :meth:`generate`'s. :meth:`collect` waits for the table."""
        if self._pids is None:
            self.restarted()
        # An update under way (update(wait=False)) serves the version this generation waits for.
        ahead = self._updating is not None
        version, wait_s = self._version + ahead, self.timeout if ahead else 0.0
        seeds = self.seeds(prompts.num_rows, sampling.n)
        seeded = prompts.append_column(SAMPLE_SEED, pa.array(seeds, pa.int64()))
        gens = self.actors.generators
        parts = split_rows(seeded, max(1, -(-seeded.num_rows // len(gens))))
        tables, versions = [], []
        for gen, part in zip(gens, parts, strict=False):  # fewer parts than replicas: idle ones
            table, served = gen.generate_checked.options(num_returns=2).remote(
                part, sampling, version, wait_s
            )
            tables.append(table)
            versions.append(served)
        submitted = Submitted(
            prompts,
            seeds,
            tables,
            versions,
            version,
            continuing=sampling.continue_across_updates,
        )
        self._in_flight.append(submitted)
        return submitted

    def collect(self, submitted: Submitted, sampling: Sampling) -> ray.ObjectRef:
        """The table of a :meth:`submit` (ref). A replica that failed or served other weights
        is brought back (:meth:`recover`) and the prompts sampled again, with the same seeds,
        by the version served now."""
        if submitted.table is not None:
            return ray.put(submitted.table)
        if submitted in self._in_flight:
            self._in_flight.remove(submitted)
        try:
            calls.wait(submitted.versions, "generate", self.timeout)
        except (ray.exceptions.RayActorError, StaleWeightsError) as e:
            self.settle()
            print(
                f"generators: {type(e).__name__} during a generation ahead of training; "
                f"re-syncing them to weight version {self._version} and sampling its "
                f"{submitted.prompts.num_rows} prompts again",
                flush=True,
            )
            self.recover(self._version)
            return self.generate(submitted.prompts, sampling, submitted.seeds)
        return concat_refs(submitted.tables, "generate", self.timeout)

    def _finish_in_flight(self) -> None:
        """Before a weight update: wait for the generations under way that finish with the
        weights they started with (``partial_rollouts: finish``); their failures surface in
        :meth:`collect`."""
        waiting = [ref for s in self._in_flight if not s.continuing for ref in s.versions]
        if waiting:
            ray.wait(waiting, num_returns=len(waiting), timeout=self.timeout)

    def forget_in_flight(self) -> None:
        """The generations under way are dropped (a resume or a rollback)."""
        self._in_flight.clear()

    def beam_search(self, prompts: pa.Table, width: int, max_new_tokens: int) -> ray.ObjectRef:
        """The ``width`` best beams of every prompt (RRHF candidates; see
        ``PolicyGenerator.beam_search``: the rows are not policy samples), from the current
        version; one rollout table (ref) back, in prompt order.

        The prompts are split evenly over the replicas, one part each (beam search is
        deterministic, so no seeds). A replica that fails or serves other weights raises here
        (``StaleWeightsError``, ``RayActorError``), unlike :meth:`generate`, which recovers:
        call :meth:`recover` and ask again."""
        self.settle()
        gens = self.actors.generators
        parts = split_rows(prompts, max(1, -(-prompts.num_rows // len(gens))))
        tables, versions = [], []
        for gen, part in zip(gens, parts, strict=False):  # fewer parts than replicas: idle ones
            call = gen.beam_search_checked.options(num_returns=2)
            table, version = call.remote(part, width, max_new_tokens, self._version)
            tables.append(table)
            versions.append(version)
        calls.wait(versions, "beam search", self.timeout)  # raises the replica's error
        return concat_refs(tables, "beam search", self.timeout)

    def restarted(self) -> bool:
        """Whether any generator process changed since the last look (Ray restarted it)."""
        gens = self.actors.generators
        pids = calls.wait([g.process_id.remote() for g in gens], "generator pids", self.timeout)
        changed = self._pids is not None and pids != self._pids
        self._pids = pids
        return changed

    def recover(self, version: int) -> None:
        """Bring every generator to ``version`` after one died: wait for Ray to restart it
        (calls queue until it is back), give each generator serving another version the
        learner's current weights, and reopen the sync (a collective group lost a member)."""
        start = time.perf_counter()
        gens = self.actors.generators
        served = [self._when_back(g) for g in gens]
        behind = [g for g, v in zip(gens, served, strict=True) if v != version]
        if behind:
            self.sync.restore(version, behind, stage="re-sync generator")
        self.sync.reopen()
        self.restarted()  # remember the new processes
        self.faults.count("generator_recoveries", time.perf_counter() - start)

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
                    f"{self.max_restarts}): {e}"
                ) from e
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"restart generator: no answer within cluster.call_timeout_s={self.timeout:g}"
                ) from None

    def restore(self, version: int) -> None:
        """Every generator serves the learner's current weights as ``version`` (after a resume
        or a rollback: versions may go back). Waits for generators Ray is restarting."""
        self.settle(raise_errors=False)  # the weights it was pushing are replaced anyway
        start = time.perf_counter()
        gens = self.actors.generators
        for g in gens:
            self._when_back(g)
        served = self.sync.restore(version, gens)
        if set(served) != {version}:
            raise RuntimeError(f"generators serve versions {served} after restoring {version}")
        self._version = version
        if self._pids is not None and self.restarted():  # one died meanwhile
            self.sync.reopen()
            self.faults.count("generator_recoveries", time.perf_counter() - start)

    @property
    def version(self) -> int:
        """The weight version every generator serves (after an update under way, if any)."""
        self.settle()
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        self.settle()
        self._version = version

    def update(self, wait: bool = True) -> dict[str, float]:
        """The learner's weights -> every generator as the next version; returns ``sync/*``.
        A generator that dies on the way is restarted by Ray and given the new weights through
        the object store (:meth:`recover`).

        With ``wait=False`` (the asynchronous loop with partial rollouts) the update runs in a
        thread of the driver and this returns ``{}`` at once: the next generations are
        submitted meanwhile (each starts once its replica serves the new version) and the
        rollout is rewarded and scored; :meth:`settle` (or reading :attr:`version`) waits for
        it, and :meth:`take_sync_metrics` returns its metrics."""
        self.settle()
        if wait:
            return self._update()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="weight-sync")
        self._updating = self._executor.submit(self._update)
        return {}

    def settle(self, raise_errors: bool = True) -> None:
        """Wait for the update :meth:`update` started without waiting, if any (its error,
        unless ``raise_errors`` is off); :meth:`take_sync_metrics` has its metrics."""
        if self._updating is None:
            return
        updating, self._updating = self._updating, None
        try:
            self._unreported = updating.result()
        except Exception:  # noqa: BLE001 - the caller replaces the weights (restore)
            if raise_errors:
                raise

    def take_sync_metrics(self) -> dict[str, float]:
        """The ``sync/*`` metrics of the last update started without waiting, once (after
        :meth:`settle`)."""
        out, self._unreported = self._unreported, {}
        return out

    def _update(self) -> dict[str, float]:
        version = self._version + 1
        start = time.perf_counter()
        self._finish_in_flight()
        try:
            sent = self.sync.push(version)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # A generator that died mid-sync breaks the learner's send too; anything else is a
            # real error.
            if not isinstance(e, ray.exceptions.RayActorError) and not self.restarted():
                raise
            print(
                f"weight sync {version}: {type(e).__name__}; re-syncing the generators",
                flush=True,
            )
            self.recover(version)
            sent = float("nan")
        seconds = time.perf_counter() - start
        self._version = version
        return {
            "sync/bytes": float(sent),
            "sync/seconds": seconds,
            "sync/gbytes_per_s": sent / seconds / 1e9,
        }
