"""The data path on real files from ../shared/data and on small broken ones written here."""

import json

import pytest
from conftest import SHARED_DATA

from dstune.config import DataConfig
from dstune.data import (
    DataError,
    dropped_rows_warning,
    load_examples,
    prepare_data,
    split_examples,
    tokenize_examples,
)
from dstune.data.read import READERS
from dstune.data.tokenize import IGNORE
from dstune.models.templates import DEEPSEEK_V3_TEMPLATE


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(tmp_path, name, rows):
    return _write(tmp_path, name, "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                                          for r in rows))


GOOD = {"instruction": "Say hi", "input": "", "output": "Hi"}


# --------------------------------------------------------------------------- reading real files


@pytest.mark.parametrize("name, fmt, count", [
    ("alpaca_zh_demo.json", "alpaca", 1000),
    ("alpaca_en_demo.json", "alpaca", 999),  # the README says 1,000; the file holds 999
    ("identity.json", "alpaca", 91),
    ("wiki_demo.txt", "text", 30),  # one (long) article per line
])
def test_real_files(name, fmt, count):
    loaded = load_examples(SHARED_DATA / name)
    assert (loaded.format, len(loaded.examples), loaded.dropped) == (fmt, count, {})
    first = loaded.examples[0]
    assert first["source"] in (f"{name}:row 1", f"{name}:line 1")
    if fmt == "alpaca":
        assert [m["role"] for m in first["messages"]] == ["user", "assistant"]


def test_alpaca_input_is_appended_after_a_blank_line():
    loaded = load_examples(SHARED_DATA / "alpaca_en_demo.json")
    raw = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    i = next(i for i, r in enumerate(raw) if r["input"].strip())
    user, reply = loaded.examples[i]["messages"]
    assert user["content"] == raw[i]["instruction"] + "\n\n" + raw[i]["input"]
    assert reply["content"] == raw[i]["output"]


def test_csv_without_known_columns_says_what_it_found_and_what_is_needed(tmp_path):
    # chnsenticorp's label,review is detected as classification (tests/test_prepare.py); with the
    # label column renamed, no format fits and the error says what each one needs.
    csv_path = SHARED_DATA / "chnsenticorp_htl.csv"
    renamed = tmp_path / "stars.csv"
    renamed.write_text(csv_path.read_text(encoding="utf-8").replace("label,review", "stars,review", 1), "utf-8")
    with pytest.raises(DataError) as err:
        load_examples(renamed)
    msg = str(err.value)
    assert "stars.csv" in msg and "['review', 'stars']" in msg
    assert "text: 'text'" in msg and "'instruction' and 'output'" in msg and "'messages'" in msg
    assert "classification: 'label' and a text column" in msg
    rows = list(READERS[".csv"](csv_path))  # the reader itself copes with the file: 6,000 rows, 2 columns
    assert len(rows) == 6000 and rows[0][0] == "line 2" and set(rows[0][1]) == {"label", "review"}


def test_csv_formats_and_row_lines(tmp_path):
    path = _write(tmp_path, "a.csv", 'instruction,input,output\n"multi\nline",,ok\nq,,\n')
    with pytest.raises(DataError, match=r"a\.csv, line 4: the assistant turn \(turn 1 of the conversation\) is empty"):
        load_examples(path)  # the quoted field spans lines 2-3, so the bad row starts on line 4
    loaded = load_examples(_write(tmp_path, "t.csv", "text,id\nhello,1\nworld,0\n"))
    assert loaded.format == "text" and [e["text"] for e in loaded.examples] == ["hello", "world"]
    loaded = load_examples(_write(tmp_path, "l.csv", "text,label\nhello,1\nworld,0\n"))  # a label column: classification
    assert loaded.format == "classification" and [e["label"] for e in loaded.examples] == ["1", "0"]
    with pytest.raises(DataError, match=r"c\.csv, line 3: has 4 fields, the header has 2"):
        load_examples(_write(tmp_path, "c.csv", "text,label\nfine,1\nbad,1,2,3\n"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"instruction": "x", "input": None, "output": None}]), path)
    with pytest.raises(DataError, match=r"d\.parquet, row 2: field 'output' is null"):
        load_examples(path)
    assert len(load_examples(path, lenient=True).examples) == 1
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_examples(_write(tmp_path, "fake.parquet", "not parquet"))


def test_messages_and_sharegpt(tmp_path):
    path = _jsonl(tmp_path, "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "c"},
                           {"from": "gpt", "value": "d"}]},
    ])
    loaded = load_examples(path, system="Be kind.")
    assert loaded.format == "messages"
    assert loaded.examples[0]["messages"] == [{"role": "system", "content": "Be kind."},
                                              {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert loaded.examples[1]["messages"][0] == {"role": "system", "content": "s"}  # its own system is kept
    assert loaded.examples[1]["source"] == "chat.jsonl:line 2"


def test_alpaca_history_and_system(tmp_path):
    row = dict(GOOD, system="S", history=[["q1", "a1"]])
    messages = load_examples(_jsonl(tmp_path, "h.jsonl", [row])).examples[0]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "Say hi"), ("assistant", "Hi")]
    only_input = load_examples(_jsonl(tmp_path, "i.jsonl", [dict(GOOD, instruction=" ", input="x")]))
    assert only_input.examples[0]["messages"][0] == {"role": "user", "content": "x"}
    with pytest.raises(DataError, match="history item 0"):
        load_examples(_jsonl(tmp_path, "h2.jsonl", [dict(GOOD, history=[["only one"]])]))


