"""The sections of the run configuration: one pydantic model per concern, every field documented.

Each field's docstring is its documentation (``python -m orchestration.config_doc``, ``--help``).
Rules that span fields live in ``orchestration.config_rules``; the root ``RunConfig``, loading
and overrides in ``orchestration.config``, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.estimators import ESTIMATOR_SPECS, AdvantageEstimator, AggMode, EstimatorSpec
from orchestration.config_rules import BUILTIN_MODEL, component_problems, raise_problems


class Section(BaseModel):
    """A config section: unknown keys are refused, values frozen, field docstrings kept."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    path: str = BUILTIN_MODEL
    """Policy checkpoint: a local Hugging Face directory, a hub name (``org/name``), or
    ``builtin:tiny`` to build the demo's tiny model and tokenizer in the run directory."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights dtype for generator, reference and learner (float32 on CPU)."""
    trust_remote_code: bool = False
    """Run Python shipped inside the checkpoint. Off: turn on only for checkpoints you trust."""


class DataConfig(Section):
    source: str = "builtin:addition"
    """Prompts: ``builtin:addition``, a .jsonl / .parquet / .arrow file, or a directory saved by
    the ``datasets`` library. A row holds a prompt (``prompt_key``), chat ``messages``, or an
    Alpaca ``instruction`` (+ ``input``, ``history``); see ``orchestration.data``."""
    split: str = "train"
    """The split to read from a ``datasets`` directory holding several."""
    prompt_key: str = "prompt"
    """Field holding the prompt (a string, or a list of chat messages)."""
    label_key: str = "label"
    """Field holding the label the reward functions check against (optional per row)."""
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per iteration; each gets ``generator.samples_per_prompt`` samples."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Longest prompt; what happens to a longer one is ``overlong``."""
    overlong: Literal["skip", "truncate", "error"] = "skip"
    """A prompt over ``max_prompt_tokens``: skipped and counted, truncated to its last
    ``max_prompt_tokens`` tokens and counted, or an error naming its row."""
    strict: bool = False
    """A malformed row stops the run (with its file and line) instead of being skipped and
    counted."""
    shuffle: bool = True
    """Draw prompts in a new seeded order each epoch; off: file order."""
    addition_max_operand: int = Field(9, ge=1, le=999)
    """builtin:addition: operands run from 0 to this value."""
    seed: int = 0
    """Seed of the prompt order (the order of epoch e depends only on seed and e)."""


class GeneratorConfig(Section):
    num_replicas: int = Field(1, ge=1)
    """vLLM engines; prompts are dispatched to them as they become free."""
    samples_per_prompt: int = Field(8, ge=1)
    """Samples per prompt (the group size for GRPO / RLOO)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner and reference divide logits by the same value."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest response sampled, in tokens."""
    ignore_eos: bool = False
    """Keep sampling past EOS, so every training response is exactly ``max_new_tokens`` long
    (for benchmarks at fixed shapes; a real run leaves it off). Evaluation is not affected."""
    max_model_len: int = Field(512, ge=8)
    """Longest prompt + response the engine accepts."""
    kv_cache_mib: int = Field(256, ge=16)
    """KV cache size on CPU (on GPU, ``gpu_memory_utilization`` sizes it)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95)
    """Fraction of the GPU's memory vLLM takes for weights and KV cache (GPU only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor-parallel workers per replica (GPU only; one GPU bundle each)."""
    chunks_per_replica: int = Field(2, ge=1)
    """With several replicas, prompts go out in ``num_replicas x chunks_per_replica`` chunks,
    each to whichever replica is free."""
    seed: int = 0
    """Sampling seed; replica i uses seed + i."""
    max_logprob_mismatch: float | None = Field(None, gt=0)
    """Mean ``|rollout_logprobs - old_logprobs|`` over response tokens (the metric
    ``rollout/logprob_mismatch``) above which an iteration warns that the generators sample
    from another policy than the learner's. None: 1e-3 for ``model.dtype=float32``, 0.1 for
    bfloat16 (same weights measure about 6e-6 and 4.5e-2 on SmolLM2-135M on CPU)."""
    max_mismatch_in_a_row: int = Field(3, ge=1)
    """Iterations in a row above ``max_logprob_mismatch`` before the run stops (exit code 4),
    with a checkpoint of the learner's state."""


