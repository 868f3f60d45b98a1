"""Starting the run's actors on Ray: generators, reward scorers, reference, learner ranks.

Each role is one plain class from ``actors`` / ``reward_service`` wrapped with ``ray.remote``;
the config decides how many of each, what each reserves, and which placement-group bundle it
runs in (``orchestration.resources`` makes that plan; :func:`reserve` gets it from Ray).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import ray

from actors.generator import PolicyGenerator
from actors.learner_actor import LearnerActor
from actors.reference import ReferenceModel
from actors.vllm_engine import EngineSpec
from learner.weight_sync import SyncPlan
from learner.worker import LearnerSpec, LossSpec, OptimizerSpec
from orchestration import calls
from orchestration.config import RunConfig
from orchestration.resources import PlacementPlan, Slot, check_fit, plan_placement
from reward_service.remote import RemoteSpec
from reward_service.reward_model import RewardModelScorer
from reward_service.scorer import RemoteScorer, RuleScorer, RuleSpec


@dataclass
class Actors:
    generators: list
    scorers: list  # reward actors: the rule scorer, each reward model, each remote service
    reference: object
    learners: list
    placement_groups: dict = field(default_factory=dict)
    sync_plan: SyncPlan | None = None  # bucket layout of the learner's weights
    plan: PlacementPlan | None = None  # which bundle each actor has

    def all(self) -> list:
        return [*self.generators, *self.scorers, self.reference, *self.learners]

    def release(self) -> None:
        """Kill every actor and remove the placement groups, leaving the Ray session to the
        next run (a run that ends shuts Ray down instead)."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.all():
            ray.kill(actor, no_restart=True)
        for group in self.placement_groups.values():
            remove_placement_group(group)


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
        collective_timeout_s=cfg.cluster.call_timeout_s,
    )


def kl_kind(cfg: RunConfig) -> str:
    """The KL estimator: as configured, else k1 in the reward (PPO) and k3 as a loss (GRPO)."""
    if cfg.algorithm.kl_estimator is not None:
        return cfg.algorithm.kl_estimator
    return "k1" if cfg.algorithm.spec.kl_in_reward else "k3"


class PlacementError(RuntimeError):
    """The cluster cannot hold the run as configured, or did not within the timeout."""


def reserve(cfg: RunConfig) -> tuple[PlacementPlan, dict]:
    """Check the plan against the cluster, then create its placement groups and wait for them.

    Fails fast when the cluster's nodes cannot hold the plan at all, and after
    ``cluster.placement_timeout_s`` when they could but the resources do not come free.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    plan = plan_placement(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = check_fit(plan, nodes)
    if problems:
        raise PlacementError("the run does not fit the cluster:\n  " + "\n  ".join(problems))
    groups = {
        g.name: placement_group(list(g.bundles), strategy=g.strategy, name=f"raylign-{g.name}")
        for g in plan.groups
    }
    timeout = cfg.cluster.placement_timeout_s
    print(f"placement: waiting up to {timeout:g}s for {', '.join(groups)}", flush=True)
    ready = {name: g.ready() for name, g in groups.items()}
    done, _ = ray.wait(list(ready.values()), num_returns=len(ready), timeout=timeout)
    if len(done) < len(ready):
        waiting = [name for name, ref in ready.items() if ref not in done]
        for g in groups.values():
            remove_placement_group(g)
        raise PlacementError(
            f"placement groups {waiting} did not get their resources within "
            f"cluster.placement_timeout_s={timeout:g}s; free: {ray.available_resources()}"
        )
    return plan, groups


def _options(
    cfg: RunConfig,
    slot: Slot,
    groups: dict,
    env: dict[str, str] | None = None,
    *,
    name: str,
    restarts: bool = True,
    retry_calls: bool = True,
) -> dict:
    """Ray options of one actor in its bundle. With ``restarts`` Ray restarts it (up to
    ``cluster.max_actor_restarts``) when it dies; with ``retry_calls`` it also re-runs the calls
    that were in flight (only for actors whose calls are idempotent: the scorers and the
    reference; the driver re-issues a generator's after re-syncing it). ``name`` names its log
    file, ``<run_dir>/logs/<name>.log`` (``orchestration.console``)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestration.console import LOG_NAME_ENV

    n = cfg.cluster.max_actor_restarts if restarts else 0

    env_vars = {
        "OMP_NUM_THREADS": str(cfg.cluster.torch_threads),
        LOG_NAME_ENV: name,
        # progress bars of weight loading, in every actor: not one line per iteration
        "TQDM_DISABLE": "1",
        **(env or {}),
    }
    return {
        "num_cpus": slot.num_cpus,
        "num_gpus": slot.num_gpus,
        "resources": slot.resources,
        "runtime_env": {"env_vars": env_vars},
        "max_restarts": n,
        "max_task_retries": n if retry_calls else 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            groups[slot.group],
            placement_group_bundle_index=slot.bundle,
            placement_group_capture_child_tasks=True,  # vLLM's tensor-parallel workers
        ),
    }


