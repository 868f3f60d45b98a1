"""Narrowing: the run config to each component's own spec, in one place.

Components (``learner``, ``actors``, ``reward_service``) never see :class:`RunConfig`; each takes
a small frozen spec of its own, made here. What follows from the estimator (critic or not, KL in
the reward or in the loss, the loss aggregation, whether it needs sample groups) comes from its
``EstimatorSpec``.
"""

from __future__ import annotations

import os

from actors.vllm_engine import EngineSpec, Sampling
from learner.algorithms import AdaptiveKLController, FixedKLController
from learner.engine import LearnerSpec, OptimizerSpec
from learner.objectives import LossSpec, PolicyGradient
from learner.off_policy import OffPolicySpec
from orchestration.config import RunConfig
from orchestration.reward_stage import ENVIRONMENT_COMPONENT
from reward_service.remote import RemoteSpec
from reward_service.scorer import RuleSpec
from reward_service.shaping import SafetyGate, ShapingSpec


def kl_kind(cfg: RunConfig) -> str:
    """The KL estimator: as configured, else k1 in the reward (PPO) and k3 as a loss (GRPO)."""
    if cfg.algorithm.kl_estimator is not None:
        return cfg.algorithm.kl_estimator
    return "k1" if cfg.algorithm.spec.kl_in_reward else "k3"


def kl_controller(cfg: RunConfig):
    """The KL coefficient's controller: adaptive towards ``algorithm.kl_target``, else fixed.
    Its current value weighs the KL wherever the estimator puts it (reward or loss)."""
    algo = cfg.algorithm
    if algo.kl_target is not None:
        return AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
    return FixedKLController(algo.kl_coef)


def on_policy(cfg: RunConfig) -> bool:
    """Whether each update is exactly on-policy, so the learner's scoring pass is skipped (its
    log-probabilities would equal the first forward's): one epoch of one mini-batch, and nothing
    before the train stage needs the learner's log-probabilities (no critic's values, no KL in
    the reward, no adaptive KL controller)."""
    algo, lc = cfg.algorithm, cfg.learner
    return (
        lc.ppo_epochs == 1
        and lc.num_mini_batches == 1
        and not algo.spec.needs_critic
        and not algo.spec.kl_in_reward
        and algo.kl_target is None
        and cfg.distill.teacher is None  # the reverse-KL reward needs the learner's pass
    )


def objective(cfg: RunConfig) -> PolicyGradient:
    """The learner's objective for the configured estimator."""
    algo, spec = cfg.algorithm, cfg.algorithm.spec
    return PolicyGradient(
        loss=LossSpec(
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            agg=algo.loss_agg or spec.loss_agg,
            entropy_coef=algo.entropy_coef,
            kl_loss_coef=0.0 if spec.kl_in_reward else algo.kl_coef,
            kl_kind=kl_kind(cfg),
            value_clip=algo.value_clip,
            off_policy=OffPolicySpec(**algo.off_policy.model_dump()),
        ),
        temperature=cfg.generator.temperature,
        critic=spec.needs_critic,
        on_policy=on_policy(cfg),
        logits_chunk_bytes=cfg.learner.logits_chunk_mib << 20,
    )


def stage_objective(cfg: RunConfig):
    """The objective of a stage beside RL: next-token prediction (sft, and rs on the kept
    responses), pairwise ranking (rm), DPO (dpo) or RRHF (rrhf)."""
    from learner.preference import DirectPreference, RankResponses
    from learner.supervised import NextToken, PairwiseRanking

    chunk = cfg.learner.logits_chunk_mib << 20
    if cfg.stage == "sft":
        return NextToken(packing=cfg.sft.packing, logits_chunk_bytes=chunk)
    if cfg.stage == "rs":
        return NextToken(prefix="rs/sft_", logits_chunk_bytes=chunk)
    if cfg.stage == "dpo":
        d = cfg.dpo
        return DirectPreference(
            beta=d.beta,
            loss_type=d.loss,
            label_smoothing=d.label_smoothing,
            nll_coef=d.nll_coef,
            logits_chunk_bytes=chunk,
        )
    if cfg.stage == "rrhf":
        return RankResponses(ce_coef=cfg.rrhf.ce_coef, logits_chunk_bytes=chunk)
    return PairwiseRanking(reg=cfg.rm.reg)


