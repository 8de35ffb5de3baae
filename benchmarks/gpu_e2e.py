"""End-to-end check on a GPU: speculative decoding on CUDA, greedy, against ``model.generate``.

Targets: the embedded stories260K (with its shipped Falcon drafter) and a random-initialised
Llama of SmolLM2-135M's shape (30 layers, width 576) with a random drafter of the shipped SmolLM2
drafter's configuration and CUDA tree (acceptance is near zero there: the point is the kernels
at that width, and exactness). Each runs with the
Falcon drafter and with prompt lookup. One prompt per target is longer than 227 tokens, so the
drafter settles it in one encode_only call of more positions than attention's shared memory
could hold (the failure fixed in issue 12). Per run: whether the tokens equal ``generate``'s,
tokens/s of both, and tau, the mean tokens accepted per target forward. Exits 1 if any output
differs (or a run raises), after printing the whole table.

    python benchmarks/gpu_e2e.py [--device cuda] [--max-new-tokens 64] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import transformers

from falcon_ext import FalconDrafter, FalconDrafterConfig, PromptLookupDrafter, speculative_generate
from falcon_ext.drafters.checkpoint import drafter_dir, read_config
from falcon_ext.targets import load_target


def random_drafter(shipped: str, target) -> FalconDrafter:
    """A randomly initialised drafter with a shipped drafter's configuration (sizes, k, trees); the
    shipped weights belong to the real target, whose fingerprint a random target does not match."""
    config = read_config(drafter_dir(shipped), FalconDrafterConfig)
    config.target = {}
    torch.manual_seed(0)
    return FalconDrafter(config, target)


def smollm2_shaped(device: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompts_for(model, tokenizer, device: str) -> list[torch.Tensor]:
    """A short prompt and one of 300 tokens (over the 227 at which the encode used to fail)."""
    g = torch.Generator().manual_seed(1)
    if tokenizer is not None:
        short = tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt").input_ids
        story = tokenizer(" ".join(["The cat sat on the mat and looked at the sun."] * 17), return_tensors="pt").input_ids
        long = story[:, :300]
    else:
        vocab = model.config.vocab_size
        short = torch.randint(3, vocab, (1, 24), generator=g)
        long = torch.randint(3, vocab, (1, 300), generator=g)
    return [short.to(device), long.to(device)]


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_case(target_name, model, tokenizer, drafter_name, drafter, device, max_new) -> dict:
    row = {"target": target_name, "drafter": drafter_name}
    try:
        identical, spec_tokens, spec_s, gen_tokens, gen_s, accepted = True, 0, 0.0, 0, 0.0, []
        prompts = prompts_for(model, tokenizer, device)
        # Warm-up (CUDA context, cuBLAS handles, the first kernel launches): not timed.
        speculative_generate(model, drafter, prompts[0], max_new_tokens=4, temperature=0.0)
        model.generate(prompts[0], max_new_tokens=4, do_sample=False)
        for ids in prompts:
            out, seconds = timed(lambda: speculative_generate(model, drafter, ids, max_new_tokens=max_new,
                                                              temperature=0.0), device)
            ref, ref_seconds = timed(lambda: model.generate(ids, max_new_tokens=max_new, do_sample=False), device)
            identical &= torch.equal(out.sequences.cpu(), ref.cpu())
            spec_tokens += out.sequences.shape[1] - ids.shape[1]
            gen_tokens += ref.shape[1] - ids.shape[1]
            spec_s += seconds
            gen_s += ref_seconds
            accepted += out.accept_lengths  # one entry per verifying forward (the prefill has none)
        row.update(identical=identical, spec_tok_s=spec_tokens / spec_s, generate_tok_s=gen_tokens / gen_s,
                   tau=sum(accepted) / len(accepted) if accepted else 0.0, prompt_lengths=[p.shape[1] for p in prompts])
    except Exception as error:  # one failing case must not hide the others' rows
        traceback.print_exc()
        row.update(identical=False, error=f"{type(error).__name__}: {error}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    rows = []
    stories, tokenizer = load_target("stories260K", device=args.device)
    wide = smollm2_shaped(args.device)
    for name, model, tok, make_falcon in [
            ("stories260K", stories, tokenizer, lambda m: FalconDrafter.from_pretrained("stories260K", target=m)),
            ("llama-30x576-random", wide, None, lambda m: random_drafter("SmolLM2-135M-Instruct", m))]:
        drafters = [("falcon", lambda: make_falcon(model)), ("prompt-lookup", PromptLookupDrafter)]
        for drafter_name, make in drafters:
            try:
                drafter = make()
            except Exception as error:
                traceback.print_exc()
                rows.append({"target": name, "drafter": drafter_name, "identical": False,
                             "error": f"{type(error).__name__}: {error}"})
                continue
            rows.append(run_case(name, model, tok, drafter_name, drafter, args.device, args.max_new_tokens))
            print(json.dumps(rows[-1]), flush=True)

    print("\n| target | drafter | identical to generate | tokens/s | generate tokens/s | tau |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['target']} | {r['drafter']} | ERROR: {r['error'][:120]} | | | |")
        else:
            print(f"| {r['target']} | {r['drafter']} | {'yes' if r['identical'] else 'NO'} | {r['spec_tok_s']:.1f} | "
                  f"{r['generate_tok_s']:.1f} | {r['tau']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if rows and all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
