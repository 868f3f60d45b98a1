"""Hypothesis strategies that make valid rollout samples and tables."""

from __future__ import annotations

from hypothesis import strategies as st

from rollout import GeneratedSample, build_rollout_table

token = st.integers(min_value=0, max_value=50_000)
logprob = st.floats(min_value=-30.0, max_value=0.0, width=32, allow_nan=False)


@st.composite
def samples(draw, max_rows: int = 12, max_len: int = 16) -> list[GeneratedSample]:
    """A list of valid samples: unique (prompt_id, sample_index), logprobs one per token,
    empty responses only when aborted."""
    n = draw(st.integers(min_value=1, max_value=max_rows))
    prompt_ids = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    seen: dict[int, int] = {}
    out = []
    for pid in prompt_ids:
        idx = seen.get(pid, 0)
        seen[pid] = idx + 1
        response = draw(st.lists(token, min_size=0, max_size=max_len))
        reason = "abort" if not response else draw(st.sampled_from(["stop", "length", "abort"]))
        out.append(
            GeneratedSample(
                prompt_id=pid,
                sample_index=idx,
                prompt_token_ids=draw(st.lists(token, min_size=1, max_size=max_len)),
                response_token_ids=response,
                rollout_logprobs=draw(
                    st.lists(logprob, min_size=len(response), max_size=len(response))
                ),
                finish_reason=reason,
            )
        )
    return out


@st.composite
def rollout_tables(draw, max_rows: int = 12, max_len: int = 16):
    rows = draw(samples(max_rows=max_rows, max_len=max_len))
    labels = [f"label-{i}" for i in range(len(rows))]
    return build_rollout_table(
        rows, weight_version=draw(st.integers(0, 10)), metadata={"label": labels}
    )
