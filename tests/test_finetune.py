"""musco_core.finetune.distill: knowledge distillation from the uncompressed model into a compressed one."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models import make_trained_like
from musco_core import Compressor, ConfigError
from musco_core.finetune import (LR_SCHEDULES, DistillResult, distill, matched_output, reestimate_batchnorm,
                                  relative_mse)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return make_trained_like(nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Dropout(dropout), nn.Linear(48, 48),
                                           nn.ReLU(), nn.Linear(48, 6)), seed=seed).eval()


def inputs(n_batches: int = 4, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 24, generator=generator) for _ in range(n_batches)]


def compressed(teacher: nn.Module, rank: int = 3) -> nn.Module:
    schedule = {name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [rank]}
                for name in ("0", "3")}
    compressor = Compressor(teacher, model_compr_kwargs=schedule, ft_every=2, progress=False)
    compressor.compression_step()
    return compressor.compressed_model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(expected) and all(torch.equal(now[key], value) for key, value in expected.items())


def output_error(teacher: nn.Module, student: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(relative_mse(student(x), teacher(x)) for x in data) / len(data))


def test_distillation_lowers_the_loss_and_the_held_out_output_error():
    teacher = mlp()
    student = compressed(teacher)
    held_out = inputs(seed=7)
    before = output_error(teacher, student, held_out)
    result = distill(teacher, student, inputs(), steps=60, lr=3e-3, progress=False)
    assert isinstance(result, DistillResult) and result.steps == 60
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert output_error(teacher, student, held_out) < 0.7 * before


def test_the_same_seed_gives_the_same_student_and_another_seed_another():
    teacher = mlp(dropout=0.2)  # dropout in the student's train mode draws random numbers
    first, second, third = (compressed(teacher) for _ in range(3))
    runs = [distill(teacher, student, inputs(), steps=8, lr=1e-3, seed=seed, progress=False)
            for student, seed in ((first, 0), (second, 0), (third, 1))]
    assert runs[0].losses == runs[1].losses
    assert same_state(second, state(first))
    assert runs[2].losses != runs[0].losses
    assert not same_state(third, state(first))


def test_in_eval_mode_the_student_trains_without_dropout():
    teacher = mlp(dropout=0.5)
    first, second = compressed(teacher), compressed(teacher)
    runs = [distill(teacher, student, inputs(), steps=5, lr=1e-3, seed=seed, train_mode=False, progress=False)
            for student, seed in ((first, 0), (second, 1))]
    assert runs[0].losses == runs[1].losses  # nothing random is drawn: the seed does not matter
    assert same_state(second, state(first))
    assert not first.training


def test_the_callers_random_state_is_left_alone():
    teacher = mlp(dropout=0.2)
    torch.manual_seed(123)
    distill(teacher, compressed(teacher), inputs(), steps=3, progress=False)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_training_modes_are_restored_and_the_teacher_is_not_trained():
    teacher = mlp(dropout=0.2).train()
    teacher[2].eval()  # a submodule in another mode than its parent keeps it
    student = compressed(mlp(dropout=0.2)).eval()
    teacher_state = state(teacher)
    distill(teacher, student, inputs(), steps=3, progress=False)
    assert teacher.training and not teacher[2].training and teacher[0].training
    assert not any(module.training for module in student.modules())
    assert same_state(teacher, teacher_state)
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_matching_pulls_the_named_layer_towards_the_teachers():
    teacher = mlp()

    def perturbed() -> nn.Module:  # the first layer off, so that its output has something to recover
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            noise = torch.randn(student[0].weight.shape, generator=torch.Generator().manual_seed(5))
            student[0].weight.add_(0.5 * noise * student[0].weight.norm() / noise.norm())
        return student

    def hidden_error(model: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(relative_mse(model[:2](x), teacher[:2](x)) for x in inputs(seed=7)))

    plain, matched = perturbed(), perturbed()
    before = hidden_error(plain)
    distill(teacher, plain, inputs(), steps=40, lr=3e-3, progress=False)
    distill(teacher, matched, inputs(), steps=40, lr=3e-3, features=["1"], feature_weight=10.0, progress=False)
    assert hidden_error(matched) < 0.5 * min(before, hidden_error(plain))


def test_a_feature_module_that_returns_a_tuple_is_matched_on_its_first_element():
    """As a transformer layer returns ``(hidden_states, ...)`` (a BertLayer does in some transformers versions)."""
    class Block(nn.Module):
        def __init__(self, body: nn.Module):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x), x  # the second element is the same in both models: matching it would add 0

    class Net(nn.Module):
        def __init__(self, layers: nn.Module):
            super().__init__()
            self.block, self.head = Block(layers[:2]), layers[2:]

        def forward(self, x):
            return self.head(self.block(x)[0])

    teacher, student = Net(mlp()), Net(compressed(mlp()))
    batch = inputs()[0]
    with torch.no_grad():
        expected = relative_mse(student(batch), teacher(batch)) + relative_mse(student.block.body(batch),
                                                                                teacher.block.body(batch))
    result = distill(teacher, student, inputs(), steps=1, lr=1e-3, features=["block"], progress=False)
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_a_feature_module_called_twice_is_matched_on_both_calls():
    """A shared layer (ALBERT's, say) runs more than once per forward: each call's output is matched, averaged."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    torch.manual_seed(0)
    teacher = Twice().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.shared.weight.add_(0.3 * torch.randn(8, 8))
    x = torch.randn(4, 8)
    with torch.no_grad():
        first = relative_mse(student.shared(x), teacher.shared(x))
        second = relative_mse(student.shared(torch.relu(student.shared(x))),
                              teacher.shared(torch.relu(teacher.shared(x))))
        expected = relative_mse(student(x), teacher(x)) + (first + second) / 2
    result = distill(teacher, student, [x], steps=1, features=["shared"], progress=False)
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_a_feature_name_the_student_lacks_leaves_no_hook_on_the_teacher():
    teacher = mlp()
    with pytest.raises(ConfigError, match="the student has no module named '3'"):
        distill(teacher, nn.Sequential(nn.Linear(24, 6)), inputs(), steps=1, features=["3"], progress=False)
    assert not any(module._forward_hooks for module in teacher.modules())
    compressed(teacher)  # a hook left on a layer would stop its compression


def test_a_batch_the_teachers_output_is_not_finite_on_is_named_not_blamed_on_the_lr():
    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    batches = [*inputs(2), torch.full((16, 24), float("inf"))]
    with pytest.raises(ConfigError, match=r"^distill: the teacher's output on step 3's batch is not finite"):
        distill(teacher, student, batches, steps=3, lr=1e-3, progress=False)
    with pytest.raises(ConfigError, match=r"^distill: the teacher's feature '1' \(call 1\) on step 3's batch is not"):
        distill(teacher, student, batches, steps=3, lr=1e-3, features=["1"], output=lambda out: out.nan_to_num(),
                progress=False)
    assert same_state(student, before)


def test_the_callers_gradients_are_left_as_they_were():
    teacher = mlp()
    student = compressed(teacher)
    distill(teacher, student, inputs(), steps=2, lr=1e-3, progress=False)
    assert all(p.grad is None for p in student.parameters())  # not the last step's
    mine = [torch.full_like(p, 7.0) for p in student.parameters()]
    for p, grad in zip(student.parameters(), mine):
        p.grad = grad
    with pytest.raises(ConfigError, match="step 2's batch"):
        distill(teacher, student, [inputs(1)[0], torch.randn(16, 5)], steps=2, lr=1e-3, progress=False)
    assert all(p.grad is grad for p, grad in zip(student.parameters(), mine))


def test_outputs_in_tuples_and_mappings_and_a_custom_output():
    class Both(nn.Module):
        def __init__(self, body: nn.Module, as_mapping: bool):
            super().__init__()
            self.body, self.as_mapping = body, as_mapping

        def forward(self, x):
            logits = self.body(x)
            return {"hidden": x, "logits": logits} if self.as_mapping else (logits, x)

    for as_mapping in (False, True):
        teacher = Both(mlp(), as_mapping)
        student = Both(compressed(mlp()), as_mapping)
        before = output_error(teacher.body, student.body, inputs(seed=7))
        distill(teacher, student, inputs(), steps=30, lr=3e-3, progress=False)
        assert output_error(teacher.body, student.body, inputs(seed=7)) < before, as_mapping
    assert matched_output({"last_hidden_state": torch.ones(1), "pooler_output": torch.zeros(1)}).item() == 1.0
    assert matched_output([{"other": torch.zeros(2)}]).shape == (2,)
    teacher = Both(mlp(), True)
    student = Both(compressed(mlp()), True)
    frozen = state(student)
    with pytest.raises(ConfigError, match="does not depend on the student's trainable parameters"):
        distill(teacher, student, inputs(), steps=5, progress=False, output=lambda outputs: outputs["hidden"])
    assert same_state(student, frozen)


def test_a_classifier_with_a_temperature_matches_the_softened_distribution():
    teacher = mlp()
    student = compressed(teacher, rank=2)

    def kl(data):
        with torch.no_grad():
            return float(sum(torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                                        log_target=True, reduction="batchmean") for x in data))

    before = kl(inputs(seed=7))
    result = distill(teacher, student, inputs(), steps=40, lr=3e-3, temperature=2.0, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert kl(inputs(seed=7)) < before


def labelled(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Input batches with labels the teacher does not predict (random classes)."""
    generator = torch.Generator().manual_seed(seed + 100)
    return [(x, torch.randint(0, 6, (len(x),), generator=generator)) for x in inputs(seed=seed)]


def label_loss(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return float(sum(nn.functional.cross_entropy(model(x), y) for x, y in data) / len(data))


def test_labels_add_their_cross_entropy_and_a_zero_weight_changes_nothing():
    teacher = mlp()
    soft, zero, both = (compressed(teacher) for _ in range(3))
    data = labelled()
    plain = distill(teacher, soft, [x for x, _ in data], steps=40, lr=3e-3, temperature=2.0, progress=False)
    unweighted = distill(teacher, zero, data, steps=40, lr=3e-3, temperature=2.0, label_weight=0.0, progress=False)
    assert unweighted.losses == plain.losses and same_state(zero, state(soft))
    mixed = distill(teacher, both, data, steps=40, lr=3e-3, temperature=2.0, label_weight=5.0, progress=False)
    assert mixed.losses[0] > plain.losses[0]  # the label term is in the loss
    assert label_loss(both, data) < label_loss(soft, data) - 0.1


def test_labels_must_come_in_pairs_of_the_outputs_shape():
    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    with pytest.raises(ConfigError, match=r"every batch must be a pair \(inputs, labels tensor\); step 1's batch"):
        distill(teacher, student, inputs(), steps=2, label_weight=1.0, progress=False)
    wrong = [(x, torch.zeros(len(x), 2, dtype=torch.long)) for x in inputs()]
    with pytest.raises(ConfigError, match=r"step 1's labels must be integers of shape \(16,\).*got torch.int64 of "
                                          r"shape \(16, 2\)"):
        distill(teacher, student, wrong, steps=2, label_weight=1.0, progress=False)
    out_of_range = labelled()
    out_of_range[2][1][5] = 6  # of 6 classes, at step 3
    with pytest.raises(ConfigError, match=r"step 3's labels must be class indices 0\.\.5 \(the output's last axis\) "
                                          r"or -100 \(ignored\), got 6"):
        distill(teacher, student, out_of_range, steps=4, lr=1e-2, label_weight=1.0, progress=False)
    assert same_state(student, before)


def test_a_batch_whose_labels_are_all_ignored_adds_no_label_loss_and_partly_ignored_ones_average_the_rest():
    teacher = mlp()
    data = labelled()
    ignored = [(x, torch.full_like(y, -100)) for x, y in data]
    plain = distill(teacher, compressed(teacher), [x for x, _ in data], steps=4, lr=1e-3, progress=False)
    unlabelled = distill(teacher, compressed(teacher), ignored, steps=4, lr=1e-3, label_weight=1.0, progress=False)
    assert unlabelled.losses == pytest.approx(plain.losses)
    half = [(x, torch.where(torch.arange(len(y)) % 2 == 0, y, -100)) for x, y in data]
    student = compressed(teacher)
    first = distill(teacher, copy.deepcopy(student), half[:1], steps=1, label_weight=1.0, progress=False).losses[0]
    with torch.no_grad():
        x, y = half[0]
        expected = relative_mse(student(x), teacher(x)) + nn.functional.cross_entropy(student(x)[::2], y[::2])
    assert first == pytest.approx(float(expected), rel=1e-5)


def test_a_cosine_schedule_decays_the_learning_rate_to_zero():
    assert [round(LR_SCHEDULES["cosine"](step, 4), 4) for step in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert all(LR_SCHEDULES["constant"](step, 4) == 1.0 for step in range(5))
    teacher = mlp()
    constant, cosine, one_step = (compressed(teacher) for _ in range(3))
    distill(teacher, constant, inputs(), steps=1, lr=1e-2, progress=False)
    distill(teacher, one_step, inputs(), steps=1, lr=1e-2, lr_schedule="cosine", progress=False)
    assert same_state(one_step, state(constant))  # the first step takes the full lr
    two_constant, two_cosine = compressed(teacher), compressed(teacher)
    runs = [distill(teacher, student, inputs(), steps=2, lr=1e-2, lr_schedule=schedule, progress=False)
            for student, schedule in ((two_constant, "constant"), (two_cosine, "cosine"))]
    assert runs[0].losses[0] == runs[1].losses[0]
    assert not same_state(two_cosine, state(two_constant))  # the second step took half the lr
    result = distill(teacher, cosine, inputs(), steps=30, lr=1e-2, lr_schedule="cosine", progress=False)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_a_hugging_face_model_matches_its_last_hidden_state():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    teacher = BertModel(config, add_pooling_layer=False).eval()
    linears = [name for name, m in teacher.named_modules() if isinstance(m, nn.Linear)]
    compressor = Compressor(teacher, model_compr_kwargs={
        name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]} for name in linears},
        ft_every=len(linears), progress=False)
    compressor.compression_step()
    student = compressor.compressed_model
    generator = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 40, (4, 10), generator=generator)} for _ in range(3)]

    name = "encoder.layer.0.attention.output.dense"

    def feature_error() -> float:
        taken = {}
        handles = [model.get_submodule(name).register_forward_hook(
            lambda module, args, out, key=key: taken.__setitem__(key, out)) for key, model in
            (("teacher", teacher), ("student", student))]
        with torch.no_grad():
            for model in (teacher, student):
                model(**batches[0])
        for handle in handles:
            handle.remove()
        return float(relative_mse(taken["student"], taken["teacher"]))

    before = feature_error()
    result = distill(teacher, student, batches, steps=30, lr=1e-3, progress=False, features=[name])
    assert result.losses[-1] < 0.5 * result.losses[0]  # last_hidden_state of the ModelOutput, and the feature
    assert feature_error() < 0.5 * before


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps: expected a positive int, got 0"),
    ({"steps": 2.5}, "steps: expected a positive int, got 2.5"),
    ({"lr": -1.0}, "lr: expected a positive number, got -1.0"),
    ({"lr": 1e39}, "lr: expected a positive number at most 3.4e+37 (AdamW's first step"),
    ({"weight_decay": float("nan")}, "weight_decay: expected a non-negative number, got nan"),
    ({"temperature": 0}, "temperature: expected None (MSE) or a positive number, got 0"),
    ({"feature_weight": float("nan")}, "feature_weight: expected a non-negative number, got nan"),
    ({"label_weight": -1}, "label_weight: expected None (no labels) or a non-negative number, got -1"),
    ({"lr_schedule": "linear"}, "lr_schedule: expected one of 'constant', 'cosine', got 'linear'"),
    ({"seed": 1.5}, "seed: expected an int (as torch.manual_seed takes), got 1.5"),
    ({"seed": "0"}, "seed: expected an int (as torch.manual_seed takes), got '0'"),
    ({"seed": 2 ** 64}, "seed: expected an int (as torch.manual_seed takes), got 18446744073709551616"),
    ({"features": ["0", "nope"]}, "the teacher has no module named 'nope'"),
    ({"features": "10"}, "features: expected a list of module names (['10'] for one), got '10'"),  # not '1', '0'
    ({"features": [0]}, "features: expected a list of module names, got [0]"),
    ({"features": (name for name in ["0"])}, "features: expected a list of module names, got <generator"),
    ({"batches": iter(inputs())}, "got an iterator"),
    ({"batches": []}, "batches is empty"),
    ({"batches": [torch.randn(4, 5)]}, "the models failed on step 1's batch: RuntimeError"),
])
def test_bad_input_is_one_clear_error_and_changes_nothing(kwargs, message):
    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    arguments = {"batches": inputs(), "steps": 3, **kwargs}
    with pytest.raises(ConfigError, match="^distill: ") as info:
        distill(teacher, student, progress=False, **arguments)
    assert message in str(info.value)
    assert same_state(student, before)


def test_batches_that_give_nothing_the_second_time_are_not_called_empty():
    class Once:  # iterable, not an iterator, yet used up after one pass (a stream read once)
        def __init__(self, items):
            self.items = iter(items)

        def __iter__(self):
            return self.items

    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    with pytest.raises(ConfigError, match=r"^distill: batches gave 2 batch\(es\), then none when iterated again for "
                                          r"steps=5: it must give its batches at every pass"):
        distill(teacher, student, Once(inputs(2)), steps=5, lr=1e-2, progress=False)
    assert same_state(student, before)


def test_a_failure_after_some_steps_restores_the_student():
    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    batches = [*inputs(3), torch.randn(16, 5)]  # the fourth batch does not fit the model
    with pytest.raises(ConfigError, match="step 4's batch"):
        distill(teacher, student, batches, steps=6, lr=1e-2, progress=False)
    assert same_state(student, before)
    assert not any(module.training for module in student.modules())


def test_a_last_step_that_diverges_is_an_error_and_restores_the_student():
    teacher = mlp()
    student = compressed(teacher)
    before = state(student)
    with pytest.raises(ConfigError, match=r"^distill: after 1 step\(s\) the student's output is not finite; lower lr"):
        distill(teacher, student, inputs(), steps=1, lr=1e20, progress=False)  # each loss is finite before its step
    assert same_state(student, before)


def test_under_the_callers_no_grad_the_student_trains_and_under_inference_mode_it_is_one_clear_error():
    teacher = mlp()
    expected, student = compressed(teacher), compressed(teacher)
    losses = distill(teacher, expected, inputs(), steps=3, lr=1e-3, progress=False).losses
    with torch.no_grad():  # e.g. from the caller's evaluation helper
        assert distill(teacher, student, inputs(), steps=3, lr=1e-3, progress=False).losses == losses
    assert same_state(student, state(expected))
    before = state(student)
    with torch.inference_mode(), pytest.raises(ConfigError, match=r"^distill: called under torch.inference_mode\(\)"):
        distill(teacher, student, inputs(), steps=3, progress=False)
    assert same_state(student, before)


def test_a_float16_student_is_refused_up_front_naming_why_and_what_to_do():
    teacher = mlp().half()
    student = compressed(mlp()).half()
    before = state(student)
    with pytest.raises(ConfigError, match=r"^distill: the student's '0.0.weight' and 7 more parameter\(s\) are "
                                          r"float16: AdamW's state underflows .* distill a float32 or bfloat16 "):
        distill(teacher, student, [x.half() for x in inputs()], steps=3, progress=False)
    assert same_state(student, before)
    student = compressed(mlp()).bfloat16()  # bfloat16 has float32's range: it trains
    distill(teacher.bfloat16(), student, [x.bfloat16() for x in inputs()], steps=2, lr=1e-3, progress=False)


def test_a_student_sharing_the_teachers_tensors_is_refused_before_anything_changes():
    teacher = nn.Sequential(nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6)).eval()
    student = nn.Sequential(teacher[0], teacher[1], nn.ReLU(), nn.Linear(32, 2), nn.Linear(2, 6))
    before = state(teacher)
    with pytest.raises(ConfigError, match="^distill: the student's '0.weight' is the teacher's '0.weight' .*"
                                          "training the student would change the teacher"):
        distill(teacher, student, inputs(), steps=3, lr=1e-2, progress=False)
    assert same_state(teacher, before)
    view = nn.Sequential(nn.Linear(24, 6))
    with torch.no_grad():
        view[0].weight = nn.Parameter(teacher[3].weight.detach()[:, :24])  # a view of the teacher's memory
    with pytest.raises(ConfigError, match="the student's '0.weight' is the teacher's '3.weight'"):
        distill(teacher, view, inputs(), steps=1, progress=False)


def test_the_teacher_and_student_must_differ_and_fit_together():
    teacher = mlp()
    with pytest.raises(ConfigError, match="the same model"):
        distill(teacher, teacher, inputs(), steps=1, progress=False)
    other = nn.Sequential(nn.Linear(24, 5))
    with pytest.raises(ConfigError, match=r"output has shape \(16, 5\), the teacher's \(16, 6\)"):
        distill(teacher, other, inputs(), steps=1, progress=False)
    frozen = compressed(teacher).requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter that requires grad"):
        distill(teacher, frozen, inputs(), steps=1, progress=False)
    with pytest.raises(ConfigError, match="cannot tell which output to match in a object"):
        distill(teacher, compressed(teacher), inputs(), steps=1, progress=False,
                output=lambda outputs: matched_output(object()))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4), nn.BatchNorm1d(4, track_running_stats=False))


def test_batchnorm_statistics_become_the_average_over_the_batches():
    model = bn_net().train()
    model[0].eval()  # a submodule in another mode keeps it
    generator = torch.Generator().manual_seed(0)
    batches = [3 + 2 * torch.randn(10, 3, 6, 6, generator=generator) for _ in range(3)]
    weights = {key: value.clone() for key, value in model.state_dict().items() if "running" not in key and "tracked" not in key}
    assert reestimate_batchnorm(model, batches, progress=False) == 3
    with torch.no_grad():
        outputs = [model[0](x) for x in batches]
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.var((0, 2, 3)) for o in outputs]).mean(0)  # unbiased per batch, averaged
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-5)
    assert model[1].momentum == 0.1 and int(model[1].num_batches_tracked) == 3
    assert model.training and not model[0].training and model[3].training
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_a_batchnorm_the_batches_never_reach_keeps_its_statistics_and_is_named_in_a_warning(caplog):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=0.3))  # runs in training only

        def forward(self, x):
            y = self.body(x)
            return (y, self.aux(y)) if self.training else y

    torch.manual_seed(0)
    model = TwoHeads().eval()
    aux = model.aux[1]
    aux.running_mean.fill_(3.0)  # trained statistics
    aux.running_var.fill_(5.0)
    aux.num_batches_tracked.fill_(1000)
    before = state(aux)
    with caplog.at_level("WARNING", logger="musco_core.finetune"):
        assert reestimate_batchnorm(model, [torch.randn(4, 3, 8, 8) for _ in range(3)], progress=False) == 3
    assert same_state(aux, before) and aux.momentum == 0.3
    assert int(model.body[1].num_batches_tracked) == 3
    assert "never reached 'aux.1'; kept their statistics" in caplog.text and "body" not in caplog.text


def test_batchnorm_reestimation_refuses_bad_input_and_restores_the_statistics():
    model = bn_net()
    before = state(model)
    with pytest.raises(ConfigError, match="no BatchNorm layer with running statistics"):
        reestimate_batchnorm(mlp(), inputs(), progress=False)
    with pytest.raises(ConfigError, match="reestimate_batchnorm: batches: got an iterator"):
        reestimate_batchnorm(model, iter([torch.randn(2, 3, 6, 6)]), progress=False)
    with pytest.raises(ConfigError, match="reestimate_batchnorm: batches is empty"):
        reestimate_batchnorm(model, [], progress=False)
    with pytest.raises(ConfigError, match="the model failed on batch 2: RuntimeError"):
        reestimate_batchnorm(model, [torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)], progress=False)
    one_nan = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    one_nan[1][0, 0, 0, 0] = float("nan")  # would leave every output of the model NaN
    with pytest.raises(ConfigError, match=r"batch 2 made the running statistics of '1' not finite \(NaN or inf\)"):
        reestimate_batchnorm(model, one_nan, progress=False)
    assert same_state(model, before) and model[1].momentum == 0.1


def test_a_teacher_that_is_zero_over_the_batch_is_measured_against_the_students_scale():
    """Divided by float32's smallest normal, a zero teacher made the term 8.5e35 for a student at 0.1 and inf at 10
    (distill: "the loss is not finite; lower lr"): now 1, its gradient pulling the student towards zero."""
    student = torch.full((4,), 10.0, requires_grad=True)
    loss = relative_mse(student, torch.zeros(4))
    loss.backward()
    assert float(loss) == 1.0 and torch.allclose(student.grad, torch.full((4,), 0.05))  # 2 s / (n mean(s^2))
    assert float(relative_mse(torch.zeros(4), torch.zeros(4))) == 0.0
    assert float(relative_mse(torch.full((4,), 3.0), torch.full((4,), 2.0))) == 0.25  # a teacher's scale unchanged
    torch.manual_seed(0)
    teacher, student = (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(2))
    with torch.no_grad():
        teacher[0].bias.fill_(-100.0)  # the ReLU's output is zero over the batch
        student[0].bias.fill_(10.0)
    result = distill(teacher, student, [torch.randn(8, 4)], steps=2, lr=1e-4, features=["1"], progress=False)
    assert all(math.isfinite(loss) for loss in result.losses)
