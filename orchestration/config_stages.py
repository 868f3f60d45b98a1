"""The config sections of the stages beside RL: supervised fine-tuning, reward-model training,
the PTX term, and the preference and ranking methods (DPO, RRHF, rejection sampling) with
on-policy distillation. ``orchestration.config`` re-exports them with the other sections
(``orchestration.config_sections``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestration.config_sections import Section


class SupervisedConfig(Section):
    """``stage: sft``: supervised fine-tuning on ``data.source`` (``orchestration.sft_data``:
    prompt/response pairs, chat ``messages`` with the loss on assistant turns only, Alpaca
    rows), one optimizer step per iteration on the learner ranks alone."""

    response_key: str = "response"
    """Field holding the response of a prompt/response row (``data.prompt_key`` the prompt)."""
    max_tokens: int = Field(512, ge=2)
    """The longest example (prompt and response); longer ones are handled as ``data.overlong``
    says (a truncated one loses the end of its response)."""
    rows_per_step: int = Field(32, ge=1)
    """Examples per optimizer step, over every rank."""
    held_out: float = Field(0.05, ge=0, lt=1)
    """Share of the examples held out for ``eval/sft_loss`` and ``eval/sft_accuracy``, every
    ``eval.every`` iterations and after the last."""
    packing: Literal["auto", "always", "never"] = "auto"
    """Several examples per sequence (position ids and attention per example): auto packs a
    micro-batch when that needs fewer rows than padding."""


class RewardTrainingConfig(Section):
    """``stage: rm``: a reward model trained on preferences in ``data.source``
    (``orchestration.preferences``: ``{prompt, chosen, rejected}``, rankings under
    ``responses`` or Alpaca ``output``, chat-message pairs), started from ``model.path`` (the
    SFT policy) with a fresh value head; written to ``<run_dir>/reward_model``."""

    max_tokens: int = Field(512, ge=2)
    """The longest prompt + response kept; a group with a longer one is handled as
    ``data.overlong`` says (``truncate`` drops the response)."""
    groups_per_step: int = Field(16, ge=1)
    """Prompt groups per optimizer step, over every rank; every pair of a group trains in the
    same micro-batch."""
    held_out: float = Field(0.1, ge=0, lt=1)
    """Share of the prompt groups held out for ``eval/rm_accuracy`` and ``eval/rm_loss`` and
    the evaluation in ``rm_eval/held_out.json``."""
    margins: dict[str, float] | None = None
    """Llama 2's margin by a row's preference strength (its ``strength`` or ``label`` field),
    e.g. ``{significantly better: 1.0, negligibly better: 0.0}``; a row's own ``margin`` wins."""
    reg: float = Field(0.0, ge=0)
    """ChatGLM-RLHF's L2 regulariser: ``reg x (r_chosen^2 + r_rejected^2)`` per pair."""
    balance_lengths: bool = False
    """ChatGLM-RLHF's length balancing: in each bucket of response-length difference, as many
    pairs where the longer response is chosen as where it is rejected (the surplus dropped)."""
    length_buckets: list[int] = Field(default_factory=lambda: [0, 1, 3, 8])
    """Edges (tokens) of the length-difference buckets: ascending from 0, the last bucket
    open-ended (``[0, 1, 3, 8]``: 0, 1-2, 3-7, 8 or more)."""
    normalize_source: str | None = None
    """Reference (SFT) data, in any format ``stage: sft`` reads: after training, the head's bias
    is shifted so that its responses score 0 on average (the N+ details). None: no shift."""
    equal_quality_source: str | None = None
    """Preference pairs of equal quality that differ in length (chosen: either), evaluated into
    ``rm_eval/equal_quality.json``: ``longer_preferred`` there is the model's length bias."""


class PtxConfig(Section):
    """The supervised term in RL (InstructGPT's PPO-ptx): each iteration ``rows_per_iteration``
    examples of ``source`` (any supervised format, or plain ``text`` rows), their next-token loss
    times ``coef`` added to the policy loss in every micro-batch (``actor/ptx_loss``)."""

    source: str | None = None
    """The supervised or pretraining data; None: no PTX term."""
    coef: float = Field(0.0, ge=0)
    """ptx_coef, the weight of the next-token loss."""
    rows_per_iteration: int = Field(16, ge=1)
    """Examples per iteration, over every rank, spread over the mini-batches."""
    max_tokens: int = Field(512, ge=2)
    """The longest example; longer ones are handled as ``data.overlong`` says."""


