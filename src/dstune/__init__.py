"""dstune: fine-tune DeepSeek models, and tune the fine-tuning itself."""

import logging
import os

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns on import (peft imports it whenever it is installed) that it could not
# fetch a faster 4-bit kernel from the Hugging Face Hub with the `kernels` package. Fetching code at run
# time is what dstune never does (offline by design); its built-in CPU kernel is used instead, correctly.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# OpenMP worker threads that find no work sleep instead of spinning. GNU OpenMP (torch's CPU runtime) spins
# by default, which on CPUs counts every barrier between two small operations as busy time of each
# thread; PASSIVE cut the CPU time of a SmolLM2 LoRA step by 11-13% in one pair of runs here, at the same
# wall time (docs/benchmarks.md, 'Training speed'). It must be set before torch loads the runtime; a value
# the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
