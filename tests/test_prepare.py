"""Data preparation: normalisation, PII scrubbing, duplicates, contamination, stratified split, reports,
classification and reasoning formats, and ``dstune data prepare|inspect`` on the real data sets."""

import json
from collections import Counter

import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

from dstune.cli import app
from dstune.config import DataConfig
from dstune.data import DataError, load_examples, prepare_data
from dstune.data.clean import (
    CleanOptions,
    clean_examples,
    id_card_valid,
    luhn_valid,
    normalize_text,
    scrub_pii,
)
from dstune.data.formats import strip_reasoning
from dstune.data.inspect import inspect_file, render_mask
from dstune.data.overlap import find_overlaps, ngrams, units
from dstune.data.prepare import PrepareOptions, length_stats, prepare_files
from dstune.data.tokenize import tokenize_examples
from dstune.models.templates import DEEPSEEK_R1_TEMPLATE, DEEPSEEK_V3_TEMPLATE

CHNSENTI = SHARED_DATA / "chnsenticorp_htl.csv"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _text(s, i=0):
    return {"text": s, "source": f"t:{i}"}


# --------------------------------------------------------------------------- normalisation and PII


def test_nfkc_turns_full_width_into_ascii_and_drops_invisible_characters():
    assert normalize_text("ＡＢＣ１２３\u200b好\x07\r\n") == "ABC123好\n"
    assert normalize_text("你好，世界！") == "你好,世界!"  # NFKC: Chinese punctuation becomes ASCII
    assert normalize_text("你好，世界！", "NFC") == "你好，世界！"


def test_checksums_by_hand():
    # GB 11643's sample ID: sum(d_i * w_i) over the first 17 digits is 167; 167 mod 11 = 2 -> "X".
    assert id_card_valid("11010519491231002X") and id_card_valid("11010519491231002x")
    assert not id_card_valid("110105194912310021")  # wrong check digit
    assert not id_card_valid("110105194913310028")  # month 13
    # Luhn: 4111 1111 1111 1111 -> 8 ones + (7 ones and the 4, doubled: 14 + 8) = 30, a multiple of 10.
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert luhn_valid("79927398713")  # Wikipedia's worked example
    # 6222021234567890128: undoubled digits 42 + doubled digits (digit sums) 38 = 80.
    assert luhn_valid("6222021234567890128")


def test_scrub_replaces_each_kind_and_leaves_other_numbers_alone():
    text = ("联系 13812345678 或 +86 138-1234-5678，邮箱 zhang.san@example.com.cn；身份证 11010519491231002X，"
            "银行卡 6222 0212 3456 7890 128，Visa 4111111111111111，座机 010-12345678，US (555) 123-4567。"
            "订单 20231225，错号 110105194912310021，卡 4111111111111112，2023年12月25日，价格 1380元")
    out, counts = scrub_pii(text)
    assert out == ("联系 <PHONE> 或 <PHONE>，邮箱 <EMAIL>；身份证 <ID_CARD>，银行卡 <BANK_CARD>，Visa <BANK_CARD>，"
                   "座机 <PHONE>，US <PHONE>。订单 20231225，错号 110105194912310021，卡 4111111111111112，"
                   "2023年12月25日，价格 1380元")
    assert counts == {"phone": 4, "email": 1, "id_card": 1, "bank_card": 2}


def test_full_width_phone_is_scrubbed_after_normalisation():
    [ex] = clean_examples([_text("电话：１３８１２３４５６７８")]).examples
    assert ex["text"] == "电话:<PHONE>"


# --------------------------------------------------------------------------- filters and duplicates


def test_length_filters_and_exact_duplicates_on_normalised_text():
    rows = [_text("Hello   World", 1), _text("hello world", 2), _text("\u200b\u200b", 3), _text("x", 4),
            _text("a" * 50, 5), _text("Ｈｅｌｌｏ ｗｏｒｌｄ", 6), _text("something else", 7)]
    out = clean_examples(rows, CleanOptions(min_chars=2, max_chars=40, near_dedup=False))
    assert [ex["source"] for ex in out.examples] == ["t:1", "t:7"]
    assert out.dropped == {"exact duplicate": 2, "empty": 1, "too short": 1, "too long": 1}
    assert out.duplicate_of == {"t:2": "t:1", "t:6": "t:1"}
    assert out.first_dropped["exact duplicate"] == "t:2"
    off = clean_examples(rows, CleanOptions(normalize=False, dedup=False, near_dedup=False, min_chars=1, max_chars=None))
    # Without normalisation the zero-width characters stay (they are not whitespace), so nothing is empty.
    assert len(off.examples) == 7 and off.dropped == {}


