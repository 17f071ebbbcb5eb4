"""The vLLM backend (vLLM 0.24): `AsyncLLM` in-process, or its OpenAI-compatible server over HTTP.

Its own package because it has parts: `engine.py` is the front (`VLLMEngine`, the `Engine`
contract), `params.py` maps agentrl's sampling contract onto vLLM's, `launch.py` its engine
arguments and server command, `inprocess.py` and `server.py` the two transports, `weights.py` the
weight updates, `loop_thread.py` the event loop the transports live on. vllm itself is imported
only inside `inprocess.py` (and the NCCL path of `server.py`), when an engine is made.
"""

from agentrl.rollout.backends.vllm.engine import VLLMEngine

__all__ = ["VLLMEngine"]
