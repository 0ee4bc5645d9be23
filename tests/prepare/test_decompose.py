"""torch.nn's attention blocks become nn.Linear layers and tensor ops: the same float outputs, every
projection quantized, and the model converts and exports (it stayed float and unconvertible before)."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import qatkit
from qatkit.errors import ConfigError
from qatkit.export import export_onnx, verify
from qatkit.prepare.decompose import MultiheadAttention, TransformerEncoder, decompose


def _masks(b: int, l: int, heads: int) -> list[dict]:
    torch.manual_seed(1)
    pad = torch.rand(b, l) > 0.6
    pad[:, 0] = False  # every query keeps a key: no all -inf row
    causal = torch.triu(torch.ones(l, l, dtype=torch.bool), 1)
    return [{}, {"key_padding_mask": pad}, {"key_padding_mask": pad.float() * -1e4}, {"attn_mask": causal},
            {"attn_mask": torch.randn(b * heads, l, l), "key_padding_mask": pad, "average_attn_weights": False},
            {"need_weights": False, "attn_mask": causal}]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv_dims", [None, (12, 20)])
def test_multihead_attention_computes_what_torch_computes(batch_first, kv_dims):
    torch.manual_seed(0)
    kdim, vdim = kv_dims or (None, None)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).double()
    mine = MultiheadAttention(mha)
    b, l = 3, 5
    shape = (b, l) if batch_first else (l, b)
    q = torch.randn(*shape, 16, dtype=torch.float64)
    k, v = torch.randn(*shape, kdim or 16, dtype=torch.float64), torch.randn(*shape, vdim or 16, dtype=torch.float64)
    for kwargs in _masks(b, l, 4):
        kwargs = {key: m.double() if m.is_floating_point() else m for key, m in kwargs.items() if torch.is_tensor(m)} | \
                 {key: m for key, m in kwargs.items() if not torch.is_tensor(m)}
        theirs, ours = mha(q, k, v, **kwargs), mine(q, k, v, **kwargs)
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-12)
        if theirs[1] is None:
            assert ours[1] is None
        else:
            torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_computes_what_torch_computes(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False).double()
    mine = TransformerEncoder(copy.deepcopy(encoder))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    for mode in ("train", "eval"):
        encoder.train(mode == "train"), mine.train(mode == "train")
        torch.testing.assert_close(mine(x, src_key_padding_mask=pad), encoder(x, src_key_padding_mask=pad),
                                   rtol=0, atol=1e-12)


def _decoder_masks(b: int, t: int, s: int) -> list[dict]:
    """The target's causal mask (float, as nn.Transformer makes it, or boolean), padding of target and memory, and a
    memory mask."""
    torch.manual_seed(2)
    tgt_pad, mem_pad = torch.rand(b, t) > 0.6, torch.rand(b, s) > 0.6
    tgt_pad[:, 0] = mem_pad[:, 0] = False  # every query keeps a key: no all -inf row
    causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    return [{}, {"tgt_mask": causal, "tgt_is_causal": True},
            {"tgt_mask": torch.triu(torch.ones(t, t, dtype=torch.bool), 1), "tgt_key_padding_mask": tgt_pad,
             "memory_key_padding_mask": mem_pad},
            {"tgt_mask": causal, "memory_mask": torch.randn(t, s, dtype=torch.float64)}]


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_transformer_decoder_computes_what_torch_computes(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    decoder = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(16)).double()
    mine = decompose(copy.deepcopy(decoder))
    tgt, memory = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    for kwargs in _decoder_masks(3, 5, 7):
        for mode in (True, False):
            decoder.train(mode), mine.train(mode)
            torch.testing.assert_close(mine(tgt, memory, **kwargs), decoder(tgt, memory, **kwargs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_nn_transformer_computes_what_torch_computes(batch_first):
    torch.manual_seed(0)
    transformer = nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                                 batch_first=batch_first).double().eval()
    mine = decompose(copy.deepcopy(transformer))
    assert not any(isinstance(m, (nn.Transformer, nn.TransformerDecoderLayer, nn.TransformerEncoderLayer,
                                  nn.MultiheadAttention)) for m in mine.modules())
    src, tgt = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    src_pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]])
    kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64),
              "src_key_padding_mask": src_pad, "memory_key_padding_mask": src_pad}
    torch.testing.assert_close(mine(src, tgt, **kwargs), transformer(src, tgt, **kwargs), rtol=0, atol=1e-12)


def test_is_causal_without_its_mask_is_refused_with_the_fix():
    decoder = decompose(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"is_causal=True needs the causal attn_mask .* Fix: pass attn_mask="):
        decoder(x, x, tgt_is_causal=True)


def test_bias_kv_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"uses add_bias_kv or add_zero_attn; allowed: neither\. Fix:"):
        decompose(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def _deploys(model, qat, ids, tmp_path) -> None:
    """Calibrated: close to the float model; the integer model computes the QAT model's eval outputs; ONNX Runtime
    agrees within one output step (its float softmax/sigmoid/tanh/LayerNorm may round a value to the next step)."""
    qatkit.calibrate(qat, [ids])
    qat.eval()
    with torch.no_grad():
        y = qat(ids)
        assert (y - model(ids)).abs().max() < 0.1 * model(ids).abs().max()
    integer = qatkit.convert(qat)
    assert torch.equal(integer(ids), y)
    export_onnx(integer, tmp_path / "m.onnx", ids[:1])
    result = verify(tmp_path / "m.onnx", integer, [ids])
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0


class TextEncoder(nn.Module):
    """A text classifier from torch.nn blocks: padding masked by key_padding_mask, the first token's output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32, padding_idx=0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):  # (B, L) int64, 0 = padding
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)[:, 0])


