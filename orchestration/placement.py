"""Starting the run's actors on Ray: generators, reward scorers, reference, learner ranks.

Each role is one plain class from ``actors`` / ``reward_service`` wrapped with ``ray.remote``;
the config decides how many of each, what each reserves, and which placement-group bundle it
runs in (``orchestration.resources`` makes that plan; :func:`reserve` gets it from Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from actors.generator import actor_class as generator_actor_class
from actors.learner_actor import LearnerActor
from actors.reference import ReferenceModel
from learner.weight_sync import SyncPlan
from orchestration import calls, reward_stage, specs
from orchestration.config import RunConfig
from orchestration.resources import PlacementPlan, Slot, check_fit, plan_placement
from reward_service.reward_model import RewardModelScorer
from reward_service.scorer import RemoteScorer, RuleScorer


@dataclass
class Actors:
    generators: list
    scorers: list  # reward actors: the rule scorer, each reward model, each remote service
    reference: object  # None: the stage has none (sft, rm, rrhf, rs)
    learners: list
    placement_groups: dict = field(default_factory=dict)
    sync_plan: SyncPlan | None = None  # bucket layout of the learner's weights
    plan: PlacementPlan | None = None  # which bundle each actor has

    def all(self) -> list:
        reference = [self.reference] if self.reference is not None else []
        return [*self.generators, *self.scorers, *reference, *self.learners]

    def release(self) -> None:
        """Kill every actor and remove the placement groups, leaving the Ray session to the
        next run (a run that ends shuts Ray down instead)."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.all():
            ray.kill(actor, no_restart=True)
        for group in self.placement_groups.values():
            remove_placement_group(group)


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
            generator_actor_class()
            .options(**_options(cfg, slot, groups, env, name=f"generator-{i}", retry_calls=False))
            .remote(specs.engine_spec(cfg, model_path, i))
        )
    return generators


def start_scorers(
    cfg: RunConfig, model_path: str, reward_model_paths: dict[str, str], plan, groups
) -> list:
    """The reward actors, in the order of ``resources.reward_actor_names``: one for the rule
    functions, one per reward model, one per remote service."""
    slots = iter(plan.reward)
    roles = (
        [(RuleScorer, "rules", specs.rule_scorer_args(cfg, model_path))]
        if (cfg.reward.functions or cfg.reward.monitors)
        else []
    )
    roles += [
        (RewardModelScorer, m.name, specs.reward_model_args(cfg, m, reward_model_paths, model_path))
        for m in cfg.reward.models
    ]
    roles += [
        (RemoteScorer, r.name, specs.remote_scorer_args(cfg, r, model_path))
        for r in cfg.reward.remote
    ]
    scorers = []
    for cls, name, (args, kwargs) in roles:
        options = _options(cfg, next(slots), groups, name=f"reward-{name}")
        scorers.append(ray.remote(cls).options(**options).remote(*args, **kwargs))
    return scorers


def start_learners(cfg: RunConfig, model_path: str, pad_token_id: int, plan, groups) -> list:
    """The learner ranks in their bundles, their process group joined (a collective: every
    rank connects to rank 0). Not restarted by Ray: a rank that dies takes the group down, and
    the driver rebuilds it from the last checkpoint (``orchestration.recovery``)."""
    timeout = cfg.cluster.call_timeout_s
    spec = specs.learner_spec(cfg, model_path, pad_token_id)
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
    ready (engines started, learner process group joined; the weight sync is opened by its
    object, ``orchestration.sync``).

    ``reward_model_paths`` maps a reward model's name to where it was built (``builtin:``
    paths); others load from their configured path."""
    timeout = cfg.cluster.call_timeout_s
    plan, groups = reserve(cfg)
    warm = reward_stage.warm_worker.remote()
    generators = start_generators(cfg, model_path, plan, groups)
    scorers = start_scorers(cfg, model_path, reward_model_paths or {}, plan, groups)
    reference = None
    if plan.reference is not None:  # rrhf and rs use none
        reference = (
            ray.remote(ReferenceModel)
            .options(**_options(cfg, plan.reference, groups, name="reference"))
            .remote(**specs.reference_kwargs(cfg, model_path, pad_token_id))
        )
    learners = start_learners(cfg, model_path, pad_token_id, plan, groups)
    calls.wait([g.weight_version.remote() for g in generators], "start generators", timeout)
    ready = [a.__ray_ready__.remote() for a in [*scorers, *([reference] if reference else [])]]
    calls.wait([*ready, warm], "start reward and reference actors", timeout)
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
    return actors


def start_learner_ranks(cfg: RunConfig, model_path: str, pad_token_id: int) -> Actors:
    """A stage that does not sample: the learner ranks alone, in their placement group, and
    for offline DPO the frozen reference beside the first rank."""
    plan, groups = reserve(cfg)
    learners = start_learners(cfg, model_path, pad_token_id, plan, groups)
    reference = None
    if plan.reference is not None:
        reference = (
            ray.remote(ReferenceModel)
            .options(**_options(cfg, plan.reference, groups, name="reference"))
            .remote(**specs.reference_kwargs(cfg, model_path, pad_token_id))
        )
        calls.wait(
            reference.__ray_ready__.remote(), "start the reference", cfg.cluster.call_timeout_s
        )
    return Actors(
        generators=[],
        scorers=[],
        reference=reference,
        learners=learners,
        placement_groups=groups,
        plan=plan,
    )


def rebuild_learners(cfg: RunConfig, actors: Actors, model_path: str, pad_token_id: int) -> None:
    """Replace the whole learner group after a rank died: kill every rank (the survivors may be
    blocked in a collective with the dead one), start new ones in the same bundles (Ray moves a
    dead node's bundles to a live node when one has room); the caller reopens the weight sync.
    The new ranks hold the initial weights until a checkpoint is loaded into them."""
    for rank in actors.learners:
        ray.kill(rank, no_restart=True)
    actors.learners = start_learners(
        cfg, model_path, pad_token_id, actors.plan, actors.placement_groups
    )
