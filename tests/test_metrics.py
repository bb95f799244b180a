"""Every metric against values computed by hand (in the comments) on small English and Chinese inputs."""

import math

import pytest

from dstune.evaluate.metrics import (
    best_f1_threshold,
    bleu,
    classification_metrics,
    exact_match,
    is_chinese,
    lcs_length,
    perplexity,
    rouge,
    rouge_l,
    rouge_n,
    rouge_tokens,
    threshold_for_recall,
)


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_perplexity():
    assert close(perplexity(0.0), 1.0) and close(perplexity(math.log(42.0)), 42.0)
    assert perplexity(1000.0) == math.inf


def test_is_chinese_by_share_of_characters():
    assert is_chinese("今天天气很好") and is_chinese("我用 Python 写代码")  # 5 of 11 non-space characters
    assert not is_chinese("The capital is 北京, a city in the north")  # 2 of 32
    assert not is_chinese("") and is_chinese(["hello", "你好世界"])


def test_bleu_english_by_hand():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (6 words each, BP = 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3.
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25
    out = bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert out["tokenize"] == "13a" and close(out["bp"], 1.0)
    assert close(out["bleu"], 100 * (1 / 12) ** 0.25)  # 53.73
    # Brevity: 4 words against 6, every n-gram matches: BLEU = exp(1 - 6/4) = exp(-0.5)
    assert close(bleu(["the cat sat on"], ["the cat sat on the mat"])["bleu"], 100 * math.exp(-0.5))


def test_bleu_chinese_counts_characters():
    # zh tokenizer: one token per character. hyp 今天北京的天气很好, ref 今天上海的天气很好 (9 each):
    # 1-grams 7/9 (今 天x2 的 气 很 好), 2-grams 5/8 (今天 的天 天气 气很 很好), 3-grams 3/7 (的天气 天气很 气很好),
    # 4-grams 2/6 (的天气很 天气很好). BLEU = (7/9 * 5/8 * 3/7 * 2/6) ** (1/4) = (5/72) ** 0.25
    out = bleu(["今天北京的天气很好"], ["今天上海的天气很好"])
    assert out["tokenize"] == "zh" and close(out["bleu"], 100 * (5 / 72) ** 0.25)  # 51.33
    assert bleu(["今天北京的天气很好"], ["今天上海的天气很好"], tokenize="13a")["bleu"] < 1  # one "word" each


def test_rouge_english_by_hand():
    h, r = rouge_tokens("The cat sat on a mat.", False), rouge_tokens("the cat sat on the mat", False)
    assert h == ["the", "cat", "sat", "on", "a", "mat"]
    # ROUGE-1: overlap 5 (the, cat, sat, on, mat; "the" clipped to 1 by the hypothesis), P = R = 5/6.
    assert rouge_n(h, r, 1) == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    # ROUGE-2: bigrams the cat, cat sat, sat on shared of 5 each.
    assert rouge_n(h, r, 2) == pytest.approx((3 / 5, 3 / 5, 3 / 5))
    # ROUGE-L: LCS "the cat sat on mat" = 5.
    assert lcs_length(h, r) == 5 and rouge_l(h, r) == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    out = rouge(["The cat sat on a mat."], ["the cat sat on the mat"])
    assert out == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6, "segmentation": "words"})


def test_rouge_chinese_with_jieba_by_hand():
    hyp, ref = "酒店的服务很好，房间干净", "酒店服务很好，但房间不干净"
    h, r = rouge_tokens(hyp, True), rouge_tokens(ref, True)
    assert h == ["酒店", "的", "服务", "很", "好", "房间", "干净"]  # jieba words; the comma is not a token
    assert r == ["酒店", "服务", "很", "好", "但", "房间", "不", "干净"]
    # ROUGE-1: 6 shared words, P = 6/7, R = 6/8, F = 2PR/(P+R) = 0.8
    # ROUGE-2: 服务很 and 很好 shared; P = 2/6, R = 2/7, F = 4/13
    # ROUGE-L: LCS 酒店 服务 很 好 房间 干净 = 6, same as ROUGE-1
    out = rouge([hyp], [ref])
    assert out["segmentation"] == "jieba"
    assert out["rouge1"] == pytest.approx(0.8) and out["rouge2"] == pytest.approx(4 / 13)
    assert out["rougeL"] == pytest.approx(0.8)
    # Averaged over pairs: a perfect pair and the one above.
    assert rouge([ref, hyp], [ref, ref])["rouge2"] == pytest.approx((1 + 4 / 13) / 2)
    # A mixed set: each pair is segmented by its reference's language.
    mixed = rouge([hyp, "The cat sat on a mat."], [ref, "the cat sat on the mat"])
    assert mixed["segmentation"] == "mixed" and mixed["rouge1"] == pytest.approx((0.8 + 5 / 6) / 2)
    assert bleu(["今天北京的天气很好", "the cat"], ["今天上海的天气很好", "the cat"])["tokenize"] == "zh"


def test_lcs_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: BCBA
    assert lcs_length([], ["a"]) == 0 and rouge_l([], ["a"]) == (0.0, 0.0, 0.0)


def test_exact_match():
    assert exact_match(["Paris", " paris ", "Lyon", "北京"], ["paris", "Paris", "Nice", "北京 "]) == 3 / 4
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_classification_metrics_by_hand_with_chinese_labels():
    y_true = ["正面", "负面", "正面", "中性", "负面", "正面"]
    y_pred = ["正面", "正面", "正面", "中性", "负面", "负面"]
    out = classification_metrics(y_true, y_pred)
    # 正面: tp 2, fp 1, fn 1 -> P = R = F = 2/3; 负面: tp 1, fp 1, fn 1 -> 1/2; 中性: tp 1 -> 1.
    assert out["labels"] == ["中性", "正面", "负面"]
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["per_class"]["正面"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert out["per_class"]["负面"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert out["per_class"]["中性"]["f1"] == 1.0
    macro = (1 + 2 / 3 + 1 / 2) / 3  # 13/18
    assert out["precision_macro"] == pytest.approx(macro) and out["f1_macro"] == pytest.approx(macro)
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 2, 1], [0, 1, 1]]  # rows true, columns predicted


def test_classification_class_never_predicted_scores_zero():
    out = classification_metrics(["1", "1", "0"], ["1", "1", "1"], labels=["0", "1"])
    # class 0: no prediction -> precision 0 (not an error), recall 0; class 1: P 2/3, R 1, F 0.8
    assert out["per_class"]["0"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["per_class"]["1"]["f1"] == pytest.approx(0.8) and out["f1_macro"] == pytest.approx(0.4)


def test_threshold_tuning_by_hand():
    y = [1, 1, 0, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.4, 0.2]
    # predict positive when score >= t:
    #   t=0.9: P 1,   R 1/3, F 0.5      t=0.8: P 1,   R 2/3, F 0.8
    #   t=0.7: P 2/3, R 2/3, F 2/3      t=0.6: P 3/4, R 1,   F 6/7 (best)
    assert best_f1_threshold(y, s) == pytest.approx({"threshold": 0.6, "precision": 0.75, "recall": 1.0, "f1": 6 / 7})
    # recall >= 0.6 first holds at t = 0.8 going down; that is the strictest threshold reaching it
    assert threshold_for_recall(y, s, 0.6) == pytest.approx({"threshold": 0.8, "precision": 1.0, "recall": 2 / 3,
                                                             "f1": 0.8})
    assert threshold_for_recall(y, s, 1.0)["threshold"] == 0.6
    with pytest.raises(ValueError, match="binary labels"):
        best_f1_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="target recall"):
        threshold_for_recall(y, s, 0.0)
