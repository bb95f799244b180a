"""Write one GGUF file (weights, hyperparameters, tokenizer, chat template) with the ``gguf`` package.

No llama.cpp build is needed: the ``gguf`` package writes the container and quantises in numpy
(F16, BF16, Q8_0 bit-exact with ggml, Q4_0, Q4_1, Q5_0, Q5_1). Which tensor gets which type follows
llama.cpp's converter (conversion/base.py ``prepare_tensors``): 1-D tensors (norms, biases) and the MoE
router stay F32; a tensor whose rows do not split into quantisation blocks falls back to F16. For the
4- and 5-bit types the output layer is kept at Q8_0, as llama-quantize keeps it at a higher type
(Q6_K there, which the gguf package cannot write). The file is written beside its target under a
temporary name and renamed at the end, so a failed export leaves no half file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np

from dstune.export.gguf_arch import to_gguf, write_metadata
from dstune.export.source import GGUF_ARCH, ExportError, Source

Q = gguf.GGMLQuantizationType
QUANTS = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0,
    "q4_1": Q.Q4_1,
    "q5_0": Q.Q5_0,
    "q5_1": Q.Q5_1,
}
# llama.cpp's LlamaFileType of each (general.file_type), so readers report the file's type.
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}
_KEEP_F32 = ("ffn_gate_inp.weight", "exp_probs_b.bias", "rope_freqs.weight")
# The pre-tokenizer llama.cpp must use, by vocabulary size (the regex that splits text before BPE).
# llama.cpp's converter recognises these by a hash of their output (get_vocab_base_pre); the names are its.
PRE_TOKENIZERS = {
    129280: "deepseek-v3",  # DeepSeek-V3/R1 tokenizer (also every tiny: preset)
    102400: "deepseek-llm",
    32256: "deepseek-coder",
    151936: "deepseek-r1-qwen",  # R1-Distill-Qwen (Qwen2.5 tokenizer)
    128256: "llama-bpe",  # R1-Distill-Llama (Llama 3 tokenizer)
    49152: "smollm",  # SmolLM2
}
_LOOKS_SPECIAL = re.compile(r"^<[|｜].*[|｜]>$")


def check_quant(quant: str) -> Q:
    """The GGML type of a ``--quant`` name.

    Raises:
        ExportError: naming the accepted values.
    """
    if quant not in QUANTS:
        raise ExportError(
            f"--quant {quant!r} is not a GGUF type this exporter writes; accepted: {', '.join(QUANTS)}"
        )
    return QUANTS[quant]


def _tensor_type(name: str, data: np.ndarray, quant: str) -> Q:
    if data.ndim <= 1 or name.endswith(_KEEP_F32) or quant == "f32":
        return Q.F32
    if quant in ("q4_0", "q4_1", "q5_0", "q5_1") and name == "output.weight":
        return Q.Q8_0
    return QUANTS[quant]


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, quant: str) -> None:
    qtype = _tensor_type(name, data, quant)
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows shorter than a block: llama.cpp falls back to F16 the same way
        qtype, packed = Q.F16, gguf.quants.quantize(data, Q.F16)
    writer.add_tensor(name, packed, raw_dtype=qtype)


def _add_vocab(writer: gguf.GGUFWriter, src: Source, n_vocab: int) -> None:
    """Tokens, token types, merges, special ids and chat template (llama.cpp ``_set_vocab_gpt2``)."""
    tok = src.tokenizer
    if n_vocab not in PRE_TOKENIZERS:
        raise ExportError(
            f"no llama.cpp pre-tokenizer is known for a {n_vocab}-token vocabulary; known: "
            + ", ".join(f"{v} ({k})" for k, v in PRE_TOKENIZERS.items())
            + ". Nothing was written"
        )
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # the model's rows past the tokenizer: unused padding, as llama.cpp names it
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            special = added[i].special or _LOOKS_SPECIAL.match(added[i].content)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[n_vocab])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src.tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = src.chat_template  # the template the model was trained with, not the file's
    special.add_to_gguf(writer)


def write_gguf(src: Source, out: Path, quant: str) -> Path:
    """Writes ``src`` as one GGUF file at ``out`` (temporary name, then rename).

    Args:
        src: the merged model and what to embed.
        out: the ``.gguf`` path to write.
        quant: a key of :data:`QUANTS`.

    Returns:
        The written path.
    """
    arch = GGUF_ARCH[src.family]
    config = src.model.config
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(src.name)
        writer.add_file_type(_FILE_TYPES[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_metadata(writer, arch, config, src.family)
        _add_vocab(writer, src, config.vocab_size)
        for name, tensor in to_gguf(src.model, arch):
            _add_tensor(writer, name, tensor.numpy(), quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:  # a full disk, Ctrl-C, an unmapped tensor: no half file is left behind
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