class OffPolicyConfig(Section):
    """The behaviour correction (``learner.off_policy``): each token's policy loss weighed by
    ``w = pi_old / mu``, the learner's recomputed log-probability over vLLM's
    (``rollout_logprobs``), truncated at ``cap``; ratios outside ``[1/band, band]`` masked. The
    PPO ratio and clip stay around ``pi_old``, so with samples older than the weights being
    trained this is the decoupled PPO objective; in synchronous training it corrects the
    numerical gap between vLLM and the learner (large in bf16). Metrics: ``off_policy/*``."""

    weight: Literal["none", "token", "sequence"] = "none"
    """Per-token truncated importance weights (TIS), one weight per sample (the product of its
    token ratios, truncated), or none."""
    cap: float = Field(2.0, gt=0)
    """The most a weight can be (TIS's C)."""
    mask: Literal["none", "token", "sequence"] = "none"
    """Leave out (weight 0) the tokens, or the whole samples by the geometric mean of their
    token ratios, whose ratio leaves ``[1/band, band]``."""
    band: float = Field(2.0, gt=1)
    """The mask's band."""


class AlgorithmConfig(Section):
    estimator: AdvantageEstimator = AdvantageEstimator.GRPO
    """gae (PPO with a critic), grpo, dr_grpo, rloo or reinforce_pp."""
    kl_coef: float = Field(0.001, ge=0)
    """Weight of the KL to the reference: in the reward (gae, reinforce_pp) or the loss."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """KL estimator; default k3 when the KL is a loss term, k1 when it is in the reward."""
    kl_target: float | None = Field(None, gt=0)
    """With a target, the KL coefficient adapts (InstructGPT controller); else it is fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """With ``kl_target``: the adaptive controller's horizon, in samples."""
    gamma: float = Field(1.0, ge=0, le=1)
    """gae: discount factor over response tokens."""
    lam: float = Field(0.95, ge=0, le=1)
    """gae: GAE lambda."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip below 1: the ratio is clipped to ``1 - clip_low``."""
    clip_high: float = Field(0.2, gt=0)
    """PPO ratio clip above 1 (larger than ``clip_low``: DAPO's clip-higher)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip PPO: for negative advantages the loss is bounded at ``dual_clip x |A|``;
    None: off."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus in the policy loss; 0: off."""
    value_clip: float | None = Field(0.2, gt=0)
    """gae: clip the critic's new values to within this of the old ones; None: unclipped."""
    loss_agg: AggMode | None = None
    """Loss aggregation; default is the estimator's own (see learner.estimators)."""
    whiten_advantages: bool = True
    """gae: whiten advantages over the batch."""
    off_policy: OffPolicyConfig = OffPolicyConfig()
    """Importance correction between the policy that sampled and the learner's."""

    @property
    def spec(self) -> EstimatorSpec:
        """The estimator's setup choices: critic, KL placement, loss aggregation, groups."""
        return ESTIMATOR_SPECS[self.estimator]


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """Data-parallel DeepSpeed ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (0: none; 3: shard parameters, gradients and optimizer state)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each iteration's samples."""
    num_mini_batches: int = Field(1, ge=1)
    """Optimizer steps per epoch; the iteration's samples are split evenly into them."""
    micro_batch_tokens: int = Field(4096, ge=16)
    """Most prompt + response tokens in one forward/backward pass, unpadded and summed over the
    rows of the micro-batch (a longer row gets one to itself). The reference model batches its
    forward passes by the same value."""
    logits_chunk_mib: int = Field(256, ge=1)
    """Most memory the full-vocabulary float32 logits of one pass take at once, learner and
    reference alike: the output head runs only on response positions, in chunks of this size
    (recomputed in backward when there is more than one), so memory stays bounded as responses
    grow."""
    lr: float = Field(1e-6, gt=0)
    """Policy learning rate (AdamW)."""
    critic_lr: float = Field(1e-5, gt=0)
    """gae: critic learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear learning-rate warm-up."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: constant, or cosine or linear decay to 0 at the run's last optimizer step
    (linear: the N+ implementation details of RLHF with PPO, arXiv 2403.17031)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW's epsilon, policy and critic (the N+ implementation details use 1e-5: a larger
    epsilon damps the update of parameters whose gradients have been tiny)."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the gradient's global norm to this."""
    critic_init: str | None = None
    """gae: initialise the critic from this reward model (a local directory: a causal LM with
    ``value_head.safetensors``, a one-label ``*ForSequenceClassification`` checkpoint, or a
    plain causal LM, whose value head is then fresh); its vocabulary must be the policy's.
    None: the policy's checkpoint with a fresh value head."""
    max_skipped_in_a_row: int = Field(8, ge=1)
    """Updates dropped in a row for a non-finite loss or gradient norm before the run stops
    (with a checkpoint of the last good state); single ones are skipped and counted."""


