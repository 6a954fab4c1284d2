"""Final hidden states of decoder-only models for many sequences, with shared prefixes.

Best-of-n candidates of one request are the same prompt followed by different
replies. Each request's longest common token prefix runs through the model
once; its KV cache is then reused while the candidates' remaining tokens run as
a batch of suffixes. Suffixes of different requests share a batch: each row
carries its own request's prefix KV, right-padded to the longest prefix in the
batch and masked, so one forward pass serves many requests.

Padding is bounded by sorting rows by length and cutting batches at a token
budget (rows x padded length). The attention mask is built here, 4-D, from
each token's true position, so prefix padding, suffix padding, causality and
sliding windows are all explicit; transformers passes a 4-D mask through as is.
Results equal scoring each full sequence alone (to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, tokens, head_dim]


@dataclass(frozen=True)
class Seq:
    ids: list[int]
    read: list[int]  # positions whose final hidden states the caller needs


@dataclass
class _Prefix:
    hidden: torch.Tensor  # [tokens, hidden]
    kv: KV


@dataclass
class _Row:
    ids: list[int]
    past: _Prefix | None
    offset: int  # position of ids[0]: the prefix length


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


class CausalHidden:
    """Runs a decoder's base model (no head) over sequences grouped by request."""

    def __init__(
        self,
        base: PreTrainedModel,
        *,
        max_batch_tokens: int,
        share_prefix: bool = True,
        on_batch: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.base = base
        self.config = base.config.get_text_config()
        self.max_batch_tokens = max_batch_tokens
        self.share_prefix = share_prefix
        self.on_batch = on_batch
        self.device = next(base.parameters()).device
        self.dtype = next(base.parameters()).dtype
        layer_types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if layer_types is not None:
            # Mixed layers (Gemma 3): transformers takes one mask per layer type.
            self._mask_kinds = {kind: window if kind == "sliding_attention" else None for kind in set(layer_types)}
        else:
            # One mask for every layer; windowed when the model slides (Mistral).
            self._mask_kinds = {None: window}

    @torch.inference_mode()
    def hidden(self, groups: Sequence[Sequence[Seq]]) -> list[list[torch.Tensor]]:
        """For each group (request) and sequence: the final hidden states at `seq.read`, [len(read), hidden]."""
        shared = [common_prefix_len([s.ids for s in group]) if self.share_prefix and len(group) > 1 else 0 for group in groups]
        prefixes: dict[int, _Prefix] = {}
        with_prefix = [g for g, length in enumerate(shared) if length > 0]
        prefix_rows = [_Row(groups[g][0].ids[: shared[g]], None, 0) for g in with_prefix]
        for batch, hidden, kv in self._run(prefix_rows, keep_kv=True):
            for b, row_index in enumerate(batch):
                g = with_prefix[row_index]
                length = shared[g]
                # clone(): keep only this row's prefix alive, not the whole padded batch.
                prefixes[g] = _Prefix(
                    hidden[b, :length].clone(),
                    [(k[b : b + 1, :, :length].clone(), v[b : b + 1, :, :length].clone()) for k, v in kv],
                )

        suffix_rows: list[_Row] = []
        owners: list[tuple[int, int]] = []
        for g, group in enumerate(groups):
            for s, seq in enumerate(group):
                if len(seq.ids) > shared[g]:
                    suffix_rows.append(_Row(seq.ids[shared[g] :], prefixes.get(g), shared[g]))
                    owners.append((g, s))
        suffix_hidden: dict[tuple[int, int], torch.Tensor] = {}
        for batch, hidden, _ in self._run(suffix_rows, keep_kv=False):
            for b, row_index in enumerate(batch):
                suffix_hidden[owners[row_index]] = hidden[b]

        results: list[list[torch.Tensor]] = []
        for g, group in enumerate(groups):
            length = shared[g]
            outputs = []
            for s, seq in enumerate(group):
                rows = [
                    prefixes[g].hidden[position] if position < length else suffix_hidden[(g, s)][position - length]
                    for position in seq.read
                ]
                outputs.append(torch.stack(rows) if rows else torch.empty(0, self.config.hidden_size))
            results.append(outputs)
        return results

    def _run(self, rows: list[_Row], *, keep_kv: bool) -> Iterator[tuple[list[int], torch.Tensor, KV]]:
        # Attention reads every prefix slot of the batch, so prefix padding costs too.
        costs = [len(row.ids) + row.offset for row in rows]
        for batch in length_buckets(costs, self.max_batch_tokens):
            hidden, kv = self._forward([rows[i] for i in batch], keep_kv)
            self.on_batch(len(batch))
            yield batch, hidden, kv

    def _forward(self, rows: list[_Row], keep_kv: bool) -> tuple[torch.Tensor, KV]:
        device = self.device
        batch = len(rows)
        width = max(len(row.ids) for row in rows)
        past_width = max(row.offset for row in rows)
        lengths = torch.tensor([len(row.ids) for row in rows], device=device)
        offsets = torch.tensor([row.offset for row in rows], device=device)
        # Pad with token 0: every pad position is masked as a key, so its value never matters.
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            ids[b, : len(row.ids)] = torch.tensor(row.ids, device=device)

        steps = torch.arange(width, device=device)
        query_pos = offsets[:, None] + steps[None, :]  # [B, S]
        past_slots = torch.arange(past_width, device=device)
        key_pos = torch.cat([past_slots[None, :].expand(batch, -1), query_pos], dim=1)  # [B, P + S]
        key_valid = torch.cat([past_slots[None, :] < offsets[:, None], steps[None, :] < lengths[:, None]], dim=1)
        masks = {
            kind: self._mask(query_pos, key_pos, key_valid, past_width, window) for kind, window in self._mask_kinds.items()
        }
        attention_mask = masks[None] if None in masks else masks

        cache = DynamicCache()
        if past_width:
            # Each row's own prefix, right-padded to the batch's longest; padded slots are masked above.
            template = next(row.past for row in rows if row.past is not None)
            layers = []
            for layer, (template_k, template_v) in enumerate(template.kv):
                keys = template_k.new_zeros(batch, template_k.shape[1], past_width, template_k.shape[3])
                values = template_v.new_zeros(batch, template_v.shape[1], past_width, template_v.shape[3])
                for b, row in enumerate(rows):
                    if row.past is not None:
                        keys[b, :, : row.offset] = row.past.kv[layer][0][0]
                        values[b, :, : row.offset] = row.past.kv[layer][1][0]
                layers.append((keys, values))
            cache = DynamicCache(ddp_cache_data=layers)
        out = self.base(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=query_pos,
            past_key_values=cache,
            use_cache=True,
        )
        kv: KV = [(layer.keys, layer.values) for layer in cache.layers] if keep_kv else []
        return out.last_hidden_state, kv

    def _mask(
        self,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        key_valid: torch.Tensor,
        past_width: int,
        window: int | None,
    ) -> torch.Tensor:
        q = query_pos[:, :, None]
        k = key_pos[:, None, :]
        allowed = key_valid[:, None, :] & (k <= q)
        if window is not None:
            allowed &= q - k < window
        # Every query also sees its own slot, so padded queries never get an all-masked row
        # (softmax over nothing is NaN, and NaN values would leak through zero weights).
        width = query_pos.shape[1]
        own = torch.arange(width, device=q.device)
        allowed[:, own, past_width + own] = True
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=q.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return additive[:, None]  # [B, 1, S, P + S]
