"""The default-model preparation: tokenizer repairs (on the tiny tokenizer) and caching.

The real Gemma conversion takes ~1.5 min on 2 cores, so it is only checked
when it has already been prepared (or GUARD_TEST_DEFAULT_MODEL=1 asks for it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from guard.upstream import default_model
from guard.upstream.default_model import (
    DEFAULT_MODEL_NAME,
    GEMMA_CHAT_TEMPLATE,
    add_bos_post_processor,
    default_cache_dir,
    fix_tokenizer_files,
    is_prepared,
    prepare_default_model,
)
from tests.support.tiny_models import BOS, build_tokenizer


@pytest.fixture
def broken_tokenizer_dir(tmp_path: Path) -> Path:
    """The tiny tokenizer as a GGUF round trip leaves Gemma's: no bos, no chat template."""
    from tokenizers import processors

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    return tmp_path


def load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_bos_post_processor_restores_bos(broken_tokenizer_dir: Path) -> None:
    before = load(broken_tokenizer_dir)
    assert before("hello world").input_ids[0] != before.bos_token_id

    add_bos_post_processor(broken_tokenizer_dir / "tokenizer.json", BOS)
    tok = load(broken_tokenizer_dir)
    ids = tok("hello world").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1:] == before("hello world").input_ids
    assert tok("hello world", add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_gemma_chat_template_renders(broken_tokenizer_dir: Path) -> None:
    fix_tokenizer_files(broken_tokenizer_dir, bos_token=BOS, chat_template=GEMMA_CHAT_TEMPLATE)
    assert json.loads((broken_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert (broken_tokenizer_dir / "chat_template.jinja").read_text() == GEMMA_CHAT_TEMPLATE
    tok = load(broken_tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS}<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # Chat prompts are tokenized without special tokens, so bos appears exactly once.
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id

    no_system = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert no_system == f"{BOS}<start_of_turn>user\nHi<end_of_turn>\n"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


def test_prepare_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_convert(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        if len(calls) == 2:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(default_model, "_convert", fake_convert)
    target = tmp_path / "models" / "gemma"
    assert prepare_default_model(target) == target
    assert is_prepared(target) and (target / "config.json").exists()
    assert prepare_default_model(target) == target
    assert len(calls) == 1  # second call reused the marker

    (target / ".guard-prepared.json").unlink()  # as if the recipe changed / marker lost
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_default_model(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["gemma"]  # no temp dir left behind
    assert prepare_default_model(target) == target and is_prepared(target)
    assert len(calls) == 3


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GUARD_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME


@pytest.mark.skipif(
    not is_prepared(default_cache_dir()) and os.environ.get("GUARD_TEST_DEFAULT_MODEL") != "1",
    reason="Gemma not prepared (python -m guard.upstream.default_model, ~1.5 min); set GUARD_TEST_DEFAULT_MODEL=1",
)
def test_prepared_gemma_directory() -> None:
    model_dir = prepare_default_model()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    tok = load(model_dir)
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