def test_a_torch_nn_transformer_is_quantized_converted_and_exported(tmp_path):
    torch.manual_seed(0)
    model = TextEncoder().eval()
    ids = torch.randint(1, 50, (32, 10))
    ids[:16, 6:] = 0
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    layers = {r["name"] for r in qat.qat_info.layers}
    for i in (0, 1):
        assert {f"encoder.layers.{i}.self_attn.{p}_proj" for p in "qkvo" if p != "o"} | \
               {f"encoder.layers.{i}.self_attn.out_proj", f"encoder.layers.{i}.linear1", f"encoder.layers.{i}.linear2"} <= layers
    _deploys(model, qat, ids, tmp_path)


class Translator(nn.Module):
    """A sequence-to-sequence model as PyTorch's translation tutorial builds it: token embeddings, nn.Transformer
    (source padding masked, the target causal), a projection to the target vocabulary at every position."""

    def __init__(self):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(40, 32, padding_idx=0), nn.Embedding(30, 32)
        self.transformer = nn.Transformer(32, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                                          dropout=0.1, batch_first=True)
        self.generator = nn.Linear(32, 30)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        out = self.transformer(self.src_embed(src), self.tgt_embed(tgt), tgt_mask=causal,
                               src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0)
        return self.generator(out)


def test_a_torch_nn_seq2seq_transformer_is_quantized_converted_and_exported(tmp_path):
    """Every projection of encoder and decoder (both attentions) is quantized; the integer model computes the QAT
    model's outputs at the example's lengths and at others; so does the ONNX file, whose lengths are free."""
    torch.manual_seed(0)
    model = Translator().eval()
    src, tgt = torch.randint(1, 40, (16, 9)), torch.randint(0, 30, (16, 6))
    src[:8, 6:] = 0
    qat = qatkit.prepare(model, qatkit.QATConfig(), (src[:2], tgt[:2]))
    layers = {r["name"] for r in qat.qat_info.layers}
    for i in (0, 1):
        decoder = f"transformer.decoder.layers.{i}"
        assert {f"{decoder}.{attn}.{p}_proj" for attn in ("self_attn", "multihead_attn") for p in ("q", "k", "v", "out")} \
            | {f"{decoder}.linear1", f"{decoder}.linear2", f"transformer.encoder.layers.{i}.self_attn.q_proj"} <= layers
    batch = ((src, tgt), torch.zeros(16))
    qatkit.calibrate(qat, [batch])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        y = qat(src, tgt)
        assert (y - model(src, tgt)).abs().max() < 0.1 * model(src, tgt).abs().max()
        assert torch.equal(integer(src, tgt), y)
        longer = torch.randint(1, 40, (4, 11)), torch.randint(0, 30, (4, 8))
        assert torch.equal(integer(*longer), qat(*longer))
    assert qat.qat_info.input_sizes == {"src": [None, None], "tgt": [None, None]}  # any lengths
    export_onnx(integer, tmp_path / "m.onnx", (src[:1], tgt[:1]))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)] \
        == [["batch", "src_1"], ["batch", "tgt_1"], ["batch", "tgt_1", 30]]
    result = verify(tmp_path / "m.onnx", integer, [batch, (longer, torch.zeros(4))])
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0


