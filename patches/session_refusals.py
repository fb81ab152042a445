"""A refused session request becomes an HTTP 4xx naming the session, in the API server.

The stream store (lminf_vllm/sessions.py) lives in the EngineCore: only it knows whether a
session exists, is busy, or was started with other settings. It refuses a request by
finishing it at once with reason "error" and a stop_reason carrying its message and the
HTTP status it stands for (patches/stream_states.py). vLLM turns every "error" finish into
HTTP 500 "Internal server error", so this patch wraps the API server's
RequestState.make_request_output: for such a finish, on the AsyncLLM path (the request has
an output queue), it returns vLLM's GracefulHTTPError(message, status) instead of the
output; the queue hands exceptions to AsyncLLM.generate, which re-raises a
GracefulHTTPError as it is, and the OpenAI server answers with that status and message
(for a streamed request: as the stream's error event). The in-process LLM path (no queue)
keeps the output: finish_reason "error", stop_reason the message.
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "session_refusals"
TARGET = "vllm.v1.engine.output_processor:RequestState.make_request_output"
COLLECTOR = "vllm.v1.engine.output_processor:RequestOutputCollector.put"
GENERATE = "vllm.v1.engine.async_llm:AsyncLLM.generate"


def _install() -> None:
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import RequestState

    from lminf_vllm.sessions import parse_refusal

    make_request_output = RequestState.make_request_output

    def output_or_refusal(self, new_token_ids, pooling_output, finish_reason, stop_reason,
                          *args, **kwargs):
        refusal = (parse_refusal(stop_reason)
                   if finish_reason == FinishReason.ERROR and self.queue is not None
                   else None)
        if refusal is not None:
            message, status = refusal
            return GracefulHTTPError(message, HTTPStatus(status))
        return make_request_output(self, new_token_ids, pooling_output, finish_reason,
                                   stop_reason, *args, **kwargs)

    RequestState.make_request_output = mark_applied(output_or_refusal, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("RequestState.make_request_output returns GracefulHTTPError(message, status) "
          "for a request the EngineCore refused as a session request (finish reason "
          "error, stop_reason from sessions.SessionRefused), on the AsyncLLM path"),
    why=("session state lives in the EngineCore, which can only finish a request; vLLM "
         "maps every error finish to HTTP 500 and drops its reason"),
    upstream="none: EngineCoreOutput carries no client-error status",
    remove_when="an EngineCore can fail one request with a client error and a message",
    fingerprints={
        build: {TARGET: output, COLLECTOR: "3390ffb9a292f21f", GENERATE: generate}
        for build, (output, generate) in {
            CPU_0_32: ("353cb96c5deaa307", "5bd0ee90459b0e29"),
            CUDA_0_32: ("353cb96c5deaa307", "5bd0ee90459b0e29"),
            CUDA_0_33: ("9c555c51b1a2ece2", "f8205b7b520cf747"),
        }.items()},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
