"""optimize_for_inference: BatchNorm folding, chain merging and 1x1 convolutions as matrix products keep
outputs, the result exports, and the statistics and compression path start without importing torch._dynamo."""
from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from models import make_trained_like, resnet18
from musco_core import Compressor, FactorizedLayer, optimize_for_inference
from musco_core.errors import ConfigError
import musco_core.inference
from musco_core.inference import PointwiseConv2d, merge_layers, merged_geometry, pointwise_products
from musco_core.timing import fixed_threads, tensors_in, time_alternated, time_modules_at

TOLERANCE = 1e-5  # relative, on the output's norm


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def factorize(layer: nn.Module, decomposition: str, rank: int | tuple[int, int]) -> FactorizedLayer:
    """``layer`` compressed with ``decomposition`` at ``rank`` (forced), as a factorized layer."""
    schedule = {"0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": [rank],
                      "force": True}}
    compressor = Compressor(nn.Sequential(layer), model_compr_kwargs=schedule, progress=False)
    compressor.compression_step()
    (result,) = compressor.history
    assert result.applied, result.note
    return compressor.compressed_model[0]


def optimized_both_ways(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """``model`` (put in eval mode) optimized without and with ``x`` as its example input, each checked to give the
    model's outputs on ``x``."""
    model.eval()
    with torch.no_grad():
        expected = tensors_in(model(x))
        optimized = [optimize_for_inference(model, example, progress=False) for example in (None, x)]
        for candidate in optimized:
            got = tensors_in(candidate(x))
            assert len(got) == len(expected) and all(relative(a, b) < TOLERANCE for a, b in zip(got, expected))
    return optimized


def with_trained_statistics(batchnorm: nn.modules.batchnorm._BatchNorm, seed: int) -> nn.Module:
    """Gives a BatchNorm running statistics and affine parameters far from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    n = batchnorm.num_features
    with torch.no_grad():
        batchnorm.running_mean.copy_(torch.randn(n, generator=generator))
        batchnorm.running_var.copy_(torch.rand(n, generator=generator) * 3 + 0.1)
        if batchnorm.affine:
            batchnorm.weight.copy_(torch.randn(n, generator=generator))
            batchnorm.bias.copy_(torch.randn(n, generator=generator))
    return batchnorm


# --- chain merging over every conv geometry the adapters support ----------------------------------------------

@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(2, 4))
    out_channels = groups * draw(st.integers(2, 4))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["same", "valid", "ints"])) if all(s == 1 for s in stride) else "ints"
    if padding == "ints":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    size = tuple(d * (k - 1) + 3 + draw(st.integers(0, 2)) for d, k in zip(dilation, kernel))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layer = conv(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, bias=bias, padding_mode=mode)
    splittable = padding != "same" or all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel))
    decompositions = ["tucker2"] + (["svd"] if all(k == 1 for k in kernel) else
                                    ["cp3"] + ["cp4"] * (dims == 2 and splittable))
    decomposition = draw(st.sampled_from(decompositions))
    out_group, in_group = out_channels // groups, in_channels // groups
    per_rank = {"cp3": out_group + in_group + math.prod(kernel), "cp4": out_group + in_group + sum(kernel)}
    largest = (out_group * in_group * math.prod(kernel) // per_rank[decomposition] if decomposition in per_rank
               else min(out_group, in_group))
    rank = draw(st.integers(1, max(1, largest)))
    return layer, size, decomposition, (rank, rank) if decomposition == "tucker2" else rank


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_every_run_of_factors_that_merges_reproduces_the_chain(case):
    """Each run of consecutive factors that ``merged_geometry`` accepts is replaced exactly by its product, and
    the whole chain of a bundled decomposition always merges back to one layer of the original geometry."""
    layer, size, decomposition, rank = case
    factorized = factorize(layer, decomposition, rank).eval()
    factors = list(factorized)
    assert merged_geometry(factors) is not None, f"{decomposition} on {layer} does not merge back"
    x = torch.randn(2, layer.in_channels, *size)
    inputs = [x]
    with torch.no_grad():
        for factor in factors:
            inputs.append(factor(inputs[-1]))
        for start in range(len(factors)):
            for stop in range(start + 2, len(factors) + 1):
                geometry = merged_geometry(factors[start:stop])
                if geometry is None:
                    continue
                merged = merge_layers(factors[start:stop], geometry)
                assert relative(merged(inputs[start]), inputs[stop]) < TOLERANCE, (start, stop, geometry)
        whole = merge_layers(factors, merged_geometry(factors))
    assert whole.weight.shape == layer.weight.shape
    effective_dilation = tuple(d if k > 1 else 1 for d, k in zip(layer.dilation, layer.kernel_size))
    assert (whole.stride, whole.dilation, whole.groups) == (layer.stride, effective_dilation, layer.groups)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.booleans(), st.booleans())
def test_factorized_conv_then_batchnorm_keeps_its_outputs(case, affine, train_mode):
    """A factorized conv followed by a BatchNorm (trained statistics, model in train or eval mode): the
    BatchNorm folds into the last factor and the optimized model matches the eval-mode model."""
    layer, size, decomposition, rank = case
    batchnorm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[layer.weight.dim() - 2]
    model = nn.Sequential(factorize(layer, decomposition, rank),
                          with_trained_statistics(batchnorm(layer.out_channels, affine=affine), 1), nn.ReLU())
    model.train(train_mode)
    x = torch.randn(2, layer.in_channels, *size)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
        # BatchNorm1d normalizes axis 1, a Conv1d's channels only on batched input: that needs the shape seen
        optimized = optimize_for_inference(model, x if layer.weight.dim() == 3 else None, progress=False)
        assert relative(optimized(x), expected) < TOLERANCE
    assert isinstance(optimized[1], nn.Identity)
    assert model.training == train_mode and isinstance(model[0], FactorizedLayer), "the input model changed"
    assert not any(isinstance(m, (FactorizedLayer, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
                   for m in optimized.modules())


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.booleans(),
                          st.sampled_from(["zeros", "reflect"])), min_size=2, max_size=4))
def test_merging_refuses_chains_it_cannot_reproduce(layers):
    """Random 1-d conv chains: whenever a merged geometry is offered, the merged layer reproduces the chain
    (biases before zero padding, two layers convolving one axis and mixed padding modes are refused)."""
    convs, channels = [], 3
    for kernel, stride, padding, bias, mode in layers:
        convs.append(nn.Conv1d(channels, 4, kernel, stride=stride, padding=padding, bias=bias, padding_mode=mode))
        channels = 4
    geometry = merged_geometry(convs)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        if geometry is not None:
            assert relative(merge_layers(convs, geometry)(x), nn.Sequential(*convs)(x)) < TOLERANCE
    convolving = sum(1 for kernel, stride, padding, *_ in layers if kernel > 1 or stride > 1 or padding)
    if convolving > 1:
        assert geometry is None


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_a_bias_reaching_a_padded_border_merges_only_when_padding_copies_pixels(mode):
    """Zero padding puts zeros where the chain has the first layer's bias; copying pads commute with it."""
    chain = [nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)]
    geometry = merged_geometry(chain)
    assert (geometry is None) == (mode == "zeros")
    if geometry is not None:
        x = torch.randn(2, 3, 6, 7)
        with torch.no_grad():
            assert relative(merge_layers(chain, geometry)(x), nn.Sequential(*chain)(x)) < TOLERANCE


