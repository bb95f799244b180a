"""dstune: fine-tune DeepSeek models, and tune the fine-tuning itself."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns on import (peft imports it whenever it is installed) that it could not
# fetch a faster 4-bit kernel from the Hugging Face Hub with the `kernels` package. Fetching code at run
# time is what dstune never does (offline by design); its built-in CPU kernel is used instead, correctly.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
