"""falcon_ext: lossless Falcon speculative decoding for Hugging Face causal LMs."""
from . import ops
from ._C import compiled_with_cuda
from .drafting import BatchDrafter, Drafter, DraftTree
from .falcon import FalconDrafter, FalconDrafterConfig
from .generate import SpeculativeOutput, speculative_generate
from .prompt_lookup import PromptLookupDrafter
from .sampling import SamplingConfig

__all__ = [
    "BatchDrafter",
    "Drafter",
    "DraftTree",
    "FalconDrafter",
    "FalconDrafterConfig",
    "PromptLookupDrafter",
    "SamplingConfig",
    "SpeculativeOutput",
    "compiled_with_cuda",
    "ops",
    "speculative_generate",
]
