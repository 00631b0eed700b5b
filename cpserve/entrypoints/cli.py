"""The `cpserve` command: `generate`, `serve` and `bench serve`.

    cpserve generate [MODEL] --prompt TEXT [--max-tokens N ...]   offline, prints the text
    cpserve serve [MODEL] [--host --port --api-key ...]           the OpenAI-compatible server
    cpserve bench serve --base-url URL [...]                      load test of any such server

Engine flags (`-tp`, `-pcp`, `-dcp`, `--block-size`, ...) are vLLM's, from `EngineArgs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cpserve.config import ConfigError
from cpserve.engine.args import EngineArgs


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for several prompts")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 disables it")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    # --seed is the engine flag: it seeds the sampler, so it repeats a sampled run.


def _generate(args: argparse.Namespace) -> int:
    from cpserve import LLM, SamplingParams

    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, max_tokens=args.max_tokens,
                                stop=args.stop, ignore_eos=args.ignore_eos)
    except ValueError as exc:
        print(f"cpserve generate: {exc}", file=sys.stderr)
        return 2
    with LLM(**vars(EngineArgs.from_cli_args(args))) as llm:
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
    return run_server(args)


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

    generate = commands.add_parser("generate", help="generate text offline and print it")
    EngineArgs.add_cli_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    EngineArgs.add_cli_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    bench_serve_parser = bench_commands.add_parser(
        "serve", help="load test an OpenAI-compatible server through its public API")
    bench_serve.add_cli_args(bench_serve_parser)
    bench_serve_parser.set_defaults(func=_bench_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:  # a bad flag or combination: the message names it
        print(f"cpserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