def learner_spec(
    cfg: RunConfig, model_path: str, pad_token_id: int, total_steps: int | None = None
) -> LearnerSpec:
    """The learner's part of the config (``total_steps``: optimizer steps of the whole run, for
    the LR schedule; default from the config)."""
    lc = cfg.learner
    if total_steps is None:
        steps = cfg.rs.steps if cfg.stage == "rs" else lc.ppo_epochs
        total_steps = cfg.iterations * steps * lc.num_mini_batches
    goal = objective(cfg) if cfg.stage == "rl" else stage_objective(cfg)
    ptx = None
    if cfg.stage == "rl" and cfg.ptx.coef > 0:
        from learner.supervised import NextToken

        ptx = NextToken(prefix="actor/ptx_", logits_chunk_bytes=lc.logits_chunk_mib << 20)

    def optim(lr: float) -> OptimizerSpec:
        return OptimizerSpec(
            lr=lr,
            weight_decay=lc.weight_decay,
            eps=lc.adam_eps,
            warmup_steps=lc.warmup_steps,
            total_steps=total_steps,
            schedule=lc.lr_schedule,
            grad_clip=lc.grad_clip,
        )

    return LearnerSpec(
        model_path=model_path,
        policy_optim=optim(lc.lr),
        objective=goal,
        ptx=ptx,
        ptx_coef=cfg.ptx.coef if ptx is not None else 0.0,
        critic_optim=optim(lc.critic_lr) if "critic" in goal.models else None,
        critic_path=lc.critic_init,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        zero_stage=lc.zero_stage,
        micro_batch_tokens=lc.micro_batch_tokens,
        ppo_epochs=cfg.rs.steps if cfg.stage == "rs" else lc.ppo_epochs,
        num_mini_batches=lc.num_mini_batches,
        pad_token_id=pad_token_id,
        seed=cfg.seed,
        collective_timeout_s=cfg.cluster.call_timeout_s,
    )


def engine_spec(cfg: RunConfig, model_path: str, replica: int) -> EngineSpec:
    """Generator replica ``replica``'s vLLM engine."""
    gen = cfg.generator
    return EngineSpec(
        model_path=model_path,
        dtype=cfg.model.dtype,
        seed=gen.seed + replica,
        max_model_len=gen.max_model_len,
        kv_cache_bytes=gen.kv_cache_mib * 2**20,
        tensor_parallel_size=gen.tensor_parallel_size,
        gpu_memory_utilization=gen.gpu_memory_utilization,
        trust_remote_code=cfg.model.trust_remote_code,
        enable_sleep_mode=cfg.cluster.colocate == "all" and cfg.cluster.generator.num_gpus > 0,
    )


def sampling(cfg: RunConfig) -> Sampling:
    """How training rollouts sample."""
    gen = cfg.generator
    return Sampling(
        n=gen.samples_per_prompt,
        temperature=gen.temperature,
        max_new_tokens=gen.max_new_tokens,
        ignore_eos=gen.ignore_eos,
        continue_across_updates=bool(cfg.max_staleness) and cfg.partial_rollouts == "continue",
        episodes=cfg.episodes.spec(),
    )


def eval_sampling(cfg: RunConfig) -> Sampling:
    """How evaluation samples (its own seed: the same every evaluation)."""
    ev = cfg.eval
    return Sampling(
        n=ev.samples,
        temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens or cfg.generator.max_new_tokens,
        seed=cfg.seed,
        episodes=cfg.episodes.spec(),
    )


def reference_kwargs(cfg: RunConfig, model_path: str, pad_token_id: int) -> dict:
    """The frozen reference model's arguments; it batches by ``learner.micro_batch_tokens``.
    With ``distill.teacher`` it is the teacher; for DPO it scores at temperature 1 (the
    objective's log-probabilities are the model's own)."""
    return {
        "model_path": cfg.distill.teacher or model_path,
        "temperature": 1.0 if cfg.stage == "dpo" else cfg.generator.temperature,
        "micro_batch_tokens": cfg.learner.micro_batch_tokens,
        "logits_chunk_bytes": cfg.learner.logits_chunk_mib << 20,
        "pad_token_id": pad_token_id,
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
    }


