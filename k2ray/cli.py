"""`k2ray serve | generate | chat | quantize | keys | usage | search-index`: argument parsing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI/Anthropic API on Ray Serve until Ctrl-C")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    serve.add_argument("--config", default=None, help="deployment YAML (see deploy/serve/local.yaml)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--served-model-name", default=None,
                       help="the one model id to serve (default: the config's `models`)")

    gen = sub.add_parser("generate", help="complete raw prompts offline")
    _add_model_args(gen)
    gen.add_argument("prompts", nargs="+")
    _add_sampling_args(gen)

    chat = sub.add_parser("chat", help="one chat turn (or an interactive loop with no --message)")
    _add_model_args(chat)
    chat.add_argument("--message", action="append", default=None, help="user message; repeat for a batch")
    chat.add_argument("--no-thinking", action="store_true", help="render the template with thinking disabled")
    _add_sampling_args(chat)

    quant = sub.add_parser("quantize", help="write a checkpoint as compressed-tensors pack-quantized INT4")
    quant.add_argument("src")
    quant.add_argument("dst")
    quant.add_argument("--group-size", type=int, default=32)
    _add_billing_parsers(sub)
    index = sub.add_parser("search-index", help="build the local $web_search index (SQLite FTS5) of a folder")
    index.add_argument("dir", help="folder of .md/.txt documents, each with a title line")
    index.add_argument("--out", required=True, help="SQLite file to write (replaced atomically)")
    return parser


def _add_billing_parsers(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys in the billing ledger")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; its secret is printed once, as the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--plan", default=None, help="price plan (default: the model's)")
    for limit in ("--rpm", "--tpm", "--concurrency"):
        create.add_argument(limit, type=int, default=None)
    create.add_argument("--budget-usd", default=None, help="exact decimal, e.g. 25.50")
    keys_sub.add_parser("list", help="every key, revoked ones included, as JSON lines")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    usage = sub.add_parser("usage", help="usage totals and per-day breakdown from the billing ledger")
    usage.add_argument("--key-id", default=None, help="one key (default: every key)")
    usage.add_argument("--since", type=date.fromisoformat, default=None, help="YYYY-MM-DD (UTC)")
    usage.add_argument("--format", choices=("json", "csv"), default="json")
    for p in (create, keys_sub.choices["list"], revoke, usage):
        p.add_argument("--config", default=None, help="deployment YAML whose `billing:` names the ledger")


def _billing(args: argparse.Namespace) -> None:
    from k2ray.billing import cli as billing

    config = billing.load_billing_config(args.config)
    if args.command == "usage":
        lines = billing.usage(config, key_id=args.key_id, since=args.since, output_format=args.format)
    elif args.keys_command == "create":
        lines = billing.keys_create(config, args.name, plan=args.plan, rpm=args.rpm, tpm=args.tpm,
                                    concurrency=args.concurrency, budget_usd=args.budget_usd)
    elif args.keys_command == "list":
        lines = billing.keys_list(config)
    else:
        lines = billing.keys_revoke(config, args.key_id)
    if lines:
        print("\n".join(lines))


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _sampling_params(args: argparse.Namespace):
    from k2ray.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def _llm(args: argparse.Namespace):
    from k2ray.engine.llm import LLM
    from k2ray.model.default_checkpoint import default_checkpoint_dir

    return LLM(model=args.model or str(default_checkpoint_dir()), dtype=args.dtype)


def _generate(args: argparse.Namespace) -> None:
    llm = _llm(args)
    for out in llm.generate(args.prompts, _sampling_params(args)):
        print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                          "finish_reason": out.outputs[0].finish_reason}, ensure_ascii=False))


def _chat(args: argparse.Namespace) -> None:
    llm = _llm(args)
    params = _sampling_params(args)
    kwargs = {"chat_template_kwargs": {"thinking": not args.no_thinking}}
    if args.message:
        conversations = [[{"role": "user", "content": m}] for m in args.message]
        for out in llm.chat(conversations, params, **kwargs):
            print(out.outputs[0].text)
        return
    history: list[dict] = []
    for line in sys.stdin:
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = llm.chat(history, params, **kwargs)[0].outputs[0].text
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        from k2ray.serve.launcher import run_serve

        run_serve(model=args.model, config_path=args.config, host=args.host, port=args.port,
                  served_model_name=args.served_model_name)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "chat":
        _chat(args)
    elif args.command in ("keys", "usage"):
        _billing(args)
    elif args.command == "search-index":
        from k2ray.tools.search_index import search_index_command

        print(search_index_command(args.dir, args.out))
    elif args.command == "quantize":
        from k2ray.model.quantize import quantize_checkpoint

        quantize_checkpoint(args.src, args.dst, group_size=args.group_size)


if __name__ == "__main__":
    main()
