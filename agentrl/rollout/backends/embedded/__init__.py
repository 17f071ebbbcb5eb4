"""The built-in PyTorch engine (`engine.py` is its front; the module map is in its docstring).

Its own package because it is large: a scheduler, a paged KV cache, a model runner over a table
of model families, samplers, CUDA graphs and Triton kernels. The other engines (`sglang.py`,
`vllm.py`) sit beside it in `rollout/backends/`, one entry per engine.
"""

from agentrl.rollout.backends.embedded.engine import EmbeddedEngine, EmbeddedGeneration

__all__ = ["EmbeddedEngine", "EmbeddedGeneration"]
