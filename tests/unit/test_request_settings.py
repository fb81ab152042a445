"""Per-request n_global / n_local (request_settings.py): the checks, vLLM's own validators
loading the processor by the name the engine config carries, and the row / slot tables the
metadata builder reads, driven by vLLM's own BatchUpdate records."""

import pickle

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, validate_logits_processors_parameters
from vllm.v1.sample.logits_processor.interface import MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import (
    build_custom_logits_processors_params_validator)

from lminf_vllm import request_settings

ENGINE_N_GLOBAL, ENGINE_N_LOCAL = 64, 256
V1_NAME = "lminf_vllm.request_settings:RowSettings_n_global_64_n_local_256"
V2_NAME = "lminf_vllm.request_settings:SlotSettings_n_global_64_n_local_256"

# (extra_args, the key the error must name, what else the message must say)
BAD = {
    "negative n_global": ({"lminf_n_global": -1}, "lminf_n_global", "[0, 64]"),
    "n_global above the engine's": ({"lminf_n_global": 65}, "lminf_n_global", "[0, 64]"),
    "n_local of zero": ({"lminf_n_local": 0}, "lminf_n_local", "[1, 256]"),
    "n_local above the engine's": ({"lminf_n_local": 257}, "lminf_n_local", "[1, 256]"),
    "string": ({"lminf_n_local": "128"}, "lminf_n_local", "must be an integer"),
    "float": ({"lminf_n_global": 16.0}, "lminf_n_global", "must be an integer"),
    "bool": ({"lminf_n_global": True}, "lminf_n_global", "must be an integer"),
    "unknown key": ({"lminf_n_locals": 5}, "lminf_n_locals", "allowed: ['lminf_n_global'"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_value_fails_naming_the_key_and_the_allowed_range(name):
    extra_args, key, detail = BAD[name]
    with pytest.raises(VLLMValidationError) as raised:
        request_settings.requested(extra_args, ENGINE_N_GLOBAL, ENGINE_N_LOCAL)
    assert key in str(raised.value) and detail in str(raised.value)
    assert raised.value.parameter == key


def test_good_values_narrow_and_other_extensions_keys_are_left_alone():
    requested = lambda args: request_settings.requested(args, ENGINE_N_GLOBAL, ENGINE_N_LOCAL)
    assert requested(None) == (64, 256)
    assert requested({"other_extension": "x", "kv_transfer_params": 3}) == (64, 256)
    assert requested({"lminf_n_global": 0, "lminf_n_local": 1}) == (0, 1)
    assert requested({"lminf_n_global": 64, "lminf_n_local": 256}) == (64, 256)
    assert requested({"lminf_n_local": 100}) == (64, 100)


@pytest.mark.parametrize("runner, name", [("v1", V1_NAME), ("v2", V2_NAME)])
def test_vllms_own_validators_load_the_processor_by_name_and_refuse_bad_values(runner, name):
    validate = (lambda params: validate_logits_processors_parameters([name], params)) \
        if runner == "v1" else build_custom_logits_processors_params_validator([name])
    validate(SamplingParams(extra_args={"lminf_n_global": 3, "lminf_n_local": 200}))
    validate(SamplingParams())
    for extra_args, key, detail in BAD.values():
        with pytest.raises(VLLMValidationError, match=key) as raised:
            validate(SamplingParams(extra_args=extra_args))
        assert detail in str(raised.value)


def test_the_processor_classes_pickle_by_name_in_a_process_that_has_not_made_them():
    cls = getattr(request_settings, "RowSettings_n_global_7_n_local_9")
    data = pickle.dumps(cls)
    del request_settings.__dict__["RowSettings_n_global_7_n_local_9"]
    remade = pickle.loads(data)
    assert remade.__name__ == "RowSettings_n_global_7_n_local_9"
    with pytest.raises(VLLMValidationError, match=r"\[0, 7\]"):
        remade.validate_params(SamplingParams(extra_args={"lminf_n_global": 8}))
    with pytest.raises(AttributeError):
        request_settings.RowSettings_n_global_7


def added(row, extra_args=None):
    return (row, SamplingParams(extra_args=extra_args), [1, 2], [])


def test_v1_rows_follow_adds_swaps_and_condensing_moves():
    table = request_settings.RequestSettings.for_engine(ENGINE_N_GLOBAL, ENGINE_N_LOCAL, 8)
    processor = object.__new__(getattr(request_settings, V1_NAME.split(":")[1]))
    processor.table = table
    processor.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        added(0, {"lminf_n_local": 10}), added(1), added(2, {"lminf_n_global": 0}),
        added(3, {"lminf_n_global": 5, "lminf_n_local": 6})]))
    assert table.of_rows(None, 4)[0].tolist() == [64, 64, 0, 5]
    assert table.of_rows(None, 4)[1].tolist() == [10, 256, 256, 6]
    # row 1 finishes; a new request takes it; the batch is reordered (swap 0 <-> 3);
    # then row 2 finishes and condensing moves row 3 down into it
    processor.update_state(BatchUpdate(batch_size=4, removed=[1], moved=[
        (0, 3, MoveDirectionality.SWAP)], added=[added(1, {"lminf_n_local": 2})]))
    assert table.of_rows(None, 4)[1].tolist() == [6, 2, 256, 10]
    processor.update_state(BatchUpdate(batch_size=3, removed=[2], added=[],
                                       moved=[(3, 2, MoveDirectionality.UNIDIRECTIONAL)]))
    assert table.of_rows(None, 3)[0].tolist() == [5, 64, 64]
    assert table.of_rows(None, 3)[1].tolist() == [6, 2, 10]
    processor.update_state(None)  # no change this step
    assert table.of_rows(None, 3)[1].tolist() == [6, 2, 10]


def test_v2_slots_are_set_on_add_and_read_through_req_idx():
    table = request_settings.RequestSettings.for_engine(ENGINE_N_GLOBAL, ENGINE_N_LOCAL, 8)
    processor = object.__new__(getattr(request_settings, V2_NAME.split(":")[1]))
    processor.table = table
    assert processor.add_request(5, SamplingParams(extra_args={"lminf_n_local": 9})) is False
    processor.add_request(2, SamplingParams(extra_args={"lminf_n_global": 1}))
    logits = torch.randn(2, 10)
    assert processor.apply(logits, None) is logits
    # rows 0, 1 are slots 5, 2; a graph's padding request (row 2) gets the engine's values
    n_global, n_local = table.of_rows(np.array([5, 2]), 3)
    assert n_global.tolist() == [64, 1, 64] and n_local.tolist() == [9, 256, 256]
