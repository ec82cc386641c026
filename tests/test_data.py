"""Data readers and the Grain prompt pipeline, against slow per-row references."""

import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from echorl_jax.data.pipeline import (
    DataError,
    PromptPipeline,
    load_files,
    load_records,
    render_prompt,
    tokenize_prompts,
)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """Character-level BPE (no merges) with a few special tokens; built offline."""
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(["<unk>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.name_or_path = "tiny-char"
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_records(n: int, seed: int = 0, system: bool = True) -> list[dict]:
    """Odd rows string prompts, even rows message lists ([system,] user)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = f"q{i}:" + "x" * int(rng.integers(0, 12))
        head = [{"role": "system", "content": "be brief"}] if system else []
        prompt = text if i % 2 else [*head, {"role": "user", "content": text}]
        out.append({"prompt": prompt, "ground_truth": str(i), "data_source": f"src{i % 3}"})
    return out


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens_np, y.tokens_np)
        np.testing.assert_array_equal(x.record_index, y.record_index)
        assert x.ground_truth == y.ground_truth


# --- readers -------------------------------------------------------------------


def test_parquet_verl_chat_and_string_prompts(tmp_path):
    msgs = [[{"role": "system", "content": "s"}, {"role": "user", "content": "1+1?"}],
            [{"role": "user", "content": "2+2?"}]]
    pq.write_table(pa.table({
        "data_source": ["math", "gsm"], "prompt": msgs, "ability": ["math", "math"],
        "reward_model": [{"ground_truth": "2", "style": "rule"},
                         {"ground_truth": "4", "style": "rule"}],
    }), tmp_path / "chat.parquet")
    recs = load_records(str(tmp_path / "chat.parquet"))
    assert recs == [
        {"prompt": msgs[0], "ground_truth": "2", "data_source": "math", "ability": "math"},
        {"prompt": msgs[1], "ground_truth": "4", "data_source": "gsm", "ability": "math"},
    ]
    pq.write_table(pa.table({"data_source": ["a"], "prompt": ["plain"],
                             "reward_model": [{"ground_truth": "x"}]}), tmp_path / "s.parquet")
    assert load_records(tmp_path / "s.parquet") == [
        {"prompt": "plain", "ground_truth": "x", "data_source": "a"}]


def test_jsonl_and_json(tmp_path):
    rows = [{"question": "what?", "answer": 42, "id": 7},
            {"prompt": [{"role": "user", "content": "hi"}], "ground_truth": "yo",
             "data_source": "chat"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(tmp_path / "train.jsonl")
    assert recs == [
        {"prompt": "what?", "ground_truth": "42", "data_source": "train", "id": 7},
        {"prompt": [{"role": "user", "content": "hi"}], "ground_truth": "yo",
         "data_source": "chat"},
    ]
    (tmp_path / "dev.json").write_text(json.dumps(rows))
    assert [r["data_source"] for r in load_records(tmp_path / "dev.json")] == ["dev", "chat"]


def _jsonl(lines):
    return "\n".join(lines) + "\n"


GOOD = json.dumps({"prompt": "p", "answer": "a"})
ERROR_CASES = {
    # name: (file name, content writer, substrings the message must contain)
    "bad_json": ("a.jsonl", _jsonl([GOOD, "{not json"]), ["line 2", "row 1", "invalid JSON"]),
    "missing_key": ("a.jsonl", _jsonl([GOOD, GOOD, json.dumps({"prompt": "p"})]),
                    ["line 3", "row 2", "'ground_truth' or 'answer'"]),
    "wrong_prompt_type": ("a.jsonl", _jsonl([json.dumps({"prompt": 5, "answer": "a"})]),
                          ["line 1", "row 0", "'prompt' must be"]),
    "bad_message": ("a.jsonl", _jsonl([GOOD, json.dumps({"prompt": [{"role": "user"}],
                                                         "answer": "a"})]),
                    ["line 2", "row 1", "message 0"]),
    "wrong_answer_type": ("a.json", json.dumps([{"prompt": "p", "answer": ["a"]}]),
                          ["row 0", "'answer' must be a string"]),
    "not_object": ("a.json", json.dumps([{"prompt": "p", "answer": "a"}, 3]),
                   ["row 1", "JSON object"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_json_errors_name_file_and_row(tmp_path, case):
    name, content, expected = ERROR_CASES[case]
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        load_records(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)
    for s in expected:
        assert s in str(e.value)


def test_parquet_errors_name_file_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "data_source": ["d"]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 0: missing column.*reward_model"):
        load_records(path)
    pq.write_table(pa.table({"prompt": ["p", "q"], "data_source": ["d", "d"],
                             "reward_model": [{"ground_truth": "1"}, None]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1: 'reward_model' must be"):
        load_records(path)
    pq.write_table(pa.table({"prompt": ["p", "q"], "data_source": ["d", None],
                             "reward_model": [{"ground_truth": "1"}] * 2}), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1: 'data_source' must be a string"):
        load_records(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet"):
        load_records(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown data file suffix '\.csv'"):
        load_records(tmp_path / "x.csv")


# --- rendering -----------------------------------------------------------------


def test_render_chat_and_format(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "last"}]
    assert render_prompt(msgs, tok, "chat") == (
        "<s><|system|>S\n<|user|>first\n<|assistant|>A\n<|user|>last\n<|assistant|>")
    assert render_prompt("hi", tok, "chat") == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    # A format string never silently keeps one message of a conversation.
    with pytest.raises(DataError, match=r"4 message\(s\).*'system', 'user', 'assistant'.*'chat'"):
        render_prompt(msgs, tok, "Question: {prompt}\nAnswer:")
    one_user = [{"role": "user", "content": "only"}]
    assert render_prompt(one_user, tok, "Question: {prompt}\nAnswer:") == "Question: only\nAnswer:"
    assert render_prompt("a {b}", tok, "{prompt}") == "a {b}"  # prompt text is not re-formatted
    with pytest.raises(DataError, match="tiny-char.*no chat template"):
        render_prompt("hi", make_tokenizer(chat=False), "chat")
    with pytest.raises(DataError, match=r"only field is \{prompt\}.*'question'"):
        render_prompt("hi", tok, "{question}")
    with pytest.raises(DataError, match=r"roles \['system'\]"):
        render_prompt([{"role": "system", "content": "S"}], tok, "{prompt}")


def test_tokenize_special_tokens_and_bos(tok):
    bos = tok.bos_token_id
    plain = tokenize_prompts(["ab"], tok, "{prompt}")[0]
    assert plain == tok.convert_tokens_to_ids(["a", "b"])  # nothing added
    assert tokenize_prompts(["ab"], tok, "{prompt}", add_bos=True)[0] == [bos, *plain]
    chat = tokenize_prompts(["ab"], tok, "chat")[0]
    assert chat[0] == bos and chat.count(bos) == 1  # BOS comes from the chat template
    assert tokenize_prompts(["ab"], tok, "chat", add_bos=True)[0] == chat  # not doubled


# --- pipeline ------------------------------------------------------------------


def reference_row(record, tok, template, p, pad):
    """Slow per-row left padding straight from the tokenizer."""
    ids = tok(render_prompt(record["prompt"], tok, template), add_special_tokens=False)["input_ids"]
    return [pad] * (p - len(ids)) + ids, len(ids)


@pytest.mark.parametrize("template", ["auto", "chat", "Q: {prompt}\nA:"])
def test_left_padding_matches_reference(tok, template):
    recs = make_records(23, system=template != "Q: {prompt}\nA:")
    p = 40
    pipe = PromptPipeline(recs, tok, batch_size=4, max_prompt_len=p, template=template,
                          mode="eval", shard_index=0, shard_count=1)
    assert pipe.num_dropped == 0 and pipe.num_batches == 6
    seen = 0
    for b in pipe:
        assert b.tokens_np.shape == (4, p) and b.tokens_np.dtype == np.int32
        assert b.length_n.dtype == np.int32
        for row, i, n, ok in zip(b.tokens_np, b.record_index, b.length_n, b.valid_n):
            if not ok:
                continue
            want, want_len = reference_row(recs[i], tok, template, p, tok.pad_token_id)
            assert row.tolist() == want and n == want_len
            seen += 1
    assert seen == 23


def test_overlong_dropped_counted_or_error(tok):
    recs = make_records(30, system=False)
    lengths = [len(x) for x in tokenize_prompts([r["prompt"] for r in recs], tok, "{prompt}")]
    p = int(np.median(lengths))
    over = [i for i, n in enumerate(lengths) if n > p]
    assert 0 < len(over) < len(recs)
    pipe = PromptPipeline(recs, tok, batch_size=2, max_prompt_len=p, template="{prompt}",
                          mode="eval", shard_index=0, shard_count=1)
    assert pipe.num_dropped == len(over) and pipe.dropped_indices.tolist() == over
    got = np.concatenate([b.record_index[b.valid_n] for b in pipe])
    assert sorted(got.tolist()) == sorted(set(range(30)) - set(over))
    with pytest.raises(DataError, match=f"record {over[0]}: prompt has {lengths[over[0]]} tokens"):
        PromptPipeline(recs, tok, batch_size=2, max_prompt_len=p, template="{prompt}",
                       on_overlong="error", shard_index=0, shard_count=1)


def train_pipe(tok, recs, **kw):
    kw = {"batch_size": 4, "max_prompt_len": 48, "seed": 0, "shard_index": 0,
          "shard_count": 1, **kw}
    return PromptPipeline(recs, tok, **kw)


def test_shuffle_deterministic_by_seed_and_epochs(tok):
    recs = make_records(20)
    a, b, c = (train_pipe(tok, recs, seed=s) for s in (1, 1, 2))
    ba, bb, bc = take(a, 10), take(b, 10), take(c, 10)
    assert_batches_equal(ba, bb)
    idx = lambda bs: np.concatenate([x.record_index for x in bs])  # noqa: E731
    assert not np.array_equal(idx(ba), idx(bc))
    epoch1, epoch2 = idx(ba[:5]), idx(ba[5:])
    assert sorted(epoch1.tolist()) == list(range(20)) == sorted(epoch2.tolist())
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    assert all(x.valid_n.all() for x in ba)
    assert all(x.ground_truth == [str(i) for i in x.record_index] for x in ba)


def test_finite_epochs_drop_remainder(tok):
    pipe = train_pipe(tok, make_records(10), num_epochs=2)
    assert pipe.num_batches == 5
    batches = list(pipe)
    assert len(batches) == 5 and all(b.tokens_np.shape == (4, 48) for b in batches)


def test_shards_disjoint_and_cover_epoch(tok):
    recs = make_records(24)
    shards = [train_pipe(tok, recs, seed=3, shard_index=h, shard_count=2) for h in range(2)]
    for epoch in range(2):
        got = [np.concatenate([b.record_index for b in take(s, 3)]) for s in shards]
        assert not set(got[0]) & set(got[1])
        assert sorted(np.concatenate(got).tolist()) == list(range(24)), epoch
    # Odd count: equal shards (one prompt per epoch left out), still disjoint.
    odd = [train_pipe(tok, make_records(9), batch_size=2, shard_index=h, shard_count=2,
                      num_epochs=1) for h in range(2)]
    got = [np.concatenate([b.record_index for b in s]) for s in odd]
    assert len(got[0]) == len(got[1]) == 4 and not set(got[0]) & set(got[1])


def test_state_round_trip(tok):
    recs = make_records(14)
    pipe = train_pipe(tok, recs, batch_size=3, seed=5)
    take(pipe, 7)  # crosses an epoch boundary (14 prompts / 3 per batch)
    state = json.loads(json.dumps(pipe.get_state()))
    want = take(pipe, 6)
    fresh = train_pipe(tok, recs, batch_size=3, seed=5)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 6), want)
    other = train_pipe(tok, recs, batch_size=3, seed=6)
    with pytest.raises(DataError, match="does not match.*'seed': \\(5, 6\\)"):
        other.set_state(state)


def test_eval_covers_every_record_once_over_shards(tok):
    recs = make_records(11)
    shards = [PromptPipeline(recs, tok, batch_size=4, max_prompt_len=48, mode="eval",
                             shard_index=h, shard_count=3) for h in range(3)]
    outs = [list(s) for s in shards]
    assert [len(o) for o in outs] == [1, 1, 1]  # same batch count on every host
    idx = np.concatenate([b.record_index[b.valid_n] for o in outs for b in o])
    assert sorted(idx.tolist()) == list(range(11))
    pads = [b for o in outs for b in o if not b.valid_n.all()]
    assert pads and all((b.record_index[~b.valid_n] == -1).all() for b in pads)
    assert all(b.tokens_np.shape == (4, 48) for o in outs for b in o)


def test_config_errors(tok):
    with pytest.raises(DataError, match="batch_size=0"):
        train_pipe(tok, make_records(4), batch_size=0)
    with pytest.raises(DataError, match="shard_index=2"):
        train_pipe(tok, make_records(4), shard_index=2, shard_count=2)
    with pytest.raises(DataError, match="no full batch"):
        train_pipe(tok, make_records(3), batch_size=4, num_epochs=1)


# --- template "auto", JSON-encoded prompts, column mapping, mixtures ----------------


def test_auto_template_per_record_type(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    # A tokenizer with a chat template gets it for message lists (as verl does) and for strings, as one
    # user message: a chat model fed raw text never stops at its end-of-turn token (issue 23).
    assert render_prompt(msgs, tok, "auto") == "<s><|system|>S\n<|user|>hi\n<|assistant|>"
    assert render_prompt("a {b}", tok, "auto") == "<s><|user|>a {b}\n<|assistant|>"
    assert render_prompt("a {b}", tok, "{prompt}") == "a {b}"
    plain = make_tokenizer(chat=False)
    assert render_prompt("hi", plain, "auto") == "hi"  # e.g. the arith task's char tokenizer
    with pytest.raises(DataError, match=r"record 1: tokenizer 'tiny-char' has no chat template.*"
                                        r"data\.template"):
        tokenize_prompts(["ok", msgs], plain, "auto")
    pipe = PromptPipeline(make_records(6), tok, batch_size=6, max_prompt_len=48, mode="eval",
                          shard_index=0, shard_count=1)  # default template: auto
    b = next(pipe)
    for row, i, n in zip(b.tokens_np, b.record_index, b.length_n):
        p = make_records(6)[i]["prompt"]
        want = render_prompt(p, tok, "chat")
        assert row[len(row) - n:].tolist() == tok(want, add_special_tokens=False)["input_ids"]


def test_json_encoded_message_list_is_decoded(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    rows = [{"prompt": json.dumps(msgs), "answer": "2"},
            {"prompt": "[1, 2] -- sort this", "answer": "x"},  # not JSON: a plain prompt
            {"prompt": "[1, 2]", "answer": "x"},  # JSON, but not messages
            {"prompt": " " + json.dumps(msgs[1:]), "answer": "2"}]
    (tmp_path / "a.jsonl").write_text(_jsonl([json.dumps(r) for r in rows]))
    got = [r["prompt"] for r in load_records(tmp_path / "a.jsonl")]
    assert got == [msgs, "[1, 2] -- sort this", "[1, 2]", msgs[1:]]
    pq.write_table(pa.table({"prompt": [json.dumps(msgs)], "data_source": ["d"],
                             "reward_model": [{"ground_truth": "2"}]}), tmp_path / "a.parquet")
    assert load_records(tmp_path / "a.parquet")[0]["prompt"] == msgs


def test_column_mapping(tmp_path):
    rows = [{"problem": "2+2?", "final": 4, "extra": {"gold": "four"}, "id": 1}]
    (tmp_path / "trl.jsonl").write_text(_jsonl([json.dumps(r) for r in rows]))
    assert load_records(tmp_path / "trl.jsonl", prompt_key="problem", answer_key="final") == [
        {"prompt": "2+2?", "ground_truth": "4", "data_source": "trl",
         "extra": {"gold": "four"}, "id": 1}]
    # A dotted key reads a nested struct.
    rec = load_records(tmp_path / "trl.jsonl", prompt_key="problem", answer_key="extra.gold")[0]
    assert rec["ground_truth"] == "four" and "extra" not in rec and rec["final"] == 4
    # A plain parquet (no reward_model, no data_source) loads with the keys set.
    pq.write_table(pa.table({"problem": ["a?", "b?"], "final": ["1", "2"]}), tmp_path / "p.parquet")
    assert load_records(tmp_path / "p.parquet", prompt_key="problem", answer_key="final") == [
        {"prompt": "a?", "ground_truth": "1", "data_source": "p"},
        {"prompt": "b?", "ground_truth": "2", "data_source": "p"}]
    # ... and with auto keys when it has `prompt` and `answer` columns.
    pq.write_table(pa.table({"prompt": ["a?"], "answer": ["1"]}), tmp_path / "q.parquet")
    assert load_records(tmp_path / "q.parquet")[0]["ground_truth"] == "1"
    # Errors name the file, the row and the key.
    with pytest.raises(DataError, match=r"p\.parquet, row 0: missing column\(s\) 'question'"):
        load_records(tmp_path / "p.parquet", prompt_key="question", answer_key="final")
    (tmp_path / "two.jsonl").write_text(_jsonl([json.dumps(rows[0]), json.dumps({"problem": "x"})]))
    with pytest.raises(DataError, match=r"two\.jsonl, line 2 \(row 1\): missing 'final'"):
        load_records(tmp_path / "two.jsonl", prompt_key="problem", answer_key="final")
    with pytest.raises(DataError, match=r"trl\.jsonl, line 1 \(row 0\): 'extra' must be a struct"
                                        r" with a 'nope' field \(data key 'extra\.nope'\)"):
        load_records(tmp_path / "trl.jsonl", prompt_key="problem", answer_key="extra.nope")
    with pytest.raises(DataError, match=r"\(row 0\): missing answer column.*data\.answer_key"):
        load_records(tmp_path / "trl.jsonl", prompt_key="problem")


def test_mixture_concatenates_in_order_and_keeps_sources(tmp_path):
    (tmp_path / "gsm.jsonl").write_text(_jsonl([json.dumps({"prompt": f"g{i}", "answer": i})
                                                for i in range(3)]))
    pq.write_table(pa.table({"prompt": ["m0"], "data_source": ["math"],
                             "reward_model": [{"ground_truth": "0"}]}), tmp_path / "m.parquet")
    recs = load_files([tmp_path / "gsm.jsonl", str(tmp_path / "m.parquet")])
    assert [(r["prompt"], r["data_source"]) for r in recs] == [
        ("g0", "gsm"), ("g1", "gsm"), ("g2", "gsm"), ("m0", "math")]
    assert load_files(tmp_path / "gsm.jsonl") == load_records(tmp_path / "gsm.jsonl")
    (tmp_path / "bad.jsonl").write_text(_jsonl([GOOD, "{"]))
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2"):
        load_files([tmp_path / "gsm.jsonl", tmp_path / "bad.jsonl"])


def test_length_errors_name_the_longest_prompt(tok):
    recs = [{"prompt": "x" * n, "ground_truth": "", "data_source": "s"} for n in (5, 30, 12, 9)]
    kw = dict(batch_size=1, max_prompt_len=10, template="{prompt}", shard_index=0, shard_count=1)
    with pytest.raises(DataError, match=r"record 1: prompt has 30 tokens.*longest: record 1,"
                                        r" 30 tokens"):
        PromptPipeline(recs, tok, on_overlong="error", **kw)
    with pytest.raises(DataError, match=r"no prompts left: all 4 records.*max_prompt_len=4"
                                        r" \(shortest 5 tokens; longest: record 1, 30 tokens\)"):
        PromptPipeline(recs, tok, **dict(kw, max_prompt_len=4))
    assert PromptPipeline(recs, tok, **kw).longest == "longest: record 1, 30 tokens"