def test_linear_chain_on_3d_input_merges_with_its_biases():
    chain = [nn.Linear(6, 3), nn.Linear(3, 5), nn.Linear(5, 4)]
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        merged = merge_layers(chain, merged_geometry(chain))
        assert relative(merged(x), nn.Sequential(*chain)(x)) < TOLERANCE
    assert merged.weight.shape == (4, 6)


def test_without_an_example_input_the_split_with_fewest_macs_is_taken():
    """svd at a rank that saves MACs stays factorized; Tucker2 at full ranks costs more than the dense conv and
    is merged back; outputs are kept either way."""
    cheap = factorize(nn.Linear(64, 64), "svd", 8)
    costly = factorize(nn.Conv2d(16, 16, 3, padding=1), "tucker2", (16, 16))
    model = nn.Sequential(costly, nn.Flatten(), nn.Linear(16 * 25, 64), nn.ReLU(), cheap)
    x = torch.randn(3, 16, 5, 5)
    with torch.no_grad():
        optimized = optimize_for_inference(model, progress=False)
        assert relative(optimized(x), model.eval()(x)) < TOLERANCE
    assert isinstance(optimized[0], nn.Conv2d) and optimized[0].weight.shape == (16, 16, 3, 3)
    assert isinstance(optimized[4], nn.Sequential) and [f.weight.shape for f in optimized[4]] == [(8, 64), (64, 8)]


def test_merging_layers_draws_nothing_from_the_callers_rng():
    """The merged Conv2d and Linear are built without a random init: the caller's random stream goes on as if
    optimize_for_inference had not run."""
    model = nn.Sequential(factorize(nn.Conv2d(16, 16, 3, padding=1), "tucker2", (16, 16)), nn.Flatten(),
                          factorize(nn.Linear(16 * 25, 16), "svd", 16))
    state = torch.get_rng_state()
    optimized = optimize_for_inference(model, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert type(optimized[0]) is nn.Conv2d and type(optimized[2]) is nn.Linear


def test_a_plain_sequential_chain_is_merged_too():
    """What standardize_model leaves (an nn.Sequential of factor convs) merges like a factorized layer."""
    chain = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.Conv2d(8, 8, 1))
    model = nn.Sequential(chain, nn.ReLU())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        optimized = optimize_for_inference(model, progress=False)
        assert relative(optimized(x), model(x)) < TOLERANCE
    assert isinstance(optimized[0], nn.Conv2d)


@pytest.mark.parametrize("layer", [lambda: nn.Linear(8, 8, bias=False, dtype=torch.cfloat),
                                   lambda: nn.Conv2d(8, 8, 1, bias=False, dtype=torch.cfloat)])
def test_a_complex_chain_is_not_merged(layer):
    """Merged weights are multiplied in float64: a complex chain merged without an example input (nothing checks
    the result then) lost its imaginary parts, its output off by 0.7 (relative)."""
    model = nn.Sequential(nn.Sequential(layer(), layer()))
    x = torch.randn(2, 8, dtype=torch.cfloat)
    x = x if isinstance(model[0][0], nn.Linear) else x[:, :, None, None]
    with torch.no_grad():
        optimized = optimize_for_inference(model, progress=False)
        assert isinstance(optimized[0], nn.Sequential) and len(optimized[0]) == 2
        assert relative(optimized(x), model(x)) < TOLERANCE


def test_a_model_holding_torchscript_is_optimized_as_without_an_example_input():
    """A TorchScript module takes no hooks: with an example input, optimize_for_inference failed with a raw
    RuntimeError ('register_forward_pre_hook is not supported on ScriptModules'). A pass would not see what it
    reads either, so the rewrites are those made without one (a factorized layer still merges), then checked."""
    scripted = torch.jit.script(nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), scripted, factorize(nn.Conv2d(8, 8, 1), "svd", 8),
                          nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    optimized = optimize_for_inference(model, x, progress=False)
    assert isinstance(optimized[2], torch.jit.ScriptModule) and isinstance(optimized[3], nn.Conv2d)
    with torch.no_grad():
        assert relative(optimized(x), model(x)) < TOLERANCE