def test_json_file_with_one_object_per_line(tmp_path):
    loaded = load_examples(_jsonl(tmp_path, "lines.json", [GOOD, GOOD]))
    assert len(loaded.examples) == 2 and loaded.examples[1]["source"] == "lines.json:line 2"


def test_max_samples_takes_the_first_usable_rows():
    loaded = load_examples(SHARED_DATA / "alpaca_zh_demo.json", max_samples=7)
    assert [e["source"] for e in loaded.examples] == [f"alpaca_zh_demo.json:row {i}" for i in range(1, 8)]


# --------------------------------------------------------------------------- errors name file and line


def test_broken_json_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, "bad.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": '])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "bad.jsonl" in str(err.value) and "line 3" in str(err.value) and "not valid JSON" in str(err.value)


def test_missing_field_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: missing field 'output'"):
        load_examples(_jsonl(tmp_path, "m.jsonl", [GOOD, {"instruction": "x"}]), fmt="alpaca")
    with pytest.raises(DataError, match=r"w\.json, row 2: field 'output' is int 5, expected a string"):
        load_examples(_write(tmp_path, "w.json", json.dumps([GOOD, dict(GOOD, output=5)])))
    with pytest.raises(DataError, match=r"r\.jsonl, line 1: .*role='bot'; accepted: system, user, human"):
        load_examples(_jsonl(tmp_path, "r.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]))
    with pytest.raises(DataError, match=r"o\.jsonl, line 1: turns are \['assistant', 'user'\]"):
        load_examples(_jsonl(tmp_path, "o.jsonl", [{"messages": [{"role": "assistant", "content": "x"},
                                                                {"role": "user", "content": "y"}]}]))


def test_lenient_mode_drops_and_counts_by_reason(tmp_path):
    path = _jsonl(tmp_path, "mixed.jsonl", [
        GOOD, "not json", {"instruction": "x"}, {"instruction": "x", "output": "   "}, [1, 2],
        {"instruction": "x", "output": ["a"]}, GOOD, {"instruction": "y", "output": ""}])
    loaded = load_examples(path, lenient=True)
    assert len(loaded.examples) == 2 and loaded.rows_read == 8
    assert loaded.dropped == {"not valid JSON": 1, "missing field 'output'": 1, "empty assistant reply": 2,
                              "not an object": 1, "field 'output' is not a string": 1}
    assert loaded.first_dropped["empty assistant reply"] == "line 4"


def test_empty_unknown_missing_and_unusable_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_examples(_write(tmp_path, "empty.jsonl", ""))
    with pytest.raises(DataError, match=r"blank\.txt: the file is empty"):
        load_examples(_write(tmp_path, "blank.txt", "\n  \n"))
    with pytest.raises(DataError, match=r"list\.json: the file is empty"):
        load_examples(_write(tmp_path, "list.json", "[]"))
    accepted = r"accepted: \.json, \.jsonl, \.csv, \.parquet, \.txt"
    with pytest.raises(DataError, match=r"unknown file type '\.xlsx'; " + accepted):
        load_examples(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"junk\.jsonl: no usable examples in 2 rows \(not valid JSON: 2\)"):
        load_examples(_jsonl(tmp_path, "junk.jsonl", ["{", "}"]), lenient=True)
    with pytest.raises(DataError, match=r"obj\.json: the top level is an object with keys \['train'\]"):
        load_examples(_write(tmp_path, "obj.json", '{\n"train": []\n}'))
    with pytest.raises(DataError, match=r"latin\.jsonl, line 2: is not UTF-8"):
        (tmp_path / "latin.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n')
        load_examples(tmp_path / "latin.jsonl")


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(101))
    a = split_examples(items, (0.8, 0.1, 0.1), seed=3)
    assert a == split_examples(items, (0.8, 0.1, 0.1), seed=3)
    assert a != split_examples(items, (0.8, 0.1, 0.1), seed=4)
    assert [len(s) for s in a] == [81, 10, 10]
    assert sorted(a[0] + a[1] + a[2]) == items
    assert [len(s) for s in split_examples(list(range(3)), (0.8, 0.1, 0.1))] == [1, 1, 1]
    assert [len(s) for s in split_examples(list(range(5)), (0.9, 0.1, 0.0))] == [4, 1, 0]
    assert [len(s) for s in split_examples([1], (0.8, 0.1, 0.1))] == [1, 0, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        split_examples(items, (0.5, 0.1, 0.1))


# --------------------------------------------------------------------------- tokenize


def _chat(user, reply, source="t:1"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "source": source}


def test_truncate_versus_drop(deepseek_tokenizer):
    examples = [_chat("short", "fine"), _chat("q", "word " * 40), _chat("word " * 40, "a")]
    kw = dict(tokenizer=deepseek_tokenizer, chat_template=DEEPSEEK_V3_TEMPLATE, max_length=16)
    truncated = tokenize_examples(examples, overflow="truncate", **kw)
    # The long reply is cut (kept); the long prompt leaves no reply in 16 tokens (dropped, counted).
    assert (len(truncated.rows), truncated.truncated, truncated.dropped) == (2, 1, {"no trainable tokens": 1})
    assert all(len(r["input_ids"]) <= 16 and len(r["labels"]) == len(r["input_ids"]) for r in truncated.rows)
    dropped = tokenize_examples(examples, overflow="drop", **kw)
    assert (len(dropped.rows), dropped.truncated, dropped.dropped) == (1, 0, {"too long": 2})


def test_text_examples_get_bos_and_eos_and_full_loss(deepseek_tokenizer):
    tok = deepseek_tokenizer
    out = tokenize_examples([{"text": "Hello world", "source": "w.txt:line 1"}], tok, DEEPSEEK_V3_TEMPLATE, 64)
    row = out.rows[0]
    assert row["input_ids"] == [tok.bos_token_id, 19923, 2058, tok.eos_token_id] == row["labels"]
    assert row["source"] == "w.txt:line 1" and out.trainable_tokens == 4


def test_control_tokens_in_data_are_dropped(deepseek_tokenizer):
    examples = [_chat("hi", "stop<｜end▁of▁sentence｜>early"), _chat("<｜Assistant｜>forged", "x"),
                _chat("hi", "<think>\nok\n</think>\n\nfine")]
    out = tokenize_examples(examples, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, 64)
    assert len(out.rows) == 1 and out.dropped == {"contains a control token": 2}


def test_alpaca_rows_mask_only_the_reply(deepseek_tokenizer):
    tok = deepseek_tokenizer
    loaded = load_examples(SHARED_DATA / "identity.json", max_samples=5)
    out = tokenize_examples(loaded.examples, tok, DEEPSEEK_V3_TEMPLATE, 256)
    raw = json.loads((SHARED_DATA / "identity.json").read_text(encoding="utf-8"))
    for row, item in zip(out.rows, raw):
        trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
        assert trained == item["output"] + "<｜end▁of▁sentence｜>"


# --------------------------------------------------------------------------- prepare_data


def test_prepare_data_end_to_end(deepseek_tokenizer):
    cfg = DataConfig(train=str(SHARED_DATA / "alpaca_zh_demo.json"), max_samples=50, max_length=128)
    data = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=42)
    rep = data.report
    assert rep["format"] == "alpaca" and rep["read"]["train"]["examples"] == 50
    assert rep["split"] == {"train": 40, "val": 5, "test": 5}
    assert len(data.train) + rep["tokenized"]["train"]["dropped"].get("no trainable tokens", 0) == 40
    assert rep["tokenized"]["train"]["truncated"] > 0  # some answers are longer than 128 tokens
    assert rep["trainable_tokens"] == sum(lab != IGNORE for r in data.train for lab in r["labels"]) > 0
    sources = [r["source"] for r in data.train + data.val + data.test]
    assert len(set(sources)) == len(sources)
    again = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=42)
    assert again.train == data.train and again.val == data.val and again.report == rep
    json.dumps(rep)  # the report is written to the run directory as JSON


def test_prepare_data_with_a_validation_file(tmp_path, deepseek_tokenizer):
    cfg = DataConfig(train=str(SHARED_DATA / "identity.json"), validation=str(_jsonl(tmp_path, "v.jsonl", [GOOD])),
                     max_length=64)
    data = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=0)
    assert (len(data.train), len(data.val), data.test) == (91, 1, [])
    assert data.report["files"]["validation"].endswith("v.jsonl")
    with pytest.raises(DataError, match="set data.train"):
        prepare_data(DataConfig(), deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=0)


def test_a_max_length_that_cuts_off_most_answers_is_warned_about(deepseek_tokenizer):
    # At 24 tokens the template and the instruction fill the row: most answers are cut off entirely, those
    # rows carry no loss and are dropped. Training goes on (some rows are left), but the user is told.
    cfg = DataConfig(train=str(SHARED_DATA / "alpaca_zh_demo.json"), max_samples=100, max_length=24)
    rep = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=0).report
    train, val = rep["tokenized"]["train"], rep["tokenized"]["val"]
    dropped = train["dropped"]["no trainable tokens"]
    assert 0 < train["rows"] and dropped >= 8  # the case the warning is for: a tenth or more of 80 rows gone
    warning = dropped_rows_warning(rep, 24)
    assert f"{dropped} of 80 train rows (no trainable tokens: {dropped})" in warning
    assert f"{val['rows']} validation rows with {val['trainable_tokens']} trainable tokens" in warning
    assert "data.max_length=24" in warning
    roomy = DataConfig(train=str(SHARED_DATA / "alpaca_zh_demo.json"), max_samples=100, max_length=1024)
    assert dropped_rows_warning(prepare_data(roomy, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=0).report,
                                1024) is None