class DpoConfig(Section):
    """``stage: dpo``: direct preference optimisation (``learner.preference.DirectPreference``),
    the reference log-probabilities from the frozen reference actor (the starting policy).
    Offline on preference rows in ``data.source`` (the formats ``stage: rm`` reads), or with
    ``online`` on prompts: every iteration the generators sample ``generator.samples_per_prompt``
    responses per prompt, the reward stage scores them, and the best and worst of each prompt
    form its pair (ChatGLM-RLHF's construction; prompts whose samples all score the same are
    left out)."""

    beta: float = Field(0.1, gt=0)
    """beta: the strength of the implicit KL to the reference."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's ``-log sigmoid(beta h)``; ipo: IPO's ``(h - 1/(2 beta))^2`` (``h``: the
    chosen response's log-ratio to the reference minus the rejected one's)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO's epsilon, the assumed share of flipped labels (sigmoid only)."""
    nll_coef: float = Field(0.0, ge=0)
    """RPO: the weight of the chosen response's token-mean negative log-likelihood added to
    each pair's loss (0: plain DPO). Offline pairs the policy did not write tend to lower the
    chosen responses' likelihood along with the rejected ones'; this term holds it up."""
    online: bool = False
    """Sample the pairs from the policy every iteration (``data.source`` holds prompts) instead
    of reading them (``data.source`` holds preference rows)."""
    groups_per_step: int = Field(16, ge=1)
    """Offline: preference groups per optimizer step, over every rank."""
    held_out: float = Field(0.1, ge=0, lt=1)
    """Offline: share of the preference groups held out for ``eval/dpo_*``."""
    max_tokens: int = Field(512, ge=2)
    """Offline: the longest prompt + response kept (as ``rm.max_tokens``)."""
    min_score_gap: float = Field(0.0, ge=0)
    """Online: a prompt's pair is kept only if its best score exceeds its worst by more."""


class RrhfConfig(Section):
    """``stage: rrhf``: RRHF (``learner.preference.RankResponses``). Each iteration, per prompt
    of ``data.source``, candidates from every configured source are scored by the reward stage
    and ranked: the policy's samples (``generator.samples_per_prompt``), the generators' beam
    search (``beam_width`` beams: candidates only, never a policy-gradient sample), and the
    responses stored with the prompt in the dataset (``dataset_responses``: its answer, other
    models' answers). The loss is the rank loss on length-normalised log-probabilities plus
    ``ce_coef`` times the cross-entropy of the best candidate. In the rollout table a prompt's
    rows are its samples, then its beams, then its dataset responses (by ``sample_index``);
    ``rrhf/best_from_beams`` and ``rrhf/best_from_dataset`` are the shares of prompts whose best
    candidate came from each."""

    ce_coef: float = Field(1.0, ge=0)
    """The weight of the best candidate's cross-entropy."""
    beam_width: int = Field(0, ge=0)
    """Beams per prompt from the generators' beam search (0: none)."""
    dataset_responses: list[str] = []
    """Fields of each ``data.source`` row holding candidate responses (a string or a list of
    strings), tokenized as SFT responses; a row without them has none. A response longer than
    ``generator.max_new_tokens`` is left out and counted (``data/candidates_overlong``)."""


class RejectionSamplingConfig(Section):
    """``stage: rs``: rejection-sampling fine-tuning (Llama 2, RAFT): each iteration is a round:
    sample ``generator.samples_per_prompt`` responses per prompt, score them, keep each prompt's
    best (if it scores at least ``threshold``), fine-tune on the kept responses with the SFT
    objective for ``steps`` optimizer steps, and push the weights to the generators. Metrics:
    ``rs/best_of_n`` (the mean best score), ``rs/kept_fraction``."""

    threshold: float | None = None
    """The least score a kept response has (None: keep every prompt's best)."""
    steps: int = Field(1, ge=1)
    """Optimizer steps per round on the kept responses (each over all of them)."""


