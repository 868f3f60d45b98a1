"""Fixtures of the orchestration tests: the tiny tokenizer with role tags (``tokenizer``) and
with a chat template too (``chat_tokenizer``); see ``chat_tokens``."""

import pytest
from transformers import AutoTokenizer

from tests.orchestration.chat_tokens import ASSISTANT, CHAT_TEMPLATE, ROLE_TAGS, SYSTEM, USER, E, d


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(ROLE_TAGS, special_tokens=True)
    assert tok.convert_tokens_to_ids(ROLE_TAGS) == [SYSTEM, USER, ASSISTANT]
    assert tok.eos_token_id == E and tok("1+2=", add_special_tokens=False)["input_ids"] == d("1+2=")
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(ROLE_TAGS, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok
