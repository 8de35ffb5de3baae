"""Speculative decoding of any local Hugging Face causal LM, streaming the text as it comes.

    python python/generate_example.py [MODEL_DIR_OR_EMBEDDED_NAME] [PROMPT]

Uses the installed falcon_ext (pip install --no-build-isolation .) and the prompt-lookup
drafter, which needs no training; pass a FalconDrafter instead for Falcon's draft head.
"""
import sys

from transformers import TextStreamer

import falcon_ext
from falcon_ext.targets import load_target


def main():
    model, tokenizer = load_target(sys.argv[1] if len(sys.argv) > 1 else "stories260K")
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time, there was a dog named Max."
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = falcon_ext.speculative_generate(model, falcon_ext.PromptLookupDrafter(max_branches=3), ids,
                                          max_new_tokens=200, streamer=TextStreamer(tokenizer))
    print(f"\n{out.sequences.shape[1] - ids.shape[1]} tokens, "
          f"{out.mean_accepted_tokens:.2f} accepted per target forward")


if __name__ == "__main__":
    main()