class RoleResources(Section):
    """What one actor of a role reserves in Ray's scheduler, and how the role's actors spread."""

    num_cpus: float = Field(0.25, gt=0)
    """CPUs per actor reserved in Ray's scheduler."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per actor (per tensor-parallel worker for generators); a fraction shares a GPU."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, e.g. ``{learner_node: 1}`` to pin a role to nodes that
    advertise that resource."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy for the role's bundles (PACK: as few nodes as possible)."""


class RewardFunctionConfig(Section):
    name: str
    """A built-in reward function (see ``reward_service.rules.REWARD_FUNCTIONS``) or
    ``package.module:function``."""
    weight: float = 1.0
    """Weight of this component in the score."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the function, e.g. ``{pattern: '^\\d+$'}`` for regex_match."""
    column: str | None = None
    """Component name (``reward/<column>``); default: the function's name."""

    @property
    def key(self) -> str:
        return self.column or self.name


class RewardModelConfig(Section):
    """A frozen reward model, run as its own Ray actor (resources: ``cluster.reward``)."""

    name: str
    """Component name: its scores are the ``reward/<name>`` column and metrics."""
    path: str
    """A ``*ForSequenceClassification`` checkpoint with one label, a causal LM with
    ``value_head.safetensors``, or ``builtin:addition-rm`` (the demo's, trained at start by
    ``orchestration.train_rm`` on preference pairs built from the task)."""
    weight: float = 1.0
    """Weight of this component in the score."""
    micro_batch_tokens: int = Field(4096, ge=16)
    """Most prompt + response tokens in one scoring forward pass, counted as
    ``learner.micro_batch_tokens`` counts them: unpadded, summed over the rows (in this model's
    tokens)."""
    padding_side: Literal["left", "right"] = "right"
    """Scores do not depend on it; left padding can be faster for some attention kernels."""
    resources: RoleResources | None = None
    """What this model's actor reserves (e.g. ``{num_gpus: 1}``); None: ``cluster.reward``."""


class RemoteRewardConfig(Section):
    """A reward server run elsewhere (``python -m reward_service.server`` speaks its protocol)."""

    name: str
    """Component name: its scores are the ``reward/<name>`` column and metrics."""
    url: str
    """The one URL called (http or https); redirects are never followed."""
    weight: float = 1.0
    """Weight of this component in the score."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts the URL may name; empty: the URL's own host. Guards against a typo'd or edited URL
    sending prompts to an unexpected place."""
    token_env: str | None = "RAYLIGN_REWARD_TOKEN"
    """Environment variable holding the bearer token (the token never goes in the config)."""
    connect_timeout_s: float = Field(3.0, gt=0)
    """Seconds to wait for the TCP/TLS connection."""
    read_timeout_s: float = Field(30.0, gt=0)
    """Seconds to wait for the whole response."""
    max_retries: int = Field(2, ge=0, le=10)
    """Extra attempts after a connection error, timeout, 429 or 5xx, with exponential backoff."""
    backoff_s: float = Field(0.5, ge=0)
    """First retry's wait (plus jitter), doubling with each retry."""
    batch_size: int = Field(64, ge=1, le=4096)
    """Samples per request (the server takes at most 4096)."""


class SafetyGateConfig(Section):
    """Llama 2's gate: where ``component`` scores below ``threshold``, the score is that
    component's score instead of the weighted sum."""

    component: str
    """The reward component that gates (e.g. a safety reward model's name)."""
    threshold: float
    """Below this score of ``component``, the score is that component's score."""


class OverlongConfig(Section):
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - buffer_tokens`` tokens, then
    falling linearly to ``-penalty`` at ``generator.max_new_tokens``."""

    buffer_tokens: int = Field(ge=1)
    """Length of the penalty ramp before ``generator.max_new_tokens``, in tokens."""
    penalty: float = Field(1.0, ge=0)
    """Penalty at ``generator.max_new_tokens``."""


class DynamicSamplingConfig(Section):
    """DAPO's dynamic sampling: drop groups whose scores all have spread <= ``min_std`` and
    generate more prompts until ``data.prompts_per_iteration`` groups are kept."""

    enabled: bool = False
    """Drop groups whose scores do not vary and sample more prompts."""
    min_std: float = Field(0.0, ge=0)
    """A group is dropped when its scores' spread is at most this."""
    max_rounds: int = Field(4, ge=1)
    """Generation rounds per iteration at most; if the batch is still short after them, it is
    filled with dropped groups (counted in ``rollout/groups_refilled_with_dropped``)."""


