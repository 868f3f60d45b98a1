"""Early checks of a run's checkpoints and tokenizers, before any actor starts.

``orchestration.config`` has already checked the config (keys, values, that paths exist) and
``orchestration.data`` checks the prompts (rows, lengths); neither is repeated here. What is left
is what only the files can say, and what would otherwise fail minutes later inside an actor, or
not fail at all and train on garbage:

1. a model directory: ``config.json`` present and readable; weights present, in safetensors (the
   only format Raylign loads: a ``.bin`` / ``.pt`` file is a pickle, and unpickling runs code),
   whole (not a Git LFS pointer, not truncated, every shard of the index there); tokenizer files
   present (without them transformers builds an empty tokenizer and says nothing);
2. the policy's tokenizer fits its model: every token id (and the EOS, pad and BOS ids) has an
   embedding row; the tokenizer has an EOS token; the checkpoint is a causal LM, not a classifier;
3. ``generator.max_model_len`` fits the policy's position embeddings;
4. each reward model: the same checks of its files and of its own tokenizer against its own
   embedding, a head the scorer can read, and a note when its vocabulary is not the policy's
   (``reward_service.reward_model.RewardModelScorer`` then decodes each sample to text and
   re-tokenizes it);
5. ``learner.critic_init``: a local directory holding a reward model the critic can start from
   (a causal LM with a whole, well-shaped ``value_head.safetensors``, a one-label classifier,
   or a plain causal LM, noted), with the policy's vocabulary (the critic reads its token ids).

A hub name (``org/name``) has no local files to check; its config and tokenizer are checked, and
its weights are fetched and loaded from safetensors only (``use_safetensors=True`` in
transformers, ``load_format="safetensors"`` in vLLM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestration.config import RunConfig
from reward_service.reward_model import VALUE_HEAD_FILE, head_kind, same_vocabulary

# Weight files in other formats than safetensors (PyTorch pickles, TF, Flax, GGUF).
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf")
# What a transformers Trainer saves beside the weights: not weights.
TRAINER_STATE = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
LFS_POINTER = b"version https://git-lfs"


class InputError(ValueError):
    """A model or tokenizer the run cannot use; the message names it and says what to do."""


HUB_TIMEOUT_S = 5.0


def locate_model(field: str, path: str, timeout_s: float = HUB_TIMEOUT_S) -> str:
    """Where ``path`` (``field``'s value) loads from: a local directory as it is; a hub name
    (``org/name``) as it is when the hub answers for it within ``timeout_s``, else its copy in
    the local Hugging Face cache. Called before anything loads it, so that a hub name on a
    machine without hub access fails in seconds instead of after transformers' retries.

    Raises:
        InputError: the hub says there is no such model, or the hub cannot be reached and no
            copy is cached; the message says how to point ``field`` at a local copy.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    if os.path.isdir(os.path.expanduser(path)):
        return path
    cached = try_to_load_from_cache(path, "config.json")
    cached_dir = os.path.dirname(cached) if isinstance(cached, str) else None
    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        request = urllib.request.Request(f"{endpoint}/api/models/{path}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return path
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # gated or private: the hub is there; a token may open it
                return path
            if e.code == 404:
                raise InputError(
                    f"{field} {path!r}: no such model on the Hugging Face hub ({endpoint}), and "
                    "no such local directory; check the name, or give a directory"
                ) from None
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:  # DNS, refused, timed out
            reason = str(getattr(e, "reason", e))
    if cached_dir is not None:
        print(
            f"note: {field} {path!r}: the hub is not reachable ({reason}); using the cached "
            f"copy at {cached_dir}",
            flush=True,
        )
        return cached_dir
    raise InputError(
        f"{field} {path!r} is neither a local directory nor reachable: the Hugging Face hub "
        f"({endpoint}) did not answer ({reason}) and no copy is in the local cache "
        f"({constants.HF_HUB_CACHE}). On a machine with hub access, download it "
        f"(`huggingface-cli download {path} --local-dir <dir>`), copy the directory here and "
        f"set {field}=<dir>"
    )


def check_inputs(
    cfg: RunConfig, model_path: str, tokenizer, reward_model_paths: dict[str, str]
) -> list[str]:
    """Check the policy, critic-init and reward-model checkpoints and tokenizers before any
    actor starts.

    Args:
        cfg: the validated run config.
        model_path: the policy's directory or hub name (``builtin:tiny`` already built).
        tokenizer: the policy's tokenizer, loaded from ``model_path``.
        reward_model_paths: reward model name -> directory or hub name, for every
            ``cfg.reward.models`` (built-in ones already built).

    Returns:
        Notes to print: things that are handled but worth saying.

    Raises:
        InputError: the first problem found, naming the path and the fix.
    """
    trust = cfg.model.trust_remote_code
    field = "model.path"
    config = _read_checkpoint(field, model_path, trust)
    _check_causal_lm(field, model_path, config)
    _check_tokenizer_fits(field, model_path, tokenizer, config)
    if tokenizer.eos_token_id is None:
        raise InputError(
            f"{field} {model_path!r}: the tokenizer has no EOS token, so a response can only end "
            "at generator.max_new_tokens and rewards read at EOS never see one; set eos_token in "
            "its tokenizer_config.json"
        )
    if cfg.samples:  # (sft, rm and offline dpo start no generator)
        _check_positions(cfg.generator.max_model_len, model_path, config)
    notes = []
    if cfg.learner.critic_init is not None:
        notes += _check_critic_init(cfg.learner.critic_init, tokenizer, trust)
    if cfg.distill.teacher is not None:
        _check_teacher(cfg.distill.teacher, tokenizer, trust)
    for m in cfg.reward.models:
        path, field = reward_model_paths[m.name], f"reward.models[{m.name}].path"
        config = _read_checkpoint(field, path, trust)
        try:
            head_kind(config, path)
        except ValueError as e:
            raise InputError(f"{field}: {e}") from None
        rm_tokenizer = _load_tokenizer(field, path, trust)
        _check_tokenizer_fits(field, path, rm_tokenizer, config)
        if not same_vocabulary(tokenizer, rm_tokenizer):
            sizes = f"{len(tokenizer)} and {len(rm_tokenizer)} tokens"
            if len(tokenizer) == len(rm_tokenizer):
                sizes = f"both {len(tokenizer)} tokens, with different ids"
            notes.append(
                f"reward model {m.name}: its tokenizer differs from the policy's ({sizes}); "
                "responses are decoded to text and re-tokenized for it (counted in "
                f"reward/{m.name}/retokenized)"
            )
    return notes


def _check_teacher(path: str, tokenizer, trust_remote_code: bool) -> None:
    """The distillation teacher: a causal LM whose tokenizer gives the policy's ids (its
    log-probabilities are read at the policy's tokens)."""
    field = "distill.teacher"
    config = _read_checkpoint(field, path, trust_remote_code)
    _check_causal_lm(field, path, config)
    teacher_tokenizer = _load_tokenizer(field, path, trust_remote_code)
    if not same_vocabulary(tokenizer, teacher_tokenizer):
        raise InputError(
            f"{field} {path!r}: its tokenizer differs from the policy's, so its "
            "log-probabilities cannot be read at the policy's tokens; distil from a teacher "
            "of the same tokenizer family"
        )


# ------------------------------------------------------------------------------ files


def _read_checkpoint(field: str, path: str, trust_remote_code: bool):
    """The checkpoint's transformers config, after checking its local files (a hub name has
    none to check)."""
    from transformers import AutoConfig

    local = os.path.isdir(os.path.expanduser(path))
    if local:
        _check_directory(field, path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = ""
        if "trust_remote_code" in str(e):
            hint = "; it ships its own Python: set model.trust_remote_code=true if you trust it"
        first_line = str(e).strip().splitlines()[0]
        raise InputError(f"{field} {path!r}: cannot read its config ({first_line}){hint}") from None
    if local:
        _check_weights(field, path, config)
    return config


def _check_directory(field: str, path: str) -> None:
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        inside = sorted(p.parent.name for p in root.glob("*/config.json"))[:3]
        hint = f" (inside it, {', '.join(inside)} holds one)" if inside else ""
        raise InputError(
            f"{field} {path!r}: a directory without config.json, so not a Hugging Face model"
            f"{hint}; give the directory that holds config.json and the weights"
        )
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{field} {path!r}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
            "transformers would build an empty tokenizer for it. Save the model's tokenizer "
            "there (tokenizer.save_pretrained)"
        )


def _check_weights(field: str, path: str, config) -> None:
    root = Path(path).expanduser()
    weights = sorted(p for p in root.glob("*.safetensors") if p.name != VALUE_HEAD_FILE)
    if not weights:
        others = sorted(
            p.name
            for pattern in OTHER_WEIGHT_PATTERNS
            for p in root.glob(pattern)
            if p.name not in TRAINER_STATE and not p.name.startswith("rng_state")
        )
        if others:
            raise InputError(
                f"{field} {path!r}: the weights are {', '.join(others[:3])}, not safetensors; "
                "Raylign loads safetensors only (a .bin/.pt/.ckpt file is a pickle, and loading "
                f"one runs code). Convert it once: {_convert_hint(path, config)}, then point "
                f"{field} at the new directory"
            )
        raise InputError(
            f"{field} {path!r}: config.json but no weights (*.safetensors); did a download or "
            "copy stop early? Give the directory that holds the weights"
        )
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise InputError(
                f"{field} {path!r}: {SAFETENSORS_INDEX} lists {len(shards)} shards, but "
                f"{', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} missing; "
                "copy or download the whole checkpoint"
            )
    for file in weights:
        _check_safetensors(field, file)


def _check_safetensors(field: str, file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    with file.open("rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise InputError(
                f"{field}: {file} is a Git LFS pointer, not the weights; fetch them "
                "(git lfs install && git lfs pull in the clone) or download the model again"
            )
    try:
        with safe_open(str(file), framework="pt"):
            pass  # reads and checks the header against the file's size
    except SafetensorError as e:
        raise InputError(
            f"{field}: {file} is not a whole safetensors file ({e}); copy or download it again"
        ) from None


def _convert_hint(path: str, config) -> str:
    architectures = config.architectures or []
    cls = "AutoModelForCausalLM"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        cls = "AutoModelForSequenceClassification"
    out = f"{path.rstrip('/')}-safetensors"
    hint = (
        f"{cls}.from_pretrained('{path}').save_pretrained('{out}', safe_serialization=True) and "
        f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{out}') (transformers)"
    )
    if (Path(path).expanduser() / VALUE_HEAD_FILE).is_file():
        hint += f", and copy {VALUE_HEAD_FILE}"
    return hint


# ------------------------------------------------------------------------------ models


def _load_tokenizer(field: str, path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise InputError(f"{field} {path!r}: cannot load its tokenizer ({first_line})") from None


def _vocab_size(config) -> int | None:
    """The embedding's rows (a multimodal config keeps it in its text config)."""
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return size


def _check_tokenizer_fits(field: str, model_path: str, tokenizer, config) -> None:
    """Every id the tokenizer can produce has an embedding row. A tokenizer smaller than the
    embedding is normal (vocabularies are padded to a multiple of 64 or 128)."""
    vocab_size = _vocab_size(config)
    if vocab_size is None:
        return
    where = f"the tokenizer at {tokenizer.name_or_path!r}"
    if len(tokenizer) > vocab_size:
        extra = f"id {vocab_size} has"
        if len(tokenizer) - 1 > vocab_size:
            extra = f"ids {vocab_size} to {len(tokenizer) - 1} have"
        raise InputError(
            f"{field} {model_path!r}: {where} has {len(tokenizer)} tokens, but the model's "
            f"embedding holds vocab_size={vocab_size} (config.json): {extra} no embedding. Give "
            "the tokenizer the model was trained with, or resize the model "
            f"(model.resize_token_embeddings({len(tokenizer)})) and save it"
        )
    for name in ("eos", "pad", "bos"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None and token_id >= vocab_size:
            raise InputError(
                f"{field} {model_path!r}: {where} has {name}_token_id={token_id}, but the "
                f"model's embedding holds vocab_size={vocab_size} (ids 0 to {vocab_size - 1}); "
                f"set {name}_token in its tokenizer_config.json to a token the model knows"
            )


def _check_causal_lm(field: str, path: str, config) -> None:
    """A classifier (e.g. a reward model) loads as a causal LM with a random LM head, with only
    a warning from transformers."""
    architectures = config.architectures or []
    heads = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
    if architectures and all(a.endswith(heads) for a in architectures):
        raise InputError(
            f"{field} {path!r}: a {architectures[0]} checkpoint (a classifier, such as a reward "
            "model), not a causal LM; the policy would get a random LM head. Give the policy's "
            "checkpoint (a reward model goes in reward.models)"
        )


def _check_critic_init(path: str, tokenizer, trust_remote_code: bool) -> list[str]:
    """``learner.critic_init``: a local checkpoint ``learner.models.CriticModel`` can start
    from (a value-head reward model, a one-label classifier, or a causal LM) that reads the
    policy's token ids (``tokenizer``) as the policy does. Returns a note for a causal LM
    without a value head (its head is fresh, as when the critic starts from the policy)."""
    field = "learner.critic_init"
    kinds = (
        f"a reward model's directory: a causal LM with {VALUE_HEAD_FILE}, or a one-label "
        "*ForSequenceClassification checkpoint"
    )
    if not os.path.isdir(os.path.expanduser(path)):
        raise InputError(f"{field} {path!r} is not a directory; give {kinds}")
    config = _read_checkpoint(field, path, trust_remote_code)
    architectures = config.architectures or []
    head_file = Path(path).expanduser() / VALUE_HEAD_FILE
    notes = []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        try:
            head_kind(config, path)
        except ValueError as e:
            raise InputError(f"{field}: {e}") from None
    elif architectures and all(
        a.endswith(("ForTokenClassification", "ForQuestionAnswering")) for a in architectures
    ):
        raise InputError(f"{field} {path!r}: a {architectures[0]} checkpoint; give {kinds}")
    elif head_file.is_file():
        _check_value_head(field, head_file, config.get_text_config().hidden_size)
    else:
        notes.append(
            f"{field} {path!r} is a causal LM without {VALUE_HEAD_FILE}: the critic starts from "
            "its body with a fresh value head"
        )
    _check_tokenizer_fits(field, path, tokenizer, config)
    own = _load_tokenizer(field, path, trust_remote_code)
    if not same_vocabulary(tokenizer, own):
        raise InputError(
            f"{field} {path!r}: its tokenizer differs from the policy's ({len(tokenizer)} and "
            f"{len(own)} tokens, or other ids); the critic reads the policy's token ids, so start "
            "it from a reward model trained with the policy's tokenizer"
        )
    return notes


def _check_value_head(field: str, file: Path, hidden_size: int) -> None:
    """``file`` is whole and holds exactly ``weight`` (1, H) and ``bias`` (1,)."""
    from safetensors import safe_open

    _check_safetensors(field, file)
    with safe_open(str(file), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in sorted(f.keys())}
    wanted = {"bias": (1,), "weight": (1, hidden_size)}
    if shapes != wanted:
        raise InputError(
            f"{field}: {file} holds {shapes}; a value head for this body (hidden size "
            f"{hidden_size}) is exactly {wanted}"
        )


def _check_positions(max_model_len: int, path: str, config) -> None:
    """``generator.max_model_len`` within the policy's position embeddings. Skipped for scaled
    RoPE (vLLM derives the longer length itself) and configs without the field."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    per_layer = [rope] if "rope_type" in rope or "type" in rope else list(rope.values())
    types = {p.get("rope_type", p.get("type")) for p in per_layer if isinstance(p, dict)}
    if positions is None or types - {None, "default"}:
        return
    if (getattr(text, "model_max_length", None) or 0) >= max_model_len:
        return  # a separate, longer limit (vLLM accepts it too)
    if max_model_len > positions:
        raise InputError(
            f"generator.max_model_len={max_model_len} is longer than the policy's "
            f"max_position_embeddings={positions} (model.path {path!r}): positions past it were "
            f"never trained, and vLLM refuses to start; set generator.max_model_len to at most "
            f"{positions}"
        )