class SequentialsAsLists(nn.Module):
    """nn.Sequential containers of convolutions that the forward does not call whole: one indexed, with a
    non-linearity between its layers, one iterated, keeping an intermediate output."""

    def __init__(self):
        super().__init__()
        self.indexed = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
        self.iterated = nn.Sequential(nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        x = self.indexed[1](torch.relu(self.indexed[0](x)))
        for index, layer in enumerate(self.iterated):
            x = layer(x)
            if index == 1:
                skip = x
        return x + skip


def test_a_sequential_the_forward_indexes_or_iterates_is_not_merged():
    for optimized in optimized_both_ways(SequentialsAsLists(), torch.randn(2, 8, 6, 6)):
        assert len(optimized.indexed) == 2 and len(optimized.iterated) == 3


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization: a subclass whose ``_conv_forward`` computes with another weight than its own."""

    def _conv_forward(self, input, weight, bias):
        weight = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(input, weight / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5), bias)


class Pointwise(nn.Conv2d):
    """A 1x1 convolution with an __init__ of its own, computing what nn.Conv2d does."""

    def __init__(self, channels):
        super().__init__(channels, channels, 1, bias=False)


class DataDependent(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x)


def test_conv_subclasses_are_rewritten_only_when_they_compute_what_their_torch_class_does():
    """A weight-standardizing conv is neither merged, nor folded into, nor made a matrix product; a subclass that
    only has another __init__ is merged into a stock nn.Conv2d."""
    standardized = nn.Sequential(StandardizedConv2d(4, 8, 1, bias=False), StandardizedConv2d(8, 4, 3, padding=1))
    folded_into = DataDependent(StandardizedConv2d(4, 8, 3, padding=1), with_trained_statistics(nn.BatchNorm2d(8), 1))
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Sequential(Pointwise(8), Pointwise(8)))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        for model in (standardized, folded_into, plain):
            model.eval()
            for example in (None, x):
                assert relative(optimize_for_inference(model, example, progress=False)(x), model(x)) < TOLERANCE
        assert isinstance(optimize_for_inference(standardized, progress=False), nn.Sequential)
        assert isinstance(optimize_for_inference(folded_into, x, progress=False).body[1], nn.BatchNorm2d)
        assert type(optimize_for_inference(plain, progress=False)[2]) is nn.Conv2d
        pointwise = nn.Sequential(StandardizedConv2d(4, 8, 1)).eval().to(memory_format=torch.channels_last)
        assert type(pointwise_products(pointwise)[0]) is StandardizedConv2d


def test_hooks_on_a_chain_container_stay_where_they_are():
    """A hook on a plain Sequential chain or on a factorized layer would be dropped with the container."""
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1)))
    plain[2].register_forward_hook(lambda module, inputs, output: output * 2)
    compressed = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                               factorize(nn.Conv2d(16, 16, 3, padding=1), "tucker2", (16, 16)))
    seen = []
    compressed[2].register_forward_hook(lambda module, inputs, output: seen.append(output))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for model in (plain.eval(), compressed.eval()):
            expected = model(x)
            for example in (None, x):
                optimized = optimize_for_inference(model, example, progress=False)
                seen.clear()
                assert relative(optimized(x), expected) < TOLERANCE
    assert len(seen) == 1

# --- BatchNorm folding: where the data flow is certain ---------------------------------------------------------

class Attributes(nn.Module):
    """torchvision-style attribute layers: conv -> bn, linear -> bn (2-d), and a conv whose output is also
    read elsewhere (its BatchNorm must not fold)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = with_trained_statistics(nn.BatchNorm2d(8), 2)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = with_trained_statistics(nn.BatchNorm2d(8), 3)
        self.fc = nn.Linear(8, 6)
        self.fc_bn = with_trained_statistics(nn.BatchNorm1d(6), 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        z = self.shared(y)
        y = self.shared_bn(z) + z
        return self.fc_bn(self.fc(y.mean((2, 3))))


class Untraceable(Attributes):
    """Data-dependent control flow: torch.fx cannot trace it, so only the Sequential pair folds."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), with_trained_statistics(nn.BatchNorm2d(3), 5))

    def forward(self, x):
        x = self.block(x)
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


def test_traced_model_folds_every_pair_whose_output_is_only_normalized():
    model = Attributes()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        without_input = optimize_for_inference(model, progress=False)
        with_input = optimize_for_inference(model, x, progress=False)
        for optimized in (without_input, with_input):
            assert relative(optimized(x), expected) < TOLERANCE
    assert isinstance(without_input.bn, nn.Identity) and isinstance(with_input.bn, nn.Identity)
    assert isinstance(without_input.shared_bn, nn.BatchNorm2d) and isinstance(with_input.shared_bn, nn.BatchNorm2d)
    # BatchNorm1d after a Linear normalizes its features only on 2-d input: folded once the shape was seen
    assert isinstance(without_input.fc_bn, nn.BatchNorm1d) and isinstance(with_input.fc_bn, nn.Identity)


def test_untraceable_model_folds_inside_sequentials_only_where_a_pass_confirms_it():
    """Without a trace, a pair inside an nn.Sequential folds where a pass on the example input shows the container
    calling it; without an example input nothing shows that the forward does not also read the conv elsewhere."""
    model = Untraceable()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        confirmed = optimize_for_inference(model, x, progress=False)
        unconfirmed = optimize_for_inference(model, progress=False)
        for optimized in (confirmed, unconfirmed):
            assert relative(optimized(x), expected) < TOLERANCE
    assert isinstance(confirmed.block[1], nn.Identity) and isinstance(confirmed.bn, nn.BatchNorm2d)
    assert isinstance(unconfirmed.block[1], nn.BatchNorm2d) and isinstance(unconfirmed.bn, nn.BatchNorm2d)


class ByKeyword(nn.Module):
    """Calls its layers as ``layer(input=x)``; with ``branch``, data-dependent control flow torch.fx cannot trace."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = with_trained_statistics(nn.BatchNorm2d(8), 2)
        self.chain = factorize(nn.Conv2d(8, 8, 3, padding=1), "tucker2", (4, 4))

    def forward(self, x):
        if self.branch and x.sum() > 0:
            x = x * 2
        return self.chain(input=self.bn(input=self.conv(input=x)).relu())


@pytest.mark.parametrize("traceable", [True, False])
def test_layers_called_by_keyword_are_seen_like_positional_calls(monkeypatch, traceable):
    """The BatchNorm given the conv's output as ``input=`` folds where the trace shows the pair (outside an
    nn.Sequential an untraceable model folds nothing), and the chain is timed at the input it gets as ``input=``."""
    timed = []

    def fake_timing(modules, input_shape, **options):
        timed.append(tuple(input_shape))
        return [1.0] * len(modules)

    monkeypatch.setattr(musco_core.inference, "_channels_last_is_faster", lambda model, x: False)
    monkeypatch.setattr(musco_core.inference, "time_modules_at", fake_timing)
    model = ByKeyword(branch=not traceable).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        optimized = optimize_for_inference(model, x, progress=False)
        assert relative(optimized(x), model(x)) < TOLERANCE
    assert isinstance(optimized.bn, nn.Identity if traceable else nn.BatchNorm2d)
    assert timed == [(2, 8, 6, 6)]


class SideReads(nn.Module):
    """Untraceable (data-dependent branch), with a Sequential(conv, bn) whose conv the forward also calls alone,
    and a Sequential(conv, bn, relu) it runs layer by layer, returning every layer's output."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), with_trained_statistics(nn.BatchNorm2d(4), 1))
        self.features = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), with_trained_statistics(nn.BatchNorm2d(4), 2),
                                      nn.ReLU())

    def forward(self, x):
        if x.mean() > 10:
            x = x / 2
        y = self.block(x) + self.block[0](x)
        outputs = []
        for layer in self.features:
            y = layer(y)
            outputs.append(y)
        return outputs


def test_untraceable_model_keeps_pairs_whose_conv_output_is_read_elsewhere():
    for optimized in optimized_both_ways(SideReads(), torch.randn(2, 4, 6, 6)):
        assert isinstance(optimized.block[1], nn.BatchNorm2d) and isinstance(optimized.features[1], nn.BatchNorm2d)


class KeepsFeatures(nn.Module):
    """Keeps the conv's output on the module for whoever reads it after the call (a feature extractor)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), with_trained_statistics(nn.BatchNorm2d(4), 12)

    def forward(self, x):
        self.features = self.conv(x)
        return self.bn(self.features)


def test_a_conv_output_the_forward_keeps_on_the_model_is_not_folded(caplog):
    # the trace shows the BatchNorm as the only reader: without an example input the pair folded, and
    # model.features held the normalized tensor (3.6 relative off the conv's output)
    caplog.set_level(logging.INFO, logger="musco_core.dataflow")
    model, x = KeepsFeatures().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        for optimized in optimized_both_ways(model, x):
            optimized(x)
            assert isinstance(optimized.bn, nn.BatchNorm2d) and relative(optimized.features, model.features) < TOLERANCE
    assert "keeps values on the model (features)" in caplog.text


class OptionalSkip(nn.Module):
    """forward(x, skip=None): a trace gives ``skip`` a proxy, so ``skip is not None`` holds there; called without
    it, the model also returns the conv's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = with_trained_statistics(nn.BatchNorm2d(8), 1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is not None:
            return self.bn(y) + skip
        return self.bn(y), y


class TypeBranch(nn.Module):
    """A trace's proxy is no torch.Tensor: the trace takes the branch where only the BatchNorm reads the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = with_trained_statistics(nn.BatchNorm2d(8), 1)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return self.bn(self.conv(x))
        y = self.conv(x)
        return self.bn(y) + y


def test_a_trace_that_takes_another_branch_than_the_call_folds_nothing_it_shows_alone():
    """An optional argument is traced both given and left out (without an example input) or as the example input
    leaves it; the pass on the example input shows what a trace cannot (here the isinstance branch)."""
    x = torch.randn(2, 3, 8, 8)
    optional, branching = OptionalSkip().eval(), TypeBranch().eval()
    for optimized in optimized_both_ways(optional, x):
        assert isinstance(optimized.bn, nn.BatchNorm2d)
    with torch.no_grad():
        optimized = optimize_for_inference(branching, x, progress=False)
        assert relative(optimized(x), branching(x)) < TOLERANCE
    assert isinstance(optimized.bn, nn.BatchNorm2d)


class Siamese(nn.Module):
    """Two convolutions sharing one weight, each with its BatchNorm; a Linear whose weight a second one shares."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.right.weight = self.left.weight
        self.left_bn = with_trained_statistics(nn.BatchNorm2d(8), 1)
        self.right_bn = with_trained_statistics(nn.BatchNorm2d(8), 2)
        self.encode, self.decode = nn.Linear(8, 8), nn.Linear(8, 8)
        self.decode.weight = self.encode.weight
        self.encode_bn = with_trained_statistics(nn.BatchNorm1d(8), 3)

    def forward(self, x):
        y = (self.left_bn(self.left(x)) + self.right_bn(self.right(x))).mean((2, 3))
        return self.decode(torch.relu(self.encode_bn(self.encode(y))))


def test_layers_sharing_a_parameter_with_another_module_are_left_alone():
    """Folding writes the layer's weight: the other holder of that weight would change too."""
    for optimized in optimized_both_ways(Siamese(), torch.randn(2, 3, 8, 8)):
        assert not any(isinstance(m, nn.Identity) for m in optimized.modules())
        assert optimized.left.weight is optimized.right.weight


class ViewTied(nn.Module):
    """A Linear whose weight is another Parameter over the memory of the conv's weight (a view of it)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), with_trained_statistics(nn.BatchNorm2d(4), 11)
        self.fc = nn.Linear(4, 4)
        self.fc.weight = nn.Parameter(self.conv.weight.view(4, 4))

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("example", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_whose_weight_another_parameter_views_is_tied_and_not_folded(example, inplace):
    # the fold wrote the conv's weight in place, which rewrote the Linear's too: outputs off by 0.8 (relative);
    # the check, on a deep copy (which did not share the memory), passed. Then the fold gave the conv new
    # weights: outputs right, but the Linear no longer trained with the conv, silently
    model, x = ViewTied().eval(), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x)
        optimized = optimize_for_inference(model, x if example else None, inplace=inplace, progress=False)
        assert isinstance(optimized.bn, nn.BatchNorm2d) and relative(optimized(x), expected) < TOLERANCE
    assert optimized.fc.weight.untyped_storage().data_ptr() == optimized.conv.weight.untyped_storage().data_ptr()


class ParameterNorm(nn.Module):
    """Reads its conv's parameters through ``.parameters()`` in the forward (a trace sees a constant), and a
    non-tensor attribute of its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = with_trained_statistics(nn.BatchNorm2d(8), 1)
        self.head_conv = nn.Conv2d(8, 8, 1)
        self.head_bn = with_trained_statistics(nn.BatchNorm2d(8), 2)

    def forward(self, x):
        scale = sum(p.abs().sum() for p in self.conv.parameters())
        y = self.head_bn(self.head_conv(self.bn(self.conv(x)) * scale))
        return y.flatten(2).mean(-1).reshape(-1, self.head_bn.num_features)


def test_parameters_read_outside_their_layer_keep_it_unfolded_and_tracing_leaves_the_model_as_it_was():
    model = ParameterNorm().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        with_input = optimize_for_inference(model, x, progress=False)
        assert relative(with_input(x), expected) < TOLERANCE
        assert isinstance(with_input.bn, nn.BatchNorm2d) and isinstance(with_input.head_bn, nn.Identity)
        # without an example input, the constant in the trace leaves the data flow unknown: nothing folds
        without_input = optimize_for_inference(model, inplace=True, progress=False)
        assert without_input is model and relative(model(x), expected) < TOLERANCE
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.head_bn, nn.BatchNorm2d)
    assert not [name for name in vars(model) if name.startswith("_tensor_constant")]
    copy.deepcopy(model)  # a non-leaf tensor left on the model by tracing made it impossible to copy


def test_an_untraceable_model_is_reported_at_info_once_per_class(caplog):
    class UntraceableOnce(Untraceable):  # a class of its own: the once-per-class record is per process
        pass

    caplog.set_level(logging.DEBUG, logger="musco_core.dataflow")
    for _ in range(3):
        optimize_for_inference(UntraceableOnce(), progress=False)
    said = [record.levelno for record in caplog.records if "cannot be traced" in record.getMessage()]
    assert said == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert "UntraceableOnce model" in caplog.records[0].getMessage()


def test_batchnorm_without_running_statistics_and_a_layer_used_twice_are_left_alone():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4, track_running_stats=False), conv,
                          with_trained_statistics(nn.BatchNorm2d(4), 6))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model.eval()(x)
        optimized = optimize_for_inference(model, progress=False)
        assert relative(optimized(x), expected) < TOLERANCE
    assert all(isinstance(m, nn.BatchNorm2d) for m in (optimized[1], optimized[3]))