def _flat(out):
    return [out[0], *(out[1] if isinstance(out[1], tuple) else [out[1]])]


@pytest.mark.parametrize("cls, kwargs", [
    (cls, kwargs) for cls in (nn.LSTM, nn.GRU, nn.RNN) for kwargs in (
        {"batch_first": True}, {"num_layers": 2, "bidirectional": True},
        {"num_layers": 2, "batch_first": True, "bias": False, "dropout": 0.0})
] + [(nn.LSTM, {"proj_size": 3}), (nn.LSTM, {"proj_size": 2, "num_layers": 2, "bidirectional": True}),
     (nn.RNN, {"nonlinearity": "relu", "num_layers": 2})])
@pytest.mark.parametrize("initial", [False, True], ids=["zeros", "given-state"])
def test_recurrent_layers_compute_what_torch_computes(cls, kwargs, initial):
    torch.manual_seed(0)
    rnn = cls(6, 5, **kwargs).double()
    mine = decompose(copy.deepcopy(rnn))
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    x = x if kwargs.get("batch_first") else x.transpose(0, 1)
    states = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    h0 = torch.randn(states, 3, kwargs.get("proj_size") or 5, dtype=torch.float64)
    c0 = torch.randn(states, 3, 5, dtype=torch.float64)
    hx = ((h0, c0) if cls is nn.LSTM else h0) if initial else None
    for theirs, ours in zip(_flat(rnn(x, hx)), _flat(mine(x, hx))):  # output, h_n (and c_n)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, kwargs", [(nn.LSTMCell, {}), (nn.GRUCell, {}), (nn.RNNCell, {}),
                                         (nn.RNNCell, {"nonlinearity": "relu"}), (nn.LSTMCell, {"bias": False}),
                                         (nn.GRUCell, {"bias": False})])
