"""``dstune serve``: an OpenAI-compatible HTTP server for a model or run, with LoRA adapters by name.

Modules by responsibility: ``schemas`` (request bodies, OpenAI's error shape), ``host`` (the model and
its adapters), ``worker`` (the one generation thread and its bounded queue), ``sse`` (response objects and
server-sent events), ``app`` (the FastAPI routes), ``vllm`` (hand-over to vLLM), ``cli`` (the command).
Importing this package imports neither FastAPI nor torch: the CLI registers the command cheaply.
"""
