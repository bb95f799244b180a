"""dstune: fine-tune DeepSeek models, and tune the fine-tuning itself."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns on import (peft imports it whenever it is installed) that it could not
# fetch a faster 4-bit kernel from the Hugging Face Hub with the `kernels` package. Fetching code at run
# time is what dstune never does (offline by design); its built-in CPU kernel is used instead, correctly.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# OMP_WAIT_POLICY is left to GNU OpenMP's default (threads spin briefly at a barrier, then sleep). An
# earlier default of PASSIVE (sleep at once) saved CPU time on an AVX2 CPU in fp32, but on a Zen 4 in bf16,
# where operations are shorter, it cost 16-21% of wall time for no CPU time saved (two pairs of SmolLM2
# runs: docs/benchmarks.md, 'On a CPU with native bf16'). A value the user sets is torch's to read.