@pytest.mark.parametrize("example", [False, True])
def test_a_fold_whose_weights_overflow_the_layers_dtype_is_left_out(example):
    # the float16 conv weight 1.0 times the BatchNorm's scale 1000 / sqrt(1e-4 + 1e-5) = 95346 is inf in float16,
    # while the model scales the conv's small output (343 at most here); the float32 check does not see it
    conv, batchnorm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        batchnorm.running_var.fill_(1e-4)
        batchnorm.weight.fill_(1000.0)
    model = nn.Sequential(conv, batchnorm).half().eval()
    x = torch.full((1, 4, 6, 6), 1e-4).half()
    with torch.no_grad():
        expected = model(x)
        optimized = optimize_for_inference(model, x if example else None, progress=False)
        assert expected.isfinite().all() and relative(optimized(x).float(), expected.float()) < 1e-3
    assert isinstance(optimized[1], nn.BatchNorm2d)


def test_fold_weights_are_made_once_per_fold_without_an_example_input(monkeypatch):
    """The dtype check made each whole folded weight too: 0.41 s of ResNet-50's 1.18 s without an example input."""
    made, real = [], musco_core.inference.folded_weights
    monkeypatch.setattr(musco_core.inference, "folded_weights",
                        lambda weight, *rest: made.append(tuple(weight.shape)) or real(weight, *rest))
    model = nn.Sequential(nn.Conv2d(4, 8, 3), with_trained_statistics(nn.BatchNorm2d(8), 1)).eval()
    assert isinstance(optimize_for_inference(model, progress=False)[1], nn.Identity)
    assert made.count((8, 4, 3, 3)) == 1


