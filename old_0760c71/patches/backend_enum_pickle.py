"""Let the LMINF backend enum member cross a process spawn (VLLM_NOTES B1).

vLLM pickles the VllmConfig into the EngineCore and worker processes it spawns. An enum
member pickles by value, and the child unpickles it before it loads plugins, so a member
added by a plugin fails with "'...' is not a valid AttentionBackendEnum". This patch makes
LMINF pickle as a call to `lminf_vllm.backend_member`, which registers the plugin in the
child first and then returns the member; every other member pickles as before.
"""

from ._patch import Patch, carries_mark, mark_applied

NAME = "backend_enum_pickle"
TARGET = "vllm.v1.attention.backends.registry:AttentionBackendEnum.__reduce_ex__"


def _install() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import lminf_vllm

    by_value = AttentionBackendEnum.__reduce_ex__

    def __reduce_ex__(self, protocol):
        if self.name == lminf_vllm.BACKEND_NAME:
            return lminf_vllm.backend_member, ()
        return by_value(self, protocol)

    AttentionBackendEnum.__reduce_ex__ = mark_applied(__reduce_ex__, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what="AttentionBackendEnum.LMINF pickles as lminf_vllm.backend_member() instead of by value",
    why="spawned EngineCore/worker processes unpickle the config before loading plugins",
    upstream="none yet: plugin-registered enum members cannot survive spawn in vLLM 0.32",
    remove_when="vLLM loads general plugins before unpickling engine arguments",
    fingerprinted={"vllm.v1.attention.backends.registry:AttentionBackendEnum.register":
                   "c751d75289673feb"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
