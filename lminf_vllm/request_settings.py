"""Per-request n_global and n_local through vLLM's own channel, SamplingParams.extra_args.

A request may narrow the engine's n_global and n_local, never widen them: the engine's
values size the pinned pages and the ring every request holds. The keys are flat, because
the OpenAI API's `vllm_xargs` (which becomes extra_args) takes only scalar values:

    SamplingParams(extra_args={"lminf_n_global": 16, "lminf_n_local": 128})
    client.completions.create(..., extra_body={"vllm_xargs": {"lminf_n_local": 128}})

    lminf_n_global: an integer in [0, the engine's n_global]
    lminf_n_local:  an integer in [1, the engine's n_local]

The session keys (`lminf_session`, `lminf_session_new`, `lminf_session_close`) travel the
same way and are checked by lminf_vllm/sessions.py. Any other `lminf_` key is refused; keys
without the prefix belong to other extensions and are left alone.

vLLM hands the attention metadata builder no per-request data, so the values reach it
through vLLM's logits-processor extension point, which sees every request's SamplingParams
and its place in the batch before the step's metadata is built:

* validate_params runs at admission in the process that takes the request (the API
  server, or the LLM's own process); vLLM turns its error into HTTP 400 for that request
  alone. It needs the engine's values, and vLLM gives it only the SamplingParams, so the
  processor class is named after them (`processor_name`), and this module makes the class
  for such a name on first use: the name is all vLLM passes between processes.
* In the worker, the processor records each request's values where the builder reads
  them: model runner V1 (the CPU runner, CUDA with VLLM_USE_V2_MODEL_RUNNER=0) by batch
  row, following the runner's adds, removals and moves (update_state, called after the
  batch is condensed and reordered and before the step's inputs are prepared), which are
  the rows of the step's attention metadata; model runner V2 by request slot
  (add_request), which the metadata carries per row as CommonAttentionMetadata.req_idx.
  `RequestSettings` is that table, one per engine, in its EngineContext.

The processor never changes logits (apply returns them as they are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from vllm.exceptions import VLLMValidationError

from lminf_vllm import sessions

KEY_PREFIX = "lminf_"
# extra_args key -> (setting, smallest allowed value); the largest is the engine's value.
KEYS = {"lminf_n_global": ("n_global", 0), "lminf_n_local": ("n_local", 1)}

_MODULE = __name__
# Class names carry the runner interface and the engine's values (see the module doc).
_RUNNER_PREFIXES = {"v1": "RowSettings", "v2": "SlotSettings"}
_CLASS_NAME = re.compile(r"(RowSettings|SlotSettings)_n_global_(\d+)_n_local_(\d+)")


def requested(extra_args: Mapping[str, Any] | None, n_global: int,
              n_local: int) -> tuple[int, int]:
    """(n_global, n_local) a request asks for: its extra_args over the engine's values.

    Raises vLLM's VLLMValidationError (HTTP 400 in the server) naming the key, its value
    and the allowed range, for an unknown `lminf_` key, a non-integer (bool included) or a
    value outside [low, the engine's value].
    """
    error = VLLMValidationError
    args = extra_args or {}
    unknown = sorted(k for k in args if k.startswith(KEY_PREFIX) and k not in KEYS
                     and k not in sessions.KEYS)
    if unknown:
        raise error(f"lminf: unknown per-request setting(s) {unknown} in extra_args "
                    f"(vllm_xargs); allowed: {sorted(KEYS) + list(sessions.KEYS)}",
                    parameter=unknown[0])
    engine = {"n_global": n_global, "n_local": n_local}
    values = dict(engine)
    for key, (name, low) in KEYS.items():
        if key not in args:
            continue
        value, high = args[key], engine[name]
        allowed = (f"the allowed range [{low}, {high}] (a request may narrow the engine's "
                   f"{name}={high}, not widen it)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"lminf: {key}={value!r} must be an integer in {allowed}",
                        parameter=key)
        if not low <= value <= high:
            raise error(f"lminf: {key}={value} is outside {allowed}", parameter=key)
        values[name] = value
    return values["n_global"], values["n_local"]


@dataclass
class RequestSettings:
    """Each request's (n_global, n_local) by batch row (model runner V1) or request slot
    (V2): n_global, n_local: [rows] int64, the engine's values where no request says
    otherwise."""

    engine_n_global: int
    engine_n_local: int
    n_global: np.ndarray
    n_local: np.ndarray

    @classmethod
    def for_engine(cls, n_global: int, n_local: int, rows: int) -> "RequestSettings":
        return cls(n_global, n_local, np.full(rows, n_global, np.int64),
                   np.full(rows, n_local, np.int64))

    def set(self, row: int, extra_args: Mapping[str, Any] | None) -> None:
        self.n_global[row], self.n_local[row] = requested(
            extra_args, self.engine_n_global, self.engine_n_local)

    def move(self, source: int, target: int) -> None:
        self.n_global[target] = self.n_global[source]
        self.n_local[target] = self.n_local[source]

    def swap(self, a: int, b: int) -> None:
        for values in (self.n_global, self.n_local):
            values[[a, b]] = values[[b, a]]

    def of_rows(self, rows: np.ndarray | None, num_reqs: int) -> tuple[np.ndarray, np.ndarray]:
        """[num_reqs] values of the step's requests; rows: their table rows (V2's req_idx),
        or None for rows 0..num_reqs-1 (V1). Rows past `rows` (a graph's padding requests)
        get the engine's values."""
        if rows is None:
            return self.n_global[:num_reqs], self.n_local[:num_reqs]
        rows = np.asarray(rows[:num_reqs], dtype=np.int64)
        pad = num_reqs - len(rows)
        return (np.concatenate([self.n_global[rows], np.full(pad, self.engine_n_global)]),
                np.concatenate([self.n_local[rows], np.full(pad, self.engine_n_local)]))


def processor_name(vllm_config) -> str:
    """The processor for this engine's runner and values, as vLLM's logits_processors
    takes it (a 'module:Class' name)."""
    from lminf_vllm import config as lminf_config

    config = lminf_config.from_vllm_config(vllm_config)
    prefix = _RUNNER_PREFIXES["v2" if vllm_config.use_v2_model_runner else "v1"]
    return f"{_MODULE}:{prefix}_n_global_{config.n_global}_n_local_{config.n_local}"


def enable(vllm_config) -> None:
    """Add this engine's processor to model_config.logits_processors (idempotent)."""
    model_config = vllm_config.model_config
    name = processor_name(vllm_config)
    processors = list(model_config.logits_processors or [])
    if name not in processors:
        model_config.logits_processors = processors + [name]


def _record_into(vllm_config, rows: int) -> RequestSettings:
    """A fresh table for this engine, where its attention metadata builder reads it."""
    from lminf_vllm import config as lminf_config
    from lminf_vllm import engine_context

    config = lminf_config.from_vllm_config(vllm_config)
    table = RequestSettings.for_engine(config.n_global, config.n_local, rows)
    engine_context.of(vllm_config).request_settings = table
    return table


def _row_settings_class(n_global: int, n_local: int, name: str) -> type:
    """Model runner V1's interface: batch rows, updated by BatchUpdate."""
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    class RowSettings(V1LogitsProcessor):
        @classmethod
        def validate_params(cls, sampling_params):
            requested(sampling_params.extra_args, n_global, n_local)
            sessions.validate_session_params(sampling_params)

        def __init__(self, vllm_config, device, is_pin_memory: bool) -> None:
            self.table = _record_into(vllm_config, vllm_config.scheduler_config.max_num_seqs)

        def apply(self, logits):
            return logits

        def is_argmax_invariant(self) -> bool:
            return True

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            table = self.table
            # vLLM's order: removed, added, moved (a removed row is overwritten before use)
            for row, params, _, _ in batch_update.added:
                table.set(row, params.extra_args if params is not None else None)
            for source, target, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    table.swap(source, target)
                else:
                    table.move(source, target)

    RowSettings.__name__ = RowSettings.__qualname__ = name
    RowSettings.__module__ = _MODULE
    return RowSettings


def _slot_settings_class(n_global: int, n_local: int, name: str) -> type:
    """Model runner V2's interface: request slots, each set when a request takes it."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    class SlotSettings(V2LogitsProcessor):
        @classmethod
        def validate_params(cls, sampling_params) -> None:
            requested(sampling_params.extra_args, n_global, n_local)
            sessions.validate_session_params(sampling_params)

        def __init__(self, vllm_config, req_states) -> None:
            self.table = _record_into(vllm_config, req_states.max_num_reqs)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            self.table.set(req_idx, sampling_params.extra_args)
            return False  # logits untouched

        def apply(self, logits, ctx):
            return logits

    SlotSettings.__name__ = SlotSettings.__qualname__ = name
    SlotSettings.__module__ = _MODULE
    return SlotSettings


def __getattr__(name: str):
    """The processor class a name from processor_name stands for, made once per process
    (vLLM loads it by name in the API server and in the worker; pickle finds it here)."""
    match = _CLASS_NAME.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {_MODULE!r} has no attribute {name!r}")
    prefix, n_global, n_local = match.group(1), int(match.group(2)), int(match.group(3))
    make = _row_settings_class if prefix == _RUNNER_PREFIXES["v1"] else _slot_settings_class
    cls = globals()[name] = make(n_global, n_local, name)
    return cls