@pytest.mark.parametrize("gain", [65504.0, 65519.0, 65520.0, 1e5, float("nan")])
def test_the_fold_check_from_channel_maxima_agrees_with_the_whole_folded_weight(gain):
    # float16's largest is 65504; 65520 and above round to inf
    conv, batchnorm = nn.Conv2d(2, 3, 3).half(), nn.BatchNorm2d(3, eps=0.0).half().eval()
    with torch.no_grad():
        conv.weight.uniform_(-1, 1)
        conv.weight[1, 0, 1, 1] = -1.0
        batchnorm.weight[1] = gain
    whole = musco_core.inference.folded_weights(conv.weight, conv.bias, *musco_core.inference.batchnorm_affine(
        batchnorm))
    expected = all(bool(t.half().isfinite().all()) for t in whole)
    assert musco_core.inference._fold_fits_dtype(conv, batchnorm) == expected == (gain < 65520)


@pytest.mark.parametrize("example", [False, True])
def test_a_merge_whose_weights_overflow_the_layers_dtype_is_left_out(example):
    # the product of two float16 convs, 2 channels x 300 x 300 = 180000, is inf in float16, while the chain's own
    # output is finite; the float32 check does not see it
    chain = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 3, padding=1, bias=False))
    with torch.no_grad():
        chain[0].weight.fill_(300.0)
        chain[1].weight.fill_(300.0)
    model = nn.Sequential(chain).half().eval()
    x = torch.full((1, 2, 6, 6), 1e-3).half()
    with torch.no_grad():
        expected = model(x)
        optimized = optimize_for_inference(model, x if example else None, progress=False)
        assert expected.isfinite().all() and relative(optimized(x).float(), expected.float()) < 1e-3
    assert len(optimized[0]) == 2


