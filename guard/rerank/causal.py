"""Final hidden states of decoder-only models for many sequences, with shared prefixes.

Best-of-n candidates of one request are the same prompt followed by different
replies. Each request's longest common token prefix runs through the model once
(the prefix pass); the candidates' remaining tokens then run as one batch of
suffixes (the suffix pass) whose attention reads that prefix's keys and values.
Suffixes of different requests share the suffix pass, so one pass serves many
requests.

Attention is guard's own function, registered with transformers' attention
interface, so the model's layers, norms and rotary embeddings stay the stock
code while the attention is flash-friendly:
  - rows are right-padded, so plain causal attention (SDPA `is_causal`, no mask
    tensor) is exact for every real token: a real query never sees a pad key;
  - a suffix attends its own request's prefix KV, expanded as a view and joined
    to its keys, under lower-right causal alignment (`causal_lower_right`), one
    SDPA call per request and layer, never per row;
  - only sliding windows shorter than the sequence and attention-logit soft-capping
    need an explicit mask (built per call from positions; the same for every row).
No attention mask is built by transformers for these passes and no KV is copied
per row.

`strategy` chooses how a batch of requests runs: "shared" always shares
prefixes; "whole" runs every sequence in full in one causal pass (the plain
padded batch); "auto" (default) shares only when the prefix pass's fixed cost is
smaller than the compute it saves, from a cost model measured on the device by
`calibrate()`. Small models on a GPU are bound by kernel launches, not FLOPs: a
second pass can cost more than the prompt tokens it saves.

Results equal scoring each full sequence alone (to float rounding).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

Strategy = Literal["auto", "shared", "whole"]
KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [rows, kv_heads, tokens, head_dim]

ATTENTION = "guard_shared_prefix"
# Passed as the attention mask of planned passes: a 4-D tensor transformers hands through as is,
# so it builds no mask of its own (the plan says what each query sees).
_NO_MASK = torch.empty(0, 0, 0, 0)


@dataclass(frozen=True)
class Seq:
    ids: list[int]
    read: list[int]  # positions whose final hidden states the caller needs, ascending


@dataclass(frozen=True)
class _Group:
    """Consecutive rows of a suffix pass that continue one prefix."""

    start: int
    stop: int
    prefix: tuple[int, int] | None  # the prefix's (prefix batch, row), or None
    prefix_len: int


@dataclass
class _Plan:
    """What attention does in one forward pass, for every layer."""

    groups: list[_Group] | None = None  # suffix pass; None: a causal pass over whole rows
    prefix_kv: list[dict[int, KV]] | None = None  # suffix pass: each prefix batch's keys/values by layer
    keep_kv: dict[int, KV] | None = None  # prefix pass: where to leave keys/values by layer


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    plan: _Plan | None = kwargs.pop("guard_plan", None)
    if plan is None:
        # Ordinary calls of the same model (generate, a plain forward) keep SDPA semantics.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    if plan.groups is None:
        if plan.keep_kv is not None:
            plan.keep_kv[module.layer_idx] = (key, value)
        out = _attend(query, key, value, 0, scaling, window, softcap)
    else:
        assert plan.prefix_kv is not None
        parts = []
        for group in plan.groups:
            rows = slice(group.start, group.stop)
            keys, values = key[rows], value[rows]
            if group.prefix is not None:
                batch, row = group.prefix
                prefix_keys, prefix_values = plan.prefix_kv[batch][module.layer_idx]
                shape = (group.stop - group.start, -1, -1, -1)
                # The prefix is computed once; each row reads it through an expanded view.
                keys = torch.cat([prefix_keys[row : row + 1, :, : group.prefix_len].expand(shape), keys], dim=2)
                values = torch.cat([prefix_values[row : row + 1, :, : group.prefix_len].expand(shape), values], dim=2)
            parts.append(_attend(query[rows], keys, values, group.prefix_len, scaling, window, softcap))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, prefix_len: int, scale, window: int | None, softcap: float | None) -> torch.Tensor:
    """Causal attention of right-padded queries at positions prefix_len.. over keys at 0..; [B, H, S, D]."""
    queries, keys = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if softcap is None and (window is None or window >= keys):
        if prefix_len == 0:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
        bias = causal_lower_right(queries, keys)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(prefix_len, prefix_len + queries, device=query.device)[:, None]
    k_pos = torch.arange(keys, device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if gqa:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scores = (query @ key.transpose(-1, -2)) * (scale if scale is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(query.dtype) @ value


_registered = threading.Lock()


def _register() -> None:
    with _registered:
        if ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTENTION, _attention)
            # Unplanned calls get the padding/causal masks SDPA would get.
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _take(hidden: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """hidden[positions]: a view when they are consecutive (a reply's span, or one last token)."""
    first, last = positions[0], positions[-1]
    if last - first + 1 == len(positions):
        return hidden[first : last + 1]
    return hidden[torch.tensor(positions, device=hidden.device)]


def length_buckets(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, each within `budget` padded tokens.

    Sorting first keeps padding low; a single row longer than the budget still gets a batch.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so this row sets the batch's padded length.
        if current and (len(current) + 1) * lengths[index] > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    limit = min(len(s) for s in seqs)
    for position in range(limit):
        token = first[position]
        if any(s[position] != token for s in seqs):
            return position
    return limit


@dataclass
class CostModel:
    """Seconds a forward pass takes: a fixed part (kernel launches, Python) plus a part per token."""

    per_pass: float = 0.0
    per_token: float = 1.0

    def passes(self, lengths: Sequence[int], budget: int) -> float:
        return sum(self.per_pass + self.per_token * len(b) * max(lengths[i] for i in b) for b in length_buckets(lengths, budget))


@dataclass
class _Row:
    ids: list[int]
    offset: int  # position of ids[0]: its prefix's length
    prefix: tuple[int, int] | None = None  # its prefix's (prefix batch, row)
    owner: tuple[int, int] = (-1, -1)  # (group, sequence) it belongs to


@dataclass
class _Prefixes:
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [tokens, hidden]
    rows: dict[int, tuple[int, int]] = field(default_factory=dict)  # group -> (prefix batch, row)
    kv: list[dict[int, KV]] = field(default_factory=list)  # per prefix batch: layer -> keys/values


class CausalHidden:
    """Runs a decoder's base model (no head) over sequences grouped by request."""

    def __init__(
        self,
        base: PreTrainedModel,
        *,
        max_batch_tokens: int,
        strategy: Strategy = "auto",
        on_batch: Callable[[int], None] = lambda rows: None,
    ) -> None:
        _register()
        self.base = base
        self.config = base.config.get_text_config()
        self.max_batch_tokens = max_batch_tokens
        self.strategy = strategy
        self.on_batch = on_batch
        self.device = next(base.parameters()).device
        # Until calibrated, sharing always wins: it never does more arithmetic than a whole pass.
        self.cost = CostModel()
        base.set_attn_implementation(ATTENTION)

    @torch.inference_mode()
    def calibrate(self, tokens: int = 512) -> CostModel:
        """Measures the cost model on this device (a pass of a few tokens, and one of `tokens`); also warms kernels."""
        limit = getattr(self.config, "max_position_embeddings", None) or tokens
        tokens = max(16, min(tokens, limit, self.max_batch_tokens))

        def seconds(length: int) -> float:
            rows = [_Row([1] * length, 0)]
            best = math.inf
            for _ in range(3):  # the first run also pays for allocation and kernel selection
                started = time.perf_counter()
                self._forward(rows, _Plan())
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - started)
            return best

        short, long = seconds(8), seconds(tokens)
        per_token = max(long - short, 1e-9) / (tokens - 8)
        self.cost = CostModel(per_pass=max(short - 8 * per_token, 0.0), per_token=per_token)
        return self.cost

    @torch.inference_mode()
    def hidden(self, groups: Sequence[Sequence[Seq]]) -> list[list[torch.Tensor]]:
        """For each group (request) and sequence: the final hidden states at `seq.read`, [len(read), hidden]."""
        shared = self._shared_lengths(groups)
        prefixes = self._prefix_pass(groups, shared)
        suffix_rows = [
            _Row(seq.ids[shared[g] :], shared[g], prefixes.rows.get(g), (g, s))
            for g, group in enumerate(groups)
            for s, seq in enumerate(group)
            if len(seq.ids) > shared[g]
        ]
        suffix_hidden: dict[tuple[int, int], torch.Tensor] = {}
        for batch, hidden in self._run(suffix_rows, prefixes.kv):
            for b, row in enumerate(batch):
                suffix_hidden[row.owner] = hidden[b]

        results: list[list[torch.Tensor]] = []
        for g, group in enumerate(groups):
            length = shared[g]
            outputs = []
            for s, seq in enumerate(group):
                split = bisect.bisect_left(seq.read, length)
                parts = [_take(prefixes.hidden[g], seq.read[:split])] if split else []
                if split < len(seq.read):
                    parts.append(_take(suffix_hidden[(g, s)], [position - length for position in seq.read[split:]]))
                outputs.append(torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0, self.config.hidden_size))
            results.append(outputs)
        return results

    def _shared_lengths(self, groups: Sequence[Sequence[Seq]]) -> list[int]:
        if self.strategy == "whole":
            return [0] * len(groups)
        shared = [common_prefix_len([s.ids for s in group]) if len(group) > 1 else 0 for group in groups]
        if self.strategy == "shared" or not any(shared):
            return shared
        budget = self.max_batch_tokens
        whole = [len(seq.ids) for group in groups for seq in group]
        prefixes = [length for length in shared if length]
        # Attending to a prefix's keys is left out: next to the layers' matmuls it is a small share.
        suffixes = [len(seq.ids) - shared[g] for g, group in enumerate(groups) for seq in group if len(seq.ids) > shared[g]]
        if self.cost.passes(prefixes, budget) + self.cost.passes(suffixes, budget) < self.cost.passes(whole, budget):
            return shared
        return [0] * len(groups)

    def _prefix_pass(self, groups: Sequence[Sequence[Seq]], shared: list[int]) -> _Prefixes:
        prefixes = _Prefixes()
        owners = [g for g, length in enumerate(shared) if length]
        if not owners:
            return prefixes
        for indices in length_buckets([shared[g] for g in owners], self.max_batch_tokens):
            kv: dict[int, KV] = {}
            hidden = self._forward([_Row(groups[owners[i]][0].ids[: shared[owners[i]]], 0) for i in indices], _Plan(keep_kv=kv))
            self.on_batch(len(indices))
            for row, i in enumerate(indices):
                g = owners[i]
                prefixes.hidden[g] = hidden[row, : shared[g]]
                prefixes.rows[g] = (len(prefixes.kv), row)
            prefixes.kv.append(kv)
        return prefixes

    def _run(self, rows: list[_Row], prefix_kv: list[dict[int, KV]]) -> Iterator[tuple[list[_Row], torch.Tensor]]:
        # Attention reads every prefix key, so a row's prefix counts toward the budget too.
        costs = [len(row.ids) + row.offset for row in rows]
        for indices in length_buckets(costs, self.max_batch_tokens):
            # Rows of one request side by side: each request is one attention call per layer.
            batch = sorted((rows[i] for i in indices), key=lambda row: (row.prefix or (-1, -1), row.offset))
            groups: list[_Group] = []
            for index, row in enumerate(batch):
                if groups and groups[-1].prefix == row.prefix and groups[-1].prefix_len == row.offset:
                    groups[-1] = _Group(groups[-1].start, index + 1, row.prefix, row.offset)
                else:
                    groups.append(_Group(index, index + 1, row.prefix, row.offset))
            hidden = self._forward(batch, _Plan(groups=groups, prefix_kv=prefix_kv))
            self.on_batch(len(batch))
            yield batch, hidden

    def _forward(self, rows: list[_Row], plan: _Plan) -> torch.Tensor:
        device = self.device
        width = max(len(row.ids) for row in rows)
        # Right padding with token 0: a pad is never a key of a real query (causality), so its value never matters.
        ids = torch.tensor([row.ids + [0] * (width - len(row.ids)) for row in rows], device=device)
        offsets = torch.tensor([row.offset for row in rows], device=device)
        positions = offsets[:, None] + torch.arange(width, device=device)[None, :]
        out = self.base(input_ids=ids, attention_mask=_NO_MASK, position_ids=positions, use_cache=False, guard_plan=plan)
        return out.last_hidden_state
