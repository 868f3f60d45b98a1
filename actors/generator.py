"""The policy generator: a vLLM engine that turns a prompt table into a rollout table.

A plain class; the driver runs it as a Ray actor (:func:`actor_class`), one per replica. It
serves one weight version at a time and stamps it on every row it generates.

As an actor it runs three lanes, each in order: generation (``generate``, ``beam_search``), the
weights (loads, the sync group, sleep and wake-up) and queries (the version served, the
process). One user has the engine at a time: a weight load waits for a generation to finish,
except a generation asked to continue across updates (partial rollouts, ``Sampling.
continue_across_updates``), which takes the load between two of its engine steps and goes on
with the new weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import replace

import pyarrow as pa
import ray
import torch

from actors.environments import make_environment
from actors.episodes import EpisodeRunner, HostedEnvironment, ObservationFormat
from actors.vllm_engine import EngineSpec, Sampling, VLLMEngine
from learner import weight_sync
from rollout import schema as S
from rollout.build import GeneratedSample, build_rollout_table

SAMPLE_SEED = "sample_seed"  # optional prompt-table column: the prompt's sampling seed
WEIGHTS, QUERIES = "weights", "queries"  # the actor's lanes beside generation (one thread each)
LANES = {WEIGHTS: 1, QUERIES: 1}  # ray.remote(concurrency_groups=...) of a generator class


def actor_class():
    """``PolicyGenerator`` as a Ray actor class with its lanes (see the module docstring)."""
    return ray.remote(concurrency_groups=LANES)(PolicyGenerator)


def _no_update() -> None:
    """A generation that takes no weight update between its steps."""
    return None


class StaleWeightsError(RuntimeError):
    """Asked to generate with weights this generator does not serve (it was restarted)."""


class StaleKernelError(RuntimeError):
    """After a weight load, vLLM computes some modules with other weights than it holds."""


def _check_kernels(version: int, stale: list[str]) -> None:
    if stale:
        raise StaleKernelError(
            f"weight version {version}: after loading, vLLM's modules {stale} still compute "
            "with the previous weights (their kernels keep a copy the reload did not refresh); "
            "the generators would sample from another policy than the learner's. This vLLM "
            "version needs a change in actors/vllm_worker.py"
        )


class _Handoff:
    """A weight load handed to the generation that holds the engine, and its outcome."""

    def __init__(self, load: Callable[[], object]):
        self.load, self.done = load, threading.Event()
        self.value: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.load()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that asked for it
            self.error = e
        finally:
            self.done.set()

    def result(self) -> object:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class PolicyGenerator:
    """Generates with vLLM; ``update_weights`` swaps in a new policy version.

    Args:
        spec: how to start the engine. initial_version: the version of the weights at
            ``spec.model_path`` (0 for a fresh run). engine: a started engine instead (tests).
    """

    def __init__(self, spec: EngineSpec, *, initial_version: int = 0, engine=None):
        self.engine = engine if engine is not None else VLLMEngine(spec)
        self._version = initial_version
        self._engine_lock = threading.Lock()  # one user of the engine at a time
        self._handoff_lock = threading.Lock()  # guards the two below
        self._takes_updates = False  # a generation that continues across updates runs
        self._generating = False  # a generation holds the engine
        self._served = threading.Condition()  # notified when the version served changes
        self._handoff: _Handoff | None = None  # a load waiting for that generation's next step
        self._environments: dict[str, tuple] = {}  # episodes: environment and format per spec
        self._faults_reported: set[str] = set()

    def _serve(self, version: int) -> None:
        with self._served:
            self._version = version
            self._served.notify_all()

    def _wait_for_version(self, version: int, wait_s: float) -> None:
        """Up to ``wait_s`` seconds for a weight update under way to bring ``version``."""
        with self._served:
            self._served.wait_for(lambda: self._version >= version, timeout=wait_s)

    @contextmanager
    def _engine_for_generation(self, takes_updates: bool):
        """The engine, to generate; with ``takes_updates``, weight loads asked for meanwhile
        run between the generation's steps (see :meth:`_exclusive`)."""
        with self._engine_lock:
            with self._handoff_lock:
                self._takes_updates = takes_updates
                self._generating = True
            try:
                yield
            finally:
                with self._handoff_lock:
                    self._takes_updates = self._generating = False
                    late, self._handoff = self._handoff, None
                if late is not None:  # asked for after the generation's last step
                    late.run()

    def _take_update(self) -> Callable[[], int] | None:
        """For the generation between two engine steps: the weight load asked for meanwhile
        (it returns the version then served), or None."""
        with self._handoff_lock:
            handoff, self._handoff = self._handoff, None
        if handoff is None:
            return None

        def load() -> int:
            handoff.run()
            if handoff.error is not None:
                raise RuntimeError(
                    "a weight update failed in the middle of a generation"
                ) from handoff.error
            return self._version

        return load

    def _exclusive(self, load: Callable[[], object]) -> object:
        """Run ``load`` (anything that changes the engine's weights or state) with the engine
        to itself: at once when it is idle, after a generation that runs to its end, or
        between two steps of a generation that continues across updates."""
        while True:
            with self._handoff_lock:
                if self._takes_updates:
                    handoff = self._handoff = _Handoff(load)
                    break
            if self._engine_lock.acquire(timeout=0.005):
                try:
                    return load()
                finally:
                    self._engine_lock.release()
        return handoff.result()

    def generate(
        self,
        prompts: pa.Table,
        sampling: Sampling,
        expected_version: int | None = None,
        wait_s: float = 0.0,
    ) -> pa.Table:
        """``sampling.n`` samples for each row of ``prompts``.

        Args:
            prompts: ``prompt_id`` (int64) and ``prompt_token_ids`` (list<int32>) columns; an
                optional ``sample_seed`` (int64) seeds each prompt's sampling; any other column
                (``label``, ...) is copied onto each of the prompt's samples.
            expected_version: refuse (:class:`StaleWeightsError`) unless serving this version
                (with ``sampling.continue_across_updates``, this one or a newer one); a
                generator Ray restarted serves its initial weights until it is re-synced.
            wait_s: with ``sampling.continue_across_updates``, wait up to this long for an
                update under way to bring ``expected_version`` before refusing.
        Returns:
            A validated rollout table, prompt-major, stamped with the weight version served at
            the start; with ``sampling.continue_across_updates`` also each token's version
            (``token_versions``: an update that arrives meanwhile applies from the next token
            on, ``VLLMEngine.generate_continuing``).
        """
        continuing = sampling.continue_across_updates
        if continuing and expected_version is not None and wait_s > 0:
            self._wait_for_version(expected_version, wait_s)
        ids = S.column_array(prompts, S.PROMPT_TOKEN_IDS).to_pylist()
        seeds = None
        if SAMPLE_SEED in prompts.column_names:
            seeds = S.column_array(prompts, SAMPLE_SEED).to_pylist()
        episodes = self._episodes(prompts, sampling) if sampling.episodes else None
        with self._engine_for_generation(takes_updates=continuing):
            self._check_request(prompts, expected_version, newer_ok=continuing)
            first = self._version
            if continuing or episodes is not None:
                take = self._take_update if continuing else _no_update
                samples = self.engine.generate_continuing(
                    ids, range(len(ids)), sampling, seeds, first, take, episodes
                )
            else:
                samples = self.engine.generate(ids, range(len(ids)), sampling, seeds)
        if episodes is not None:
            self._report_faults(samples)
            if isinstance(episodes.environment, HostedEnvironment):
                episodes.environment.forget()  # its actor keeps no finished episode
        return self._rollout_table(prompts, samples, first)

    def _episodes(self, prompts: pa.Table, sampling: Sampling) -> EpisodeRunner:
        """The environment side of one episode per sample: each is reset from its prompt's
        row (every column but the token ids: ``label``, metadata)."""
        spec = sampling.episodes
        key = repr(spec)
        if key not in self._environments:  # built once per spec, in this process or its own
            if spec.isolation == "actor":
                from actors.environment_host import RemoteEnvironment

                environment = RemoteEnvironment(spec)
            else:
                environment = make_environment(spec)
            self._environments[key] = (
                environment,
                ObservationFormat(self.engine.tokenizer(), spec.observation_role),
            )
        environment, observations = self._environments[key]
        rows = prompts.drop_columns([S.PROMPT_TOKEN_IDS]).to_pylist()
        per_sample = [row for row in rows for _ in range(sampling.n)]
        return EpisodeRunner(environment, spec, observations, per_sample)

    def _report_faults(self, samples: list[GeneratedSample]) -> None:
        """Print each kind of fault (a tool or the environment that raised, hung or returned
        garbage) the first time it ends an episode; the metrics count every one."""
        for sample in samples:
            end = sample.episode.end
            if ":" in end and end not in self._faults_reported:
                self._faults_reported.add(end)
                detail = sample.episode.detail or "no detail"
                print(
                    f"warning: an episode ended with {end} ({detail}); later ones are counted "
                    f"in episode/end/{end} only",
                    flush=True,
                )

    def generate_checked(
        self, prompts: pa.Table, sampling: Sampling, expected_version: int, wait_s: float = 0.0
    ) -> tuple[pa.Table, int]:
        """:meth:`generate` plus the version served, as two return values (call it with
        ``num_returns=2``): the driver waits on the small one to learn whether the call failed
        without pulling the table."""
        return self.generate(prompts, sampling, expected_version, wait_s), self._version

    def beam_search(
        self,
        prompts: pa.Table,
        width: int,
        max_new_tokens: int,
        expected_version: int | None = None,
    ) -> pa.Table:
        """The ``width`` best beams for each row of ``prompts`` (RRHF candidates, not RL).

        Same prompt table, version check and output as :meth:`generate`: a validated rollout
        table of the same schema (no extra column), prompt-major, passthrough columns copied,
        stamped with the served weight version. ``sample_index`` is the beam's rank (0 = the
        highest cumulative log-probability). The rows are **not samples of the policy** and
        nothing in the table says so: keep them out of policy-gradient updates and importance
        ratios; ``rollout_logprobs`` hold the policy's log-probability of each chosen token
        at temperature 1 (see :meth:`actors.vllm_engine.VLLMEngine.beam_search`).
        """
        ids = S.column_array(prompts, S.PROMPT_TOKEN_IDS).to_pylist()
        with self._engine_for_generation(takes_updates=False):
            self._check_request(prompts, expected_version)
            samples = self.engine.beam_search(ids, range(len(ids)), width, max_new_tokens)
            return self._rollout_table(prompts, samples, self._version)

    def beam_search_checked(
        self, prompts: pa.Table, width: int, max_new_tokens: int, expected_version: int
    ) -> tuple[pa.Table, int]:
        """:meth:`beam_search` plus the version served (``num_returns=2``, as
        :meth:`generate_checked`)."""
        return self.beam_search(prompts, width, max_new_tokens, expected_version), self._version

    def _check_request(
        self, prompts: pa.Table, expected_version: int | None, newer_ok: bool = False
    ) -> None:
        if expected_version is None:
            pass
        elif self._version < expected_version or (
            self._version > expected_version and not newer_ok
        ):
            raise StaleWeightsError(
                f"generator serves weight version {self._version}, the driver expects "
                f"{expected_version}"
            )
        for name in (S.PROMPT_ID, S.PROMPT_TOKEN_IDS):
            if name not in prompts.column_names:
                raise ValueError(f"prompt table has no '{name}' column")

    def _rollout_table(
        self, prompts: pa.Table, samples: list[GeneratedSample], version: int
    ) -> pa.Table:
        """``samples`` (``prompt_id`` = row of ``prompts``) as a rollout table with the
        prompts' ids and passthrough columns, stamped with ``version``."""
        rows = pa.array([s.prompt_id for s in samples], pa.int64())  # row of prompts per sample
        prompt_ids = S.column_array(prompts, S.PROMPT_ID).take(rows).to_pylist()
        samples = [replace(s, prompt_id=pid) for s, pid in zip(samples, prompt_ids, strict=True)]
        passthrough = [
            c for c in prompts.column_names if c not in (S.PROMPT_ID, S.PROMPT_TOKEN_IDS)
        ]
        metadata = {c: S.column_array(prompts, c).take(rows) for c in passthrough}
        return build_rollout_table(samples, weight_version=version, metadata=metadata)

    @ray.method(concurrency_group=WEIGHTS)
    def update_weights(
        self,
        version: int,
        weights: Mapping[str, torch.Tensor]
        | Iterable[tuple[str, torch.Tensor]]
        | weight_sync.HostArrays,
        reset: bool = False,
    ) -> int:
        """Serve ``weights`` (full policy state, Hugging Face names; tensors, or the object
        store's arrays, ``weight_sync.to_host_arrays``, read in place) as ``version`` from now on.

        Versions only move forward, except with ``reset`` (a run rolled back to a checkpoint).
        Returns the version now served.
        """
        if isinstance(weights, list) and weights and len(weights[0]) == 3:  # the object store's
            weights = weight_sync.from_host_arrays(weights)
        items = weights.items() if isinstance(weights, Mapping) else weights

        def load() -> int:
            self._check_newer(version, reset)
            _check_kernels(version, self.engine.load_weights(items))
            self._serve(version)
            return version

        return self._exclusive(load)

    @ray.method(concurrency_group=WEIGHTS)
    def open_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float
    ) -> list[int]:
        """Join the learner's weight-sync group (every engine worker); returns their ranks."""
        return self._exclusive(
            lambda: self.engine.open_sync_group(host, port, rank_offset, world_size, timeout_s)
        )

    @ray.method(concurrency_group=WEIGHTS)
    def receive_weights(
        self, version: int, plan: weight_sync.SyncPlan, verify: bool = False
    ) -> tuple[int, list[str | None]]:
        """Take ``version`` from the sync group's broadcast (the learner sends concurrently).
        Returns the version now served and, with ``verify``, each worker's checksum of the
        bytes it received."""

        def load() -> tuple[int, list[str | None]]:
            self._check_newer(version)
            received = self.engine.receive_weights(plan, verify)
            _check_kernels(version, sorted({m for _, stale in received for m in stale}))
            self._serve(version)
            return version, [digest for digest, _ in received]

        return self._exclusive(load)

    @ray.method(concurrency_group=WEIGHTS)
    def receive_ipc(self, version: int, plan: weight_sync.SyncPlan, handles: list) -> int:
        """Take ``version`` from CUDA IPC handles of a learner on the same GPU."""

        def load() -> int:
            self._check_newer(version)
            _check_kernels(version, self.engine.receive_ipc(plan, handles))
            self._serve(version)
            return version

        return self._exclusive(load)

    @ray.method(concurrency_group=WEIGHTS)
    def sleep(self) -> None:
        """Give the GPU to the learner until :meth:`wake_up` (colocation; no-op on CPU)."""
        self._exclusive(self.engine.sleep)

    @ray.method(concurrency_group=WEIGHTS)
    def wake_up(self) -> None:
        self._exclusive(self.engine.wake_up)

    def _check_newer(self, version: int, reset: bool = False) -> None:
        if version <= self._version and not reset:
            raise ValueError(f"weight version {version} is not newer than {self._version}")

    @ray.method(concurrency_group=QUERIES)
    def process_id(self) -> int:
        """This actor's process (a new one after Ray restarts it)."""
        import os

        return os.getpid()

    @ray.method(concurrency_group=QUERIES)
    def generating(self) -> bool:
        """Whether a generation holds the engine now (one asked for meanwhile waits)."""
        return self._generating

    @ray.method(concurrency_group=QUERIES)
    def weight_version(self) -> int:
        """The version of the weights this generator serves."""
        return self._version