@pytest.mark.parametrize("with_example", [False, True])
def test_global_module_hooks_leave_the_model_as_it_is(caplog, with_example):
    # a global hook runs on every module call: folding took the BatchNorm's call away, outputs 0.49 off (relative)
    model, x = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), with_trained_statistics(nn.BatchNorm2d(4), 13)), \
        torch.randn(2, 4, 6, 6)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output + 1 if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) else output)
    try:
        with torch.no_grad():
            expected = model.eval()(x)
            optimized = optimize_for_inference(model, x if with_example else None, progress=False)
            assert relative(optimized(x), expected) < TOLERANCE
    finally:
        handle.remove()
    assert isinstance(optimized[1], nn.BatchNorm2d) and "hooks for every module are registered" in caplog.text


def test_input_model_is_untouched_unless_inplace():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), with_trained_statistics(nn.BatchNorm2d(4), 7)).train()
    state = copy.deepcopy(model.state_dict())
    optimized = optimize_for_inference(model, progress=False)
    assert not optimized.training and model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert optimize_for_inference(model, inplace=True, progress=False) is model
    assert isinstance(model[1], nn.Identity) and not model.training



class ScalesItsInput(nn.Module):
    """Scales its input in place (as a forward that normalizes with ``x.mul_``): each call records the norm it got."""

    seen: list[float] = []  # on the class, so that the copies optimize_for_inference makes record here too

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), with_trained_statistics(nn.BatchNorm2d(4), 9)

    def forward(self, x):
        ScalesItsInput.seen.append(float(x.norm()))
        return self.bn(self.conv(x.mul_(0.5)))


def test_every_call_on_the_example_input_gets_it_as_the_caller_passed_it():
    # observing, timing and checking called the model on the caller's tensor itself: it came back scaled to 0
    x = torch.randn(2, 3, 8, 8)
    before = x.clone()
    ScalesItsInput.seen.clear()
    optimize_for_inference(ScalesItsInput(), x, progress=False)
    assert torch.equal(x, before)
    assert len(ScalesItsInput.seen) > 3 and set(ScalesItsInput.seen) == {float(before.norm())}

# --- the measured path and deployment ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compressed_resnet():
    """A small ResNet with trained BatchNorm statistics and svd, tucker2, cp3 and cp4 layers."""
    model = make_trained_like(resnet18(num_classes=10, width=16), seed=1)
    for index, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with_trained_statistics(module, 10 + index)
    schedule = {"layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8]]},
                "layer2.0.conv2": {"decomposition": "cp3", "rank_selection": "manual", "manual_rank": [24]},
                "layer3.0.conv2": {"decomposition": "cp4", "rank_selection": "manual", "manual_rank": [24]},
                "layer2.0.downsample.0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8]},
                "fc": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}
    compressor = Compressor(model.eval(), model_compr_kwargs=schedule, ft_every=5, progress=False)
    compressor.compression_step()
    return compressor.compressed_model.train()  # optimized as its eval-mode self


def test_measured_optimization_keeps_outputs_and_exports(compressed_resnet, tmp_path):
    import onnxruntime

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(compressed_resnet).eval()(x)
        optimized = optimize_for_inference(compressed_resnet, x, threads=1, progress=False)
        assert relative(optimized(x), expected) < TOLERANCE
    assert not optimized.training
    assert not any(isinstance(m, (FactorizedLayer, nn.BatchNorm2d)) for m in optimized.modules())

    torch.save(optimized.state_dict(), tmp_path / "weights.pt")
    reloaded = copy.deepcopy(optimized)
    for parameter in reloaded.parameters():
        parameter.data.zero_()
    reloaded.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(reloaded(x), optimized(x))

    with torch.no_grad(), pytest.warns(DeprecationWarning):
        traced = torch.jit.trace(optimized, x)
    torch.testing.assert_close(traced(x), optimized(x))
    exported = torch.export.export(optimized, (x,))
    torch.testing.assert_close(exported.module()(x), optimized(x))
    program = torch.onnx.export(optimized, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(onnx_out, expected.numpy(), rtol=1e-4, atol=1e-5)


class FlattensWithView(nn.Module):
    """``x.view(batch, -1)`` after a convolution: no such view of a channels_last tensor exists."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5)
        self.fc = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class Video(nn.Module):
    """A Conv3d (5-d weight) before a Conv2d: Module.to(memory_format=torch.channels_last) refuses the model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.stem(x).mean(2))


@pytest.mark.parametrize("model, x", [(FlattensWithView(), torch.randn(2, 1, 12, 12)),
                                      (Video(), torch.randn(1, 3, 4, 8, 8))])
def test_channels_last_forms_that_cannot_be_made_or_run_are_no_candidates(monkeypatch, model, x):
    monkeypatch.setattr(musco_core.inference, "time_modules", lambda modules, *args, **options: [
        1.0, *(0.1 for _ in modules[1:])])  # channels_last wins wherever it runs
    model.eval()
    with torch.no_grad():
        optimized = optimize_for_inference(model, x, progress=False)
        assert relative(optimized(x), model(x)) < TOLERANCE
    assert optimized.conv.weight.is_contiguous() if isinstance(model, FlattensWithView) else \
        optimized.head.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_rewrite_that_changes_the_outputs_on_the_example_input_is_dropped_with_a_warning(monkeypatch, caplog):
    """The check on the example input catches what the data flow missed (here: made to miss), dropping BatchNorm
    folding first, then every rewrite."""
    monkeypatch.setattr(musco_core.inference, "_pass_confirms_pair", lambda observed, layer, batchnorm: True)
    monkeypatch.setattr(musco_core.inference, "_called_whole", lambda trace, container: True)
    monkeypatch.setattr(musco_core.inference, "_pass_confirms_chain", lambda observed, container: True)
    caplog.set_level(logging.WARNING, logger="musco_core.inference")
    x = torch.randn(2, 3, 8, 8)
    branching = TypeBranch().eval()
    with torch.no_grad():
        optimized = optimize_for_inference(branching, x, progress=False)
        assert relative(optimized(x), branching(x)) < TOLERANCE
    assert isinstance(optimized.bn, nn.BatchNorm2d)
    assert [record.getMessage().split(":")[1].strip() for record in caplog.records] == ["BatchNorm folding not applied"]
    assert "the model so optimized changes the output by" in caplog.records[0].getMessage()

    caplog.clear()
    listed = SequentialsAsLists().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        optimized = optimize_for_inference(listed, x, progress=False)
        assert relative(optimized(x), listed(x)) < TOLERANCE
    assert len(optimized.indexed) == 2 and len(optimized.iterated) == 3
    (record,) = caplog.records
    assert "chain merging, channels_last and 1x1 convolutions as matrix products not applied" in record.getMessage()
    assert "raises TypeError" in record.getMessage()  # a merged Sequential cannot be indexed


