"""Every patch: the guard accepts the installed vLLM, the upstream fingerprint still matches,
and apply_all() puts our code in place idempotently.

Fingerprints are read in a fresh interpreter, before any patch replaces its target, so the
check sees upstream's code. A failure here means vLLM moved: re-read the target and update
the patch (and its fingerprint) deliberately.
"""

import json
import subprocess
import sys

import pytest

from lminf_vllm.patches import PATCHES, apply_all
from lminf_vllm.patches._patch import Patch, PatchError

FRESH_FINGERPRINTS = """
import json
from lminf_vllm.patches import PATCHES
from lminf_vllm.patches._patch import source_fingerprint
print(json.dumps({p.name: {path: source_fingerprint(path) for path in p.fingerprinted}
                  for p in PATCHES}))
"""


@pytest.fixture(scope="module")
def upstream_fingerprints():
    out = subprocess.run([sys.executable, "-c", FRESH_FINGERPRINTS], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_upstream_target_is_what_the_patch_was_written_against(patch, upstream_fingerprints):
    assert upstream_fingerprints[patch.name] == patch.fingerprinted, (
        f"vLLM changed under patch {patch.name!r}: re-read {list(patch.fingerprinted)}")


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_is_documented(patch):
    for field in ("what", "why", "upstream", "remove_when"):
        assert len(getattr(patch, field)) > 10, f"{patch.name}: {field} is empty"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_apply_all_installs_every_patch_idempotently(patch):
    apply_all()
    apply_all()
    assert patch.installed() or not patch.applicable()


def test_a_moved_upstream_target_fails_loudly():
    moved = Patch(name="probe", target="json:dumps", what="-", why="-", upstream="-",
                  remove_when="-", fingerprinted={"json:dumps": "0" * 16},
                  install=lambda: None, installed=lambda: False)
    with pytest.raises(PatchError, match="probe.*json:dumps.*changed"):
        moved.apply()


def test_docs_list_every_patch():
    from pathlib import Path

    from lminf_vllm.patches import markdown

    docs = Path(__file__).resolve().parents[2] / "docs" / "patches.md"
    assert docs.read_text().strip() == markdown().strip(), \
        "docs/patches.md is stale: python -m lminf_vllm.patches > docs/patches.md"


def test_ring_counters_survive_the_engine_core_to_api_server_encoding():
    """SchedulerStats.lminf crosses vLLM's own msgpack channel (scheduler_stats_lminf)."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    apply_all()

    def round_trip(stats):
        encoded = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
        return MsgpackDecoder(EngineCoreOutputs).decode(encoded).scheduler_stats

    with_counters = SchedulerStats(num_running_reqs=2)
    with_counters.lminf = {"ring_pages": 17, "tokens_past_trained_length": 10**9}
    decoded = round_trip(with_counters)
    assert (decoded.num_running_reqs, decoded.lminf) == (2, with_counters.lminf)
    assert round_trip(SchedulerStats()).lminf is None
