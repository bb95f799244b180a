"""dstune: fine-tune DeepSeek models, and tune the fine-tuning itself."""

__version__ = "0.1.0"
