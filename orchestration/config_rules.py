"""Every cross-field rule of the run configuration, in one place.

Each rule is a plain function from a validated section (or the whole tree) to a list of
problems, one sentence each, naming the fields and what to change. The models' validators
(``RewardConfig`` in ``orchestration.config_sections``, ``RunConfig`` in
``orchestration.config``) call them and raise one error listing every problem, which
``orchestration.config.load_config`` shows as ``<section>: <problem>; <problem>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from orchestration.config import RunConfig
    from orchestration.config_sections import RewardConfig

BUILTIN_MODEL = "builtin:tiny"
"""``model.path`` of the demo's tiny model, built with its tokenizer in the run directory."""
BUILTIN_RM = "builtin:addition-rm"
"""``reward.models[].path`` of the demo's reward model, trained on the built-in task at start."""


def raise_problems(problems: list[str]) -> None:
    """Raise one ``ValueError`` listing ``problems`` (pydantic reports it under the model's
    location); nothing when the list is empty."""
    if problems:
        raise ValueError("; ".join(problems))


def rule_components(reward: RewardConfig) -> list[str]:
    """The component names of the rule functions, scored (``functions``) then logged only
    (``monitors``): what evaluation can score with."""
    return [f.key for f in reward.functions] + [f.key for f in reward.monitors]


# ------------------------------------------------------------------------------ reward section


def component_names(rw: RewardConfig) -> list[str]:
    """Every reward component's name: functions, models, remote services, monitors."""
    names = [f.key for f in rw.functions] + [m.name for m in rw.models]
    return names + [r.name for r in rw.remote] + [f.key for f in rw.monitors]


def component_problems(rw: RewardConfig) -> list[str]:
    """The reward section alone: something scores, component names are distinct, and the
    safety gate names one of them."""
    names = component_names(rw)
    problems = []
    if not (rw.functions or rw.models or rw.remote):
        problems.append("no reward: give reward.functions, reward.models or reward.remote")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(
            f"reward component names {duplicates} are used twice; set a distinct 'column' "
            "(functions) or 'name' (models, remote)"
        )
    gate = rw.safety_gate
    if gate is not None and gate.component not in names:
        problems.append(
            f"reward.safety_gate.component={gate.component!r} is not a reward component "
            f"({', '.join(names)})"
        )
    return problems


