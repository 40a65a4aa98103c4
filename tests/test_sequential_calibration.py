"""Sequential (error-feedback) calibration: the data-aware layers of a step are compressed in forward order, each
fitted on the inputs it gets with the layers ahead already compressed, to the outputs it had before the step."""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from torch import nn

from musco_core import Compressor, ConfigError, calibration, run
from musco_core.calibration import (collect_input_stats, collect_sequential_stats, forward_order, input_features,
                                    layer_dataflow)
from musco_plugins import factorize


def test_the_cross_fit_at_full_rank_is_the_least_squares_map():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    reference = torch.randn(400, 5, generator=generator, dtype=torch.float64)
    actual = reference + 0.3 * torch.randn(400, 5, generator=generator, dtype=torch.float64)  # upstream error
    second, cross = actual.T @ actual / 400, reference.T @ actual / 400
    left, right = factorize.whitened_truncated_svd(weight, second, 5, damping=0.0, cross_moment=cross)
    least_squares = torch.linalg.lstsq(actual, reference @ weight.T).solution.T
    torch.testing.assert_close(left @ right, least_squares, rtol=1e-8, atol=1e-8)


def test_without_upstream_error_the_cross_fit_is_the_plain_whitened_fit():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                      dtype=torch.float64)
    second = x.T @ x / 300
    plain = factorize.whitened_truncated_svd(weight, second, 3, damping=0.0)
    crossed = factorize.whitened_truncated_svd(weight, second, 3, damping=0.0, cross_moment=second)
    torch.testing.assert_close(plain[0] @ plain[1], crossed[0] @ crossed[1], rtol=1e-9, atol=1e-9)


def test_the_cross_fit_keeps_the_layer_in_input_directions_the_calibration_data_never_excites():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    span = torch.linalg.qr(torch.randn(8, 4, generator=generator, dtype=torch.float64)).Q  # the inputs' subspace
    reference = torch.randn(5, 4, generator=generator, dtype=torch.float64) @ span.T  # fewer rows than inputs
    unseen = torch.linalg.qr(torch.cat([span, torch.randn(8, 4, generator=generator, dtype=torch.float64)], 1)
                             ).Q[:, 4:]
    for actual in (reference, reference + 0.3 * torch.randn(5, 4, generator=generator, dtype=torch.float64) @ span.T):
        second, cross = actual.T @ actual / 5, reference.T @ actual / 5
        left, right = factorize.whitened_truncated_svd(weight, second, 6, cross_moment=cross)  # full rank
        torch.testing.assert_close((left @ right) @ unseen, weight @ unseen, rtol=1e-6, atol=1e-6)
        if actual is reference:  # no upstream error: the layer itself
            torch.testing.assert_close(left @ right, weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_the_cross_fit_minimises_the_error_against_the_reference_outputs(rank):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    reference = torch.randn(500, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 2, 6)
    actual = reference @ (torch.eye(6, dtype=torch.float64) + 0.2 * torch.randn(6, 6, generator=generator,
                                                                               dtype=torch.float64))
    second, cross = actual.T @ actual / 500, reference.T @ actual / 500

    def error(left, right):
        return float((reference @ weight.T - actual @ (left @ right).T).square().mean())

    fitted = error(*factorize.whitened_truncated_svd(weight, second, rank, damping=0.0, cross_moment=cross))
    naive = error(*factorize.whitened_truncated_svd(weight, second, rank, damping=0.0))
    assert fitted < naive
    for _ in range(20):  # no nearby rank-r map does better
        left = torch.randn(7, rank, generator=generator, dtype=torch.float64)
        right = torch.randn(rank, 6, generator=generator, dtype=torch.float64)
        best = factorize.whitened_truncated_svd(weight, second, rank, damping=0.0, cross_moment=cross)
        assert error(best[0] + 1e-3 * left, best[1] + 1e-3 * right) >= fitted - 1e-12


class Reordered(nn.Module):
    """Its modules are defined in another order than it runs them."""

    def __init__(self):
        super().__init__()
        self.last = nn.Linear(16, 4)
        self.middle = nn.Linear(16, 16)
        self.first = nn.Linear(8, 16)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def batches(n=4, seed=3):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, 8, generator=generator)
    return [torch.randn(16, 8, generator=generator) @ mixing for _ in range(n)]


def test_forward_order_is_the_order_the_model_runs_its_layers():
    assert forward_order(Reordered(), ["last", "middle", "first"], batches()) == ["first", "middle", "last"]