def test_an_example_input_the_model_cannot_take_gets_one_clear_error():
    # was the forward's raw RuntimeError, raised from inside the observing hooks
    with pytest.raises(ConfigError, match=r"example input of float32 \(1, 4, 8, 8\): the model's forward raised "
                                          r"RuntimeError: .*3 channels"):
        optimize_for_inference(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 4, 8, 8), progress=False)


def _meta_friendly(device: str = "cpu") -> nn.Module:
    """A factorized conv, a BatchNorm after it, a classifier: on ``device`` (``meta``: shapes without values)."""
    torch.manual_seed(0)
    return nn.Sequential(factorize(nn.Conv2d(3, 8, 3, padding=1), "tucker2", (4, 2)), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(device)


@pytest.mark.parametrize("on_meta", ["model", "input"])
def test_an_example_input_beside_meta_tensors_is_one_clear_error(caplog, on_meta):
    """Nothing to time or check: the comparison failed on meta and was logged as 'the model so optimized raises',
    and the model came back with no rewrite."""
    model = _meta_friendly("meta" if on_meta == "model" else "cpu")
    x = torch.randn(1, 3, 6, 6, device="meta" if on_meta == "input" else "cpu")
    caplog.clear()
    with pytest.raises(ConfigError, match=r"optimize_for_inference: .*on the meta device.*example_input=None"):
        optimize_for_inference(model, x, progress=False)
    assert not caplog.records


def test_the_state_dict_loads_into_the_architecture_optimized_on_meta_without_an_example_input():
    """What the documentation promises: without an example input the form follows from the structure."""
    model = _meta_friendly()
    with_trained_statistics(model[1], 3)
    optimized = optimize_for_inference(model, progress=False)
    skeleton = optimize_for_inference(_meta_friendly("meta"), progress=False)
    assert isinstance(skeleton[1], nn.Identity)  # folded, and merged alike
    skeleton.load_state_dict(optimized.state_dict(), assign=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(skeleton(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_failure_leaves_the_model_as_it_was_also_in_place():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), with_trained_statistics(nn.BatchNorm2d(4), 7)).train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError):
        optimize_for_inference(model, torch.randn(2, 5, 8, 8), inplace=True, progress=False)  # 5 channels: no fit
    assert model.training and all(m.training for m in model.modules())
    assert isinstance(model[1], nn.BatchNorm2d) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_optimized_model_compiles():
    model = nn.Sequential(factorize(nn.Conv2d(4, 6, 3, padding=1), "tucker2", (3, 3)),
                          with_trained_statistics(nn.BatchNorm2d(6), 8), nn.ReLU())
    x = torch.randn(1, 4, 6, 6)
    optimized = optimize_for_inference(model, progress=False)
    with torch.no_grad():
        compiled = torch.compile(optimized)
        assert relative(compiled(x), model.eval()(x)) < TOLERANCE


# --- 1x1 convolutions as matrix products ----------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_computes_the_convolution_with_its_parameters(bias):
    conv = nn.Conv2d(6, 5, 1, bias=bias).double()
    pointwise = PointwiseConv2d.from_conv(conv)
    assert pointwise.weight is conv.weight and pointwise.bias is conv.bias
    x = torch.randn(2, 6, 4, 7, dtype=torch.float64)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for inputs in (x, channels_last, x[0], x[:, :, :1, :1]):
        torch.testing.assert_close(pointwise(inputs), conv(inputs))
    assert pointwise(channels_last).is_contiguous(memory_format=torch.channels_last)
    plain = nn.Conv2d(6, 5, 1, bias=bias).double()
    plain.load_state_dict(pointwise.state_dict())  # same keys and shapes: loads into a stock Conv2d
    torch.testing.assert_close(plain(x), conv(x))


class PointwiseCases(nn.Module):
    """1x1 convolutions that a matrix product reproduces (one held under two names), and ones it does not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.again = self.pointwise
        self.no_bias = nn.Conv2d(8, 16, 1, bias=False, padding="same")
        self.strided = nn.Conv2d(16, 16, 1, stride=2)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.hooked = nn.Conv2d(16, 16, 1)
        self.hooked.register_forward_hook(lambda module, inputs, output: output * 2)

    def forward(self, x):
        x = self.again(torch.relu(self.pointwise(self.stem(x))))
        return self.hooked(self.grouped(self.strided(self.no_bias(x))))


@pytest.mark.parametrize("faster", [True, False])
def test_1x1_convolutions_become_matrix_products_where_timed_faster(monkeypatch, faster):
    """With channels_last chosen, every stock 1x1 convolution the product reproduces is timed once per geometry
    and replaced when the product is measurably faster; the rest are never candidates."""
    timed = []

    def fake_timing(modules, input_shape, **options):
        timed.append((tuple(modules[0].weight.shape), tuple(input_shape)))
        assert options["channels_last"] and isinstance(modules[1], PointwiseConv2d)
        return [1.0, 0.5 if faster else 0.99]

    monkeypatch.setattr(musco_core.inference, "_channels_last_is_faster", lambda model, x: True)
    monkeypatch.setattr(musco_core.inference, "time_modules_at", fake_timing)
    model = PointwiseCases().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        optimized = optimize_for_inference(model, x, progress=False)
        assert relative(optimized(x), model(x)) < TOLERANCE
    assert sorted(timed) == [((8, 8, 1, 1), (2, 8, 6, 6)), ((16, 8, 1, 1), (2, 8, 6, 6))]
    replaced = {name for name, m in optimized.named_modules(remove_duplicate=False)
                if isinstance(m, PointwiseConv2d)}
    assert replaced == ({"pointwise", "again", "no_bias"} if faster else set())
    assert optimized.pointwise is optimized.again
    assert optimized.stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_pointwise_products_turns_every_reproducible_1x1_convolution_into_a_matrix_product():
    model = PointwiseCases().eval()
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        products = pointwise_products(copy.deepcopy(model).to(memory_format=torch.channels_last))
        assert relative(products(x), expected) < TOLERANCE
    replaced = {name for name, m in products.named_modules(remove_duplicate=False) if isinstance(m, PointwiseConv2d)}
    assert replaced == {"pointwise", "again", "no_bias"} and products.pointwise is products.again


@pytest.mark.parametrize("times, chosen", [([1.0, 0.99, 0.5], True), ([1.0, 0.5, 0.99], True),
                                           ([1.0, 0.99, 0.99], False)])
def test_channels_last_is_chosen_when_it_wins_alone_or_with_matrix_products(monkeypatch, times, chosen):
    """channels_last alone can tie with the model's format and still win once its 1x1 convolutions are matrix
    products (which only it allows): the memory format is chosen on both."""
    timed = []

    def fake_timing(modules, example_input, **options):
        timed.append(modules)
        return times

    monkeypatch.setattr(musco_core.inference, "time_modules", fake_timing)
    model = PointwiseCases().eval()
    assert musco_core.inference._channels_last_is_faster(model, torch.randn(2, 3, 6, 6)) is chosen
    as_is, channels_last, products = timed[0]
    assert as_is is model and channels_last.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(products.pointwise, PointwiseConv2d) and not isinstance(channels_last.pointwise, PointwiseConv2d)


def test_model_with_matrix_products_traces_exports_and_compiles():
    import onnxruntime

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), PointwiseConv2d.from_conv(nn.Conv2d(8, 4, 1)))
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
        torch.testing.assert_close(torch.compile(model)(x), expected)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert [node.op_type for node in program.model_proto.graph.node].count("Conv") == 2  # ONNX Runtime's layout
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(onnx_out, expected.numpy(), rtol=1e-4, atol=1e-5)


# --- timing helpers (the protocol, not the figures) -------------------------------------------------------------

def test_time_alternated_runs_each_candidate_in_rotating_rounds():
    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")]
    medians = time_alternated(calls, warmup=1, min_rounds=4, max_rounds=4, min_seconds=0.0)
    assert len(medians) == 3 and all(m >= 0 for m in medians)
    assert order[:3] == ["a", "b", "c"]  # warm-up
    rounds = [order[3 + 3 * i:6 + 3 * i] for i in range(4)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"] and all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_time_modules_copies_the_input_outside_the_time_it_reports(monkeypatch):
    """Each call's fresh copy of the input was timed with it (0.1-0.3% of a pass at the documented sizes). A fake
    clock: a copy costs 1 s, the module 0.25 s."""
    import types

    import musco_core.timing as timing

    now = [0.0]
    copy_input = timing.fresh_copy

    def costly_copy(x):
        now[0] += 1.0
        return copy_input(x)

    class Doubling(nn.Module):
        def forward(self, x):
            now[0] += 0.25
            return x.mul_(2)

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(timing, "fresh_copy", costly_copy)
    x = torch.ones(3)
    assert timing.time_modules([Doubling(), Doubling()], x, warmup=1, min_rounds=3, max_rounds=3,
                               min_seconds=0.0) == [0.25, 0.25]
    assert torch.equal(x, torch.ones(3))  # every call on a copy


def test_time_modules_at_an_input_shape_in_channels_last():
    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(5, 2).double()
    (median,) = time_modules_at([conv], (2, 3, 8, 8), channels_last=True, warmup=0, min_rounds=2, max_rounds=2,
                                min_seconds=0.0)
    assert median > 0 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(time_modules_at([linear, linear], (4, 7, 5), dtype=torch.float64, min_rounds=1, min_seconds=0.0)) == 2


def test_fixed_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with fixed_threads(1) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        with fixed_threads(0):
            pass


# --- start-up: no torch._dynamo -----------------------------------------------------------------------------------

def test_statistics_compression_and_optimization_do_not_import_dynamo():
    """Counting FLOPs with FlopCounterMode imports torch._dynamo (seconds); the default path must not."""
    script = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        import musco_core
        from musco_core import Compressor, ModelStats, default_registry, optimize_for_inference
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
        x = torch.randn(1, 3, 8, 8)
        stats = ModelStats.from_model(model, default_registry(), x)
        assert stats.total_macs > 0 and stats.total_flops is None
        compressor = Compressor(model, example_input=x, config_type="vbmf", ft_every=10, progress=False)
        compressor.compression_step()
        optimize_for_inference(compressor.compressed_model, progress=False)
        print("torch._dynamo" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


class NoisyInEval(nn.Module):
    """Draws noise in eval mode too: the check compares its runs under one seed."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), with_trained_statistics(nn.BatchNorm2d(4), 8)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.randn(1)


def test_a_model_drawing_noise_in_eval_is_still_optimized_and_the_callers_rng_is_left_alone(caplog):
    caplog.set_level(logging.WARNING, logger="musco_core.inference")
    model, x = NoisyInEval().eval(), torch.randn(2, 3, 8, 8)
    state = torch.get_rng_state()
    optimized = optimize_for_inference(model, x, progress=False)
    assert isinstance(optimized.bn, nn.Identity) and not caplog.records
    assert torch.equal(torch.get_rng_state(), state)  # the observing and timing calls drew from it