# Labels travel in the prompt table's "label" column whatever the dataset calls its field
# (data.label_key names the field only when the dataset is read).
LABEL_COLUMN = "label"


def rule_specs(cfg: RunConfig) -> list[RuleSpec]:
    """The rule functions of the score, then the monitors."""
    rw = cfg.reward
    return [RuleSpec(f.name, f.params, f.column) for f in [*rw.functions, *rw.monitors]]


def rule_scorer_args(cfg: RunConfig, model_path: str) -> tuple[tuple, dict]:
    """``RuleScorer``'s arguments: every rule function, each call bounded in time."""
    kwargs = {
        "label_column": LABEL_COLUMN,
        "trust_remote_code": cfg.model.trust_remote_code,
        "timeout_s": cfg.reward.function_timeout_s,
    }
    return (rule_specs(cfg), model_path), kwargs


def reward_model_args(cfg: RunConfig, m, built: dict[str, str], model_path: str):
    """``RewardModelScorer``'s arguments for reward model ``m`` (``built``: where a
    ``builtin:`` one was trained)."""
    kwargs = {
        "dtype": cfg.model.dtype,
        "micro_batch_tokens": m.micro_batch_tokens,
        "padding_side": m.padding_side,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    return (m.name, built.get(m.name, m.path), model_path), kwargs


def remote_scorer_args(cfg: RunConfig, r, model_path: str) -> tuple[tuple, dict]:
    """``RemoteScorer``'s arguments for remote service ``r``. Its bearer token is read from
    ``token_env`` here and goes to the actor as an argument, never in its runtime env (the
    dashboard shows those)."""
    fields = r.model_dump(exclude={"weight"})  # the config section is the spec plus weight
    spec = RemoteSpec(**fields | {"allowed_hosts": tuple(r.allowed_hosts)})
    token = os.environ.get(r.token_env) if r.token_env else None
    kwargs = {
        "token": token,
        "label_column": LABEL_COLUMN,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    return (spec, model_path), kwargs


def shaping_spec(cfg: RunConfig) -> ShapingSpec:
    """How components become one score: weights, gate, baselines, normalisation, penalties,
    whitening."""
    rw = cfg.reward
    gate = rw.safety_gate
    weights = rw.weights
    if cfg.episodes.environment is not None and cfg.episodes.reward_weight:
        weights = weights | {ENVIRONMENT_COMPONENT: cfg.episodes.reward_weight}
    return ShapingSpec(
        weights=weights,
        gate=SafetyGate(gate.component, gate.threshold) if gate else None,
        reference_baseline=rw.reference_baseline,
        normalize=rw.normalize,
        clip=rw.clip,
        no_eos_penalty=rw.no_eos_penalty,
        overlong_buffer=rw.overlong.buffer_tokens if rw.overlong else None,
        overlong_penalty=rw.overlong.penalty if rw.overlong else 1.0,
        max_new_tokens=cfg.episodes.max_tokens
        if cfg.episodes.environment is not None
        else cfg.generator.max_new_tokens,
        whiten=rw.whiten,
    )


def advantage_spec(cfg: RunConfig, pad_token_id: int):
    """The advantages stage's part of the config."""
    from orchestration.advantages import AdvantageSpec

    algo = cfg.algorithm
    return AdvantageSpec(
        estimator=algo.estimator.value,
        kl_in_reward=algo.spec.kl_in_reward,
        needs_critic=algo.spec.needs_critic,
        kl_kind=kl_kind(cfg),
        gamma=algo.gamma,
        lam=algo.lam,
        whiten=algo.whiten_advantages,
        pad_token_id=pad_token_id,
        distill_coef=cfg.distill.coef if cfg.distill.teacher is not None else 0.0,
        max_staleness=cfg.max_staleness,
    )
