"""Where each actor goes: the placement plan of a run, and whether a cluster can hold it.

Pure (no Ray): :func:`plan_placement` turns the config into placement groups (one per role, or
shared for colocation) and one :class:`Slot` per actor; :func:`check_fit` compares the plan with
the cluster's nodes and says, in the config's terms, what does not fit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from orchestration.config import RoleResources, RunConfig


@dataclass(frozen=True)
class Slot:
    """One actor's place: a bundle of a placement group, and what the actor reserves in it."""

    group: str
    bundle: int
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupPlan:
    name: str
    strategy: str
    bundles: tuple[dict[str, float], ...]


@dataclass(frozen=True)
class Demand:
    """How a role adds up, for messages: ``count`` actors of ``noun`` x ``per`` resources each."""

    noun: str
    count: int
    per: dict[str, float]


@dataclass(frozen=True)
class PlacementPlan:
    groups: tuple[GroupPlan, ...]
    generators: tuple[Slot, ...]  # one per replica: the replica's first bundle
    generator_bundles: tuple[tuple[int, ...], ...]  # per replica: its workers' bundle indices
    learners: tuple[Slot, ...]
    reference: Slot | None  # None: no reference (sft, rm, rrhf, rs)
    reward: tuple[Slot, ...]  # one per reward actor, in the order of reward_actor_names(cfg)
    demands: tuple[Demand, ...]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for group in self.groups:
            for bundle in group.bundles:
                for k, v in bundle.items():
                    out[k] += v
        return dict(out)


def _per_actor(r: RoleResources, scale: int = 1) -> dict[str, float]:
    per = {"CPU": r.num_cpus * scale, "GPU": r.num_gpus * scale}
    per |= {k: v * scale for k, v in r.resources.items()}
    return {k: v for k, v in per.items() if v > 0}


def _add(bundle: dict[str, float], extra: dict[str, float]) -> dict[str, float]:
    out = dict(bundle)
    for k, v in extra.items():
        out[k] = out.get(k, 0.0) + v
    return out


def _slot(group: str, bundle: int, r: RoleResources, num_gpus: float | None = None) -> Slot:
    gpus = r.num_gpus if num_gpus is None else num_gpus
    return Slot(group, bundle, r.num_cpus, gpus, dict(r.resources))


def reward_actor_names(cfg: RunConfig) -> list[str]:
    """One reward actor per reward model and per remote service, plus one for all the rule
    functions (and monitors) together."""
    rw = cfg.reward
    rules = ["rules"] if rw.functions or rw.monitors else []
    return rules + [m.name for m in rw.models] + [r.name for r in rw.remote]


def reward_actor_resources(cfg: RunConfig) -> list[RoleResources]:
    """What each reward actor reserves, in the order of :func:`reward_actor_names`: a reward
    model's own ``resources`` where it has them, else ``cluster.reward``."""
    rw, default = cfg.reward, cfg.cluster.reward
    rules = [default] if rw.functions or rw.monitors else []
    return rules + [m.resources or default for m in rw.models] + [default for _ in rw.remote]


