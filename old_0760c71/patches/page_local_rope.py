"""Feed the model's rotary embedding page-local positions, j mod B (DESIGN §3; VLLM_NOTES B7).

Keys are stored rotated by their offset inside their page, so nothing larger than B - 1 ever
reaches the cos/sin table: position 199,999,999 is as exact as position 5, and vLLM's
out-of-bounds table read past max_position_embeddings cannot happen. Each RoPE class a
supported model uses is replaced (vLLM's out-of-tree CustomOp registry, keyed by class
name) by a subclass that, when LMINF is selected, applies `positions mod B` and records
the query rotation table (angles 0..L of the model's own table) for the attention backend.
When LMINF is not selected the subclass behaves exactly like its parent.
"""

from __future__ import annotations

from ._patch import Patch, mark_applied, resolve

NAME = "page_local_rope"
ROPE_MODULE = "vllm.model_executor.layers.rotary_embedding"
# RoPE classes whose table is a fixed function of position (config.SUPPORTED_ROPE_TYPES).
ROPE_CLASSES = ("RotaryEmbedding", "LinearScalingRotaryEmbedding",
                "DynamicNTKScalingRotaryEmbedding", "Llama3RotaryEmbedding",
                "YaRNScalingRotaryEmbedding")
TARGET = "vllm.model_executor.custom_op:op_registry_oot"

# head_size -> QueryRotation, filled as the model builds its rotary embeddings. vLLM gives
# the attention layer no link to its model's rotary embedding, so the backend looks the
# table up here; one process serves one model, so one entry per head size.
query_rotations: dict = {}


def query_rotation_for(head_size: int):
    if head_size not in query_rotations:
        raise RuntimeError(
            f"lminf: no rotary embedding with head size {head_size} was built in this "
            "process, so there is no RoPE to re-frame: the model is not supported")
    return query_rotations[head_size]


def _page_local(rope_cls: type) -> type:
    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm import rope_frame
    from lminf_vllm.attention.rotation import QueryRotation

    class PageLocal(rope_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from vllm.config import get_current_vllm_config

            vllm_config = get_current_vllm_config()
            self.lminf_page_size = None
            if not lminf_vllm.is_selected(vllm_config):
                return
            config = lminf_config.from_vllm_config(vllm_config)
            self.lminf_page_size = config.page_size
            num_angles = config.trained_length + 1
            # Recompute the model's table with at least L + 1 rows: the query rotation
            # reaches angle L itself (VLLM_NOTES B7), one row past an L-row table.
            rows = self.max_position_embeddings
            self.max_position_embeddings = max(rows, num_angles)
            table = self._compute_cos_sin_cache()
            self.max_position_embeddings = rows
            query_rotations[self.head_size] = QueryRotation.from_model_table(
                table, num_angles, self.is_neox_style)

        def forward(self, positions, *args, **kwargs):
            if self.lminf_page_size is not None:
                positions = rope_frame.key_frame_position(positions, self.lminf_page_size)
            return super().forward(positions, *args, **kwargs)

    PageLocal.__name__ = PageLocal.__qualname__ = f"PageLocal{rope_cls.__name__}"
    return PageLocal


def _install() -> None:
    from vllm.model_executor.custom_op import CustomOp

    for class_name in ROPE_CLASSES:
        rope_cls = getattr(resolve(ROPE_MODULE + ":"), class_name)
        page_local = _page_local(rope_cls)
        CustomOp.register_oot(page_local, name=class_name)
        # register_oot renames the op; keep the parent's name so vLLM's custom-op
        # enablement (e.g. "+rotary_embedding") still applies to it.
        page_local.name = rope_cls.name
        mark_applied(page_local, NAME)


def _installed() -> bool:
    registry = resolve(TARGET)
    return all(getattr(registry.get(c), "__lminf_patch__", None) == NAME for c in ROPE_CLASSES)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("RoPE classes are replaced by subclasses that rotate by position mod B when LMINF "
          "is selected and record the query rotation table"),
    why="keys live in the page-local frame; absolute positions must never reach RoPE",
    upstream="none: this is the plugin's position scheme, not a vLLM defect",
    remove_when="never while keys are stored in the page-local frame",
    fingerprinted={
        "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase.__init__":
            "d8ef6c14b78d9911",
        "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase."
        "_compute_cos_sin_cache": "11c9783da4c1c001",
        "vllm.model_executor.custom_op:CustomOp.__new__": "51c0f2816907bdca",
    },
    install=_install,
    installed=_installed,
)
