"""Loggers that print through vLLM's handlers (vLLM configures only the "vllm" tree)."""

import logging


def get_logger(module_name: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger(f"vllm.plugins.{module_name}")
