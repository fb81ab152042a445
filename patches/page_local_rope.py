"""Feed the model's rotary embedding page-local positions, j mod B (DESIGN §3; VLLM_NOTES B7).

Keys are stored rotated by their offset inside their page, so nothing larger than B - 1 ever
reaches the cos/sin table: position 199,999,999 is as exact as position 5, and vLLM's
out-of-bounds table read past max_position_embeddings cannot happen. Each RoPE class a
supported model uses is replaced (vLLM's out-of-tree CustomOp registry, keyed by class
name) by a subclass that, when LMINF is selected, applies `positions mod B` and holds the
query rotation table: angles 0..L of the module's own table, the rows it applies to q and
k (computed by its own `_compute_cos_sin_cache`, nothing changed), with angle L composed
from rows L - 1 and 1 when the table stops at L - 1 (rotations of one frequency add).
When LMINF is not selected the subclass behaves exactly like its parent.

Per-engine state: a module's behaviour depends on the engine's (B, L), but get_rope caches
modules process-wide by RoPE parameters alone, so a second engine in the same process would
get the first one's module. The cache (`rotary_embedding._ROPE_DICT`) is replaced by one
that keeps an LMINF engine's modules in that engine's context (lminf_vllm.engine_context)
and every other engine's in the shared dict, and each page-local module records itself in
its engine's context, where the backend's builder finds it through its vllm_config.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, mark_applied, resolve

NAME = "page_local_rope"
ROPE_MODULE = "vllm.model_executor.layers.rotary_embedding"
# RoPE classes whose table is a fixed function of position (config.SUPPORTED_ROPE_TYPES).
ROPE_CLASSES = ("RotaryEmbedding", "LinearScalingRotaryEmbedding",
                "DynamicNTKScalingRotaryEmbedding", "Llama3RotaryEmbedding",
                "YaRNScalingRotaryEmbedding")
TARGET = "vllm.model_executor.custom_op:op_registry_oot"
ROPE_CACHE = ROPE_MODULE + ":_ROPE_DICT"
GET_ROPE = ROPE_MODULE + ":get_rope"
BASE_INIT = ROPE_MODULE + ".base:RotaryEmbeddingBase.__init__"
BASE_TABLE = ROPE_MODULE + ".base:RotaryEmbeddingBase._compute_cos_sin_cache"
CUSTOM_OP_NEW = "vllm.model_executor.custom_op:CustomOp.__new__"


def _lminf_engine(vllm_config):
    import lminf_vllm

    return vllm_config is not None and lminf_vllm.is_selected(vllm_config)


class EngineScopedRopeCache(MutableMapping):
    """get_rope's module cache, one per LMINF engine, the shared one for the others."""

    def __init__(self, shared: dict) -> None:
        self.shared = shared

    def _scope(self) -> dict:
        from vllm.config import get_current_vllm_config_or_none

        from lminf_vllm import engine_context

        vllm_config = get_current_vllm_config_or_none()
        if _lminf_engine(vllm_config):
            return engine_context.of(vllm_config).rotary_embeddings
        return self.shared

    def __getitem__(self, key):
        return self._scope()[key]

    def __setitem__(self, key, value) -> None:
        self._scope()[key] = value

    def __delitem__(self, key) -> None:
        del self._scope()[key]

    def __iter__(self):
        return iter(self._scope())

    def __len__(self) -> int:
        return len(self._scope())

    def clear(self) -> None:
        """vLLM clears the cache at shutdown: the shared modules and the current scope's."""
        self.shared.clear()
        self._scope().clear()


def query_rotation_of(rope, trained_length: int):
    """The query rotation table of a vLLM RoPE module: angles 0..L of its own table."""
    from lminf_vllm.attention.rotation import QueryRotation

    num_angles = trained_length + 1
    table = rope._compute_cos_sin_cache()
    rows = min(table.shape[0], num_angles)
    return QueryRotation.from_model_table(table, rows, rope.is_neox_style) \
        .with_angles(num_angles)


def _page_local(rope_cls: type) -> type:
    from lminf_vllm import config as lminf_config
    from lminf_vllm import engine_context, rope_frame

    class PageLocal(rope_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from vllm.config import get_current_vllm_config_or_none

            vllm_config = get_current_vllm_config_or_none()
            self.lminf_page_size = None
            if not _lminf_engine(vllm_config):
                return
            config = lminf_config.from_vllm_config(vllm_config)
            self.lminf_page_size = config.page_size
            self.lminf_query_rotation = query_rotation_of(self, config.trained_length)
            engine_context.of(vllm_config).page_local_ropes.append(self)

        def forward(self, positions, *args, **kwargs):
            if self.lminf_page_size is not None:
                positions = rope_frame.key_frame_position(positions, self.lminf_page_size)
            return super().forward(positions, *args, **kwargs)

    PageLocal.__name__ = PageLocal.__qualname__ = f"PageLocal{rope_cls.__name__}"
    return PageLocal


def _install() -> None:
    import vllm.model_executor.layers.rotary_embedding as rotary_embedding
    from vllm.model_executor.custom_op import CustomOp

    for class_name in ROPE_CLASSES:
        rope_cls = getattr(resolve(ROPE_MODULE + ":"), class_name)
        page_local = _page_local(rope_cls)
        CustomOp.register_oot(page_local, name=class_name)
        # register_oot renames the op; keep the parent's name so vLLM's custom-op
        # enablement (e.g. "+rotary_embedding") still applies to it.
        page_local.name = rope_cls.name
        mark_applied(page_local, NAME)
    rotary_embedding._ROPE_DICT = EngineScopedRopeCache(rotary_embedding._ROPE_DICT)


def _installed() -> bool:
    registry = resolve(TARGET)
    return (all(getattr(registry.get(c), "__lminf_patch__", None) == NAME
                for c in ROPE_CLASSES)
            and isinstance(resolve(ROPE_CACHE), EngineScopedRopeCache))


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("RoPE classes are replaced by subclasses that rotate by position mod B when LMINF "
          "is selected and hold the query rotation table; get_rope's module cache is kept "
          "per LMINF engine"),
    why=("keys live in the page-local frame; absolute positions must never reach RoPE, and "
         "a module built for one engine's (B, L) must not serve another engine"),
    upstream="none: this is the plugin's position scheme, not a vLLM defect",
    remove_when="never while keys are stored in the page-local frame",
    fingerprints={
        CPU_0_32: {
            BASE_INIT: "d8ef6c14b78d9911",
            BASE_TABLE: "11c9783da4c1c001",
            CUSTOM_OP_NEW: "51c0f2816907bdca",
            GET_ROPE: "eae42f62bf00b0e8",
        },
        CUDA_0_32: {
            BASE_INIT: "d8ef6c14b78d9911",
            BASE_TABLE: "11c9783da4c1c001",
            CUSTOM_OP_NEW: "51c0f2816907bdca",
            GET_ROPE: "eae42f62bf00b0e8",
        },
        CUDA_0_33: {
            BASE_INIT: "d8ef6c14b78d9911",
            BASE_TABLE: "11c9783da4c1c001",
            CUSTOM_OP_NEW: "51c0f2816907bdca",
            GET_ROPE: "eae42f62bf00b0e8",
        },
    },
    install=_install,
    installed=_installed,
)