class RewardConfig(Section):
    functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [RewardFunctionConfig(name="exact_integer")]
    )
    """Rule reward functions (verifiers) in the score."""
    models: list[RewardModelConfig] = Field(default_factory=list)
    """Reward models in the score (several: Llama 2's helpfulness plus safety)."""
    remote: list[RemoteRewardConfig] = Field(default_factory=list)
    """Remote reward services in the score."""
    monitors: list[RewardFunctionConfig] = Field(default_factory=list)
    """Rule functions computed and logged (``reward/<name>/mean``) but not in the score: e.g.
    the task's verifier while a reward model drives the run."""
    safety_gate: SafetyGateConfig | None = None
    reference_baseline: bool = False
    """ChatGLM-RLHF: before training, score one response of the reference policy per dataset
    prompt (``reference_baseline_samples`` of them, averaged) and subtract it from every score of
    that prompt."""
    reference_baseline_samples: int = Field(1, ge=1)
    """Reference responses per prompt averaged into the baseline."""
    normalize: bool = False
    """Running normalisation: ``(score - mean) / std`` over every score so far."""
    clip: float | None = Field(None, gt=0)
    """Clip the score to ``[-clip, clip]`` (after normalisation)."""
    no_eos_penalty: float | None = None
    """EOS trick: a response that hits ``generator.max_new_tokens`` without stopping scores
    this, whatever the components say. None: off."""
    overlong: OverlongConfig | None = None
    whiten: bool = False
    """Reward whitening (the N+ implementation details of RLHF with PPO, arXiv 2403.17031), the
    last shaping step: over each scored batch's scorable scores, ``(r - mean) / std + mean``,
    so the batch keeps its mean and its spread becomes 1 (``reward/whiten_std``: the std
    divided by). A batch with fewer than 2 scorable scores or no spread is left as it is. With
    ``dynamic_sampling``, each generation round is a batch."""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    function_timeout_s: float = Field(10.0, gt=0)
    """Longest one call of a rule function (``functions``, ``monitors``) may take. Rule functions
    run in a child process of the reward actor; a call that takes longer is killed, its sample
    is unscorable and counted in ``reward/errors/<name>``. After 3 timeouts in a row the
    function's other samples of that batch are not tried."""
    max_unscorable_in_a_row: int = Field(3, ge=1)
    """Iterations in a row in which no sample could be scored before the run stops (exit code
    5, with a checkpoint), naming each reward function's first error."""

    @property
    def weights(self) -> dict[str, float]:
        """Component name -> weight in the score."""
        out = {f.key: f.weight for f in self.functions}
        out |= {m.name: m.weight for m in self.models}
        return out | {r.name: r.weight for r in self.remote}

    @model_validator(mode="after")
    def _components(self) -> RewardConfig:
        raise_problems(component_problems(self))
        return self


class ClusterConfig(Section):
    address: str | None = None
    """Ray cluster to join; None: ``RAY_ADDRESS`` if set (as under ``ray job submit``), else an
    embedded local Ray."""
    generator: RoleResources = RoleResources()
    """Per generator worker (a replica has ``generator.tensor_parallel_size`` of them)."""
    learner: RoleResources = RoleResources()
    """Per learner rank."""
    reference: RoleResources = RoleResources()
    reward: RoleResources = RoleResources()
    colocate: Literal["none", "learner_reference", "all"] = "none"
    """none: a placement group per role. learner_reference: the reference shares learner rank
    0's bundle. all: generator worker i, learner rank i (and the reference on 0) share bundle i,
    and on GPU the generators sleep while the learner trains; needs
    ``generator.num_replicas x generator.tensor_parallel_size == learner.num_ranks``."""
    torch_threads: int = Field(2, ge=1)
    """Torch threads in each actor (stages run one at a time in synchronous mode)."""
    call_timeout_s: float = Field(1800, gt=0)
    """Longest wait for any remote call before the run fails."""
    placement_timeout_s: float = Field(300, gt=0)
    """Longest wait for the placement groups' resources before the run fails."""
    max_actor_restarts: int = Field(3, ge=0)
    """Times Ray restarts each generator, reward or reference actor that dies (its in-flight
    work is re-issued; a generator is re-synced to the current weights before it serves)."""
    max_failures: int = Field(3, ge=0)
    """Times the learner group is rebuilt after a rank dies, each time resuming from the last
    committed checkpoint; one more failure stops the run."""


