"""The `cpserve` command: `generate`, `serve`, `proxy` and `bench serve`.

    cpserve generate [MODEL] --prompt TEXT [--max-tokens N ...]   offline, prints the text
    cpserve serve [MODEL] [--host --port --api-key ...]           the OpenAI-compatible server
    cpserve bench serve --base-url URL [...]                      load test of any such server
    cpserve proxy --prefill URL... --decode URL... [--port P]     prefill/decode disaggregation

Engine flags (`-tp`, `-pcp`, `-dcp`, `--block-size`, ...) are vLLM's, from `EngineArgs`; as
with vLLM, `--flag_name` is accepted for `--flag-name`, and `--help` groups them by vLLM's
config classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from cpserve.config import ConfigError, check_server_flags
from cpserve.engine.args import EngineArgs

# Unset sampling flags of `generate` take the generation config's defaults (as vLLM's server
# does for request fields), then vLLM's.
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for several prompts")
    g.add_argument("--max-tokens", type=int, default=None, help="default 16")
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy; default 1")
    g.add_argument("--top-p", type=float, default=None, help="default 1")
    g.add_argument("--top-k", type=int, default=None, help="0 or -1 disables it (default)")
    g.add_argument("--min-p", type=float, default=None, help="default 0")
    g.add_argument("--repetition-penalty", type=float, default=None, help="default 1")
    g.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    # --seed is the engine flag: it seeds the sampler, so it repeats a sampled run.


def _generate(args: argparse.Namespace) -> int:
    from cpserve import LLM, SamplingParams

    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS
             if getattr(args, name) is not None}
    given.update(n=args.n, stop=args.stop, ignore_eos=args.ignore_eos)
    try:
        SamplingParams(**given)  # bad flags stop here, before the model loads
    except ValueError as exc:
        print(f"cpserve generate: {exc}", file=sys.stderr)
        return 2
    with LLM(**vars(EngineArgs.from_cli_args(args))) as llm:
        params = dataclasses.replace(llm.get_default_sampling_params(), **given)
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    several = len(outputs) > 1 or args.n > 1
    for i, output in enumerate(outputs):
        for completion in output.outputs:
            if several:
                print(f"--- prompt {i}, completion {completion.index} "
                      f"({completion.finish_reason}) ---")
            print(completion.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cpserve.entrypoints.openai.api_server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    check_server_flags(args.api_server_count, args.headless, args.node_rank)
    if args.headless:
        return _serve_headless(args)
    return run_server(args)


def _serve_headless(args: argparse.Namespace) -> int:
    """A node >= 1 of a multi-node launch: its ranks, no API server, until node 0 stops."""
    from cpserve.engine.worker import run_headless_node

    config = EngineArgs.from_cli_args(args).create_engine_config()  # node 0's checks, here too
    launch, parallel = config.launch, config.parallel
    ranks = launch.local_ranks(parallel.world_size)
    print(f"cpserve: node {launch.node_rank} of {launch.nnodes}, headless: ranks "
          f"{ranks.start}-{ranks.stop - 1} of {parallel.world_size}, joining node 0 at "
          f"{launch.master_addr}:{launch.master_port}", file=sys.stderr, flush=True)
    return run_headless_node(parallel, launch, config.device)


def _proxy(args: argparse.Namespace) -> int:
    from cpserve.entrypoints.proxy import run_proxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    return run_proxy(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from cpserve.bench import serve

    serve.main(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cpserve import __version__
    from cpserve.bench import serve as bench_serve
    from cpserve.entrypoints.openai.api_server import add_server_args

    parser = argparse.ArgumentParser(
        prog="cpserve", description="Long-context LLM inference with context parallelism.")
    parser.add_argument("--version", action="version", version=f"cpserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text offline and print it",
                                   usage="%(prog)s [MODEL] --prompt TEXT [options]")
    EngineArgs.add_cli_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server",
                                usage="%(prog)s [MODEL] [options]")
    EngineArgs.add_cli_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)
    for sub in (generate, serve):
        group_like_vllm(sub)

    proxy = commands.add_parser(
        "proxy", help="one OpenAI endpoint in front of prefill and decode instances",
        usage="%(prog)s --prefill URL [URL ...] --decode URL [URL ...] [options]")
    from cpserve.entrypoints.proxy import add_proxy_args

    add_proxy_args(proxy)
    proxy.set_defaults(func=_proxy)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    bench_serve_parser = bench_commands.add_parser(
        "serve", help="load test an OpenAI-compatible server through its public API")
    bench_serve.add_cli_args(bench_serve_parser)
    bench_serve_parser.set_defaults(func=_bench_serve)
    return parser


# `--help` sections as vLLM's (its config classes), by argparse dest. Flags defined anywhere
# (EngineArgs, the server, later branches) are moved here; a flag not listed keeps the group
# it was defined in, after these.
HELP_GROUPS = {
    "options": ["headless", "api_server_count"],
    "Frontend": ["host", "port", "api_key", "chat_template", "enable_log_requests",
                 "uvicorn_log_level", "max_request_body_bytes"],
    "ModelConfig": ["tokenizer", "trust_remote_code", "dtype", "seed", "max_model_len",
                    "quantization", "enforce_eager", "max_logprobs", "served_model_name",
                    "generation_config", "override_generation_config", "device"],
    "LoadConfig": ["load_format"],
    "ParallelConfig": ["distributed_executor_backend", "master_addr", "master_port", "nnodes",
                       "node_rank", "tensor_parallel_size", "decode_context_parallel_size",
                       "cp_kv_cache_interleave_size", "prefill_context_parallel_size",
                       "pcp_kv_exchange", "pcp_min_split_tokens", "data_parallel_size",
                       "data_parallel_size_local",
                       "data_parallel_start_rank", "data_parallel_rank",
                       "data_parallel_address", "data_parallel_rpc_port",
                       "enable_expert_parallel"],
    "CacheConfig": ["block_size", "gpu_memory_utilization", "kv_cache_dtype", "num_kv_blocks",
                    "kv_cache_memory", "enable_prefix_caching"],
    "SchedulerConfig": ["max_num_batched_tokens", "max_num_seqs", "max_waiting_requests",
                        "long_prefill_token_threshold", "enable_chunked_prefill",
                        "async_scheduling"],
    "CompilationConfig": ["cudagraph_capture_sizes"],
    "VllmConfig": ["speculative_config", "kv_transfer_config", "compilation_config",
                   "optimization_level"],
}


def group_like_vllm(parser: argparse.ArgumentParser) -> None:
    """Regroup `parser`'s flags into HELP_GROUPS' sections, in that order.

    argparse has no public way to move an argument between groups; its `_action_groups` /
    `_group_actions` lists have been stable since Python 2.7.
    """
    groups = {g.title: g for g in parser._action_groups}
    section_of = {dest: title for title, dests in HELP_GROUPS.items() for dest in dests}
    for group in list(parser._action_groups):
        for action in list(group._group_actions):
            title = section_of.get(action.dest)
            if title is None or title == group.title:
                continue
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            group._group_actions.remove(action)
            groups[title]._group_actions.append(action)
    order = ["positional arguments", *HELP_GROUPS]
    parser._action_groups.sort(key=lambda g: order.index(g.title) if g.title in order
                               else len(order))
    parser._action_groups[:] = [g for g in parser._action_groups if g._group_actions]


def vllm_spelling(argv: Sequence[str]) -> list[str]:
    """`--flag_name` as `--flag-name` (vLLM's parser takes both; its docs use both)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg.partition("=")
            arg = key.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _note_vllm_environment() -> None:
    """vLLM's environment variables (a vLLM launch script exports some) change nothing here:
    say so once rather than leave them looking honoured."""
    names = sorted(name for name in os.environ if name.startswith("VLLM_"))
    if names:
        logging.getLogger("cpserve").warning(
            "these vLLM environment variables mean nothing to cpserve and are ignored: %s",
            ", ".join(names))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(vllm_spelling(sys.argv[1:] if argv is None else argv))
    if args.command in ("serve", "generate"):
        _note_vllm_environment()
    try:
        return args.func(args)
    except ConfigError as exc:  # a bad flag or combination: the message names it
        print(f"cpserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
