"""load_preferences on every row format, merging, ties, cycles, margins and bad rows; length
balancing, the preference table and the held-out split. CPU only: the tiny model's tokenizer, no
Ray."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestration.data import DataError
from orchestration.preferences import (
    PAIR_CHOSEN,
    PAIR_MARGIN,
    PAIR_REJECTED,
    RESPONSES,
    Pair,
    PreferenceReport,
    PromptGroup,
    balance_lengths,
    drop_cycles,
    length_bucket,
    load_preferences,
    preference_table,
    split_groups,
)
from rollout import schema as S
from tests.orchestration.chat_tokens import (
    ASSISTANT,
    CHAT_TEMPLATE,
    ROLE_TAGS,
    USER,
    E,
    assistant,
    d,
    user,
    write_jsonl,
)

pytestmark = pytest.mark.unit  # pure code in this process


def t(text: str) -> tuple[int, ...]:
    """A text response's tokens: its characters, then EOS."""
    return (*d(text), E)


def load(tmp_path, rows, tok, **kwargs):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    return (*load_preferences(path, tok, max_tokens=kwargs.pop("max_tokens", 32), **kwargs), path)


def better_worse(group: PromptGroup) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each pair as (chosen tokens, rejected tokens)."""
    return [(group.responses[p.chosen], group.responses[p.rejected]) for p in group.pairs]


# ------------------------------------------------------------------------------ row formats


def test_pair_of_strings(tmp_path, tokenizer):
    groups, report, path = load(
        tmp_path, [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}], tokenizer
    )
    assert groups == [
        PromptGroup(
            tuple(d("1+2=")), (t("3"), t("4")), (Pair(0, 1, 0.0),), f"dataset {path}, line 1"
        )
    ]
    assert (report.rows, report.pairs_read, report.pairs, report.groups) == (1, 1, 1, 1)


def test_parquet_rows_are_named_by_row(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2
    pq.write_table(pa.Table.from_pylist(rows), path)
    groups, report = load_preferences(str(path), tokenizer, max_tokens=16)
    # the two rows are one prompt, the same pair twice: kept twice (two annotations)
    assert groups[0].location == f"dataset {path}, row 0" and len(groups[0].pairs) == 2


def test_chat_prompt_with_message_and_text_responses(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": [user("1+2=")], "chosen": [assistant("3")], "rejected": [assistant("4")]},
        # ultrafeedback style: a string prompt, responses that repeat it as the user turn
        {"prompt": "1+2=", "chosen": [user("1+2="), assistant("3")], "rejected": [assistant("5")]},
        {"prompt": [user("1+2=")], "chosen": "3", "rejected": "6"},  # text responses get EOS
    ]
    groups, report, _ = load(tmp_path, rows, chat_tokenizer)
    # all three prompts render as <|user|>1+2=E<|assistant|>, so one group
    assert len(groups) == 1 and groups[0].prompt_ids == (USER, *d("1+2="), E, ASSISTANT)
    assert groups[0].responses == (t("3"), t("4"), t("5"), t("6"))  # "3" once
    assert groups[0].pairs == (Pair(0, 1), Pair(0, 2), Pair(0, 3))


def test_message_response_is_the_template_difference_not_eos(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(ROLE_TAGS, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE.replace("+ eos_token", "+ '='")  # turns end with "="
    rows = [
        {"prompt": [user("1")], "chosen": [assistant("2")], "rejected": "3"},
        {"prompt": [user("1")], "chosen": [assistant("2")], "rejected": [assistant("3")]},
        {"prompt": [user("2")], "chosen": "3", "rejected": "4"},
    ]
    groups, report, _ = load(tmp_path, rows, tok)
    assert report.malformed == 1 and "mix strings and chat messages" in report.problems[0]
    # <|user|>1=<|assistant|> | 2= : the template's end of turn, no EOS
    assert groups[0].prompt_ids == (USER, *d("1="), ASSISTANT)
    assert groups[0].responses == (tuple(d("2=")), tuple(d("3=")))
    # text responses: their tokens and EOS, whatever the template ends a turn with
    assert groups[1].prompt_ids == (USER, *d("2="), ASSISTANT)
    assert groups[1].responses == (t("3"), t("4"))


def test_hh_conversations_share_the_prompt(tmp_path, chat_tokenizer):
    history = [user("1+1="), assistant("2"), user("2+2=")]
    rows = [
        {"chosen": [*history, assistant("4")], "rejected": [*history, assistant("5")]},
        {"chosen": [user("1"), assistant("2")], "rejected": [user("3"), assistant("2")]},
    ]
    groups, report, path = load(tmp_path, rows, chat_tokenizer)
    prompt = (USER, *d("1+1="), E, ASSISTANT, *d("2"), E, USER, *d("2+2="), E, ASSISTANT)
    assert groups == [
        PromptGroup(prompt, (t("4"), t("5")), (Pair(0, 1),), f"dataset {path}, line 1")
    ]
    assert report.malformed == 1 and "line 2" in report.problems[0]
    assert "one conversation up to a final assistant message" in report.problems[0]


def test_ranking_of_four_gives_six_pairs_best_first(tmp_path, tokenizer):
    rows = [{"prompt": "1+1=", "responses": ["2", "3", "4", "5"]}]
    groups, report, _ = load(tmp_path, rows, tokenizer)
    assert len(groups) == 1 and report.pairs_read == 6 and report.pairs == 6
    rank = {t(text): i for i, text in enumerate(["2", "3", "4", "5"])}
    orientation = sorted((rank[c], rank[r]) for c, r in better_worse(groups[0]))
    assert orientation == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all(p.margin == 0.0 for p in groups[0].pairs)


def test_alpaca_ranking_plain_and_chat(tmp_path, tokenizer, chat_tokenizer):
    rows = [{"instruction": "2+2=", "history": [["1+1=", "2"]], "output": ["4", "5", "6"]}]
    groups, report, _ = load(tmp_path, rows, tokenizer)
    # "1+1=\n\n2\n\n2+2=\n\n": the turns, no role tags ("\n" tokenizes to nothing)
    assert groups[0].prompt_ids == tuple(d("1+1=22+2=")) and report.pairs == 3
    assert better_worse(groups[0])[0] == (t("4"), t("5"))
    groups, _, _ = load(tmp_path, rows, chat_tokenizer)
    prompt = (USER, *d("1+1="), E, ASSISTANT, *d("2"), E, USER, *d("2+2="), E, ASSISTANT)
    assert groups[0].prompt_ids == prompt
    rows = [{"instruction": "1+1=", "output": "2"}]  # a supervised row
    with pytest.raises(DataError, match="line 1: 'output' is a string"):
        load(tmp_path, rows, tokenizer)


def test_chat_rows_need_a_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": [user("1")], "chosen": "2", "rejected": "3"}]
    with pytest.raises(DataError, match="no chat template"):
        load(tmp_path, rows, tokenizer)


# ------------------------------------------------------------------------------ merging, ties


def test_rows_with_one_prompt_merge(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "1+1= ", "chosen": "2", "rejected": "6"},  # same tokens: the space is none
    ]
    groups, report, path = load(tmp_path, rows, tokenizer)
    assert [g.location for g in groups] == [f"dataset {path}, line 1", f"dataset {path}, line 2"]
    assert groups[0].responses == (t("2"), t("3"), t("6"))
    assert groups[0].pairs == (Pair(0, 1), Pair(0, 2))
    assert (report.pairs, report.groups) == (3, 2)


def test_ties_are_dropped_by_tokens(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
        {"prompt": "1+1=", "chosen": "2 ", "rejected": "2"},  # equal tokens, unequal text
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    groups, report, _ = load(tmp_path, rows, tokenizer)
    assert (report.pairs_read, report.ties_dropped, report.pairs) == (3, 2, 1)
    assert groups[0].responses == (t("2"), t("3"))
    with pytest.raises(DataError, match="no usable preference pair.*1 ties"):
        load(tmp_path, rows[:1], tokenizer)


def test_overlong_rows_are_skipped(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},  # 4 + 2 tokens
        {"prompt": "1+1=", "chosen": "2", "rejected": "2222"},  # 4 + 5 tokens
    ]
    groups, report, _ = load(tmp_path, rows, tokenizer, max_tokens=8)
    assert (report.overlong_skipped, report.pairs_read, report.pairs) == (1, 1, 1)
    assert groups[0].responses == (t("2"), t("3"))


# ------------------------------------------------------------------------------ cycles


def group_of(pairs) -> PromptGroup:
    """A group whose response i is (i,), with pairs given as (chosen, rejected)."""
    n = 1 + max(max(p) for p in pairs)
    return PromptGroup((1,), tuple((i,) for i in range(n)), tuple(Pair(*p) for p in pairs), "x")


def test_three_cycle_dropped_and_the_pair_off_it_kept(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "3", "rejected": "4"},
        {"prompt": "1+1=", "chosen": "4", "rejected": "2"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "5"},  # from the cycle, not on it
    ]
    groups, report, _ = load(tmp_path, rows, tokenizer)
    assert (report.pairs_read, report.cyclic_dropped, report.pairs) == (4, 3, 1)
    # responses no pair uses are gone, the rest renumbered
    assert groups[0].responses == (t("2"), t("5")) and groups[0].pairs == (Pair(0, 1),)


def test_drop_cycles():
    both_ways = group_of([(0, 1), (1, 0)])
    assert drop_cycles([both_ways]) == ([], 2)
    # 0>1>2>3 and 0>3: no cycle, nothing dropped
    chain = group_of([(0, 1), (1, 2), (2, 3), (0, 3)])
    assert drop_cycles([chain]) == ([chain], 0)
    # two cycles {0, 1} and {2, 3, 4} joined by 1>2: only the joining pair is kept
    kept, dropped = drop_cycles([group_of([(0, 1), (1, 0), (1, 2), (2, 3), (3, 4), (4, 2)])])
    assert dropped == 5 and kept[0].responses == ((1,), (2,)) and kept[0].pairs == (Pair(0, 1),)


def test_drop_cycles_on_a_long_cycle_is_not_recursive():
    n = 5000  # deeper than Python's recursion limit
    ring = group_of([(i, i + 1) for i in range(n - 1)] + [(n - 1, 0)])
    assert drop_cycles([ring]) == ([], n)


# ------------------------------------------------------------------------------ margins, bad rows

MARGINS = {"slightly better": 0.5, "significantly better": 1.0}


def test_margins_from_numbers_and_strengths(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3", "strength": "significantly better"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "4", "margin": 2, "strength": "x"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "5"},
    ]
    groups, _, _ = load(tmp_path, rows, tokenizer, margins=MARGINS)
    assert [p.margin for p in groups[0].pairs] == [1.0, 2.0, 0.0]
    bad = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": m} for m in ("1", True)]
    nan = rows[0] | {"margin": float("nan")}
    _, report, _ = load(tmp_path, [*rows, *bad, nan], tokenizer, margins=MARGINS)
    assert report.malformed == 3 and all("expected a finite number" in p for p in report.problems)


def test_unknown_strength_names_the_line_and_the_known_ones(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        "",
        {"prompt": "1+1=", "chosen": "2", "rejected": "4", "strength": "much better"},
    ]
    _, report, path = load(tmp_path, rows, tokenizer, margins=MARGINS)
    assert report.malformed == 1
    assert report.problems == [
        f"dataset {path}, line 3: unknown 'strength' 'much better'; known strengths: "
        "'slightly better', 'significantly better'"
    ]
    _, report, _ = load(tmp_path, rows, tokenizer)  # no margins at all
    assert "no margins were given" in report.problems[0]


def test_malformed_rows_name_file_and_line(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        "{not json",
        "",
        {"prompt": "1+1=", "chosen": "2"},
        {"prompt": "1+1=", "responses": ["2"]},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": "big"},
        {"text": "1+1=2"},
    ]
    _, report, path = load(tmp_path, rows, tokenizer)
    assert (report.rows, report.malformed, report.pairs) == (6, 5, 1)
    lines = [problem.split(": ", 1)[0] for problem in report.problems]
    assert lines == [f"dataset {path}, line {n}" for n in (2, 4, 5, 6, 7)]
    assert "needs both 'chosen' and 'rejected'" in report.problems[1]
    assert "two responses or more" in report.problems[2]
    assert "not a preference row" in report.problems[4]


def test_strict_raises_on_the_first_malformed_row(tmp_path, tokenizer):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": 7}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"dataset {path}, line 2: a pair row needs")):
        load_preferences(path, tokenizer, max_tokens=16, strict=True)


def test_report_metrics_and_summary(tmp_path, tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    _, report, _ = load(tmp_path, rows, tokenizer)
    assert report.metrics() == {
        "rm_data/rows": 2.0,
        "rm_data/malformed": 0.0,
        "rm_data/overlong_skipped": 0.0,
        "rm_data/pairs_read": 2.0,
        "rm_data/ties_dropped": 1.0,
        "rm_data/cyclic_dropped": 0.0,
        "rm_data/balance_dropped": 0.0,
        "rm_data/pairs": 1.0,
        "rm_data/groups": 1.0,
    }
    summary = report.summary()
    assert "\n" not in summary and "1 preference pairs in 1 prompt groups" in summary
    assert PreferenceReport().buckets == []


# ------------------------------------------------------------------------------ length balancing

EDGES = [0, 1, 3, 6]


def pair_groups(lengths) -> list[PromptGroup]:
    """Group i: prompt (i,), a chosen response of lengths[i][0] tokens and a rejected one of
    lengths[i][1]."""
    return [
        PromptGroup((i,), ((1,) * c, (2,) * r), (Pair(0, 1),), f"row {i}")
        for i, (c, r) in enumerate(lengths)
    ]


# bucket [0, 1): 2 equal; [1, 3): 5 longer chosen (d 1, 2, 1, 2, 1), 2 longer rejected (d 1, 2);
# [3, 6): 1 longer chosen (d 4); [6, inf): none.
LENGTHS = [(3, 3), (2, 1), (4, 2), (1, 2), (5, 4), (3, 1), (1, 3), (2, 1), (5, 1), (4, 4)]


def test_length_bucket():
    edges = [0, 1, 3, 6, 11]
    diffs, buckets = (0, 1, 2, 3, 5, 6, 10, 11, 1000), [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [length_bucket(x, edges) for x in diffs] == buckets
    with pytest.raises(ValueError, match="at least 0"):
        length_bucket(-1, edges)


def test_balance_lengths_evens_each_bucket():
    groups = pair_groups(LENGTHS)
    kept, buckets, dropped = balance_lengths(groups, EDGES, seed=0)
    # fmt: off
    assert buckets == [
        {"bucket": "[0, 1)", "longer_chosen": 0, "longer_rejected": 0, "equal": 2,
         "kept_longer_chosen": 0, "kept_longer_rejected": 0},
        {"bucket": "[1, 3)", "longer_chosen": 5, "longer_rejected": 2, "equal": 0,
         "kept_longer_chosen": 2, "kept_longer_rejected": 2},
        {"bucket": "[3, 6)", "longer_chosen": 1, "longer_rejected": 0, "equal": 0,
         "kept_longer_chosen": 0, "kept_longer_rejected": 0},
        {"bucket": "[6, inf)", "longer_chosen": 0, "longer_rejected": 0, "equal": 0,
         "kept_longer_chosen": 0, "kept_longer_rejected": 0},
    ]
    # fmt: on
    assert dropped == 3 + 1 and len(kept) == 6
    ids = {g.prompt_ids[0] for g in kept}
    assert {0, 9, 3, 6} <= ids  # equal pairs and the two longer-rejected, all kept
    assert 8 not in ids  # the lone [3, 6) pair has no counterpart
    assert len(ids & {1, 2, 4, 5, 7}) == 2  # two of the five longer-chosen


def test_balance_lengths_is_seeded_and_prunes_responses():
    groups = pair_groups(LENGTHS)
    runs = [balance_lengths(groups, EDGES, seed=s)[0] for s in range(8)]
    assert balance_lengths(groups, EDGES, seed=3)[0] == runs[3]
    assert len({tuple(g.prompt_ids for g in run) for run in runs}) > 1
    # one group, 0>1 (d 2, longer chosen) and 0>2 (d 1, longer rejected): balanced as it is;
    # 0>3 (d 4, longer rejected, alone in [3, 6)) dropped, and response 3 with it
    group = PromptGroup(
        (1,), ((5,) * 3, (6,), (7,) * 4, (8,) * 7), (Pair(0, 1), Pair(0, 2), Pair(0, 3)), "x"
    )
    kept, _, dropped = balance_lengths([group], EDGES, seed=0)
    assert dropped == 1 and kept[0].responses == group.responses[:3]
    assert kept[0].pairs == (Pair(0, 1), Pair(0, 2))


@pytest.mark.parametrize("edges", [[], [1, 3], [0, 3, 3], [0, 2.5]])
def test_balance_lengths_rejects_bad_edges(edges):
    with pytest.raises(ValueError, match="ascending integers from 0"):
        balance_lengths(pair_groups(LENGTHS), edges, seed=0)


# ------------------------------------------------------------------------------ table, split


def test_preference_table_types_and_values():
    groups = [
        PromptGroup((3, 4), ((5,), (6, 7), (8,)), (Pair(0, 1, 0.5), Pair(1, 2)), "a"),
        PromptGroup((9,), ((1,), (2,)), (Pair(1, 0, 1.0),), "b"),
    ]
    table = preference_table(groups, first_id=10)
    assert table.schema == pa.schema(
        [
            pa.field(S.PROMPT_ID, pa.int64(), nullable=False),
            pa.field(S.PROMPT_TOKEN_IDS, pa.list_(pa.int32()), nullable=False),
            pa.field(RESPONSES, pa.list_(pa.list_(pa.int32())), nullable=False),
            pa.field(PAIR_CHOSEN, pa.list_(pa.int32()), nullable=False),
            pa.field(PAIR_REJECTED, pa.list_(pa.int32()), nullable=False),
            pa.field(PAIR_MARGIN, pa.list_(pa.float32()), nullable=False),
        ]
    )
    # fmt: off
    assert table.to_pylist() == [
        {S.PROMPT_ID: 10, S.PROMPT_TOKEN_IDS: [3, 4], RESPONSES: [[5], [6, 7], [8]],
         PAIR_CHOSEN: [0, 1], PAIR_REJECTED: [1, 2], PAIR_MARGIN: [0.5, 0.0]},
        {S.PROMPT_ID: 11, S.PROMPT_TOKEN_IDS: [9], RESPONSES: [[1], [2]],
         PAIR_CHOSEN: [1], PAIR_REJECTED: [0], PAIR_MARGIN: [1.0]},
    ]
    # fmt: on


def prompts(groups) -> set[tuple[int, ...]]:
    return {g.prompt_ids for g in groups}


def test_split_groups_holds_out_whole_prompts():
    # prompts 0..9, each in two groups (as when two loads are joined): 20 groups
    groups = [PromptGroup((i % 10,), ((1,), (2,)), (Pair(0, 1),), f"row {i}") for i in range(20)]
    train, held = split_groups(groups, 0.3, seed=1)
    assert len(prompts(held)) == 3 and not prompts(train) & prompts(held)
    assert (len(train), len(held)) == (14, 6) and prompts(train) | prompts(held) == prompts(groups)
    assert (train, held) == split_groups(groups, 0.3, seed=1)
    assert len({frozenset(prompts(split_groups(groups, 0.3, seed=s)[1])) for s in range(5)}) > 1
    order = [int(g.location.split()[1]) for g in train]
    assert order == sorted(order)  # the order of groups kept
    assert split_groups(groups, 0.0, seed=1) == (groups, [])
    assert len(split_groups(groups[:2], 0.01, seed=1)[1]) == 1  # at least one, never all
    with pytest.raises(ValueError, match="less than 1"):
        split_groups(groups, 1.0, seed=0)
