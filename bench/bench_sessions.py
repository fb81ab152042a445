"""A 64-turn conversation growing to 64L tokens: time to first token per turn (issue #13).

Each turn adds --turn-tokens held-out tokens (default L = 256) to the conversation and
asks for one greedy token, which joins the conversation too; after 64 turns it holds about
64L = 16K tokens. Modes, one in-process engine each (VLLM_ENABLE_V1_MULTIPROCESSING=0, so
the engine's work is this process's CPU time), in turn:

* lminf-session: each turn sends only its new tokens, naming a session (lminf_session);
* lminf-resend: each turn resends the whole conversation as token ids, lminf.continuation
  on (transparent continuation adopts the previous turn's state);
* lminf-reprefill: the whole conversation, no state kept (receptive-field prefill on: the
  engine computes the global prefix and the last 6 · 255 + 1 tokens);
* lminf-full-reprefill: the same with receptive-field prefill off (every token computed);
* vllm-prefix-cache: stock vLLM (its CPU attention backend, dense causal attention) with
  prefix caching: each turn computes the tokens past its cached prefix.

Per turn: the wall time and this process's CPU time of generate(max_tokens=1) (the time to
the first token), and the KV pages the engine holds between turns (the kept state for
lminf sessions/resend; the pool's used blocks for stock vLLM).

    python bench/bench_sessions.py                       # 64 turns, all modes
    python bench/bench_sessions.py --turns 8 --modes lminf-session,vllm-prefix-cache
    python bench/bench_sessions.py --modes lminf-reprefill,lminf-full-reprefill \
        --timed-turns 1,8,16,32,48,64 --keep bench/results/<earlier run>.json
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import MODEL_DIR, save, shutdown, val_tokens  # noqa: E402

TRAINED_LENGTH = 256
MODES = ("lminf-session", "lminf-resend", "vllm-prefix-cache", "lminf-reprefill",
         "lminf-full-reprefill")


def make_engine(mode: str, max_model_len: int):
    from vllm import LLM

    common = dict(dtype="float32", max_model_len=max_model_len, max_num_seqs=1,
                  enforce_eager=True, seed=0, gpu_memory_utilization=0.3)
    if mode == "vllm-prefix-cache":
        # the tiny model's config says 256 positions; dense RoPE past them is out of its
        # training (the outputs are not meaningful) but costs the same. vLLM's CPU
        # attention takes pages of a multiple of 32 tokens: the smallest, for the finest
        # prefix-cache hits.
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        return LLM(str(MODEL_DIR), enable_prefix_caching=True, block_size=32, **common)
    lminf = {"lminf-session": {}, "lminf-resend": {"continuation": True},
             "lminf-reprefill": {"stream_states": 0},
             "lminf-full-reprefill": {"stream_states": 0,
                                      "receptive_field_prefill": False}}[mode]
    return LLM(str(MODEL_DIR), attention_backend="lminf", additional_config={"lminf": lminf},
               block_size=16, **common)


def pages_held(llm, mode: str) -> int:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    if mode.startswith("lminf"):
        from lminf_vllm import sessions

        store = sessions.store_of(scheduler.kv_cache_manager)
        return store.counters.stream_state_pages if store is not None else 0
    pool = scheduler.kv_cache_manager.block_pool
    # between turns no request runs: the conversation's pages are the cached blocks
    return sum(1 for block in pool.blocks if block.block_hash is not None)


def forget_kept_states(llm) -> None:
    """Drop what the warm-up left (a kept state with continuation, cached blocks)."""
    from lminf_vllm import sessions

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    store = sessions.store_of(scheduler.kv_cache_manager)
    while store is not None and store.evict_one("bench warm-up"):
        pass
    scheduler.kv_cache_manager.reset_prefix_cache()


STATELESS = ("lminf-reprefill", "lminf-full-reprefill")


def run_conversation(mode: str, turns: int, turn_tokens: int, tokens,
                     timed_turns: set[int] | None = None) -> list[dict]:
    """timed_turns: for a mode that keeps no state, the turns to run (the others only
    grow the conversation, with its last new token standing in for the generated one):
    such a turn's cost depends on its prompt's length alone."""
    from vllm import SamplingParams

    llm = make_engine(mode, max_model_len=turns * (turn_tokens + 1) + 64)
    warm = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([{"prompt_token_ids": tokens[-300:].tolist()}], warm, use_tqdm=False)
    forget_kept_states(llm)
    conversation: list[int] = []
    rows = []
    for turn in range(turns):
        new = tokens[turn * turn_tokens:(turn + 1) * turn_tokens].tolist()
        extra = None
        if mode == "lminf-session":
            extra = {"lminf_session": "bench", "lminf_session_new": turn == 0}
            prompt = new
        else:
            prompt = conversation + new
        if mode in STATELESS and timed_turns and turn + 1 not in timed_turns:
            conversation += new + new[-1:]
            continue
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                extra_args=extra)
        wall, cpu = time.perf_counter(), time.process_time()
        out, = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert out.outputs[0].finish_reason == "length", out.outputs[0]
        conversation += new + list(out.outputs[0].token_ids)
        rows.append({"turn": turn + 1, "conversation_tokens": len(conversation),
                     "sent_tokens": len(prompt), "ttft_wall_s": wall, "ttft_cpu_s": cpu,
                     "kv_pages_held_after": pages_held(llm, mode)})
        print(f"{mode} turn {turn + 1:>2}: {len(conversation):>6} tokens, sent "
              f"{len(prompt):>6}: {wall:.3f} s wall, {cpu:.3f} s cpu, "
              f"{rows[-1]['kv_pages_held_after']} pages held", flush=True)
    shutdown(llm)
    return rows


def write(args, results: dict):
    last = {mode: rows[-1]["ttft_cpu_s"] for mode, rows in results.items()}
    summary = {f"last_turn_cpu_s_{mode}": value for mode, value in last.items()}
    if "lminf-session" in last:
        summary.update({f"last_turn_speedup_of_session_over_{mode}": value
                        / last["lminf-session"] for mode, value in last.items()
                        if mode != "lminf-session"})
    path = save("sessions_ttft", {
        "command": "python bench/bench_sessions.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "settings": {"model": "tiny-llama-L256 (6 layers)", "n_global": 64, "n_local": 256,
                     "page_size": 16, "turn_tokens": args.turn_tokens, "turns": args.turns,
                     "max_tokens": 1, "statistic": "one run per turn; CPU time of this "
                     "process (in-process engine, 1 torch thread) and wall time"},
        "summary": summary, "modes": results})
    figure, (ttft, pages) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, rows in results.items():
        x = [r["conversation_tokens"] for r in rows]
        ttft.plot(x, [r["ttft_cpu_s"] for r in rows], ".-", label=mode)
        pages.plot(x, [r["kv_pages_held_after"] for r in rows], ".-", label=mode)
    ttft.set(xlabel="conversation tokens", ylabel="time to first token, CPU s",
             yscale="log", title="64-turn conversation, tiny model, CPU")
    pages.set(xlabel="conversation tokens", ylabel="KV pages held between turns",
              title="KV pages kept for the conversation")
    ttft.legend(fontsize=8)
    pages.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(figure)
    return path, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=64)
    parser.add_argument("--turn-tokens", type=int, default=TRAINED_LENGTH)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--timed-turns", default=None,
                        help="comma-separated turns to time in the modes that keep no "
                             "state (default: every turn)")
    parser.add_argument("--keep", default=None,
                        help="an earlier result JSON whose modes (not rerun) are kept, each "
                             "with the machine facts of its own run")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    tokens = val_tokens()
    results = {}
    if args.keep:
        import json

        earlier = json.loads(open(args.keep).read())
        results = {mode: rows for mode, rows in earlier["modes"].items()
                   if mode not in modes}
        for rows in results.values():
            for row in rows:
                row.setdefault("run", earlier["machine"])
    for mode in modes:  # written after each mode, so a run cut short keeps what it measured
        timed = ({int(t) for t in args.timed_turns.split(",")} if args.timed_turns
                 else None)
        results[mode] = run_conversation(mode, args.turns, args.turn_tokens, tokens, timed)
        path, summary = write(args, results)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    print(summary)


if __name__ == "__main__":
    main()