# ------------------------------------------------------------------------------ the whole tree


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Every rule that spans sections: batch shape, critic, groups, lengths, resume, then scale,
    reward and eval (:func:`scale_problems`, :func:`reward_problems`, :func:`eval_problems`)."""
    problems = []
    samples = cfg.data.prompts_per_iteration * cfg.generator.samples_per_prompt
    parts = cfg.learner.num_ranks * cfg.learner.num_mini_batches
    if cfg.rrhf.dataset_responses and cfg.stage != "rrhf":
        problems.append(f"rrhf.dataset_responses is for stage=rrhf, not stage={cfg.stage}")
    if cfg.rrhf.dataset_responses and cfg.data.source.startswith("builtin:"):
        problems.append(
            f"rrhf.dataset_responses: {cfg.data.source} holds no responses; give a data.source "
            "whose rows have those fields"
        )
    if cfg.max_staleness:
        problems += staleness_problems(cfg)
    if not cfg.samples:
        return problems + supervised_problems(cfg)
    if cfg.stage != "rl":
        problems += method_problems(cfg)
    if cfg.distill.teacher is not None and cfg.stage != "rl":
        problems.append(
            f"distill.teacher: on-policy distillation runs in stage=rl, not stage={cfg.stage}"
        )
    rl = cfg.stage == "rl"
    if rl and cfg.ptx.coef > 0 and cfg.ptx.source is None:
        problems.append("ptx.coef > 0 needs ptx.source, the supervised data of the PTX term")
    if rl and cfg.ptx.coef > 0 and cfg.ptx.rows_per_iteration % parts:
        problems.append(
            f"ptx.rows_per_iteration={cfg.ptx.rows_per_iteration} does not split evenly into "
            f"learner.num_ranks x learner.num_mini_batches = {parts}; change one of them"
        )
    if rl and samples % parts:
        problems.append(
            f"data.prompts_per_iteration x generator.samples_per_prompt = {samples} samples "
            f"do not split evenly into learner.num_ranks x learner.num_mini_batches = {parts}; "
            "change one of them"
        )
    if rl and cfg.learner.critic_init is not None and not cfg.algorithm.spec.needs_critic:
        problems.append(
            f"learner.critic_init={cfg.learner.critic_init!r} initialises a critic, but "
            f"algorithm.estimator={cfg.algorithm.estimator.value} trains none; use "
            "algorithm.estimator=gae, or drop learner.critic_init"
        )
    if rl and cfg.algorithm.spec.needs_groups and cfg.generator.samples_per_prompt < 2:
        problems.append(
            f"algorithm.estimator={cfg.algorithm.estimator.value} compares samples of one "
            "prompt: set generator.samples_per_prompt to 2 or more"
        )
    longest = cfg.data.max_prompt_tokens + cfg.generator.max_new_tokens
    if longest > cfg.generator.max_model_len:
        problems.append(
            f"data.max_prompt_tokens + generator.max_new_tokens = {longest} exceeds "
            f"generator.max_model_len = {cfg.generator.max_model_len}; raise it"
        )
    problems += episode_problems(cfg)
    if cfg.resume != "never" and not cfg.logging.name:
        problems.append(
            f"resume={cfg.resume} continues a named run: set logging.name to its directory "
            "name under logging.root"
        )
    return problems + scale_problems(cfg) + reward_problems(cfg) + eval_problems(cfg)


def episode_problems(cfg: RunConfig) -> list[str]:
    """Multi-turn episodes: stage rl, the episode fits the engine, the environment resolves."""
    ep = cfg.episodes
    if ep.environment is None:
        return ["episodes.tools: set episodes.environment=tools to use them"] if ep.tools else []
    problems = []
    if cfg.stage != "rl":
        problems.append(f"episodes.environment: episodes are for stage=rl, not stage={cfg.stage}")
    longest = cfg.data.max_prompt_tokens + ep.max_tokens
    if longest > cfg.generator.max_model_len:
        problems.append(
            f"data.max_prompt_tokens + episodes.max_tokens = {longest} exceeds "
            f"generator.max_model_len = {cfg.generator.max_model_len}; raise it"
        )
    if ep.tools and ep.environment != "tools":
        problems.append(
            f"episodes.tools: only episodes.environment=tools calls them, not {ep.environment!r}"
        )
    if "environment" in component_names(cfg.reward):
        problems.append(
            "reward component 'environment' is the environment's own rewards with episodes on; "
            "rename yours"
        )
    for tool in ep.tools:
        own = tool.params.get("timeout_s")
        if isinstance(own, int | float) and own + 1 >= ep.timeout_s:
            problems.append(
                f"episodes.tools[{tool.name}]: params.timeout_s={own:g} leaves under a second "
                f"of episodes.timeout_s={ep.timeout_s:g} (its process has to start too); raise "
                "episodes.timeout_s"
            )
    if ep.environment == "tools" and not ep.tools:
        problems.append(
            "episodes.environment=tools needs episodes.tools (e.g. [{name: calculator}])"
        )
        return problems
    from actors.environments import make_environment

    try:
        make_environment(ep.spec())  # imports it and checks its params, before any actor
    except ValueError as e:
        problems.append(f"episodes.environment: {e}")
    return problems


def staleness_problems(cfg: RunConfig) -> list[str]:
    """``max_staleness > 0``: stage rl, a correction, and generators that keep their devices
    while the learner trains."""
    k, problems = cfg.max_staleness, []
    if cfg.stage != "rl":
        problems.append(f"max_staleness={k} is for stage=rl, not stage={cfg.stage}")
    off = cfg.algorithm.off_policy
    if off.weight == "none" and off.mask == "none":
        problems.append(
            f"max_staleness={k} trains on samples of older weights: set "
            "algorithm.off_policy.weight (token: truncated importance weights) or "
            "algorithm.off_policy.mask to correct for them"
        )
    if cfg.cluster.colocate == "all":
        problems.append(
            f"max_staleness={k}: with cluster.colocate=all the generators sleep while the "
            "learner trains, so nothing can run ahead; colocate less, or set max_staleness=0"
        )
    return problems


def method_problems(cfg: RunConfig) -> list[str]:
    """The sampling stages beside RL (rrhf, rs, online dpo): they compare a prompt's samples,
    train no critic and take no PTX term."""
    problems = []
    if cfg.generator.samples_per_prompt < 2:
        problems.append(
            f"stage={cfg.stage} compares samples of one prompt: set "
            "generator.samples_per_prompt to 2 or more"
        )
    if cfg.ptx.source is not None or cfg.ptx.coef > 0:
        problems.append(f"stage={cfg.stage}: the ptx section is for stage=rl; remove it")
    if cfg.learner.critic_init is not None:
        problems.append(f"stage={cfg.stage} trains no critic: remove learner.critic_init")
    if cfg.learner.ppo_epochs != 1:
        problems.append(f"stage={cfg.stage}: learner.ppo_epochs is for stage=rl; remove it")
    return problems


def supervised_problems(cfg: RunConfig) -> list[str]:
    """The supervised stages' rules: their batch splits over ranks, and no RL-only settings."""
    problems = []
    parts = cfg.learner.num_ranks * cfg.learner.num_mini_batches
    size, key = {
        "sft": (cfg.sft.rows_per_step, "sft.rows_per_step"),
        "rm": (cfg.rm.groups_per_step, "rm.groups_per_step"),
        "dpo": (cfg.dpo.groups_per_step, "dpo.groups_per_step"),
    }[cfg.stage]
    if size % parts:
        problems.append(
            f"{key}={size} does not split evenly into learner.num_ranks x "
            f"learner.num_mini_batches = {parts}; change one of them"
        )
    if cfg.ptx.source is not None or cfg.ptx.coef > 0:
        problems.append(f"stage={cfg.stage}: the ptx section is for stage=rl; remove it")
    if cfg.reward.models:
        problems.append(f"stage={cfg.stage} scores nothing: remove reward.models")
    if cfg.learner.critic_init is not None:
        problems.append(f"stage={cfg.stage} trains no critic: remove learner.critic_init")
    if cfg.distill.teacher is not None:
        problems.append(
            f"distill.teacher: on-policy distillation runs in stage=rl, not stage={cfg.stage}"
        )
    if (
        cfg.stage == "sft"
        and cfg.data.source.startswith("builtin:")
        and cfg.data.source not in ("builtin:addition", "builtin:calculator")
    ):
        problems.append(
            f"data.source={cfg.data.source}: stage=sft reads builtin:addition and "
            "builtin:calculator"
        )
    if cfg.stage == "rm":
        edges = cfg.rm.length_buckets
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):  # noqa: B905
            problems.append(
                f"rm.length_buckets={edges}: give ascending edges from 0, e.g. [0, 1, 3]"
            )
    return problems


