"""Models that take their inputs by name, with batches as Hugging Face's collators make them: dicts
{"input_ids": ..., "attention_mask": ..., "labels": ...}. The example names the inputs prepare traces (arguments it
leaves out keep their defaults and are no inputs of the graph); calibrate, fit, evaluate and verify take the labels from
"labels"; the integer model, its file, the ONNX model (inputs named as forward's arguments), ONNX Runtime and the
integer-only reference take the inputs by name."""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import optional_mask, prepares_whole
from torch import nn

import qatkit
from qatkit.errors import DataError
from qatkit.export import export_onnx, ort, verify
from qatkit.export.integer_reference import IntegerReference
from qatkit.inputs import first

V, D, L = 40, 32, 10


class Classifier(nn.Module):
    """A sequence classifier whose forward takes what a tokenizer returns, the optional ones left to None."""

    def __init__(self):
        super().__init__()
        self.words, self.types, self.positions = nn.Embedding(V, D), nn.Embedding(2, D), nn.Embedding(L, D)
        self.layer = nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.head(self.pooled(input_ids, attention_mask, token_type_ids))

    def pooled(self, input_ids, attention_mask, token_type_ids):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        h = self.words(input_ids) + self.types(token_type_ids) + self.positions(positions)
        h = self.layer(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class ModelOutput(OrderedDict):
    """Hugging Face's ModelOutput in short: a dataclass that is also a dict of its fields that are not None."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if (value := getattr(self, field.name)) is not None:
                self[field.name] = value


@dataclasses.dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class ReturnsModelOutput(Classifier):
    """Its output as Hugging Face's models return it: a ModelOutput, or a tuple where return_dict=False."""

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        pooled = self.pooled(input_ids, attention_mask, None)
        logits = self.head(pooled)
        if not return_dict:
            return (logits, pooled) if output_hidden_states else (logits,)
        return SequenceClassifierOutput(logits=logits, hidden_states=pooled if output_hidden_states else None)


def _dict_batches(n: int = 256, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Is token 1 among the unpadded tokens? The padding is filled with 1s, so the task needs the mask."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (n, L), generator=gen)
    lengths = torch.randint(3, L + 1, (n,), generator=gen)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.nonzero(labels).flatten()
    ids[rows, (torch.rand(len(rows), generator=gen) * lengths[rows]).long()] = 1
    ids[mask == 0] = 1
    return [{"input_ids": ids[i:i + size], "attention_mask": mask[i:i + size], "labels": labels[i:i + size]}
            for i in range(0, n, size)]


def test_dict_batches_train_convert_and_run_in_onnx_runtime_by_name(tmp_path):
    torch.manual_seed(0)
    batches = _dict_batches()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    qat = prepares_whole(Classifier().eval(), {k: v[:2] for k, v in inputs.items()})
    assert [n.target for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    assert qatkit.calibrate(qat, batches, num_batches=2) == 2
    qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=10, lr=3e-3, progress=False))
    result = qatkit.evaluate(qat, batches)
    assert result["accuracy"] > 0.9, result
    unmasked = qatkit.evaluate(qat, [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches])
    assert unmasked["accuracy"] < 0.8, unmasked  # the mask was used

    integer = qatkit.convert(qat.eval())
    assert integer.input_names == ["input_ids", "attention_mask"]
    with torch.no_grad():
        expected = qat(**inputs)
        assert torch.equal(integer(**inputs), expected)
        assert torch.equal(integer(inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected)
    qatkit.save(integer, tmp_path / "classifier.safetensors")  # a model of two inputs: saved and loaded
    assert torch.equal(qatkit.load(tmp_path / "classifier.safetensors")(**inputs), expected)

    path = tmp_path / "classifier.onnx"
    export_onnx(integer, path, first(inputs))
    sess = ort.session(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    checked = verify(path, integer, batches[:2])
    assert checked["n"] == 64 and checked["top1_agreement"] == 1.0 and checked["within_one_step"] == 1.0, checked
    reversed_order = {"attention_mask": inputs["attention_mask"].numpy(), "input_ids": inputs["input_ids"].numpy()}
    reference = IntegerReference(path, requant="float32").run(reversed_order)
    assert np.array_equal(reference, ort.run(sess, inputs))


def test_the_inputs_the_example_names_are_the_graphs_the_rest_keep_their_defaults():
    """token_type_ids given, attention_mask not: the graph takes input_ids and token_type_ids, and computes what the
    model computes with attention_mask=None."""
    torch.manual_seed(0)
    model = Classifier().eval()
    ids, types = torch.randint(0, V, (4, L)), torch.randint(0, 2, (4, L))
    qat = prepares_whole(model, {"input_ids": ids[:2], "token_type_ids": types[:2]})
    assert [n.target for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "token_type_ids"]
    qatkit.calibrate(qat, [{"input_ids": ids, "token_type_ids": types}])
    integer = qatkit.convert(qat.eval())
    assert integer.input_names == ["input_ids", "token_type_ids"]
    with torch.no_grad():
        got = integer(input_ids=ids, token_type_ids=types)
        assert torch.equal(got, qat(input_ids=ids, token_type_ids=types))
        assert (got - model(ids, token_type_ids=types)).abs().max() < 0.25  # W8A8 of the float model's logits


def test_an_argument_the_example_leaves_out_keeps_its_default_where_fx_traces_the_model():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 4), torch.rand(3, 4) > 0.5
    model = optional_mask().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        without = qatkit.prepare(model, qatkit.QATConfig(), x)
        with_mask = qatkit.prepare(model, qatkit.QATConfig(), {"x": x, "mask": mask})
    assert not [w for w in caught if "train()" in str(w.message)]  # masked_fill is not taken for training-only code
    assert [n.target for n in without.graph.nodes if n.op == "placeholder"] == ["x"]
    assert [n.target for n in with_mask.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    for qat, args in ((without, {"x": x}), (with_mask, {"x": x, "mask": mask})):
        qatkit.calibrate(qat, [args])
        with torch.no_grad():
            assert torch.equal(qatkit.convert(qat.eval())(**args), qat(**args))
            assert (qat(**args) - model(**args)).abs().max() < 0.05
    assert (with_mask(x, mask)[mask] == 0).all() and without(x)[mask].abs().sum() > 0


@pytest.mark.parametrize("example, missing, unknown", [
    ({"attention_mask": torch.ones(2, L, dtype=torch.long)}, "['input_ids']", "none"),
    ({"input_ids": torch.zeros(2, L, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}, "none", "['labels']"),
], ids=["without-a-required-input", "an-argument-forward-does-not-take"])
def test_an_example_that_does_not_name_forwards_arguments_is_refused_with_the_fix(example, missing, unknown):
    with pytest.raises(DataError, match=r"^example_inputs = \[.+\] is not allowed; allowed: values for the arguments "
                                        r"of Classifier\.forward\('input_ids', 'attention_mask', 'token_type_ids'\), "
                                        r"every one without a default among them "
                                        + re.escape(f"(missing: {missing}; unknown: {unknown})") + r"\. Fix: name the"):
        qatkit.prepare(Classifier(), qatkit.QATConfig(), example)


class TakesKwargs(Classifier):
    """forward(..., **kwargs), as newer Hugging Face models end it: fx makes **kwargs a placeholder."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return super().forward(input_ids, attention_mask)


def test_forwards_kwargs_take_nothing_when_the_example_names_the_inputs():
    torch.manual_seed(0)
    inputs = {k: v for k, v in _dict_batches(32)[0].items() if k != "labels"}
    qat = prepares_whole(TakesKwargs().eval(), first(inputs))
    assert [n.target for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    qatkit.calibrate(qat, [inputs])
    integer = qatkit.convert(qat.eval())
    assert integer.input_names == ["input_ids", "attention_mask"]
    with torch.no_grad():
        assert torch.equal(integer(**inputs), qat(**inputs))


def test_an_example_value_that_is_neither_a_tensor_nor_a_constant_is_refused_with_the_fix():
    """A list of tensors (a cache of past keys and values) would be frozen into the graph."""
    example = {"input_ids": torch.zeros(2, L, dtype=torch.long), "token_type_ids": [torch.zeros(2, L, dtype=torch.long)]}
    with pytest.raises(DataError, match=r"^example_inputs\['token_type_ids'\] = 'a list' is not allowed; allowed: a "
                                        r"tensor \(an input of the graph\) or a constant that the graph keeps fixed: "
                                        r"None, a bool, a number or a string\. Fix: leave 'token_type_ids' out \(its "
                                        r"default: None\)"):
        qatkit.prepare(Classifier(), qatkit.QATConfig(), example)


def test_a_dict_batch_without_labels_is_refused_by_fit_with_the_fix():
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(64)]
    qat = qatkit.prepare(Classifier().eval(), qatkit.QATConfig(), first(batches[0]))
    with pytest.raises(DataError, match=r"^batch = .a dict of \(input_ids: Tensor, attention_mask: Tensor\). is not "
                                        r"allowed; allowed: \(x, y\) pairs, or dicts of the model's named inputs with "
                                        r"the labels tensor under 'labels' \(or 'label'\)\. Fix: "):
        qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=1, progress=False))


def test_an_integer_model_given_inputs_it_does_not_have_names_them():
    qat = qatkit.prepare(optional_mask().eval(), qatkit.QATConfig(), torch.randn(2, 4))
    qatkit.calibrate(qat, [torch.randn(8, 4)])
    integer = qatkit.convert(qat.eval())
    with pytest.raises(DataError, match=r"^inputs by name \['mask', 'x'\] do not match the model's inputs \['x'\] "
                                        r"\(missing: none; unknown: \['mask'\]\)\. Fix: give each"):
        integer(mask=torch.ones(2, 4, dtype=torch.bool), x=torch.randn(2, 4))


def test_a_model_output_dict_trains_on_its_logits_and_keeps_its_names_in_the_integer_and_onnx_models(tmp_path):
    """The example fixes output_hidden_states=True (not a tensor: an argument, no input); the model returns
    {"logits": ..., "hidden_states": ...}: fit and evaluate take "logits", the integer model returns the same dict,
    its file keeps the names, and so do the ONNX model's outputs."""
    torch.manual_seed(0)
    batches = _dict_batches(128)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    qat = prepares_whole(ReturnsModelOutput().eval(), {**first(inputs), "output_hidden_states": True})
    assert [n.target for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    qatkit.calibrate(qat, batches, num_batches=2)
    history = qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=3, lr=3e-3, progress=False))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert qatkit.evaluate(qat, batches)["accuracy"] > 0.6

    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        expected = qat(**inputs)
        assert list(expected) == ["logits", "hidden_states"] and expected["hidden_states"].shape == (32, D)
        got = integer(**inputs)
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    qatkit.save(integer, tmp_path / "out.safetensors")
    loaded = qatkit.load(tmp_path / "out.safetensors")(**inputs)
    assert list(loaded) == list(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    path = tmp_path / "out.onnx"
    export_onnx(integer, path, first(inputs))
    assert [o.name for o in ort.session(path).get_outputs()] == ["logits", "hidden_states"]
    assert verify(path, integer, batches[:1])["top1_agreement"] == 1.0
    logits, hidden = ort.run_all(ort.session(path), inputs)  # the logits integer, the pooled features float
    assert np.abs(logits - got["logits"].numpy()).max() <= ort.output_steps(integer, inputs)[0] * (1 + 1e-4)
    np.testing.assert_allclose(hidden, got["hidden_states"].numpy(), rtol=1e-5, atol=1e-5)


class ReturnsNormalizedStates(nn.Module):
    """A transformer layer's float (LayerNorm) states beside integer logits, as {"logits", "hidden_states"}."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, 2)
        self.layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)

    def forward(self, input_ids):
        states = self.layer(self.embed(input_ids))
        return {"logits": self.head(states.mean(1)), "hidden_states": states}


def test_verify_counts_a_float_output_within_float_rounding_as_agreeing(tmp_path):
    """ONNX Runtime's LayerNorm rounds its sums otherwise than PyTorch's (an ulp or a few of the largest state):
    verify took a float output's step to be one ulp of its largest value and failed such a model (within_one_step
    0.9975, max_step_diff 1.32)."""
    torch.manual_seed(0)
    ids = torch.randint(0, V, (16, L))
    qat = prepares_whole(ReturnsNormalizedStates().eval(), ids[:2])
    qatkit.calibrate(qat, [ids])
    integer = qatkit.convert(qat.eval())
    path = tmp_path / "states.onnx"
    export_onnx(integer, path, ids[:1])
    assert ort.output_steps(integer, ids)[1] is None  # (the states are a float output)
    result = verify(path, integer, [ids])
    assert result["within_one_step"] == 1.0 and result["top1_agreement"] == 1.0, result
    _, hidden = ort.run_all(ort.session(path), ids)
    expected = integer(ids)["hidden_states"].numpy()
    assert np.abs(hidden - expected).max() <= np.abs(expected).max() * ort.FLOAT_OUTPUT_STEP


def test_an_example_fixes_return_dict_false_and_the_model_returns_its_tuple():
    torch.manual_seed(0)
    inputs = {k: v for k, v in _dict_batches(32)[0].items() if k != "labels"}
    model = ReturnsModelOutput().eval()
    qat = prepares_whole(model, {**first(inputs), "return_dict": False})
    assert [n.target for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    qatkit.calibrate(qat, [inputs])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        (got,) = integer(**inputs)
        assert torch.equal(got, qat(**inputs)[0])
        assert (got - model(**inputs, return_dict=False)[0]).abs().max() < 0.25


class ReturnsScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return {"scores": self.fc(x)}


def test_a_model_output_dict_without_logits_is_refused_by_fit_with_the_fix():
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    qat = qatkit.prepare(ReturnsScores(), qatkit.QATConfig(), batches[0][0])
    qatkit.calibrate(qat, batches)
    with pytest.raises(qatkit.QatkitError, match=r"^the model's output = \"a dict of \['scores'\]\" is not allowed; "
                                                 r"allowed: a logits tensor, a tuple whose first item is one, or a dict "
                                                 r"with one under 'logits'\. Fix: return the logits"):
        qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=1, progress=False))
