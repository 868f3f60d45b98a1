"""``policy_forward`` computes logits only at response positions, in bounded chunks, and gives
the same log-probabilities, entropies and gradients as the whole (B, P+R, V) logits do."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from learner.functional import entropy_from_logits, logprobs_from_logits
from learner.models import load_causal_lm, plain_head, policy_forward
from orchestration.data import addition_corpus
from orchestration.tiny_model import FAMILY_MATRIX, build_tiny_model
from rollout import schema as S
from rollout.tensors import to_padded

pytestmark = pytest.mark.unit  # pure code in this process

TEMPERATURE = 0.7


@pytest.fixture(scope="module", params=["qwen2-untied", "llama-tied"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    build_tiny_model(str(path), addition_corpus(4), FAMILY_MATRIX[request.param])
    return load_causal_lm(str(path)).eval()


def ragged_batch(vocab: int):
    """Prompts and responses of different lengths, so both paddings are exercised."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    prompts, responses = [ids(3), ids(6), ids(1), ids(4)], [ids(5), ids(1), ids(7), ids(3)]
    table = pa.table(
        {
            S.PROMPT_TOKEN_IDS: pa.array(prompts, S.TOKEN_IDS_TYPE),
            S.RESPONSE_TOKEN_IDS: pa.array(responses, S.TOKEN_IDS_TYPE),
        }
    )
    return to_padded(table, pad_token_id=0)


def whole_logits(model, batch):
    """Today's computation in full: every position's logits, then the response slice."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    part = logits[:, p - 1 : p - 1 + r]
    return (
        logprobs_from_logits(part, batch.response_ids, TEMPERATURE),
        entropy_from_logits(part.float() / TEMPERATURE),
    )


@pytest.mark.parametrize("chunk_tokens", [None, 3], ids=["one-chunk", "3-token-chunks"])
def test_response_only_chunked_logits_match_the_whole_logits(model, chunk_tokens):
    assert plain_head(model) is not None
    vocab = model.config.vocab_size
    chunk_bytes = 1 << 30 if chunk_tokens is None else chunk_tokens * 4 * vocab
    batch = ragged_batch(vocab)
    mask = batch.response_mask
    want_lp, want_ent = whole_logits(model, batch)
    out = policy_forward(
        model, batch, temperature=TEMPERATURE, with_entropy=True, chunk_bytes=chunk_bytes
    )
    torch.testing.assert_close(out.logprobs[mask], want_lp[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy[mask], want_ent[mask], rtol=0, atol=1e-5)
    assert not out.logprobs[~mask].any()  # padding carries no value

    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))

    def grads(lp, ent):
        model.zero_grad()
        ((lp * weights)[mask].sum() + (ent * weights)[mask].sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(*whole_logits(model, batch))
    out = policy_forward(
        model, batch, temperature=TEMPERATURE, with_entropy=True, chunk_bytes=chunk_bytes
    )
    got = grads(out.logprobs, out.entropy)
    assert want.keys() == got.keys()
    for name, g in want.items():
        gap = float((got[name] - g).norm() / g.norm().clamp(min=1e-12))
        assert gap < 1e-5, (name, gap)  # measured: 2e-6 at most


def test_the_head_never_sees_prompt_or_padding_positions(model):
    """Count the rows the output head is applied to: the real response tokens, no more."""
    batch = ragged_batch(model.config.vocab_size)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[0])
    )
    try:
        policy_forward(model, batch, temperature=1.0, chunk_bytes=3 * 4 * model.config.vocab_size)
    finally:
        hook.remove()
    assert sum(seen) == int(batch.response_mask.sum())
    assert seen == [3] * (len(seen) - 1) + [seen[-1]]  # chunks of 3 tokens' logits