def reward_problems(cfg: RunConfig) -> list[str]:
    """Reward settings that depend on sampling, the model or the data, and remote URLs."""
    rw, problems = cfg.reward, []
    if rw.dynamic_sampling.enabled and cfg.generator.samples_per_prompt < 2:
        problems.append(
            "reward.dynamic_sampling drops groups with equal scores: it needs "
            "generator.samples_per_prompt >= 2"
        )
    # the response's bound: one turn's, or with episodes the whole episode's (observations in)
    bound, key = cfg.generator.max_new_tokens, "generator.max_new_tokens"
    if cfg.episodes.environment is not None:
        bound, key = cfg.episodes.max_tokens, "episodes.max_tokens"
    if rw.overlong is not None and rw.overlong.buffer_tokens >= bound:
        problems.append(
            f"reward.overlong.buffer_tokens={rw.overlong.buffer_tokens} must be less than "
            f"{key}={bound}"
        )
    for f in [*rw.functions, *rw.monitors]:
        own = f.params.get("timeout_s")
        if isinstance(own, int | float) and own >= rw.function_timeout_s:
            problems.append(
                f"reward function {f.key!r}: params.timeout_s={own:g} is not below "
                f"reward.function_timeout_s={rw.function_timeout_s:g}, which would kill its "
                "calls first; raise reward.function_timeout_s"
            )
    for m in rw.models:
        if m.path == BUILTIN_RM and (
            cfg.model.path != BUILTIN_MODEL or cfg.data.source != "builtin:addition"
        ):
            problems.append(
                f"reward.models[{m.name}].path={BUILTIN_RM} is trained on the built-in task "
                f"with the built-in tokenizer: it needs model.path={BUILTIN_MODEL} and "
                "data.source=builtin:addition"
            )
    for r in rw.remote:
        url = urlsplit(r.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(f"reward.remote[{r.name}].url={r.url!r}: give an http(s) URL")
        elif url.username or url.password:
            problems.append(
                f"reward.remote[{r.name}].url carries credentials; pass a token through "
                "token_env instead (the URL shows in logs and the dashboard)"
            )
        elif r.allowed_hosts and url.hostname not in {h.lower() for h in r.allowed_hosts}:
            problems.append(
                f"reward.remote[{r.name}].url host {url.hostname!r} is not in allowed_hosts "
                f"{r.allowed_hosts}"
            )
    return problems


def eval_problems(cfg: RunConfig) -> list[str]:
    """Evaluation's needs: a rule component to score with, sampling that makes pass@k mean
    something, and room in the engine. At most one problem (the first that applies)."""
    ev = cfg.eval
    if ev.source is None:
        return []
    rules = rule_components(cfg.reward)
    if not rules:
        return [
            "eval scores samples with rule functions: add one to reward.functions or "
            "reward.monitors (e.g. {name: exact_integer})"
        ]
    if ev.correct_component is not None and ev.correct_component not in rules:
        return [
            f"eval.correct_component={ev.correct_component!r} is not a rule component "
            f"({', '.join(rules)})"
        ]
    if ev.samples > 1 and ev.temperature == 0:
        return [
            f"eval.samples={ev.samples} with eval.temperature=0 repeats one greedy response; "
            "set eval.temperature > 0 for pass@k, or eval.samples=1"
        ]
    longest = cfg.data.max_prompt_tokens + (ev.max_new_tokens or 0)
    if longest > cfg.generator.max_model_len:
        return [
            f"data.max_prompt_tokens + eval.max_new_tokens = {longest} exceeds "
            f"generator.max_model_len = {cfg.generator.max_model_len}"
        ]
    return []


def scale_problems(cfg: RunConfig) -> list[str]:
    """Colocation, tensor parallelism and the weight-sync method against the devices."""
    gen, cl = cfg.generator, cfg.cluster
    problems = []
    workers = gen.num_replicas * gen.tensor_parallel_size
    if cl.colocate == "all" and workers != cfg.learner.num_ranks:
        problems.append(
            f"cluster.colocate=all puts one generator worker with each learner rank, but "
            f"generator.num_replicas x generator.tensor_parallel_size = {workers} and "
            f"learner.num_ranks = {cfg.learner.num_ranks}; make them equal"
        )
    on_gpu = cl.generator.num_gpus > 0
    if gen.tensor_parallel_size > 1 and not on_gpu:
        problems.append(
            "generator.tensor_parallel_size > 1 needs GPUs: set cluster.generator.num_gpus "
            "(vLLM on CPU runs one worker per replica)"
        )
    if cfg.weight_sync.method == "cuda_ipc" and not (
        cl.colocate == "all" and on_gpu and gen.tensor_parallel_size == 1
    ):
        problems.append(
            "weight_sync.method=cuda_ipc maps the learner's GPU buffers: it needs "
            "cluster.colocate=all, cluster.generator.num_gpus > 0 and "
            "generator.tensor_parallel_size=1; use collective"
        )
    if (cl.learner.num_gpus > 0) != (cl.generator.num_gpus > 0) and (
        cfg.weight_sync.method == "collective"
    ):
        problems.append(
            "weight_sync.method=collective needs the learner and the generators on the same "
            "kind of device (NCCL between GPUs, gloo between CPUs); give both GPUs or neither, "
            "or use weight_sync.method=object_store"
        )
    return problems
