"""torch.nn's attention and recurrent blocks, rewritten with nn.Linear layers and tensor ops before tracing.

nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
nn.TransformerDecoder, nn.Transformer, nn.LSTM, nn.GRU, nn.RNN, their cells and nn.EmbeddingBag are leaves to torch.fx
and run fused kernels: their projections (tables) would stay float. Replaced by these modules (same parameters, the same
computation as PyTorch's non-fused path), every projection is an nn.Linear that prepare quantizes, and
the matmuls, softmax and masks are ops the integer model and ONNX export know.
A linear layer that stores its weight (in, out) and computes `torch.addmm(bias, x.view(-1, in), weight)` (Hugging
Face's Conv1D, in GPT-2 and OpenAI GPT) becomes the nn.Linear it is, so that it is quantized like one.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qatkit.errors import ConfigError


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention as q/k/v/out nn.Linear layers, batched matmuls and a softmax."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError(f"{mha} uses add_bias_kv or add_zero_attn; allowed: neither. Fix: build it without "
                              "them, or skip its layers with a LayerRule")
        e, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.head_dim = e // mha.num_heads
        if mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
        else:
            w_q, w_k, w_v = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        b_q, b_k, b_v = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        scale = self.head_dim**-0.5  # folded into the query projection: its output feeds the Q·Kᵀ matmul directly
        self.q_proj = _linear(w_q * scale, None if b_q is None else b_q * scale)
        self.k_proj, self.v_proj = _linear(w_k, b_k), _linear(w_v, b_v)
        self.out_proj = _linear(mha.out_proj.weight.detach(), None if mha.out_proj.bias is None else mha.out_proj.bias.detach())
        self.dropout = nn.Dropout(mha.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, h, L, d)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:  # a hint about attn_mask (what is computed), as in PyTorch
            raise ValueError("is_causal=True needs the causal attn_mask it describes; allowed: is_causal with an "
                             "attn_mask. Fix: pass attn_mask=nn.Transformer.generate_square_subsequent_mask(L)")
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))  # already scaled by 1/√d
        k, v = self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        logits = q @ k.transpose(-2, -1)  # (B, h, L, S)
        if attn_mask is not None:  # (L, S) or (B·h, L, S); True or -inf: not attended
            mask = attn_mask.reshape(-1, self.num_heads, attn_mask.shape[-2], attn_mask.shape[-1]) \
                if attn_mask.dim() == 3 else attn_mask
            logits = logits.masked_fill(mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + mask
        if key_padding_mask is not None:  # (B, S); True: a padding key
            pad = key_padding_mask.reshape(key_padding_mask.shape[0], 1, 1, key_padding_mask.shape[1])
            logits = logits.masked_fill(pad, float("-inf")) if key_padding_mask.dtype == torch.bool else logits + pad
        weights = self.dropout(logits.softmax(-1))  # returned after dropout, as PyTorch returns them
        out = weights @ v  # (B, h, L, d)
        out = self.out_proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


class _FeedForward(nn.Module):
    """What nn.TransformerEncoderLayer and nn.TransformerDecoderLayer share: the feed-forward block's modules."""

    def __init__(self, layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        super().__init__()
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        act = layer.activation
        self.activation = act if isinstance(act, nn.Module) else {F.relu: nn.ReLU(), F.gelu: nn.GELU()}.get(act, act)

    def _feed_forward(self, x, dropout: nn.Module):
        return dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoderLayer(_FeedForward):
    """nn.TransformerEncoderLayer's non-fused path, with the attention above."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__(layer)
        self.self_attn = MultiheadAttention(layer.self_attn)
        self.norm1, self.norm2, self.dropout1, self.dropout2 = layer.norm1, layer.norm2, layer.dropout1, layer.dropout2

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self._feed_forward(self.norm2(x), self.dropout2)
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self._feed_forward(x, self.dropout2))

    def _sa_block(self, x, attn_mask, key_padding_mask):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.dropout1(x)


class TransformerEncoder(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in self.layers:
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoderLayer(_FeedForward):
    """nn.TransformerDecoderLayer: self-attention on the target, attention to the encoder's memory, feed-forward."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__(layer)
        self.self_attn = MultiheadAttention(layer.self_attn)
        self.multihead_attn = MultiheadAttention(layer.multihead_attn)
        self.norm1, self.norm2, self.norm3 = layer.norm1, layer.norm2, layer.norm3
        self.dropout1, self.dropout2, self.dropout3 = layer.dropout1, layer.dropout2, layer.dropout3

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.dropout1(self._attention(self.self_attn, h, h, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = x + self.dropout2(self._attention(self.multihead_attn, self.norm2(x), memory, memory_mask,
                                                  memory_key_padding_mask, memory_is_causal))
            return x + self._feed_forward(self.norm3(x), self.dropout3)
        x = self.norm1(x + self.dropout1(self._attention(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask,
                                                         tgt_is_causal)))
        x = self.norm2(x + self.dropout2(self._attention(self.multihead_attn, x, memory, memory_mask,
                                                         memory_key_padding_mask, memory_is_causal)))
        return self.norm3(x + self._feed_forward(x, self.dropout3))

    @staticmethod
    def _attention(attn: MultiheadAttention, x, kv, mask, key_padding_mask, is_causal):
        return attn(x, kv, kv, attn_mask=mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                    need_weights=False)[0]


class TransformerDecoder(nn.Module):
    def __init__(self, decoder: nn.TransformerDecoder):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(layer) for layer in decoder.layers)
        self.norm = decoder.norm

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        for layer in self.layers:  # is_causal: a hint (the masks are what is computed), refused without its mask
            tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return tgt if self.norm is None else self.norm(tgt)


class Transformer(nn.Module):
    """nn.Transformer: its encoder's memory, then its decoder (either may be a custom module, decomposed in turn)."""

    def __init__(self, transformer: nn.Transformer):
        super().__init__()
        self.encoder, self.decoder = decompose(transformer.encoder), decompose(transformer.decoder)
        self.d_model, self.nhead, self.batch_first = transformer.d_model, transformer.nhead, transformer.batch_first

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _in_out_linear(module: nn.Module) -> nn.Linear | None:
    """The nn.Linear a leaf module of the model's own code computes with its weight stored (in, out): Hugging Face's
    Conv1D, `torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size()[:-1] + (out,))`; None for any
    other module. Its traced graph must be that (size arithmetic, a reshape of the input, addmm with the default
    beta and alpha, a reshape of its result), and its outputs those of the layer."""
    params = dict(module.named_parameters(recurse=False))
    if (type(module).__module__.startswith("torch.") or set(params) != {"weight", "bias"}
            or any(True for _ in module.children()) or any(True for _ in module.buffers())):
        return None
    weight, bias = params["weight"], params["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[1],):
        return None
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # fx raises many types; a module it cannot trace is no such layer
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    compute = [n for n in graph.nodes if n.op in ("call_function", "call_method")
               and n.target not in ("size", operator.getitem, operator.add)]  # size arithmetic
    if len(inputs) != 1 or [n.target for n in compute] not in (["view", torch.addmm, "view"],
                                                                ["reshape", torch.addmm, "reshape"]):
        return None
    flat, addmm, out = compute
    attrs = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in addmm.args]
    if flat.args[0] is not inputs[0] or attrs != ["bias", flat, "weight"] or addmm.kwargs or out.args[0] is not addmm:
        return None
    layer = _linear(weight.detach().t(), bias.detach())
    x = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        got, expected = module(x), layer(x)
    return layer if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5) else None


def decompose(module: nn.Module) -> nn.Module:
    """Replace torch.nn's attention and recurrent blocks in `module` (in place; the root too) by the modules here,
    and in-out linear layers (Hugging Face's Conv1D) by nn.Linear."""
    if type(module) in DECOMPOSE:
        return DECOMPOSE[type(module)](module)
    if (linear := _in_out_linear(module)) is not None:
        return linear.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, decompose(child))
    return module


