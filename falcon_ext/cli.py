"""`falcon-ext` command line: demo, bench, prepare-data, train, eval-drafter, fetch-smollm2."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .bench import add_bench_parser
from .cli_train import add_train_parsers
from .targets import add_dtype_argument


def make_drafter(kind: str, model, target_name: str):
    """``lookup``, ``falcon`` (the drafter shipped for the target), or a Falcon drafter folder."""
    from .bench import resolve_drafter

    return resolve_drafter(kind, model, target_name)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def demo(args) -> int:
    from .generate import speculative_generate
    from .prompts import encode, use_chat_template
    from .targets import load_target, resolve_dtype

    torch.manual_seed(args.seed)
    model, tokenizer = load_target(args.model, resolve_dtype(args.dtype, args.device), args.device)
    drafter = make_drafter(args.drafter, model, args.model)
    # An instruction-tuned target (one whose tokenizer has a chat template) gets the prompt as a user turn.
    ids, _ = encode(tokenizer, args.prompt, use_chat_template(tokenizer), None)
    ids = ids.to(args.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 \
        else dict(do_sample=False)

    def plain():
        return model.generate(ids, max_new_tokens=args.max_new_tokens, **sampling)

    def spec():
        return speculative_generate(model, drafter, ids, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=0, top_p=1.0)

    plain(), spec()  # warm-up: first calls pay one-off allocation and dispatch costs
    plain_time = spec_time = 0.0
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        reference, t = _timed(plain)
        plain_time += t
        out, t = _timed(spec)
        spec_time += t
    new_plain = reference.shape[1] - ids.shape[1]
    new_spec = out.sequences.shape[1] - ids.shape[1]
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
    print()
    print(f"model {args.model}, drafter {args.drafter}, {new_spec} new tokens, temperature {args.temperature}")
    print(f"plain decoding (model.generate): {new_plain * args.repeats / plain_time:8.1f} tokens/s")
    print(f"speculative_generate:            {new_spec * args.repeats / spec_time:8.1f} tokens/s")
    print(f"mean accepted tokens per target forward: {out.mean_accepted_tokens:.2f}")
    print(f"speedup over plain decoding: {(new_spec / spec_time) / (new_plain / plain_time):.2f}x")
    if args.temperature == 0:
        return report_identity(model, ids, reference, out)
    return 0


def report_identity(model, ids, reference, out) -> int:
    """Prints whether the greedy output equals model.generate's, and if not, whether the first
    difference is a rounding near-tie (falcon_ext.divergence); 1 when it is not."""
    from .divergence import classify

    prompt_len = ids.shape[1]
    divergence = classify(model, ids, reference[0, prompt_len:].tolist(), out.sequences[0, prompt_len:].tolist(),
                          out.accept_lengths)
    print(f"identical to model.generate: {divergence is None}")
    if divergence is None:
        return 0
    d = divergence
    print(f"first difference at new token {d.position} ({d.generate_token} vs {d.other_token}): logit gap "
          f"{d.gap_one_token:.4g} (one-token forward) / {d.gap_multi_token:.4g} (multi-token), rounding tolerance "
          f"{d.tolerance:.4g}: {'explained, a near-tie' if d.explained else 'UNEXPLAINED'}")
    return 0 if d.explained else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falcon-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with speculative decoding and compare with plain decoding")
    p.add_argument("--model", default="stories260K",
                   help="embedded model name, SmolLM2-135M-Instruct (fetched and converted once), or an HF folder")
    p.add_argument("--drafter", default="falcon",
                   help="falcon (the Falcon drafter shipped for --model), lookup (prompt lookup), or a drafter folder")
    p.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    p.set_defaults(func=demo)
    add_bench_parser(sub)
    add_train_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