def test_conversation_duplicates_compare_prompt_and_reply():
    def conv(q, a, i):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": f"c:{i}"}

    out = clean_examples([conv("你好", "你好！有什么可以帮你？", 1), conv("你好", "你好！有什么可以帮你？", 2),
                          conv("你好", "我是助手。", 3)], CleanOptions(near_dedup=False))
    assert [ex["source"] for ex in out.examples] == ["c:1", "c:3"]


def test_near_duplicates_with_minhash():
    base = ("这家酒店的位置很好，离地铁站只有五分钟，房间干净整洁，服务员也很热情，早餐种类丰富。"
            "周边有很多餐馆和便利店，晚上出去散步也很方便。前台办理入住很快，还送了水果。下次出差还会再来住。")
    near = base.replace("五分钟", "六分钟")
    # One of n characters changed replaces the 5 shingles that cover it: Jaccard (n-4-5) / (n-4+5).
    n = len(normalize_text(base))
    shingles = [{normalize_text(t)[i:i + 5] for i in range(n - 4)} for t in (base, near)]
    assert len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1]) == (n - 9) / (n + 1) > 0.85
    far = "房间太小了，隔音很差，晚上很吵，空调也坏了，前台态度冷淡，不会再来了。"
    out = clean_examples([_text(base, 1), _text(near, 2), _text(far, 3)])
    assert [ex["source"] for ex in out.examples] == ["t:1", "t:3"]
    assert out.dropped == {"near duplicate": 1} and out.duplicate_of == {"t:2": "t:1"}
    strict = clean_examples([_text(base, 1), _text(near, 2)], CleanOptions(near_threshold=0.95))
    assert len(strict.examples) == 2


def test_classification_duplicates_with_other_labels_are_named(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [{"text": "不错，很满意", "label": 1}, {"text": "不错，很满意", "label": 0}])
    out = clean_examples(load_examples(path).examples)
    assert out.dropped == {"duplicate with another label": 1}


# --------------------------------------------------------------------------- contamination


def test_units_and_ngrams_by_hand():
    assert units("Hello, World! 你好。Test-2") == ["hello", "world", "你", "好", "test", "2"]
    assert ngrams("a b c d", 3) == {"a b c", "b c d"}
    assert ngrams("酒店很好", 3) == {"酒店很", "店很好"}
    assert ngrams("a b", 3) == {"a b"}  # shorter than n: the whole text


def test_overlap_names_the_rows_and_decontaminate_removes_them(tmp_path):
    test_row = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    train = [_text("intro: The quick brown fox jumps over the lazy dog while the cat sleeps on it", 1),
             _text("a completely different sentence about hotels and rooms and breakfast", 2)]
    hits = find_overlaps(train, {"test": [_text(test_row, 9)]}, n=13)
    # Shared 13-grams: "the quick ... cat sleeps" and "quick ... sleeps on"; the first in sorted order is shown.
    assert [(h["source"], h["matches"], h["shared_ngrams"]) for h in hits] == [("t:1", "test: t:9", 2)]
    assert hits[0]["ngram"] == "quick brown fox jumps over the lazy dog while the cat sleeps on"
    assert hits[0]["fraction"] == round(2 / 4, 4)  # the train row has 16 units, so 4 13-grams

    # End to end with an extra eval file: Chinese rows, character units.
    rows = [{"text": f"第{i}条评论：房间{'很' * (i % 5)}干净，服务{i}号员工态度很好，推荐入住。", "label": str(i % 2)}
            for i in range(40)]
    leaked = rows[0]["text"]
    eval_file = _jsonl(tmp_path / "bench.jsonl", [{"text": leaked, "label": "0"}])
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    opts = PrepareOptions(eval_files=[str(eval_file)], clean=CleanOptions(near_dedup=False))
    report = prepare_files([data], tmp_path / "kept", opts)
    c = report["contamination"]
    assert c["checked_against"] == {"val": 4, "test": 4, "bench.jsonl": 1}
    leaked_hits = [h for h in c["rows"] if h["matches"] == "bench.jsonl: rows.jsonl:line 1"]
    in_train = any(json.loads(line)["text"] == leaked for line in (tmp_path / "kept" / "train.jsonl").open())
    assert bool(leaked_hits) == in_train
    opts.decontaminate = True
    report = prepare_files([data], tmp_path / "clean", opts)
    assert report["dropped"].get("contaminated", 0) == c["train_rows_overlapping"]
    assert report["split"]["train"] == 32 - c["train_rows_overlapping"]
    train_texts = {json.loads(line)["text"] for line in (tmp_path / "clean" / "train.jsonl").open()}
    assert leaked not in train_texts


# --------------------------------------------------------------------------- prepare end to end


