"""The one per-engine context: what an engine's model hands its attention backend where
vLLM hands nothing over.

vLLM gives the attention backend no link to the model's rotary embedding: the metadata
builder receives the layer names, the KV spec and the engine's VllmConfig, and the layer
object in forward has no reference to the RoPE module beside it. The query rotation of
DESIGN §3 must be exactly the table that module applies, so the page-local RoPE
(patches/page_local_rope.py) records itself here when it is built, and the builder looks
it up through the VllmConfig it is given.

The VllmConfig object identifies the engine: the model is built inside
`set_current_vllm_config(config)` and every builder of that engine receives the same
object. A context lives exactly as long as its config (a weak reference drops it), so a
second engine in the same process, or one started after it, never sees this one's state.
The per-request settings (request_settings.py) travel the same way: the logits processor
that sees each request's SamplingParams records them here, where the builder reads them.
Everything else the backend needs comes from that config explicitly.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_contexts: dict[int, "EngineContext"] = {}


@dataclass
class EngineContext:
    """rotary_embeddings: get_rope's instance cache for this engine (key -> module).
    page_local_ropes: every page-local RoPE module this engine's model built.
    model_runner: a weak reference to this worker's v1 model runner
    (patches/runner_for_builders.py), whose requests the metadata builder reads per row;
    None where none was published.
    request_settings: each request's n_global / n_local by batch row or request slot
    (request_settings.RequestSettings), once the worker's logits processor is built."""

    rotary_embeddings: dict[Any, Any] = field(default_factory=dict)
    page_local_ropes: list[Any] = field(default_factory=list)
    model_runner: Callable[[], Any] | None = None
    request_settings: Any = None

    def query_rotation(self, head_size: int):
        """The QueryRotation of the engine's RoPE with this head size (one table only)."""
        ropes = [r for r in self.page_local_ropes if r.head_size == head_size]
        if not ropes:
            raise RuntimeError(
                f"lminf: this engine's model built no rotary embedding with head size "
                f"{head_size}, so there is no RoPE to re-frame: the model is not supported")
        rotation = ropes[0].lminf_query_rotation
        for other in ropes[1:]:
            table = other.lminf_query_rotation
            if (table.is_neox_style != rotation.is_neox_style
                    or not torch.equal(table.cos_sin, rotation.cos_sin)):
                raise RuntimeError(
                    f"lminf: the model builds rotary embeddings with head size {head_size} "
                    "but different tables (per-layer RoPE), which the backend cannot tell "
                    "apart: the model is not supported")
        return rotation


def of(vllm_config) -> EngineContext:
    """The context of the engine that `vllm_config` configures (created on first use)."""
    key = id(vllm_config)
    context = _contexts.get(key)
    if context is None:
        context = _contexts[key] = EngineContext()
        weakref.finalize(vllm_config, _contexts.pop, key, None)
    return context
