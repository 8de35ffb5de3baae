"""falcon_ext: lossless Falcon speculative decoding for Hugging Face causal LMs."""
from . import ops
from ._C import compiled_with_cuda

__all__ = ["compiled_with_cuda", "ops"]