def test_prepare_chnsenticorp_stratified_deterministic_and_readable(tmp_path):
    report = prepare_files([CHNSENTI], tmp_path / "a", PrepareOptions(seed=3))
    assert report["format"] == "classification" and report["inputs"][0]["rows_read"] == 6000
    assert report["dropped"] == {"near duplicate": 3}  # measured on this file: three reposted reviews
    assert report["cleaning"]["pii_replaced"]["phone"] >= 1
    n = 6000 - 3
    assert report["split"] == {"train": n - 2 * 599, "val": 599, "test": 599}
    labels = report["labels"]
    assert labels["names"] == ["0", "1"]
    overall = (labels["train"]["1"] + labels["val"]["1"] + labels["test"]["1"]) / n
    for split in ("train", "val", "test"):  # stratified: every split keeps the 68.5% positive share
        share = labels[split]["1"] / report["split"][split]
        assert abs(share - overall) < 0.002, (split, share, overall)
    files = {s: (tmp_path / "a" / f"{s}.jsonl").read_text(encoding="utf-8") for s in ("train", "val", "test")}
    sources = [json.loads(line)["source"] for text in files.values() for line in text.splitlines()]
    assert len(sources) == len(set(sources)) == n  # disjoint and complete
    # Deterministic from the seed (on the first 1,000 rows, to keep the test quick).
    runs = {name: PrepareOptions(seed=seed, max_samples=1000) for name, seed in (("b", 3), ("c", 3), ("d", 4))}
    tests = {name: (prepare_files([CHNSENTI], tmp_path / name, opts), (tmp_path / name / "test.jsonl").read_bytes())[1]
             for name, opts in runs.items()}
    assert tests["b"] == tests["c"] != tests["d"]
    back = load_examples(tmp_path / "a" / "train.jsonl")
    assert back.format == "classification" and Counter(ex["label"] for ex in back.examples) == labels["train"]
    md = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert "## Label balance" in md and "near duplicate | 3" in md


def test_strict_stops_at_the_first_bad_row_and_lenient_counts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine row"}\n{"text": 5}\nnot json\n{"text": "another fine row"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: field 'text' is int"):
        prepare_files([bad], tmp_path / "out")
    report = prepare_files([bad], tmp_path / "out", PrepareOptions(lenient=True))
    assert report["dropped"] == {"field 'text' is not a string": 1, "not valid JSON": 1}
    assert report["inputs"][0]["first_dropped"] == {"field 'text' is not a string": "line 2", "not valid JSON": "line 3"}
    assert sum(report["split"].values()) == 2


def test_inputs_of_different_kinds_are_refused(tmp_path):
    with pytest.raises(DataError, match="different kinds of data.*prepared separately"):
        prepare_files([SHARED_DATA / "wiki_demo.txt", SHARED_DATA / "identity.json"], tmp_path / "out")


def test_token_lengths_histogram_and_max_tokens(tmp_path):
    report = prepare_files([SHARED_DATA / "identity.json", SHARED_DATA / "alpaca_zh_demo.json"], tmp_path / "out",
                           PrepareOptions(model="tiny:deepseek-llm", max_tokens=100, max_samples=100))
    assert report["format"] == "messages" and report["inputs"][1]["format"] == "alpaca"
    tokens = report["tokens"]["train"]
    assert tokens["max"] <= 100 and sum(tokens["histogram"].values()) == tokens["count"] == report["split"]["train"]
    assert report["dropped"]["too many tokens"] > 0
    first = json.loads((tmp_path / "out" / "train.jsonl").open(encoding="utf-8").readline())
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    with pytest.raises(DataError, match="--max-tokens .* give --model"):
        prepare_files([SHARED_DATA / "identity.json"], tmp_path / "x", PrepareOptions(max_tokens=10))


def test_length_stats_by_hand():
    s = length_stats([10, 20, 30, 40, 5000])
    assert (s["min"], s["mean"], s["p50"], s["p90"], s["max"]) == (10, 1020.0, 30, 5000, 5000)
    assert s["histogram"]["<16"] == 1 and s["histogram"]["16-31"] == 2 and s["histogram"]["32-63"] == 1
    assert s["histogram"]["4096-8191"] == 1 and sum(s["histogram"].values()) == 5


# --------------------------------------------------------------------------- formats


