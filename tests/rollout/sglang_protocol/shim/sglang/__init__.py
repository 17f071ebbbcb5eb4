"""Not SGLang: a stand-in package so that `python -m sglang.launch_server` starts the protocol test
server (tests/rollout/sglang_protocol). Only on the PYTHONPATH of servers the CPU tests launch."""