def plan_placement(cfg: RunConfig) -> PlacementPlan:
    """Placement groups and slots for every actor of the run (a stage that does not sample: the
    learner ranks alone, and for offline DPO the reference with the first rank; rrhf and rs
    start no reference)."""
    cl, gen = cfg.cluster, cfg.generator
    if not cfg.samples:
        ranks = cfg.learner.num_ranks
        bundles = [_per_actor(cl.learner) for _ in range(ranks)]
        reference, demands = None, [Demand("learner ranks", ranks, _per_actor(cl.learner))]
        if cfg.stage == "dpo":  # offline DPO: the frozen reference beside the first rank
            bundles[0] = _add(bundles[0], _per_actor(cl.reference))
            reference = _slot("learners", 0, cl.reference)
            demands.append(Demand("reference", 1, _per_actor(cl.reference)))
        return PlacementPlan(
            groups=(GroupPlan("learners", cl.learner.strategy, tuple(bundles)),),
            generators=(),
            generator_bundles=(),
            learners=tuple(_slot("learners", i, cl.learner) for i in range(ranks)),
            reference=reference,
            reward=(),
            demands=tuple(demands),
        )
    replicas, tp, ranks = gen.num_replicas, gen.tensor_parallel_size, cfg.learner.num_ranks
    # With tensor parallelism vLLM starts its own workers (one GPU bundle each); the replica's
    # actor then only holds CPUs in the replica's first bundle.
    gen_actor_gpus = 0.0 if tp > 1 else cl.generator.num_gpus
    gen_bundles = tuple(tuple(range(i * tp, (i + 1) * tp)) for i in range(replicas))
    worker = _per_actor(cl.generator)
    groups: list[GroupPlan] = []

    with_reference = cfg.uses_reference
    reference = None
    if cl.colocate == "all":
        bundles = [_add(_per_actor(cl.learner), worker) for _ in range(ranks)]
        if with_reference:
            bundles[0] = _add(bundles[0], _per_actor(cl.reference))
            reference = _slot("colocated", 0, cl.reference)
        groups.append(GroupPlan("colocated", cl.learner.strategy, tuple(bundles)))
        learners = tuple(_slot("colocated", i, cl.learner) for i in range(ranks))
        generators = tuple(
            _slot("colocated", b[0], cl.generator, gen_actor_gpus) for b in gen_bundles
        )
    else:
        groups.append(GroupPlan("generators", cl.generator.strategy, (worker,) * (replicas * tp)))
        generators = tuple(
            _slot("generators", b[0], cl.generator, gen_actor_gpus) for b in gen_bundles
        )
        bundles = [_per_actor(cl.learner) for _ in range(ranks)]
        if with_reference and cl.colocate == "learner_reference":
            bundles[0] = _add(bundles[0], _per_actor(cl.reference))
            reference = _slot("learners", 0, cl.reference)
        elif with_reference:
            groups.append(GroupPlan("reference", "PACK", (_per_actor(cl.reference),)))
            reference = _slot("reference", 0, cl.reference)
        groups.append(GroupPlan("learners", cl.learner.strategy, tuple(bundles)))
        learners = tuple(_slot("learners", i, cl.learner) for i in range(ranks))
    reward_roles = reward_actor_resources(cfg)
    groups.append(GroupPlan("reward", "PACK", tuple(_per_actor(r) for r in reward_roles)))
    demands = (
        Demand("learner ranks", ranks, _per_actor(cl.learner)),
        Demand("generators", replicas, _per_actor(cl.generator, tp)),
        *([Demand("reference", 1, _per_actor(cl.reference))] if with_reference else []),
        *[
            Demand(f"reward scorer ({name})", 1, _per_actor(r))
            for name, r in zip(reward_actor_names(cfg), reward_roles, strict=True)
        ],
    )
    return PlacementPlan(
        groups=tuple(groups),
        generators=generators,
        generator_bundles=gen_bundles,
        learners=learners,
        reference=reference,
        reward=tuple(_slot("reward", i, r) for i, r in enumerate(reward_roles)),
        demands=demands,
    )


def _unit(resource: str, amount: float) -> str:
    n = f"{amount:g}"
    name = {"CPU": "CPU", "GPU": "GPU"}.get(resource, resource)
    return f"{n} {name}{'s' if amount != 1 and resource in ('CPU', 'GPU') else ''}"


def check_fit(plan: PlacementPlan, nodes: list[dict[str, float]]) -> list[str]:
    """What the cluster (alive nodes' total resources) cannot hold; empty when it fits.

    Two checks: the sum over all bundles against the cluster's totals (e.g. "8 learner ranks x
    1 GPU + 4 generators x 2 GPUs need 16 GPUs; the cluster has 12"), and each bundle against
    the largest node, since a bundle cannot straddle nodes.
    """
    have: dict[str, float] = defaultdict(float)
    for node in nodes:
        for k, v in node.items():
            have[k] += v
    problems = []
    for resource, need in sorted(plan.totals().items()):
        if need <= have.get(resource, 0.0) + 1e-9:
            continue
        terms = [
            f"{d.count} {d.noun if d.count != 1 else d.noun.removesuffix('s')} x "
            f"{_unit(resource, d.per[resource])}"
            for d in plan.demands
            if d.per.get(resource)
        ]
        problems.append(
            f"{' + '.join(terms)} need {_unit(resource, need)}; "
            f"the cluster has {have.get(resource, 0.0):g}"
        )
    if problems:  # the bundle check below would only repeat them
        return problems
    for group in plan.groups:
        for i, bundle in enumerate(group.bundles):
            if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
                problems.append(
                    f"bundle {i} of placement group '{group.name}' needs {bundle}, "
                    "more than any single node has"
                )
    return problems