def test_classification_columns_by_name_and_errors(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("stars,body\n5,很好\n1,很差\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_examples(path)
    loaded = load_examples(path, text_column="body", label_column="stars")
    assert loaded.format == "classification"
    assert [(ex["messages"][0]["content"], ex["label"]) for ex in loaded.examples] == [("很好", "5"), ("很差", "1")]
    with pytest.raises(DataError, match=r"reviews\.csv, line 2: has no label column 'label'.*--label-column"):
        load_examples(path, "classification", text_column="body")
    (tmp_path / "b.jsonl").write_text('{"text": "ok", "label": [1]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: label 'label' is list"):
        load_examples(tmp_path / "b.jsonl")


def test_classification_rows_train_as_generation_and_keep_label_names(deepseek_tokenizer, tmp_path):
    cfg = DataConfig(train=str(CHNSENTI), max_samples=40, max_length=64)
    data = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, seed=1)
    assert data.report["read"]["train"]["labels"] == ["0", "1"]
    row = data.train[0]
    trained = [t for t in row["labels"] if t != -100]
    label_and_eos = deepseek_tokenizer.decode(trained)
    assert label_and_eos in ("0<｜end▁of▁sentence｜>", "1<｜end▁of▁sentence｜>")


def test_long_classification_rows_lose_text_not_their_label(deepseek_tokenizer):
    examples = load_examples(CHNSENTI, max_samples=40).examples
    long = [ex for ex in examples if len(ex["messages"][0]["content"]) > 200][:3]
    tok = tokenize_examples(long, deepseek_tokenizer, DEEPSEEK_V3_TEMPLATE, 32)
    assert tok.dropped == {} and tok.truncated == 3
    for ex, row in zip(long, tok.rows):
        shown = render_mask(deepseek_tokenizer, row["input_ids"], row["labels"])
        assert len(row["input_ids"]) == 32 and shown.endswith(f"<｜Assistant｜>[[{ex['label']}<｜end▁of▁sentence｜>]]")
        assert shown.startswith("<｜begin▁of▁sentence｜><｜User｜>" + ex["messages"][0]["content"][:5])


def test_reasoning_keep_and_strip(deepseek_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2", "reasoning_content": "one plus one is two"}]},
            {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4"}]},
            {"instruction": "3+3?", "output": "6", "reasoning_content": "three and three"}]
    a = _jsonl(tmp_path / "a.jsonl", rows[:2])
    b = _jsonl(tmp_path / "b.jsonl", rows[2:])
    kept = load_examples(a).examples + load_examples(b).examples
    assert kept[2]["messages"][-1]["reasoning_content"] == "three and three"  # alpaca field read too
    stripped = [strip_reasoning(ex)["messages"][-1] for ex in kept]
    assert stripped == [{"role": "assistant", "content": "2"}, {"role": "assistant", "content": "4"},
                        {"role": "assistant", "content": "6"}]
    # Kept, the reasoning carries loss through the R1 template; stripped, only the answer does.
    for examples, expect in ((kept, True), ([strip_reasoning(ex) for ex in kept], False)):
        tok = tokenize_examples(examples, deepseek_tokenizer, DEEPSEEK_R1_TEMPLATE, 128)
        trained = [render_mask(deepseek_tokenizer, r["input_ids"], r["labels"]) for r in tok.rows]
        assert ("one plus one is two" in trained[0].split("[[", 1)[-1]) is expect
        assert ("two and two" in trained[1]) is expect
    report = prepare_files([a, b], tmp_path / "out", PrepareOptions(reasoning="strip", split=(1.0, 0.0, 0.0)))
    assert report["reasoning"] == {"policy": "strip", "rows_with_reasoning": 3}
    text = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert "think" not in text and "reasoning_content" not in text
    cfg = DataConfig(train=str(a), reasoning="strip", split=(1.0, 0.0, 0.0))
    data = prepare_data(cfg, deepseek_tokenizer, DEEPSEEK_R1_TEMPLATE, seed=0)
    assert all("one plus" not in deepseek_tokenizer.decode(r["input_ids"]) for r in data.train)


# --------------------------------------------------------------------------- inspect and CLI


def test_inspect_shows_the_loss_mask():
    report = inspect_file(SHARED_DATA / "identity.json", model="tiny:deepseek-llm", examples=2)
    assert report["format"] == "alpaca" and report["examples"] == 91 and report["tokens"]["count"] == 91
    first = report["rendered"][0]["text"]
    assert first.startswith("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>[[Hello!")
    assert first.endswith("<｜end▁of▁sentence｜>]]")
    plain = inspect_file(CHNSENTI, model=None, examples=1)
    assert plain["labels"] == {"0": 1893, "1": 4107} and "tokens" not in plain


def test_cli_data_prepare_and_inspect(tmp_path):
    runner = CliRunner()
    out = tmp_path / "prep"
    result = runner.invoke(app, ["data", "prepare", str(CHNSENTI), "--out", str(out), "--max-samples", "200",
                                 "--split", "0.6", "0.2", "0.2", "--no-near-dedup", "--decontaminate"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["split"]["val"] == 40 and report["options"]["clean"]["near_dedup"] is False
    result = runner.invoke(app, ["data", "inspect", str(out / "train.jsonl"), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "format classification" in result.output and "[[" in result.output
    result = runner.invoke(app, ["data", "prepare", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert result.exit_code == 2 and "data file not found" in result.output
    result = runner.invoke(app, ["data", "prepare", str(CHNSENTI), "--out", str(out), "--split", "0.5", "0.1", "0.1"])
    assert result.exit_code == 2 and "summing to 1" in result.output