def _kind(rnn: nn.Module) -> str:
    """"lstm", "gru", "rnn_tanh" or "rnn_relu": the recurrence of a torch.nn recurrent layer or cell."""
    if isinstance(rnn, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    return "gru" if isinstance(rnn, (nn.GRU, nn.GRUCell)) else f"rnn_{rnn.nonlinearity}"


def _projections(rnn: nn.Module, suffix: str, kind: str) -> tuple[nn.Linear, nn.Linear]:
    """The input and hidden projections of one layer and direction (`suffix`: "_l0", "_l1_reverse", "" for a cell).
    An LSTM or plain RNN adds both biases to every gate: one bias, on the input side (a GRU multiplies its hidden
    projection's by the reset gate: it keeps both)."""
    w_ih, w_hh = (getattr(rnn, f"weight_{k}{suffix}").detach() for k in ("ih", "hh"))
    b_ih, b_hh = ((getattr(rnn, f"bias_{k}{suffix}").detach() for k in ("ih", "hh")) if rnn.bias else (None, None))
    if kind != "gru" and rnn.bias:
        b_ih, b_hh = b_ih + b_hh, None
    return _linear(w_ih, b_ih), _linear(w_hh, b_hh)


def _step(kind: str, n: int, gx, state, hh: nn.Linear, hr: nn.Linear | None = None):
    """One step of hidden size n from the input projection gx (B, G·n) and the state (h, c) (None: zeros); hr: an
    LSTM's projection of h. PyTorch's equations; returns the new (h, c) (c = h but for an LSTM)."""
    if kind == "lstm":
        gates = gx if state is None else gx + hh(state[0])
        i, f = torch.sigmoid(gates[:, :n]), torch.sigmoid(gates[:, n:2 * n])
        g, o = torch.tanh(gates[:, 2 * n:3 * n]), torch.sigmoid(gates[:, 3 * n:])
        c = i * g if state is None else f * state[1] + i * g
        h = o * torch.tanh(c)
        return h if hr is None else hr(h), c
    if kind != "gru":  # h = act(W_i·x + W_h·h + b)
        pre = gx if state is None else gx + hh(state[0])
        h = torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)
        return h, h
    if state is not None:
        gh = hh(state[0])
    else:  # the first step: W_h·0 + b_h
        gh = gx * 0.0 if hh.bias is None else hh.bias.unsqueeze(0)
    r = torch.sigmoid(gx[:, :n] + gh[:, :n])
    z = torch.sigmoid(gx[:, n:2 * n] + gh[:, n:2 * n])
    cand = torch.tanh(gx[:, 2 * n:] + r * gh[:, 2 * n:])
    h = (1 - z) * cand if state is None else (1 - z) * cand + z * state[0]
    return h, h


