"""Starting the run's actors on Ray: generators, scorer, reference, learner ranks.

Each role is one plain class from ``actors`` / ``reward_service`` wrapped with ``ray.remote``;
the config decides how many of each and what each reserves.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from actors.generator import PolicyGenerator
from actors.learner_actor import LearnerActor
from actors.reference import ReferenceModel
from actors.vllm_engine import EngineSpec
from learner.worker import LearnerSpec, LossSpec, OptimizerSpec
from orchestration.config import RunConfig
from reward_service.scorer import RuleScorer, WeightedReward


@dataclass
class Actors:
    generators: list
    scorer: object
    reference: object
    learners: list

    def all(self) -> list:
        return [*self.generators, self.scorer, self.reference, *self.learners]


def learner_spec(
    cfg: RunConfig, model_path: str, pad_token_id: int, total_steps: int
) -> LearnerSpec:
    """The learner's part of the config."""
    algo, lc = cfg.algorithm, cfg.learner
    spec = algo.spec

    def optim(lr: float) -> OptimizerSpec:
        return OptimizerSpec(
            lr=lr,
            weight_decay=lc.weight_decay,
            warmup_steps=lc.warmup_steps,
            total_steps=total_steps,
            schedule=lc.lr_schedule,
            grad_clip=lc.grad_clip,
        )

    return LearnerSpec(
        model_path=model_path,
        policy_optim=optim(lc.lr),
        critic_optim=optim(lc.critic_lr) if spec.needs_critic else None,
        loss=LossSpec(
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            agg=algo.loss_agg or spec.loss_agg,
            entropy_coef=algo.entropy_coef,
            kl_loss_coef=0.0 if spec.kl_in_reward else algo.kl_coef,
            kl_kind=kl_kind(cfg),
            value_clip=algo.value_clip,
        ),
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        zero_stage=lc.zero_stage,
        temperature=cfg.generator.temperature,
        micro_batch_tokens=lc.micro_batch_tokens,
        ppo_epochs=lc.ppo_epochs,
        num_mini_batches=lc.num_mini_batches,
        pad_token_id=pad_token_id,
        seed=cfg.seed,
    )


def kl_kind(cfg: RunConfig) -> str:
    """The KL estimator: as configured, else k1 in the reward (PPO) and k3 as a loss (GRPO)."""
    if cfg.algorithm.kl_estimator is not None:
        return cfg.algorithm.kl_estimator
    return "k1" if cfg.algorithm.spec.kl_in_reward else "k3"


def _options(cfg: RunConfig, gpus: float, env: dict[str, str] | None = None) -> dict:
    env_vars = {"OMP_NUM_THREADS": str(cfg.cluster.torch_threads), **(env or {})}
    return {
        "num_cpus": cfg.cluster.actor_cpus,
        "num_gpus": gpus,
        "runtime_env": {"env_vars": env_vars},
    }


def start_actors(cfg: RunConfig, model_path: str, pad_token_id: int) -> Actors:
    """Create every actor and wait until all are ready (engines started, process group joined)."""
    timeout = cfg.cluster.call_timeout_s
    gen = cfg.generator
    generators = [
        ray.remote(PolicyGenerator)
        .options(**_options(cfg, cfg.cluster.generator_gpus, {"VLLM_LOGGING_LEVEL": "WARNING"}))
        .remote(
            EngineSpec(
                model_path=model_path,
                dtype=cfg.model.dtype,
                seed=gen.seed + i,
                max_model_len=gen.max_model_len,
                kv_cache_bytes=gen.kv_cache_mib * 2**20,
                tensor_parallel_size=gen.tensor_parallel_size,
                gpu_memory_utilization=gen.gpu_memory_utilization,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        )
        for i in range(gen.num_replicas)
    ]
    scorer = (
        ray.remote(RuleScorer)
        .options(**_options(cfg, 0))
        .remote(
            [WeightedReward(f.name, f.weight) for f in cfg.reward.functions],
            model_path,
            no_eos_penalty=cfg.reward.no_eos_penalty,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    )
    reference = (
        ray.remote(ReferenceModel)
        .options(**_options(cfg, cfg.cluster.reference_gpus))
        .remote(
            model_path,
            temperature=gen.temperature,
            micro_batch_tokens=cfg.learner.micro_batch_tokens,
            pad_token_id=pad_token_id,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    )
    steps = cfg.iterations * cfg.learner.ppo_epochs * cfg.learner.num_mini_batches
    spec = learner_spec(cfg, model_path, pad_token_id, total_steps=steps)
    world = cfg.learner.num_ranks
    learners = [
        ray.remote(LearnerActor)
        .options(
            **_options(cfg, cfg.cluster.learner_gpus, {"DS_ACCELERATOR": _ds_accelerator(cfg)})
        )
        .remote(spec, rank, world)
        for rank in range(world)
    ]
    addr, port = ray.get(learners[0].endpoint.remote(), timeout=timeout)
    ray.get([learner.setup.remote(addr, port) for learner in learners], timeout=timeout)
    ray.get([g.weight_version.remote() for g in generators], timeout=timeout)
    ray.get([scorer.__ray_ready__.remote(), reference.__ray_ready__.remote()], timeout=timeout)
    return Actors(generators=generators, scorer=scorer, reference=reference, learners=learners)


def _ds_accelerator(cfg: RunConfig) -> str:
    return "cuda" if cfg.cluster.learner_gpus > 0 else "cpu"