class DistillConfig(Section):
    """On-policy distillation in ``stage: rl``: the frozen reference slot holds the ``teacher``,
    and each response token of the policy's own samples gets the reward
    ``coef x (log teacher(y_t) - log policy(y_t))``, the negative per-token reverse KL, added to
    the task reward's advantages (``distill/reverse_kl`` is its mean). A teacher equal to the
    policy gives zero signal. The teacher must share the policy's tokenizer."""

    teacher: str | None = None
    """The teacher checkpoint (path or hub name); None: no distillation."""
    coef: float = Field(1.0, gt=0)
    """The weight of the per-token reverse-KL reward."""


class ToolConfig(Section):
    name: str
    """A built-in tool (``calculator``, ``python``) or ``package.module:object``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the tool (``python``: ``timeout_s``, ``memory_mib``)."""


class EpisodesConfig(Section):
    """rl: multi-turn episodes (``actors.episodes``): each sample is an episode in which the
    model's turns alternate with an environment's observations (tool results, a game's
    feedback), one token sequence whose observation tokens stay out of every loss
    (``loss_mask``). Off while ``environment`` is None."""

    environment: str | None = None
    """``tools`` (the model calls ``tools`` by writing ``<name>argument</name>``),
    ``guess_number`` (a game: ``higher`` / ``lower`` after each guess), or
    ``package.module:object``, called with ``params``, giving an ``actors.episodes.Environment``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment (``tools`` takes its tools from ``tools``)."""
    tools: list[ToolConfig] = Field(default_factory=list)
    """``environment: tools``: the tools, each a built-in (``calculator``, ``python``) or
    ``package.module:object`` with its ``params``."""
    max_turns: int = Field(4, ge=1)
    """Model turns per episode; an episode still going after them ends (``max_turns``), with
    ``finish_reason`` ``length``, as one cut at ``max_tokens``: ``reward.no_eos_penalty`` and
    ``reward.overlong`` treat an unfinished episode as an unfinished response. An episode a tool
    or the environment broke (``<tool>:<fault>``) is unscorable: it trains nothing."""
    max_tokens: int = Field(64, ge=1)
    """Response tokens per episode, the model's and the observations' together (each model turn
    also stops at ``generator.max_new_tokens``); ``data.max_prompt_tokens + max_tokens`` must fit
    ``generator.max_model_len``. ``reward.overlong`` counts against it."""
    timeout_s: float = Field(5.0, gt=0)
    """The longest one environment step (a tool call) may take; one that takes longer, raises or
    returns garbage ends its episode (``episode/end/<tool>:<reason>``), never the run."""
    observation_role: str = "tool"
    """The chat template role observations are written as (models without a chat template see
    the observation text as it is)."""
    isolation: Literal["thread", "actor"] = "thread"
    """Where the environment runs. thread: in the generator's process, each call in a thread of
    its own (a call past ``timeout_s`` is abandoned, still running). actor: in a Ray actor of
    its own per generator (no CPU reserved): a call past ``timeout_s`` gets it killed and
    restarted (the episodes it held end ``environment:lost``), and a crash or a memory blow-up
    in user code takes down that process only. The ``python`` tool runs its programs in a
    limited child process either way."""
    reward_weight: float = 1.0
    """Weight of the environment's own rewards (``episode_reward``, summed over the episode) in
    the score, as the ``environment`` component; 0 leaves them out."""

    def spec(self):
        """The generators' ``actors.episodes.EpisodeSpec``, or None when off."""
        from actors.episodes import EpisodeSpec

        if self.environment is None:
            return None
        params = dict(self.params)
        if self.environment == "tools":
            params["tools"] = [t.model_dump() for t in self.tools]
        return EpisodeSpec(
            environment=self.environment,
            params=params,
            max_turns=self.max_turns,
            max_tokens=self.max_tokens,
            timeout_s=self.timeout_s,
            observation_role=self.observation_role,
            isolation=self.isolation,
        )