def test_sequential_statistics_pair_the_inputs_before_and_after_the_replacements(registry):
    torch.manual_seed(0)
    model = Reordered().eval()
    replacement = nn.Linear(8, 16)
    data = batches()
    stats = collect_sequential_stats(model, {"middle": registry.adapters.get("linear").read(model.middle)[0]},
                                     {"first": replacement}, data, progress=False)["middle"]
    with torch.no_grad():
        reference = torch.cat([torch.relu(model.first(x)) for x in data])
        actual = torch.cat([torch.relu(replacement(x)) for x in data])
    torch.testing.assert_close(stats.second_moment, (actual.T.double() @ actual.double()) / len(actual))
    torch.testing.assert_close(stats.cross_moment, (reference.T.double() @ actual.double()) / len(actual))
    assert stats.count == len(actual)
    assert model.first is not replacement  # the model is as it was


class Augmented(torch.utils.data.Dataset):
    """Each item drawn with fresh random noise, as a random augmentation does."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index] + torch.randn(self.items[index].shape)


def test_sequential_statistics_pair_each_batch_with_itself_under_shuffling_and_augmentation(registry):
    torch.manual_seed(0)
    model = Reordered().eval()
    spec = registry.adapters.get("linear").read(model.middle)[0]
    items = torch.cat(batches())
    loader = torch.utils.data.DataLoader(Augmented(items), batch_size=16, shuffle=True)
    same = copy.deepcopy(model.first)  # the reference and actual inputs of one batch are then equal
    stats = collect_sequential_stats(model, {"middle": spec}, {"first": same}, loader, progress=False)["middle"]
    torch.testing.assert_close(stats.cross_moment, stats.second_moment, rtol=0, atol=0)
    replacement = nn.Linear(8, 16)
    shuffled = collect_sequential_stats(model, {"middle": spec}, {"first": replacement},
                                        torch.utils.data.DataLoader(items, batch_size=16, shuffle=True),
                                        progress=False)["middle"]
    ordered = collect_sequential_stats(model, {"middle": spec}, {"first": replacement}, batches(),
                                       progress=False)["middle"]
    torch.testing.assert_close(shuffled.cross_moment, ordered.cross_moment)  # sums over the same rows


class Drained:
    """Re-iterable calibration data that runs dry once ``drained`` is set."""

    def __init__(self, items):
        self.items, self.drained = items, False

    def __iter__(self):
        return iter([] if self.drained else self.items)


def test_empty_calibration_data_under_sequential_calibration_is_one_clear_error():
    schedule = {"version": 1, "settings": {"ft_every": 2, "nglobal_compress_iters": 2},
                "layers": {"0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [12, 6]},
                           "2": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [12, 6]}}}
    with pytest.raises(ConfigError, match="calibration data is empty: no batch to collect the input statistics "
                                          "of '0', '2'"):
        Compressor(mlp(), model_compr_kwargs=schedule, calibration_data=[], progress=False).compression_step()
    data = Drained([torch.randn(16, 32, generator=torch.Generator().manual_seed(4)) for _ in range(2)])
    compressor = Compressor(mlp(), model_compr_kwargs=schedule, calibration_data=data, progress=False)
    compressor.compression_step()
    data.drained = True
    with pytest.raises(ConfigError, match="calibration data is empty"):
        compressor.compression_step()


def test_sequential_statistics_of_a_convolution_use_its_input_features(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)).eval()
    spec = registry.adapters.get("conv").read(model[2])[0]
    replacement = nn.Conv2d(3, 8, 3, padding=1)
    data = [torch.randn(2, 3, 10, 10) for _ in range(2)]
    stats = collect_sequential_stats(model, {"2": spec}, {"0": replacement}, data, progress=False)["2"]
    with torch.no_grad():
        reference = torch.cat([input_features(spec, torch.relu(model[0](x))) for x in data]).double()
        actual = torch.cat([input_features(spec, torch.relu(replacement(x))) for x in data]).double()
    torch.testing.assert_close(stats.cross_moment, reference.T @ actual / len(actual))
    plain = collect_input_stats(model, {"2": spec}, data, progress=False)["2"]
    assert plain.cross_moment is None and not torch.allclose(plain.second_moment, stats.second_moment)


def mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(32, 10)).eval()
    with torch.no_grad():  # trained-like: a decaying spectrum, so truncation errors are moderate
        for layer in model:
            if isinstance(layer, nn.Linear):
                u, _, vh = torch.linalg.svd(layer.weight, full_matrices=False)
                layer.weight.copy_(u * (0.8 ** torch.arange(len(vh)) * 3) @ vh)
    return model


def compress(mode, data):
    schedule = {"version": 1, "settings": {"ft_every": 4, "calibration": mode},
                "layers": {str(i): {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [6]}
                           for i in (0, 2, 4, 6)}}
    compressor = Compressor(mlp(), model_compr_kwargs=schedule, calibration_data=data, progress=False)
    compressor.compression_step()
    return compressor.compressed_model


def test_sequential_calibration_beats_independent_calibration_on_held_out_inputs():
    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(32, 32, generator=generator) * torch.linspace(0.1, 1.5, 32)
    calibration = [torch.randn(64, 32, generator=generator) @ mixing for _ in range(4)]
    held_out = torch.randn(256, 32, generator=generator) @ mixing
    with torch.no_grad():
        expected = mlp()(held_out)
        errors = {mode: float((compress(mode, calibration)(held_out) - expected).square().mean() /
                              expected.square().mean()) for mode in ("independent", "sequential")}
    assert errors["sequential"] < 0.95 * errors["independent"], errors


def test_sequential_and_independent_agree_on_a_step_with_one_data_aware_layer():
    generator = torch.Generator().manual_seed(7)
    data = [torch.randn(32, 32, generator=generator) for _ in range(3)]
    schedule = {"version": 1, "settings": {"ft_every": 2},
                "layers": {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8]},
                           "6": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [4]}}}
    results = {}
    for mode in ("independent", "sequential"):
        schedule["settings"]["calibration"] = mode
        compressor = Compressor(mlp(), model_compr_kwargs=schedule, calibration_data=data, progress=False)
        compressor.compression_step()
        results[mode] = compressor.compressed_model.state_dict()
    # the svd layer runs first and is swapped in for the data-aware one only under sequential calibration
    assert torch.equal(results["independent"]["0.0.weight"], results["sequential"]["0.0.weight"])
    assert not torch.equal(results["independent"]["6.0.weight"], results["sequential"]["6.0.weight"])


class ReadsWeight(nn.Module):
    """Reads ``fc2.weight`` in its forward, as T5's ``DenseReluDense`` reads ``wo.weight.dtype``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = (nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32),
                                                  nn.Linear(32, 4))

    def forward(self, x):
        h = torch.relu(self.fc1(x)).to(self.fc2.weight.dtype)
        return self.out(torch.relu(self.fc3(torch.relu(self.fc2(h)))))


