"""The tiny tokenizer as the supervised and preference data tests use it, with role tags and a
chat template, and helpers to write their expected token ids (the fixtures ``tokenizer`` and
``chat_tokenizer`` are in this folder's ``conftest.py``).

The tiny tokenizer (operands 0..4: "+012345678=") has one token per character (ids: "+" 1, digit
d is d + 2, "=" 11) and EOS 0; other characters ("9", spaces, newlines) tokenize to nothing. The
role tags are added as special tokens: <|system|> 12, <|user|> 13, <|assistant|> 14.
"""

import json

E, PLUS, EQ, SYSTEM, USER, ASSISTANT = 0, 1, 11, 12, 13, 14
ROLE_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def d(text: str) -> list[int]:
    """Token ids of a string of digits, '+' and '=' (one token per character)."""
    return [PLUS if c == "+" else EQ if c == "=" else int(c) + 2 for c in text]


def write_jsonl(path, lines) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}
