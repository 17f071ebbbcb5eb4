"""The SGLang backend (SGLang 0.5.17): `SGLangEngine` runs agentrl's `Engine` contract on SGLang,
in this process or on a server. sglang itself is imported only when an in-process engine starts.

- `engine.py`: the front (the contract, the prefix-sharing gate, stop strings, EOS continuation);
- `protocol.py`: SGLang's request and response shapes as pure functions (sampling parameters,
  output parsing, engine arguments and server flags);
- `transport.py`: in-process (`sglang.Engine`) and HTTP (SGLang's native API) transports;
- `weights.py`: weights as tensors, as a safetensors folder, and the NCCL group's trainer end.
"""

from agentrl.rollout.backends.sglang.engine import SGLangEngine

__all__ = ["SGLangEngine"]