def _engine_spec(cfg: RunConfig, model_path: str, replica: int) -> EngineSpec:
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


def start_generators(cfg: RunConfig, model_path: str, plan, groups) -> list:
    """One vLLM ``PolicyGenerator`` per replica, in the replica's bundles."""
    tp = cfg.generator.tensor_parallel_size
    generators = []
    for i, (slot, bundles) in enumerate(zip(plan.generators, plan.generator_bundles, strict=True)):
        env = {"VLLM_LOGGING_LEVEL": "WARNING"}
        if tp > 1:  # vLLM's Ray workers take these bundles of the group this actor is in
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, bundles))
            env["VLLM_RAY_PER_WORKER_GPUS"] = str(cfg.cluster.generator.num_gpus)
        generators.append(
            ray.remote(PolicyGenerator)
            .options(**_options(cfg, slot, groups, env, name=f"generator-{i}", retry_calls=False))
            .remote(_engine_spec(cfg, model_path, i))
        )
    return generators


def start_scorers(
    cfg: RunConfig, model_path: str, reward_model_paths: dict[str, str], plan, groups
) -> list:
    """The reward actors, in the order of ``resources.reward_actor_names``: one for the rule
    functions, one per reward model, one per remote service."""
    rw, trust = cfg.reward, cfg.model.trust_remote_code
    slots = iter(plan.reward)
    scorers = []
    # Labels travel in the prompt table's "label" column whatever the dataset calls its field
    # (data.label_key names the field only when the dataset is read).
    if rw.functions or rw.monitors:
        rules = [RuleSpec(f.name, f.params, f.column) for f in [*rw.functions, *rw.monitors]]
        scorers.append(
            ray.remote(RuleScorer)
            .options(**_options(cfg, next(slots), groups, name="reward-rules"))
            .remote(
                rules,
                model_path,
                label_column="label",
                trust_remote_code=trust,
                timeout_s=rw.function_timeout_s,
            )
        )
    for m in rw.models:
        scorers.append(
            ray.remote(RewardModelScorer)
            .options(**_options(cfg, next(slots), groups, name=f"reward-{m.name}"))
            .remote(
                m.name,
                reward_model_paths.get(m.name, m.path),
                model_path,
                dtype=cfg.model.dtype,
                micro_batch_tokens=m.micro_batch_tokens,
                padding_side=m.padding_side,
                trust_remote_code=trust,
            )
        )
    for r in rw.remote:
        fields = r.model_dump(exclude={"weight"})  # the config section is the spec plus weight
        spec = RemoteSpec(**fields | {"allowed_hosts": tuple(r.allowed_hosts)})
        # The token goes as an argument, not in runtime_env (the dashboard shows env vars).
        token = os.environ.get(r.token_env) if r.token_env else None
        scorers.append(
            ray.remote(RemoteScorer)
            .options(**_options(cfg, next(slots), groups, name=f"reward-{r.name}"))
            .remote(
                spec,
                model_path,
                token=token,
                label_column="label",
                trust_remote_code=trust,
            )
        )
    return scorers


