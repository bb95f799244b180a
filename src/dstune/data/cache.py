"""Tokenised data cached on disk, so a second run of the same data starts without tokenising.

The key is a SHA-256 over everything the token rows depend on: every data file's contents, the tokenizer
(full serialised definition, special tokens, chat template), the resolved chat template, the data options
(``max_length``, ``overflow``, ``train_on``, ``split``, ...), the split seed and the data package's source,
so any change is a miss, never a stale hit. An entry ``$DSTUNE_CACHE/tokenized/<key>/`` holds, per split, flat
int32 ``.npy`` arrays (``<split>.input_ids.npy``, ``.labels.npy``, ``.offsets.npy``; ``allow_pickle=False``,
loaded memory-mapped) and ``index.json`` (row sources, data report). Invariant: an entry is written into a
temporary directory and renamed into place, ``index.json`` last, and one without it is ignored, so an
interrupted write never leaves an entry a later run could read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = 1  # bump when the layout of an entry changes
_SPLITS = ("train", "val", "test")
_ARRAYS = {"input_ids", "labels", "source"}


def _file_digest(path: str | os.PathLike, h: "hashlib._Hash") -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of what decides a tokenizer's output: its full definition, special tokens and template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(
        json.dumps(
            {
                "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
                "template": getattr(tokenizer, "chat_template", None),
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


def _code_digest() -> str:
    """The data package's source: a change to tokenising or splitting code invalidates old entries."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def data_files(cfg: Any) -> list[str]:
    """Every file the data config reads (train, validation, and a mixture's sources where set)."""
    files = [cfg.train, cfg.validation] + [m.path for m in getattr(cfg, "mix", None) or []]
    return [f for f in files if f]


def cache_key(cfg: Any, tokenizer: Any, chat_template: str | None, seed: int) -> str:
    """The cache key of ``prepare_data(cfg, tokenizer, chat_template, seed)``.

    Args:
        cfg: a ``DataConfig``; every option except ``cache`` itself enters the key.
        tokenizer: the tokenizer the rows are made with.
        chat_template: the resolved chat template.
        seed: the split seed.
    """
    h = hashlib.sha256(f"dstune-tokenized-{FORMAT}".encode())
    options = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(vars(cfg))
    options.pop("cache", None)
    h.update(
        json.dumps({"options": options, "seed": seed, "template": chat_template}, sort_keys=True).encode()
    )
    for f in data_files(cfg):
        h.update(str(Path(f).name).encode())
        _file_digest(f, h)
    h.update(tokenizer_identity(tokenizer).encode())
    h.update(_code_digest().encode())
    return h.hexdigest()[:32]


def _write_split(out: Path, name: str, rows: list[dict]) -> dict:
    lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for r in rows for t in r["labels"]), dtype=np.int32, count=int(offsets[-1]))
    for kind, arr in (("input_ids", ids), ("labels", labels), ("offsets", offsets)):
        np.save(out / f"{name}.{kind}.npy", arr, allow_pickle=False)
    meta = {"rows": len(rows), "sources": [r.get("source") for r in rows]}
    if any(set(r) - _ARRAYS for r in rows):  # further per-row fields (small, JSON) go to the index
        meta["extra"] = [{k: v for k, v in r.items() if k not in _ARRAYS} for r in rows]
    return meta


def _read_split(entry: Path, name: str, meta: dict) -> list[dict]:
    arrays = {
        kind: np.load(entry / f"{name}.{kind}.npy", mmap_mode="r", allow_pickle=False)
        for kind in ("input_ids", "labels", "offsets")
    }
    off = arrays["offsets"]
    ids, labels = arrays["input_ids"], arrays["labels"]
    # Rows become Python lists again, exactly as tokenising makes them, so everything downstream
    # (packing, collation, resume fingerprints) sees the same objects as on a fresh run.
    rows = [
        {
            "input_ids": ids[off[i] : off[i + 1]].tolist(),
            "labels": labels[off[i] : off[i + 1]].tolist(),
            "source": src,
        }
        for i, src in enumerate(meta["sources"])
    ]
    for row, extra in zip(rows, meta.get("extra", [])):
        row.update(extra)
    return rows


def load_entry(entry: Path):
    """The ``PreparedData`` stored in ``entry``, or None when there is no complete entry."""
    from dstune.data import PreparedData

    index = entry / "index.json"
    if not index.is_file():
        return None
    meta = json.loads(index.read_text("utf-8"))
    splits = {name: _read_split(entry, name, meta["splits"][name]) for name in _SPLITS}
    return PreparedData(train=splits["train"], val=splits["val"], test=splits["test"], report=meta["report"])


def save_entry(entry: Path, data) -> None:
    """Writes ``data`` (a ``PreparedData``) as a cache entry, atomically: temp directory, then rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        meta = {
            "format": FORMAT,
            "splits": {name: _write_split(tmp, name, getattr(data, name)) for name in _SPLITS},
            "report": data.report,
        }
        (tmp / "index.json").write_text(json.dumps(meta, ensure_ascii=False), "utf-8")
        if entry.exists() and not (entry / "index.json").is_file():
            # Not an entry (complete ones appear with index.json in one rename): debris, e.g. a partial copy.
            shutil.rmtree(entry)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same entry first: keep theirs
            if not (entry / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_prepare(
    cfg: Any, tokenizer: Any, chat_template: str | None, seed: int, prepare: Callable | None = None
):
    """``prepare_data`` through the on-disk cache when ``cfg.cache`` is set.

    Args:
        cfg, tokenizer, chat_template, seed: as for ``dstune.data.prepare_data``.
        prepare: the function that tokenises on a miss (default ``prepare_data``).

    Returns:
        The ``PreparedData``; its report's ``cache`` says ``hit``, ``stored`` or ``off`` and names the entry.
    """
    from dstune.data import prepare_data
    from dstune.models.load import cache_dir

    prepare = prepare or prepare_data
    if not getattr(cfg, "cache", False):
        data = prepare(cfg, tokenizer, chat_template, seed)
        data.report["cache"] = {"status": "off"}
        return data
    entry = cache_dir() / "tokenized" / cache_key(cfg, tokenizer, chat_template, seed)
    data = load_entry(entry)
    if data is not None:
        data.report["cache"] = {"status": "hit", "entry": str(entry)}
        return data
    data = prepare(cfg, tokenizer, chat_template, seed)
    if not all(
        isinstance(r["input_ids"], list) and isinstance(r["labels"], list)
        for name in _SPLITS
        for r in getattr(data, name)
    ):
        data.report["cache"] = {"status": "skipped: rows are not token sequences"}
        return data
    save_entry(entry, data)
    data.report["cache"] = {"status": "stored", "entry": str(entry)}
    return data
