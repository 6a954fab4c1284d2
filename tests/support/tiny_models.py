"""Tiny random-weight models for tests, built locally (nothing is downloaded).

* `build_tiny_llama`: a `LlamaForCausalLM` that vLLM can serve on CPU
  (head_dim 32: vLLM's CPU attention rejects smaller heads).
* `build_tiny_reward_model`: a `LlamaForSequenceClassification` with one
  label, usable as a reward model.
* `build_tiny_lora`: a PEFT LoRA adapter for the tiny Llama, random non-zero
  weights (PEFT's default zeroes B, which would leave the base model unchanged).

Both share a byte-level BPE tokenizer (vocab ~2000) trained on the English text
below, with `<s>` prepended to every encoding and a small chat template. Builds
are seeded, and cached per user under a directory keyed by a hash of this file
and the library versions, so re-runs are instant and edits here rebuild.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 2000
MAX_POSITIONS = 512

# The leading bos_token is written by the template because chat prompts are
# tokenized without special tokens (by vLLM and by transformers alike).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A small proxy sits in front of a
language model server and checks every request against a written policy before
the model sees it, and every answer before the user sees it.
Please summarize the following article in three sentences. The city council met
on Tuesday evening to discuss the new budget for public transport, schools and
parks. Several residents asked why the library would close earlier on weekends.
How do I reset my own email password? Open the account settings, choose the
security tab, and follow the instructions sent to your phone number.
Write a short poem about the sea. The waves roll in, the gulls cry out, the wind
is cold and the sand is wet; the boats come home before the night.
What is the capital of France? Paris is the capital and largest city of France.
Water boils at one hundred degrees Celsius at sea level. The sun is a star, and
the earth goes around it once every year. Plants need light, water and air.
Explain how a bicycle works. The rider pushes the pedals, the chain turns the
rear wheel, and the bicycle moves forward while the rider steers with the bars.
I am sorry, but I cannot help with that request. It could cause harm to other
people. If you are in danger, please contact local emergency services.
Thank you for your question. Here is a step by step answer that should help you
get started. First, read the instructions carefully. Second, gather the tools.
The meeting is scheduled for Monday at ten in the morning in the main office.
She opened the window, made a cup of tea, and began to read her favourite book.
Numbers like 1, 2, 3, 42, 100 and 2024 appear in text, and so do symbols such as
@, #, $, %, &, *, (, ), [, ], {, }, <, >, /, \\, |, :, ;, ', ", ?, ! and ~.
"""

_SUBJECTS = ["The teacher", "A child", "My neighbour", "The doctor", "Our team", "The old man",
             "A student", "The engineer", "Her friend", "The farmer", "This company", "The cat"]
_VERBS = ["wrote", "found", "bought", "cleaned", "repaired", "painted", "explained", "carried",
          "described", "opened", "forgot", "shared", "answered", "built", "measured"]
_OBJECTS = ["a long letter", "the red car", "an old map", "the kitchen table", "a new computer",
            "the garden fence", "a difficult question", "the small boat", "a bag of apples",
            "the broken clock", "a simple program", "the morning newspaper", "a warm blanket"]
_TAILS = ["before lunch", "in the rain", "with great care", "for the first time", "after school",
          "near the river", "without any help", "on a quiet Sunday", "at the end of the day",
          "because it was important", "while everyone was sleeping", "as quickly as possible"]


def training_text(seed: int = 0) -> list[str]:
    """A few KB of plain English: fixed paragraphs plus seeded template sentences."""
    rng = random.Random(seed)
    lines = _PARAGRAPHS.splitlines()
    for _ in range(600):
        lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}.")
    return lines


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: any input encodes without <unk>, and decoding round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32, the smallest vLLM's CPU attention takes
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )


def _write_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_tiny_reward_model(out: Path) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    # pad_token_id (not eos) is required: the score is read at the last
    # non-pad token, and batches > 1 fail without it.
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


LORA_RANK = 8


def _write_tiny_lora(out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(build_tiny_llama())
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    get_peft_model(base, config).save_pretrained(out)


def build_tiny_llama(dir: Path | None = None) -> Path:
    """Build (or reuse) the tiny causal LM in `dir`, default a per-user cache."""
    return _build(dir, "tiny-llama", _write_tiny_llama)


def build_tiny_reward_model(dir: Path | None = None) -> Path:
    """Build (or reuse) the tiny one-label reward model in `dir`, default a per-user cache."""
    return _build(dir, "tiny-reward", _write_tiny_reward_model)


def build_tiny_lora(dir: Path | None = None, seed: int = 0) -> Path:
    """Build (or reuse) a LoRA adapter (rank 8, every projection) of the tiny causal LM; each seed its own weights."""
    return _build(dir, f"tiny-lora-{seed}", lambda out: _write_tiny_lora(out, seed), marker="adapter_config.json")


def cache_root() -> Path:
    base = os.environ.get("GUARD_CACHE_DIR") or Path.home() / ".cache" / "guard"
    return Path(base) / "test-models" / _source_hash()


def _source_hash() -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    # The saved format can change between library versions.
    h.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def _build(dir: Path | None, name: str, write: Callable[[Path], None], marker: str = "config.json") -> Path:
    target = Path(dir) if dir is not None else cache_root() / name
    # A complete build only ever appears by rename, so existence means done.
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(work)
        work.chmod(0o755)  # mkdtemp makes it private
        if target.exists() and not any(target.iterdir()):
            target.rmdir()  # an empty dir (e.g. from tmp_path) is fine to replace
        try:
            work.rename(target)
        except OSError:
            if not (target / marker).exists():  # lost a race: use the winner's
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