@pytest.mark.parametrize("batched", [True, False])
def test_recurrent_cells_compute_what_torch_computes(cls, kwargs, batched):
    torch.manual_seed(0)
    cell = cls(6, 5, **kwargs).double()
    mine = decompose(copy.deepcopy(cell))
    lead = (3,) if batched else ()
    x, h, c = (torch.randn(*lead, n, dtype=torch.float64) for n in (6, 5, 5))
    for hx in (None, (h, c) if cls is nn.LSTMCell else h):  # zeros, a given state
        theirs, ours = cell(x, hx), mine(x, hx)
        for a, b in zip(theirs if cls is nn.LSTMCell else (theirs,), ours if cls is nn.LSTMCell else (ours,)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


class CellDecoder(nn.Module):
    """A loop the model writes: an LSTM cell over the embedded tokens, a GRU cell on its output, a tanh RNN cell
    beside them, then a head on the last states."""

    def __init__(self):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(40, 16), nn.LSTMCell(16, 12)
        self.gru, self.rnn, self.head = nn.GRUCell(12, 12), nn.RNNCell(16, 8), nn.Linear(20, 3)

    def forward(self, ids):
        x = self.embed(ids)
        h = c = g = x.new_zeros(ids.shape[0], 12)
        r = None
        for t in range(ids.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
            r = self.rnn(x[:, t], r)
        return self.head(torch.cat([g, r], 1))


def test_a_model_looping_over_recurrent_cells_is_quantized_converted_and_exported(tmp_path):
    torch.manual_seed(0)
    model = CellDecoder().eval()
    ids = torch.randint(0, 40, (32, 5))
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    assert {"lstm.ih", "lstm.hh", "gru.ih", "gru.hh", "rnn.ih", "rnn.hh"} <= {r["name"] for r in qat.qat_info.layers}
    _deploys(model, qat, ids, tmp_path)


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(20, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, ids, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.lstm(packed)[1][0][-1])


def test_a_packed_sequence_is_refused_with_the_fix():
    ids, lengths = torch.randint(1, 20, (4, 7)), torch.tensor([7, 5, 3, 6])
    with pytest.raises(ConfigError, match=r"nn.LSTM on a PackedSequence.*Fix: run the layer on the padded batch.*"
                                          r"lengths - 1\]"):
        qatkit.prepare(Packed().eval(), qatkit.QATConfig(), (ids, lengths))


def test_unbatched_recurrent_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"input of shape \(5, 4\): .* batched input .* Fix: add a batch axis"):
        decompose(nn.GRU(4, 8))(torch.randn(5, 4))


class TimeFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(8, 12), nn.Linear(12, 4)  # batch_first=False: (T, B, F)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def test_a_time_first_recurrent_layer_is_named_in_the_refusal():
    """Its steps run along axis 0, which tracing takes for the batch: convert blamed a branch on the batch size."""
    qat = qatkit.prepare(TimeFirst().eval(), qatkit.QATConfig(), torch.randn(6, 4, 8))
    qatkit.calibrate(qat, [torch.randn(6, 4, 8)])
    with pytest.raises(qatkit.QatkitError, match=r"or the batch is not axis 0: rnn step along it; build them with "
                                                 r"batch_first=True"):
        qatkit.convert(qat)


class Tagger(nn.Module):
    """Token ids → embedding → a recurrent layer → the last step's state → classes; learned=True: the recurrent
    layer starts from a learned initial state (a parameter expanded to the batch)."""

    def __init__(self, cls, learned: bool = False, proj_size: int = 0):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.rnn = cls(16, 12, num_layers=2, batch_first=True, bidirectional=cls is nn.GRU,
                       **({"proj_size": proj_size} if proj_size else {}))
        self.head = nn.Linear((proj_size or 12) * (2 if cls is nn.GRU else 1), 3)
        states = 2 * (2 if cls is nn.GRU else 1)
        self.h0 = nn.Parameter(0.3 * torch.randn(states, 1, 12)) if learned else None
        self.c0 = nn.Parameter(0.3 * torch.randn(states, 1, 12)) if learned and cls is nn.LSTM else None

    def forward(self, ids):
        x, hx = self.embed(ids), None
        if self.h0 is not None:
            h0 = self.h0.expand(-1, ids.shape[0], -1).contiguous()
            hx = (h0, self.c0.expand(-1, ids.shape[0], -1).contiguous()) if self.c0 is not None else h0
        return self.head(self.rnn(x, hx)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("learned", [False, True], ids=["zeros", "learned-state"])
def test_a_recurrent_model_is_quantized_converted_and_exported(cls, learned, tmp_path):
    torch.manual_seed(0)
    model = Tagger(cls, learned).eval()
    ids = torch.randint(0, 40, (32, 6))
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    layers = {r["name"] for r in qat.qat_info.layers}
    assert {"rnn.ih.0", "rnn.hh.0", "rnn.ih.1", "rnn.hh.1"} <= layers  # every gate projection quantized
    _deploys(model, qat, ids, tmp_path)


def test_an_lstm_with_projections_is_quantized_converted_and_exported(tmp_path):
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, proj_size=8).eval()
    ids = torch.randint(0, 40, (32, 6))
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    assert {"rnn.hr.0", "rnn.hr.1", "rnn.hh.1"} <= {r["name"] for r in qat.qat_info.layers}  # h's projections too
    _deploys(model, qat, ids, tmp_path)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_computes_what_torch_computes(mode, padding_idx, include_last_offset):
    """2-D bags and 1-D runs with offsets, padding left out (an all-padding bag, an empty one: zeros), per-entry
    weights in mode "sum"."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset).double()
    mine = decompose(copy.deepcopy(bag))
    rows, ids = torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (11,))
    rows[1], ids[3:5] = 0, 0
    offsets = torch.tensor([0, 3, 3, 7] + ([11] if include_last_offset else []))  # bag 1 empty
    weighted = mode == "sum"
    for args in ((rows, None, torch.rand(4, 5, dtype=torch.float64) if weighted else None),
                 (ids, offsets, torch.rand(11, dtype=torch.float64) if weighted else None)):
        torch.testing.assert_close(mine(*args), bag(*args), rtol=0, atol=1e-12)


def test_embedding_bag_arguments_pytorch_refuses_are_refused_with_the_fix():
    mine = decompose(nn.EmbeddingBag(10, 4, mode="mean"))
    ids = torch.randint(0, 10, (6,))
    cases = [((ids, torch.tensor([0, 3]), torch.rand(6)), r"per_sample_weights with mode 'mean'; allowed: mode 'sum'"),
             ((ids,), r"a 1-D input without offsets; .* Fix: pass the bags' start offsets"),
             ((ids.view(2, 3), torch.tensor([0, 1])), r"offsets with a 2-D input; .* Fix: pass offsets=None")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            mine(*args)
    with pytest.raises(ConfigError, match=r"uses max_norm, scale_grad_by_freq or sparse gradients; .* Fix:"):
        decompose(nn.EmbeddingBag(10, 4, max_norm=1.0))


class BagOfWords(nn.Module):
    """torchtext's text classification tutorial model: nn.EmbeddingBag over a batch's concatenated token ids and their
    offsets, a linear layer."""

    def __init__(self):
        super().__init__()
        self.embedding, self.fc = nn.EmbeddingBag(50, 16, mode="mean"), nn.Linear(16, 4)

    def forward(self, text, offsets=None):
        return self.fc(self.embedding(text, offsets))


@pytest.mark.parametrize("form", ["offsets", "2-D"])
def test_an_embedding_bag_model_is_quantized_converted_and_exported(form, tmp_path):
    """The table is quantized per row; the integer model computes the QAT model's outputs, also for other numbers of
    ids and bags, and so does ONNX Runtime."""
    torch.manual_seed(0)
    model = BagOfWords().eval()
    if form == "offsets":
        example, other = (torch.randint(0, 50, (40,)), torch.tensor([0, 5, 9, 20, 22, 30, 33, 38])), \
            (torch.randint(0, 50, (25,)), torch.tensor([0, 4, 4, 12, 20]))
    else:
        example, other = (torch.randint(0, 50, (8, 6)),), (torch.randint(0, 50, (5, 9)),)
    qat = qatkit.prepare(model, qatkit.QATConfig(), example)
    assert {"embedding.table", "fc"} <= {r["name"] for r in qat.qat_info.layers}
    bags = len(example[-1])
    qatkit.calibrate(qat, [(example, torch.zeros(bags))])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert (qat(*example) - model(*example)).abs().max() < 0.05 * model(*example).abs().max()
        for inputs in (example, other):
            assert torch.equal(integer(*inputs), qat(*inputs))
    export_onnx(integer, tmp_path / "m.onnx", example)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(tmp_path / "m.onnx").graph.input}
    # the ids and the bags are two sizes (the offsets form): one name would tell ONNX Runtime they are equal
    assert dims == ({"text": ["text_0"], "offsets": ["batch"]} if form == "offsets" else {"text": ["batch", "text_1"]})
    result = verify(tmp_path / "m.onnx", integer, [(example, torch.zeros(bags)), (other, torch.zeros(len(other[-1])))])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0
