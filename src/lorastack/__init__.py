"""lorastack: fine-tune LLM adapters with QLoRA and serve them on Azure Container Apps GPUs.

Importing this package is cheap; torch, transformers, Pulumi and the Azure SDKs are imported only by the
modules (and CLI commands) that need them.
"""

__version__ = "0.1.0"
