"""The Ollama ``Modelfile`` written beside a GGUF: the chat template in Go syntax, stop tokens, defaults.

Ollama renders prompts with Go templates, not Jinja, so each template dstune trains with has its Go
twin here (the layouts of Ollama's own deepseek-r1, deepseek-v3 and ChatML models); llama.cpp adds
BOS itself, so none of them writes it. A template dstune does not recognise is left out, and Ollama
falls back to the Jinja template embedded in the GGUF (``tokenizer.chat_template``).
"""

from __future__ import annotations

from pathlib import Path

from dstune.models.templates import DEEPSEEK_R1_TEMPLATE, DEEPSEEK_V3_TEMPLATE
from dstune.rundir import write_text_atomic

_DEEPSEEK = """{{- if .System }}{{ .System }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}
{{- if not $last }}<｜end▁of▁sentence｜>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<｜Assistant｜>%s{{ end }}
{{- end }}"""

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}"""

_STOPS = {
    "deepseek": ["<｜end▁of▁sentence｜>", "<｜User｜>"],
    "chatml": ["<|im_end|>", "<|im_start|>"],
}


def go_template(chat_template: str) -> tuple[str | None, str]:
    """The Go twin of a Jinja chat template and its kind (``deepseek``, ``deepseek-r1``, ``chatml``).

    Returns:
        ``(template, kind)``; template is None when the Jinja template is not one dstune knows.
    """
    if chat_template == DEEPSEEK_R1_TEMPLATE:
        return _DEEPSEEK % "<think>\n", "deepseek-r1"  # R1's generation prompt opens its reasoning
    if chat_template == DEEPSEEK_V3_TEMPLATE:
        return _DEEPSEEK % "", "deepseek"
    if "<|im_start|>" in chat_template:
        return _CHATML, "chatml"
    return None, "unknown"


def modelfile_text(gguf_name: str, chat_template: str, eos_token: str | None, context: int) -> str:
    """The Modelfile for ``gguf_name`` (a file in the same folder).

    Args:
        gguf_name: the GGUF file's name.
        chat_template: the Jinja template embedded in the file.
        eos_token: the tokenizer's end token, always a stop.
        context: the context window to default to.
    """
    template, kind = go_template(chat_template)
    stops = list(_STOPS.get(kind.removesuffix("-r1"), []))
    if eos_token and eos_token not in stops:
        stops.insert(0, eos_token)
    # DeepSeek's recommended sampling for R1 and its distills: temperature 0.6, top-p 0.95 (model card).
    temperature = 0.6 if kind == "deepseek-r1" else 0.7
    lines = [f"FROM ./{gguf_name}", ""]
    if template is None:
        lines.append("# No TEMPLATE: Ollama uses the chat template embedded in the GGUF file.")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines.append("")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER temperature {temperature}", "PARAMETER top_p 0.95", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, chat_template: str, eos_token: str | None, context: int) -> Path:
    """Writes ``Modelfile`` beside ``gguf_path`` (atomically) and returns its path."""
    text = modelfile_text(gguf_path.name, chat_template, eos_token, context)
    return write_text_atomic(gguf_path.parent / "Modelfile", text)
