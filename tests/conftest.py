"""Shared fixtures: the embedded stories260K target and tiny random targets of several families."""
import pytest
import torch
import transformers

from falcon_ext.targets import load_target

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")

# The test models are tiny: one thread is fastest, and it avoids OpenMP spin-waiting when
# other processes share the cores.
torch.set_num_threads(1)


def tiny_model(family: str, vocab: int = 97, seed: int = 0):
    """A small random-initialised causal LM in fp32, with logits spread wide enough that argmax
    ties (which fp32 rounding could flip between batched and sequential forwards) are rare."""
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=None, pad_token_id=None, initializer_range=0.3)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if family == "llama":
        config = transformers.LlamaConfig(**common, **decoder)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, **decoder, use_sliding_window=False)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, **decoder, sliding_window=None)
    elif family == "gpt2":
        config = transformers.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def stories():
    return load_target("stories260K")


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny(request):
    return tiny_model(request.param)
