"""The engine: the decode loop (``speculative_generate``), target I/O, its KV cache, the
``Drafter`` protocols, sampling, the C++/CUDA op wrappers and their plain-PyTorch references."""
