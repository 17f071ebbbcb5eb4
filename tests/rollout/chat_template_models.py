"""Tiny model directories whose tokenizers carry the test chat templates of tests/fixtures/chat_templates.

Each is a copy of the tiny test model with its tokenizer given a template (and the tokens that
template writes, as the real model family has them); the embedding table is resized to match, so
the directory is a real, loadable model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates"

# Qwen3 has these as added tokens that are not special.
QWEN3_TOKENS = ("<think>", "</think>", "<tool_response>", "</tool_response>")
MISTRAL_SPECIAL = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def model_with_template(src: str, dst: Path, name: str, *, added: tuple[str, ...] = (),
                        special: tuple[str, ...] = (), eos: str | None = "keep", bos: str | None = "keep") -> str:
    """Copy the model at `src` to `dst` with template `name` and the given extra tokens."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    if eos != "keep":
        tok.eos_token = eos
    if bos != "keep":
        tok.bos_token = bos
    tok.chat_template = template(name)
    tok.save_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    if len(tok) > model.config.vocab_size:
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(dst)
    return str(dst)
