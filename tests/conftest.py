"""Shared fixtures: the device every op test runs on, the embedded stories260K target and tiny
random targets of several families."""
import pytest
import torch
import transformers

from falcon_ext import ops  # noqa: F401  (loads the library, so its CUDA kernels can be looked up)
from falcon_ext.targets import load_target

# The one rule for CUDA: tests marked `cuda` (by hand, or through the device fixture's "cuda"
# case) are collected everywhere, so `pytest -m cuda --collect-only` lists them on any machine,
# and skip unless a GPU is visible and this build of falcon_ext registered its CUDA kernels.
HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("falcon_ext::tree_build",
                                                                                       "CUDA")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the CUDA build of falcon_ext")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Session scope: hypothesis tests take it too (it refuses function-scoped fixtures).
@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test that takes it runs on the CPU and, marked `cuda`, on the GPU."""
    return request.param


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