def start_learners(cfg: RunConfig, model_path: str, pad_token_id: int, plan, groups) -> list:
    """The learner ranks in their bundles, their process group joined (a collective: every
    rank connects to rank 0). Not restarted by Ray: a rank that dies takes the group down, and
    the driver rebuilds it from the last checkpoint (``orchestration.train``)."""
    timeout = cfg.cluster.call_timeout_s
    steps = cfg.iterations * cfg.learner.ppo_epochs * cfg.learner.num_mini_batches
    spec = learner_spec(cfg, model_path, pad_token_id, total_steps=steps)
    world = cfg.learner.num_ranks
    ds_env = {"DS_ACCELERATOR": "cuda" if cfg.cluster.learner.num_gpus > 0 else "cpu"}
    options = [
        _options(cfg, slot, groups, ds_env, name=f"learner-{r}", restarts=False)
        for r, slot in enumerate(plan.learners)
    ]
    learners = [
        ray.remote(LearnerActor).options(**o).remote(spec, r, world) for r, o in enumerate(options)
    ]
    addr, port = calls.wait(learners[0].endpoint.remote(), "start learners", timeout)
    calls.wait([r.setup.remote(addr, port) for r in learners], "start learners", timeout)
    return learners


def start_actors(
    cfg: RunConfig,
    model_path: str,
    pad_token_id: int,
    reward_model_paths: dict[str, str] | None = None,
) -> Actors:
    """Reserve the placement groups, create every actor in its bundle, and wait until all are
    ready (engines started, learner process group joined, weight-sync group open).

    ``reward_model_paths`` maps a reward model's name to where it was built (``builtin:``
    paths); others load from their configured path."""
    timeout = cfg.cluster.call_timeout_s
    plan, groups = reserve(cfg)
    tp = cfg.generator.tensor_parallel_size
    generators = start_generators(cfg, model_path, plan, groups)
    scorers = start_scorers(cfg, model_path, reward_model_paths or {}, plan, groups)
    reference = (
        ray.remote(ReferenceModel)
        .options(**_options(cfg, plan.reference, groups, name="reference"))
        .remote(
            model_path,
            temperature=cfg.generator.temperature,
            micro_batch_tokens=cfg.learner.micro_batch_tokens,
            pad_token_id=pad_token_id,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    )
    learners = start_learners(cfg, model_path, pad_token_id, plan, groups)
    calls.wait([g.weight_version.remote() for g in generators], "start generators", timeout)
    ready = [a.__ray_ready__.remote() for a in [*scorers, reference]]
    calls.wait(ready, "start reward and reference actors", timeout)
    actors = Actors(
        generators=generators,
        scorers=scorers,
        reference=reference,
        learners=learners,
        placement_groups=groups,
        plan=plan,
    )
    bucket_bytes = int(cfg.weight_sync.bucket_mib * 2**20)
    actors.sync_plan = calls.wait(learners[0].sync_plan.remote(bucket_bytes), "sync plan", timeout)
    if cfg.weight_sync.method == "collective":
        open_sync_group(actors, tp, timeout)
    return actors


def open_sync_group(actors: Actors, tp: int, timeout: float) -> None:
    """Learner rank 0 (root) and every generator worker join one weight-sync group."""
    addr, port = calls.wait(actors.learners[0].endpoint.remote(), "open sync group", timeout)
    world = 1 + len(actors.generators) * tp
    refs = [actors.learners[0].open_sync_group.remote(addr, port, world, timeout)]
    refs += [
        g.open_sync_group.remote(addr, port, 1 + i * tp, world, timeout)
        for i, g in enumerate(actors.generators)
    ]
    calls.wait(refs, "open sync group", timeout)


def rebuild_learners(cfg: RunConfig, actors: Actors, model_path: str, pad_token_id: int) -> None:
    """Replace the whole learner group after a rank died: kill every rank (the survivors may be
    blocked in a collective with the dead one), start new ones in the same bundles (Ray moves a
    dead node's bundles to a live node when one has room), and rejoin the weight-sync group.
    The new ranks hold the initial weights until a checkpoint is loaded into them."""
    for rank in actors.learners:
        ray.kill(rank, no_restart=True)
    actors.learners = start_learners(
        cfg, model_path, pad_token_id, actors.plan, actors.placement_groups
    )
    if cfg.weight_sync.method == "collective":
        tp = cfg.generator.tensor_parallel_size
        open_sync_group(actors, tp, cfg.cluster.call_timeout_s)
