"""The tokenizer behind a run's token ids, as the driver and the reward actors load it.

``transformers.AutoTokenizer`` resolves the tokenizer's class through transformers' registry of
every model, whose import costs a process about 3.5 s of CPU here (4.7 s against 1.2 s for the
generic fast class), and a run pays it in the driver before any actor starts and again in every
reward actor. A local directory whose tokenizer is the generic fast one (``tokenizer.json``, and
``tokenizer_class`` ``TokenizersBackend`` or ``PreTrainedTokenizerFast`` in
``tokenizer_config.json``: the built-in tiny models and the checkpoints ``convert_gguf`` writes)
loads with that class directly; anything else goes through ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def generic_fast(path: str) -> bool:
    """Whether ``path`` is a local directory holding a generic fast tokenizer."""
    local = Path(path).expanduser()
    config = local / "tokenizer_config.json"
    if not (local / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("tokenizer_class") in GENERIC_FAST
    except (OSError, ValueError):
        return False


def load_tokenizer(path: str, *, trust_remote_code: bool = False, **kwargs):
    """``AutoTokenizer.from_pretrained(path, trust_remote_code=..., **kwargs)``, without the
    registry for a generic fast tokenizer in a local directory (see the module docstring)."""
    if generic_fast(path):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(Path(path).expanduser()), **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