class Recurrent(nn.Module):
    """nn.LSTM / nn.GRU / nn.RNN as nn.Linear gate projections stepped over time, PyTorch's equations, from zeros or
    from a given initial state hx ((h_0, c_0) for an LSTM, h_0 otherwise; (layers · directions, B, H) each; an LSTM
    with proj_size P projects each step's h to P by one more Linear without bias, as torch does: h_0 is then (…, B, P)).

    The input projections of all steps are one Linear call; the hidden projection runs once per step. The loop
    over time follows the input's length, so prepare traces it along the example input (it unrolls)."""

    def __init__(self, rnn: nn.LSTM | nn.GRU | nn.RNN):
        super().__init__()
        self.kind, self.hidden, self.num_layers = _kind(rnn), rnn.hidden_size, rnn.num_layers
        self.rewrites = type(rnn).__name__
        self.directions, self.batch_first = 2 if rnn.bidirectional else 1, rnn.batch_first
        self.dropout = nn.Dropout(rnn.dropout)
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()  # index layer * directions + direction
        self.hr = nn.ModuleList() if getattr(rnn, "proj_size", 0) else None  # an LSTM's projections of h
        for layer in range(rnn.num_layers):
            for suffix in ("", "_reverse")[:self.directions]:
                if self.hr is not None:
                    self.hr.append(_linear(getattr(rnn, f"weight_hr_l{layer}{suffix}").detach(), None))
                ih, hh = _projections(rnn, f"_l{layer}{suffix}", self.kind)
                self.ih.append(ih)
                self.hh.append(hh)

    def forward(self, x, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise ConfigError(
                f"nn.{self.rewrites} on a PackedSequence (pack_padded_sequence); allowed: "
                "the padded batch, as a tensor (packing sorts and cuts the batch by the lengths' values, which an "
                "exported graph cannot follow). Fix: run the layer on the padded batch and read each sequence's "
                "output at its last position, out[torch.arange(len(lengths)), lengths - 1] (a unidirectional layer's "
                "states before the padding are the packed run's); a bidirectional layer's reverse direction then "
                "starts in the padding: train it so")
        if x.dim() != 3:
            raise ValueError(f"input of shape {tuple(x.shape)}: the recurrent rewrite takes batched input (3 dims). "
                             "Fix: add a batch axis (x.unsqueeze(1), or unsqueeze(0) with batch_first)")
        lstm = self.kind == "lstm"
        x = x if self.batch_first else x.transpose(0, 1)  # (B, T, I)
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        steps, finals = x.shape[1], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                i = layer * self.directions + direction
                state = None if h0 is None else (h0[i], c0[i] if lstm else h0[i])
                xs, seq = self.ih[i](x), []  # xs (B, T, G·H): every step's input projection
                for t in (range(steps) if direction == 0 else range(steps - 1, -1, -1)):
                    state = _step(self.kind, self.hidden, xs[:, t], state, self.hh[i],
                                  None if self.hr is None else self.hr[i])
                    seq.append(state[0])
                outputs.append(torch.stack(seq if direction == 0 else seq[::-1], 1))  # (B, T, H)
                finals.append(state)
            x = outputs[0] if self.directions == 1 else torch.cat(outputs, -1)
            if layer < self.num_layers - 1:
                x = self.dropout(x)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack([s[0] for s in finals], 0)  # (layers · directions, B, H)
        return (out, (h_n, torch.stack([s[1] for s in finals], 0))) if lstm else (out, h_n)


class RecurrentCell(nn.Module):
    """nn.LSTMCell / nn.GRUCell / nn.RNNCell, one step of a loop the model writes (a decoder, a policy), as
    nn.Linear projections and PyTorch's equations: input (B, I) or (I,), state hx ((h, c) for an LSTM cell, h
    otherwise; None: zeros); returns the new state as the cell does."""

    def __init__(self, cell: nn.LSTMCell | nn.GRUCell | nn.RNNCell):
        super().__init__()
        self.kind, self.hidden = _kind(cell), cell.hidden_size
        self.ih, self.hh = _projections(cell, "", self.kind)

    def forward(self, x, hx=None):
        batched = x.dim() == 2
        if not batched:  # (I,) and (H,) states: one sample
            x = x.unsqueeze(0)
            hx = None if hx is None else (tuple(v.unsqueeze(0) for v in hx) if self.kind == "lstm" else hx.unsqueeze(0))
        state = None if hx is None else (hx if self.kind == "lstm" else (hx, hx))
        h, c = _step(self.kind, self.hidden, self.ih(x), state, self.hh)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return (h, c) if self.kind == "lstm" else h


class EmbeddingBag(nn.Module):
    """nn.EmbeddingBag as an nn.Embedding lookup (its table quantized per row, as any embedding) and the bag's
    reduction in tensor ops, as PyTorch computes it: bags are the rows of a 2-D input, or the runs of a 1-D input that
    `offsets` start (`include_last_offset`: its last entry ends the last bag); entries equal to padding_idx are left
    out (of a mean's count too); `per_sample_weights` (mode "sum") scale each entry; an empty bag gives zeros. A 1-D
    input's entries are assigned to bags by comparing their positions with the offsets, (bags × entries) values."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        if bag.max_norm is not None or bag.scale_grad_by_freq or bag.sparse:
            raise ConfigError(f"{bag} uses max_norm, scale_grad_by_freq or sparse gradients; allowed: a plain "
                              "nn.EmbeddingBag. Fix: build it without them, or skip it "
                              "(LayerRule(pattern=..., skip=True))")
        self.table = nn.Embedding(*bag.weight.shape, padding_idx=bag.padding_idx, _weight=bag.weight)
        self.mode, self.padding_idx, self.include_last_offset = bag.mode, bag.padding_idx, bag.include_last_offset

    def forward(self, input, offsets=None, per_sample_weights=None):  # noqa: A002 - nn.EmbeddingBag's argument names
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError(f"per_sample_weights with mode {self.mode!r}; allowed: mode 'sum' (as in PyTorch). Fix: "
                             "build the EmbeddingBag with mode='sum', or pass no weights")
        if input.dim() == 2:  # (B, N): one bag per row
            if offsets is not None:
                raise ValueError("offsets with a 2-D input; allowed: offsets with a 1-D input only (as in PyTorch). "
                                 "Fix: pass offsets=None, or a 1-D input")
            keep = torch.ones_like(input, dtype=torch.bool) if self.padding_idx is None else input != self.padding_idx
        else:  # (N,) with offsets (B,): keep[b, i] = entry i belongs to bag b
            if offsets is None:
                raise ValueError("a 1-D input without offsets; allowed: offsets with a 1-D input (as in PyTorch). "
                                 "Fix: pass the bags' start offsets, or a 2-D input of one bag per row")
            if self.include_last_offset:
                starts, ends = offsets[:-1], offsets[1:]
            else:
                starts, ends = offsets, torch.cat([offsets[1:], offsets.new_full((1,), input.size(0))])
            position = torch.arange(input.size(0), device=input.device).unsqueeze(0)
            keep = (position >= starts.unsqueeze(1)) & (position < ends.unsqueeze(1))  # (B, N)
            if self.padding_idx is not None:
                keep = keep & (input != self.padding_idx).unsqueeze(0)
            input = input.unsqueeze(0).expand(keep.shape[0], -1)
            per_sample_weights = None if per_sample_weights is None else per_sample_weights.unsqueeze(0)
        rows = self.table(input)  # (B, N, D)
        weights = keep.to(rows.dtype)
        if self.mode == "max":
            top = rows.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
            return torch.where(weights.sum(1, keepdim=True) > 0, top, torch.zeros_like(top))
        if per_sample_weights is not None:
            weights = weights * per_sample_weights
        total = (rows * weights.unsqueeze(-1)).sum(1)
        return total if self.mode == "sum" else total / weights.sum(1, keepdim=True).clamp(min=1.0)  # (mean: no weights)


DECOMPOSE = {nn.TransformerEncoder: TransformerEncoder, nn.TransformerEncoderLayer: TransformerEncoderLayer,
             nn.TransformerDecoder: TransformerDecoder, nn.TransformerDecoderLayer: TransformerDecoderLayer,
             nn.Transformer: Transformer, nn.MultiheadAttention: MultiheadAttention, nn.LSTM: Recurrent,
             nn.GRU: Recurrent, nn.RNN: Recurrent, nn.LSTMCell: RecurrentCell, nn.GRUCell: RecurrentCell,
             nn.RNNCell: RecurrentCell, nn.EmbeddingBag: EmbeddingBag}
