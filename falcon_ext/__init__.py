"""falcon_ext: lossless Falcon speculative decoding for Hugging Face causal LMs."""
from . import _moved
from .engine import ops  # before _C: it loads torch, whose libraries _C links against
from ._C import compiled_with_cuda
from .drafters.falcon import FalconDrafter, FalconDrafterConfig
from .drafters.prompt_lookup import PromptLookupDrafter
from .drafters.union import UnionDrafter
from .engine.drafting import BatchDrafter, Drafter, DraftTree
from .engine.generate import SpeculativeOutput, speculative_generate
from .engine.sampling import SamplingConfig

_moved.install()

__all__ = [
    "BatchDrafter",
    "Drafter",
    "DraftTree",
    "FalconDrafter",
    "FalconDrafterConfig",
    "PromptLookupDrafter",
    "SamplingConfig",
    "SpeculativeOutput",
    "UnionDrafter",
    "compiled_with_cuda",
    "ops",
    "speculative_generate",
]