class WeightSyncConfig(Section):
    method: Literal["collective", "object_store", "cuda_ipc"] = "collective"
    """collective: learner rank 0 broadcasts buckets to every generator worker over a
    torch.distributed group (gloo on CPU, NCCL on GPU). object_store: the state dict travels
    through Ray's object store (the fallback). cuda_ipc: generators on the learner's GPUs map its
    buffers (needs ``cluster.colocate=all`` on GPU)."""
    bucket_mib: float = Field(64, gt=0)
    """Largest bucket of the collective path, in MiB (a larger tensor gets its own bucket)."""
    verify_checksum: bool = False
    """Check every sync twice: every generator worker received bit-identical bytes (collective
    path: BLAKE2b of every bucket, sender against receivers), and every replica computes with
    them (its log-probabilities on a probe prompt against the learner's, within
    ``generator.max_logprob_mismatch``; this covers what the engine derives from the weights,
    such as a tied output head). Costs one short generation and learner forward per replica."""


class WandbConfig(Section):
    """Weights & Biases logging (needs ``pip install wandb`` and a login, or mode offline)."""

    enabled: bool = False
    """Log metrics to Weights & Biases."""
    project: str = "raylign"
    """W&B project."""
    entity: str | None = None
    """Team or user; None: your default entity."""
    mode: Literal["online", "offline"] = "online"
    """offline: write the run under the run directory, ``wandb sync`` it later."""
    tags: list[str] = []
    """W&B run tags."""


class LoggingConfig(Section):
    root: str = "runs"
    """Directory under which each run gets its own directory."""
    name: str | None = None
    """Run directory name; default ``<preset>-<timestamp>``."""
    progress_bar: bool = True
    """A progress bar over the iterations on stderr when it is a terminal (off under ``ray job
    submit``: one line per iteration is printed either way)."""
    quiet: bool = True
    """Keep the known-benign start-up and sync notes of vLLM, DeepSpeed, torch and Ray off the
    console; every actor's whole output is in ``<run_dir>/logs/<role>.log`` either way, and real
    warnings and errors show. Off: everything on the console as the libraries print it."""
    ray_metrics: bool = True
    """Export every metric as a Ray gauge (``ray_raylign_<name>``) to Ray's Prometheus endpoint
    and the dashboard's metrics view."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run_dir>/tensorboard``."""
    wandb: WandbConfig = WandbConfig()
    rollouts_every: int = Field(10, ge=0)
    """Write the rollout table to ``rollouts/iter_<k>.parquet`` on the first and last iteration
    and every this many; 0: never."""
    report: bool = True
    """Write ``report.html`` (plots and sample responses) at the end of the run."""


class EvalConfig(Section):
    """Evaluation on a held-out prompt set with its own sampling, scored by the run's rule
    functions (``reward.functions`` and ``reward.monitors``), without reward shaping."""

    source: str | None = None
    """Eval prompts, in any format ``data.source`` takes; None: no evaluation."""
    split: str = "test"
    """The split to read from a ``datasets`` directory holding several."""
    prompt_key: str = "prompt"
    """Field holding the prompt in the eval set."""
    label_key: str = "label"
    """Field holding the label in the eval set."""
    every: int = Field(10, ge=1)
    """Evaluate before iterations 0, every, 2 x every, ... and after the last one."""
    max_prompts: int | None = Field(None, ge=1)
    """Evaluate on the first this many prompts only."""
    samples: int = Field(1, ge=1)
    """Samples per prompt; with more than one, ``eval/pass@k`` for k = 1, 2, 4, ... up to it."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding."""
    max_new_tokens: int | None = Field(None, ge=1)
    """None: ``generator.max_new_tokens``."""
    correct_component: str | None = None
    """The rule component whose score decides a correct sample (pass@k); None: the first of
    ``reward.functions`` and ``reward.monitors``."""
    correct_threshold: float = 1.0
    """A sample is correct when that component scores at least this."""


class ExportConfig(Section):
    """The policy as a Hugging Face directory (safetensors, config, tokenizer, generation
    config), loadable by transformers and vLLM. The final one is always ``<run_dir>/policy``."""

    every: int = Field(0, ge=0)
    """Also export to ``exports/iter_<k>`` after every this many iterations; 0: only at the
    end."""
    keep: int | None = Field(3, ge=1)
    """Periodic exports kept (the oldest removed first); None: all."""


class CheckpointConfig(Section):
    """Run checkpoints in ``<run_dir>/checkpoints/iter_<k>``: learner engines (weights,
    optimizer, scheduler), RNGs, data position, KL controller, reward statistics, weight
    version and config, committed by a marker written last."""

    every: int = Field(10, ge=0)
    """Checkpoint after every this many iterations (and always after the last one, and when a
    run stops on numerical faults); 0: only then."""
    keep: int = Field(2, ge=1)
    """Committed checkpoints kept (the oldest removed first)."""