def test_a_layer_its_model_reads_the_weight_of_is_kept_and_the_others_fitted_as_in_a_step_without_it():
    generator = torch.Generator().manual_seed(11)
    data = [torch.randn(16, 32, generator=generator) for _ in range(2)]

    def step(layers, decomposition="whitened_svd"):
        torch.manual_seed(0)
        schedule = {"version": 1, "settings": {"ft_every": 3}, "layers": {
            name: {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": [6]} for name in layers}}
        compressor = Compressor(ReadsWeight().eval(), model_compr_kwargs=schedule, calibration_data=data,
                                progress=False)
        compressor.compression_step()
        return compressor

    full, without, plain = step(["fc1", "fc2", "fc3"]), step(["fc1", "fc3"]), step(["fc1", "fc2", "fc3"], "svd")
    result = {r.name: r for r in full.history}
    assert [result[name].applied for name in ("fc1", "fc2", "fc3")] == [True, False, True]
    assert result["fc2"].note == {r.name: r for r in plain.history}["fc2"].note
    assert "uses the layer other than by calling it" in result["fc2"].note
    assert [(r.name, r.ranks) for r in without.history] == [("fc1", result["fc1"].ranks), ("fc3", result["fc3"].ranks)]
    got, expected = full.compressed_model.state_dict(), without.compressed_model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in expected)


def test_a_layer_called_a_different_number_of_times_per_batch_gets_every_call(registry):
    # a cell looped over each batch's sequence length: the passes stopped after as many calls as the first batch
    # made, so a later, longer batch lost its later steps from the statistics without a word
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.cell = nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x):  # (batch, steps, 4)
            state = torch.zeros(x.shape[0], 6)
            for step in range(x.shape[1]):
                state = torch.tanh(self.cell(state + self.first(x[:, step])))
            return state

    torch.manual_seed(0)
    model = Recurrent().eval()
    data = [torch.randn(3, 2, 4), torch.randn(3, 5, 4)]
    stats = collect_sequential_stats(model, {"cell": registry.adapters.get("linear").read(model.cell)[0]},
                                     {"first": nn.Linear(4, 6)}, data, progress=False)["cell"]
    assert stats.count == 3 * 2 + 3 * 5


class Branches(nn.Module):
    """``a``, ``b`` and ``c`` read the same input, ``d`` their outputs; in the other modes ``c``'s input depends on
    ``b``'s output in ways no module call shows: a write into a slice of a copy of the input, a branch on a value,
    a value read into Python, a read of its weight, a copy made outside torch (as a C extension makes one)."""

    def __init__(self, mode: str = "siblings"):
        super().__init__()
        self.mode = mode
        self.a, self.b, self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.mode == "view":
            x = x.clone()
            x[:, :4] += b[:, :4]
        elif self.mode == "branch":
            x = x * 2 if bool(b.sum() > 0) else x - 1
        elif self.mode == "python":
            x = x + b[0, 0].tolist()
        elif self.mode == "weight":
            x = x + self.b.weight.sum()
        elif self.mode == "input" and bool(x[0, 0] > 0):  # a branch on the input: batch 0 does not take it
            x = x + b
        elif self.mode == "extension":
            x = torch.empty(b.shape)
            ctypes.memmove(x.data_ptr(), b.data_ptr(), b.numel() * b.element_size())
        return self.d(torch.relu(a) + b + self.c(x))


MODES = ["siblings", "view", "branch", "python", "extension"]


@pytest.mark.parametrize("mode", [*MODES, "weight"])
def test_the_dataflow_shows_which_layers_an_input_is_computed_from(mode):
    order, sources = layer_dataflow(Branches(mode).eval(), ["d", "c", "b", "a"], batches(2))
    assert order == ["a", "b", "c", "d"]
    assert sources["a"] == sources["b"] == [] and set(sources["d"]) >= {"a", "b", "c"}
    assert ("b" in sources["c"]) == (mode != "siblings")


def branches_step(mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    schedule = {"version": 1, "settings": {"ft_every": 4}, "layers": {
        name: {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [3]} for name in "abcd"}}
    compressor = Compressor(Branches(mode).eval(), model_compr_kwargs=schedule, calibration_data=batches(3),
                            progress=False)
    compressor.compression_step()
    return compressor.compressed_model.state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_layers_whose_inputs_do_not_depend_on_one_another_are_calibrated_together_as_one_at_a_time(mode,
                                                                                                  monkeypatch):
    # each data-aware layer had a pair of passes over all batches of its own, siblings reading one input too
    calibrated, passes = [], []
    collect, inputs = run.collect_sequential_stats, calibration._inputs
    monkeypatch.setattr(run, "collect_sequential_stats", lambda model, layers, *args, **kwargs: (
        calibrated.append(list(layers)) or collect(model, layers, *args, **kwargs)))
    monkeypatch.setattr(calibration, "_inputs", lambda *args, **kwargs: passes.append(1) or inputs(*args, **kwargs))
    together = branches_step(mode)
    # 'a' alone first (nothing is compressed yet); 'b' and 'c' from one pass a batch: 'a' is not on their path
    assert calibrated == ([["b", "c"], ["d"]] if mode == "siblings" else [["b"], ["c"], ["d"]])
    assert len(passes) == (3 + 3 + 3 + 2 * 3 if mode == "siblings" else 3 + 3 + 3 + 2 * 3 + 2 * 3)
    # as before: each layer alone, with every replacement so far swapped in
    monkeypatch.setattr(run, "layer_dataflow", lambda model, names, data: (forward_order(model, names, data), {}))
    alone = branches_step(mode)
    assert together.keys() == alone.keys() and all(torch.equal(together[key], alone[key]) for key in alone)


def test_the_dataflow_is_read_on_every_batch_a_forward_may_branch_on():
    """The data flow was read on the first batch alone: a forward branching on its input's values took a path
    there where 'c' did not read 'b', and another on the later batches, where it did; 'c' was calibrated with 'b'
    (and its replacement) left out of its passes, 0.127 off the weights of calibrating it on its own (the branch
    reads no value the layers computed, so it was never taken for a dependence). Now every batch's path counts,
    and the step is as one at a time, bit for bit (the pass count test above checks that)."""
    data = batches(3)
    data[0][0, 0], data[1][0, 0] = -1.0, 1.0
    order, sources = layer_dataflow(Branches("input").eval(), ["d", "c", "b", "a"], data)
    assert order == ["a", "b", "c", "d"] and "b" in sources["c"]
    assert "b" not in layer_dataflow(Branches("input").eval(), ["d", "c", "b", "a"], data[:1])[1]["c"]


class HalvesOnSecondCall(Branches):
    """Halves ``a``'s weight in place on its second forward (the data-flow pass of the second batch)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            with torch.no_grad():
                self.a.weight.mul_(0.5)
        return super().forward(x)


def test_a_forward_changing_its_weights_on_a_later_batch_of_the_dataflow_pass_is_refused():
    """On a batch after the first, the data-flow pass's fallback (for a model the tracking cannot run through)
    swallowed the refusal of a forward that changed its weights: the run went on with 'a' halved."""
    with pytest.raises(ConfigError, match=r"changed its parameter a\.weight in place when musco-core ran it on "
                                          r"calibration batch 1"):
        layer_dataflow(HalvesOnSecondCall().eval(), ["d", "c", "b", "a"], batches(3))


def test_a_model_the_tracking_cannot_run_through_has_its_layers_calibrated_one_at_a_time(monkeypatch):
    def untrackable(marked):
        raise RuntimeError("an op no dispatch mode can run")

    monkeypatch.setattr(calibration, "tracking_dependence", untrackable)
    assert layer_dataflow(Branches().eval(), ["d", "c", "b", "a"], batches(2)) == (["a", "b", "c", "d"], {})
