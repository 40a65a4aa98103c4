"""Fine-tuning between compression steps without labels: knowledge distillation from the uncompressed model.

:func:`distill` trains a compressed model (the *student*) to reproduce the outputs of the uncompressed one (the
*teacher*) on unlabelled input batches, such as the calibration data, optionally matching intermediate features
too. It creates its own optimizer (AdamW), so one call between two :meth:`Compressor.compression_step` calls is
all the fine-tuning a multi-stage run needs. :func:`reestimate_batchnorm` recomputes a compressed model's BatchNorm
statistics from unlabelled batches, without training.
"""
from __future__ import annotations

import itertools
import logging
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn
from tqdm.auto import tqdm

from .calibration import check_reiterable
from .errors import ConfigError, MuscoError, finite_number, short_repr

log = logging.getLogger(__name__)

#: The label of a position the label loss ignores, as in torch's ``cross_entropy``.
IGNORED_LABEL = -100

#: The output fields matched by default when a model returns a mapping (a Hugging Face ``ModelOutput``), in order.
OUTPUT_KEYS = ("logits", "last_hidden_state")


@attrs.frozen
class DistillResult:
    """What a :func:`distill` run did: the total loss of every optimizer step, first step first."""

    losses: list[float]

    @property
    def steps(self) -> int:
        return len(self.losses)


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``; ``model(*batch)`` for a tuple or list; ``model(**batch)`` for a mapping (a tokenizer's
    output), as the calibration data is called."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def matched_output(outputs: Any) -> torch.Tensor:
    """The tensor of a model's outputs that distillation matches by default.

    A tensor as it is; of a mapping (a Hugging Face ``ModelOutput`` or a dict), the first of :data:`OUTPUT_KEYS`
    present, else its first tensor value; of a tuple or list, its first element (the main output of models called
    with ``return_dict=False``), searched the same way.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(outputs.get(key), torch.Tensor):
                return outputs[key]
        values = [value for value in outputs.values() if isinstance(value, torch.Tensor)]
        if values:
            return values[0]
    elif isinstance(outputs, (tuple, list)) and outputs:
        return matched_output(outputs[0])
    raise ConfigError(f"distill: cannot tell which output to match in a {type(outputs).__name__} "
                      f"({short_repr(outputs)}); pass output=, a function from the model's outputs to a tensor")


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((student - teacher)^2) / mean(teacher^2)``: the squared error relative to the teacher's scale, so
    outputs and features of any magnitude weigh alike (0 is a perfect match, 1 is as far as predicting zeros).

    A teacher that is exactly zero throughout (a feature a ReLU zeroes for a whole batch) has no scale: the error
    is then relative to the student's scale, taken as a constant as the teacher's is, so the term is 1 (0 where the
    student is zero too) and its gradient pulls the student towards zero as a relative error does, weighing as
    much as any other term. (Divided by float32's smallest normal, 1e-38, it was inf or swamped every other.)"""
    scale, own = teacher.square().mean(), student.detach().square().mean()
    scale = torch.where(scale > 0, scale, torch.where(own > 0, own, torch.ones_like(own)))
    return F.mse_loss(student, teacher) / scale


def softened_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the last axis,
    averaged over every other position."""
    classes = teacher.shape[-1]
    log_student = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2


class _FeatureTaps:
    """Forward hooks that keep the output of every call of the named modules of one model, in order (a shared
    module runs more than once per forward)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ConfigError(f"distill: features: the {role} has no module named "
                              f"{', '.join(map(repr, missing))}")
        self.values: dict[str, list[torch.Tensor]] = {}
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.values.setdefault(name, []).append(matched_output(output))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


#: The learning-rate schedules :func:`distill` offers: the factor applied to ``lr`` at step ``s`` of ``steps``.
LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, steps: 1.0,
    "cosine": lambda step, steps: 0.5 * (1 + math.cos(math.pi * step / steps)),
}


def _non_negative(value: Any) -> bool:
    return finite_number(value) and value >= 0


#: The largest factor by which AdamW (default betas) scales ``lr`` in a step: ``1 / (1 - beta1)``, at its first step.
_ADAMW_STEP_FACTOR = 10.0


def _shared_tensor(teacher: nn.Module, student: nn.Module) -> str | None:
    """The first parameter or buffer of the student that shares memory with one of the teacher's, named in both,
    or None: training the student would change the teacher."""
    def tensors(model: nn.Module):
        return itertools.chain(model.named_parameters(remove_duplicate=False),
                               model.named_buffers(remove_duplicate=False))

    def key(tensor: torch.Tensor) -> tuple:
        storage = tensor.untyped_storage()
        return (tensor.device, storage.data_ptr()) if storage.nbytes() and not tensor.is_meta else (id(tensor),)

    held = {}
    for name, tensor in tensors(teacher):
        held.setdefault(key(tensor), name)
    for name, tensor in tensors(student):
        if key(tensor) in held:
            return f"the student's {name!r} is the teacher's {held[key(tensor)]!r}"
    return None


def lr_problem(lr: Any, weight_decay: float = 0.0) -> str | None:
    """What is wrong with ``lr`` as :func:`distill`'s learning rate (``"lr: ..."``), or None."""
    if not (finite_number(lr) and lr > 0):
        return f"lr: expected a positive number, got {short_repr(lr)}"
    largest = torch.finfo(torch.float32).max / max(_ADAMW_STEP_FACTOR, weight_decay)
    if lr > largest:
        return (f"lr: expected a positive number at most {largest:.3g} (AdamW's first step, {_ADAMW_STEP_FACTOR:g} "
                f"x lr, and its decay, lr x weight_decay, must be float32 numbers), got {short_repr(lr)}")
    return None


def _check_arguments(teacher: nn.Module, student: nn.Module, batches: Any, steps: int, lr: float,
                     temperature: float | None, feature_weight: float, label_weight: float | None,
                     lr_schedule: str, weight_decay: float, seed: int, features: Any) -> list[nn.Parameter]:
    if teacher is student:
        raise ConfigError("distill: the teacher and the student are the same model; pass the uncompressed model "
                          "as the teacher and a compressed copy as the student")
    shared = _shared_tensor(teacher, student)
    if shared:
        raise ConfigError(f"distill: {shared} (the same memory): training the student would change the teacher; "
                          f"give the student its own copy (copy.deepcopy of the modules it takes from the teacher)")
    check_reiterable(batches, "distill: batches")
    problems = []
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"steps: expected a positive int, got {short_repr(steps)}")
    problems.append(lr_problem(lr, weight_decay if _non_negative(weight_decay) else 0.0))
    if not _non_negative(weight_decay):
        problems.append(f"weight_decay: expected a non-negative number, got {short_repr(weight_decay)}")
    if temperature is not None and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                        and temperature > 0):
        problems.append(f"temperature: expected None (MSE) or a positive number, got {short_repr(temperature)}")
    if not _non_negative(feature_weight):
        problems.append(f"feature_weight: expected a non-negative number, got {short_repr(feature_weight)}")
    if label_weight is not None and not _non_negative(label_weight):
        problems.append(f"label_weight: expected None (no labels) or a non-negative number, got "
                        f"{short_repr(label_weight)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= seed < 2 ** 64:
        problems.append(f"seed: expected an int (as torch.manual_seed takes), got {short_repr(seed)}")
    if features is not None and (isinstance(features, str) or not isinstance(features, Sequence)
                                 or not all(isinstance(name, str) for name in features)):
        one = f" ([{features!r}] for one)" if isinstance(features, str) else ""  # a str is a sequence of names
        problems.append(f"features: expected a list of module names{one}, got {short_repr(features)}")
    if lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule: expected one of {', '.join(map(repr, LR_SCHEDULES))}, got "
                        f"{short_repr(lr_schedule)}")
    problems = [problem for problem in problems if problem]
    if problems:
        raise ConfigError("distill: " + "; ".join(problems))
    if torch.is_inference_mode_enabled():
        raise ConfigError("distill: called under torch.inference_mode(): no gradient is recorded there and tensors "
                          "made there cannot be trained; call it outside inference_mode (torch.no_grad() is fine)")
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("distill: the student has no parameter that requires grad; nothing to train")
    half = [name for name, p in named if p.dtype == torch.float16]
    if half:
        more = f" and {len(half) - 1} more parameter(s) are" if len(half) > 1 else " is"
        raise ConfigError(f"distill: the student's {half[0]!r}{more} float16: AdamW's state underflows in float16 "
                          f"(its eps, 1e-8, is 0 there), so the updates would be NaN at any lr; distill a float32 or "
                          f"bfloat16 student (student.float()), then convert it (.half())")
    return [p for _, p in named]


def _device_indices(parameters: Iterable[nn.Parameter]) -> list[int]:
    return sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})


@torch.enable_grad()  # called under the caller's no_grad (an evaluation helper), it must still train
def distill(teacher: nn.Module, student: nn.Module, batches: Any, steps: int, lr: float = 1e-4, *,
            features: Sequence[str] | None = None, feature_weight: float = 1.0, temperature: float | None = None,
            label_weight: float | None = None, output: Callable[[Any], torch.Tensor] | None = None,
            weight_decay: float = 0.0, lr_schedule: str = "constant", train_mode: bool = True, seed: int = 0,
            progress: bool = True) -> DistillResult:
    """Trains ``student`` for ``steps`` AdamW steps to reproduce ``teacher``'s outputs on ``batches``.

    ``batches`` is a list or DataLoader of input batches, called as the calibration data is (``model(batch)``,
    ``model(*batch)``, ``model(**batch)``), on the models' device; it is cycled through until ``steps`` steps
    are done, one batch per step. No labels are needed; with ``label_weight`` set, each batch is a pair
    ``(inputs, labels)`` instead, the inputs called as above.

    The loss of a batch is the output loss plus ``feature_weight`` times the feature losses, plus
    ``label_weight`` times the label loss:

    * **output**: the tensor :func:`matched_output` picks (``logits``, else ``last_hidden_state``, else the first
      tensor), or ``output(outputs)`` when given; :func:`relative_mse` by default, or with a ``temperature`` the
      softened KL divergence of classifiers (:func:`softened_kl`, over the last axis);
    * **features**: for each module name in ``features`` (the same name in both models: a compressed layer keeps
      its path), :func:`relative_mse` between the two models' outputs of that module (of each call, averaged, for
      a module called more than once per forward), averaged over the names;
    * **labels** (when ``label_weight`` is a number): the cross-entropy of the student's matched output, its last
      axis the classes, against the batch's integer labels (shaped as the output without its last axis; -100
      marks a position to ignore, and a batch with every position ignored adds no label loss), as in fine-tuning
      with labels. Hinton's distillation combines it with a
      ``temperature``.

    The teacher runs in eval mode under ``no_grad``. The student is trained (with grad enabled, whatever the
    caller's grad mode; under ``torch.inference_mode`` it is a ConfigError), in float32 or bfloat16: a float16
    student is refused (AdamW's state underflows in float16), distill it in float32 and convert it afterwards. It
    is trained in train mode (dropout and BatchNorm's batch statistics, as in fine-tuning), or in eval mode with
    ``train_mode=False`` (no dropout, BatchNorm's running statistics kept), with a new
    ``torch.optim.AdamW(lr, weight_decay)`` over its parameters that require grad, whose learning rate follows
    ``lr_schedule``: ``constant``, or ``cosine`` (from ``lr`` down to 0 along half a cosine over the ``steps``).
    Every module's training flag, and the parameters' ``.grad``, are restored afterwards, and on any error (a
    teacher's output or feature that is not finite, a loss that is not finite, or a student
    left with non-finite weights or outputs by the last step, included) the student's parameters and buffers are
    restored too, so a failed call changes nothing. A student that shares a parameter or buffer with the teacher
    is refused, so the teacher is never changed. The run is deterministic given ``seed``, which seeds a forked RNG
    (the caller's random state is untouched). A progress bar with the running loss goes to stderr when it is a
    terminal and ``progress`` is true.

    Returns the loss of every step.
    """
    parameters = _check_arguments(teacher, student, batches, steps, lr, temperature, feature_weight, label_weight,
                                  lr_schedule, weight_decay, seed, features)
    pick = output or matched_output
    names = list(features or [])
    modes = {module: module.training for module in itertools.chain(teacher.modules(), student.modules())}
    backup = {key: value.detach().clone() for key, value in student.state_dict(keep_vars=True).items()}
    grads = [p.grad for p in parameters]  # the caller's; distill's own last gradients are not left behind
    taps: list[_FeatureTaps] = []
    losses: list[float] = []
    try:
        if names:  # one at a time, so that a name the student lacks leaves no hook on the teacher
            for model, role in ((teacher, "teacher"), (student, "student")):
                taps.append(_FeatureTaps(model, names, role))
        teacher.eval()
        student.train(train_mode)
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        factor = LR_SCHEDULES[lr_schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, steps))
        devices = _device_indices(itertools.chain(parameters, teacher.parameters()))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            bar = tqdm(total=steps, desc="distillation", unit="step", leave=False, file=sys.stderr,
                       disable=not (progress and sys.stderr.isatty()))
            try:
                for step, batch in enumerate(_cycle(batches, steps)):
                    loss = _step_loss(teacher, student, batch, pick, temperature, taps, names, feature_weight,
                                      label_weight, step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    losses.append(float(loss.detach()))
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
            finally:
                bar.close()
            _check_trained(student, batch, pick, label_weight, steps)
    except BaseException:
        with torch.no_grad():
            student.load_state_dict(backup)
        raise
    finally:
        for tap in taps:
            tap.remove()
        for module, training in modes.items():
            module.training = training
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
    log.info("distill: %d steps, loss %.4g -> %.4g", steps, losses[0], losses[-1])
    return DistillResult(losses)


def reestimate_batchnorm(model: nn.Module, batches: Any, *, progress: bool = True) -> int:
    """Recomputes the running mean and variance of every BatchNorm of ``model`` as their average over ``batches``.

    A compressed layer's outputs drift from the uncompressed layer's, and the BatchNorm after it still normalizes
    with the old statistics. One pass over unlabelled batches (called as :func:`distill` calls them), under
    ``no_grad`` with only the BatchNorm layers in train mode (dropout stays off), replaces them by the plain
    average over the pass (``momentum=None``); no weight changes. A batch that makes any statistic NaN or inf (a
    non-finite input) is a ConfigError naming it and the layer. BatchNorm layers without running statistics
    (``track_running_stats=False``) are left alone. A BatchNorm the batches never reach (a head that runs only in
    training, say) has nothing to average: its statistics are kept as they were, and a warning names it. Every
    module's training flag and momentum are restored; on an error the statistics are restored too. Returns the
    number of batches seen.
    """
    check_reiterable(batches, "reestimate_batchnorm: batches")
    named = {m: name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    norms = list(named)
    if not norms:
        raise ConfigError(f"reestimate_batchnorm: {type(model).__name__} has no BatchNorm layer with running "
                          f"statistics to re-estimate")
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    backup = [{key: value.clone() for key, value in norm.state_dict().items()} for norm in norms]
    reached: set[nn.Module] = set()
    hooks = [norm.register_forward_hook(lambda module, inputs, output: reached.add(module)) for norm in norms]
    seen = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for batch in tqdm(batches, desc="BatchNorm statistics", unit="batch", leave=False, file=sys.stderr,
                              disable=not (progress and sys.stderr.isatty())):
                try:
                    run_model(model, batch)
                except Exception as exc:  # the user's batch or model: one clear line, the cause chained
                    raise ConfigError(f"reestimate_batchnorm: the model failed on batch {seen + 1}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                seen += 1
                broken = next((named[norm] for norm in norms if norm in reached and not all(
                    bool(torch.isfinite(stat).all()) for stat in (norm.running_mean, norm.running_var))), None)
                if broken is not None:  # one NaN pixel would leave the model's every output NaN
                    raise ConfigError(f"reestimate_batchnorm: batch {seen} made the running statistics of "
                                      f"{broken!r} not finite (NaN or inf): check that batch and the layers "
                                      f"before it; the statistics are kept as they were")
        if not seen:
            raise ConfigError("reestimate_batchnorm: batches is empty; nothing to estimate from")
    except BaseException:
        for norm, state in zip(norms, backup):
            norm.load_state_dict(state)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    unreached = [(norm, state) for norm, state in zip(norms, backup) if norm not in reached]
    for norm, state in unreached:
        norm.load_state_dict(state)
    if unreached:
        log.warning("reestimate_batchnorm: the batches never reached %s; kept their statistics as they were",
                    ", ".join(repr(named[norm]) for norm, _ in unreached))
    log.info("reestimate_batchnorm: %d BatchNorm layers from %d batches", len(norms) - len(unreached), seen)
    return seen


def _cycle(batches: Iterable[Any], steps: int) -> Iterable[Any]:
    """``steps`` batches, going through ``batches`` again from the start as often as needed."""
    produced = passes = 0
    while produced < steps:
        empty = True
        passes += 1
        for batch in batches:
            empty = False
            yield batch
            produced += 1
            if produced == steps:
                return
        if empty and passes == 1:
            raise ConfigError("distill: batches is empty; nothing to distill on")
        if empty:  # a reiterable in type only (a generator behind __iter__, a stream read once)
            raise ConfigError(f"distill: batches gave {produced} batch(es), then none when iterated again for "
                              f"steps={steps}: it must give its batches at every pass, as a list or a DataLoader does")


def _check_trained(student: nn.Module, batch: Any, pick: Callable[[Any], torch.Tensor], label_weight: float | None,
                   steps: int) -> None:
    """A ConfigError unless the trained student's parameters and buffers, and its output on the last batch (in eval
    mode, so nothing changes), are finite: each step's loss is checked before its update, not after the last."""
    for name, tensor in itertools.chain(student.named_parameters(), student.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"distill: after {steps} step(s) the student's {name!r} is not finite; lower lr")
    if label_weight is not None:
        batch = _split_labels(batch, steps - 1)[0]
    student.eval()
    with torch.no_grad():
        output = pick(run_model(student, batch))
    if not bool(torch.isfinite(output).all()):
        raise ConfigError(f"distill: after {steps} step(s) the student's output is not finite; lower lr")


def _split_labels(batch: Any, step: int) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a labelled batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)):
        raise ConfigError(f"distill: label_weight is set, so every batch must be a pair (inputs, labels tensor); "
                          f"step {step + 1}'s batch is {short_repr(batch)}")
    return batch[0], batch[1]


def _label_loss(prediction: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
    """Cross-entropy of ``prediction`` (classes on the last axis) against integer ``labels``, averaged over the
    positions not ignored (-100); 0 when every position is ignored, so such a batch trains on its outputs alone."""
    if labels.shape != prediction.shape[:-1] or labels.is_floating_point() or labels.is_complex():
        raise ConfigError(f"distill: step {step + 1}'s labels must be integers of shape "
                          f"{tuple(prediction.shape[:-1])} (the output's without its last axis, the classes), got "
                          f"{labels.dtype} of shape {tuple(labels.shape)}")
    classes = prediction.shape[-1]
    labels = labels.reshape(-1).long()
    counted = labels != IGNORED_LABEL
    bad = labels[counted & ((labels < 0) | (labels >= classes))]
    if bad.numel():
        raise ConfigError(f"distill: step {step + 1}'s labels must be class indices 0..{classes - 1} (the output's "
                          f"last axis) or {IGNORED_LABEL} (ignored), got {int(bad[0])}")
    total = F.cross_entropy(prediction.reshape(-1, classes), labels, ignore_index=IGNORED_LABEL, reduction="sum")
    return total / counted.sum().clamp_min(1)


def _check_teacher_finite(value: torch.Tensor, what: str, step: int) -> None:
    """A ConfigError naming the batch when the teacher's ``what`` is not finite: no lr can fix that."""
    if not bool(torch.isfinite(value).all()):
        raise ConfigError(f"distill: the teacher's {what} on step {step + 1}'s batch is not finite (NaN or inf); "
                          f"distillation needs finite targets: check that batch and the teacher")


def _step_loss(teacher: nn.Module, student: nn.Module, batch: Any, pick: Callable[[Any], torch.Tensor],
               temperature: float | None, taps: list[_FeatureTaps], names: list[str], feature_weight: float,
               label_weight: float | None, step: int) -> torch.Tensor:
    """The loss of one batch: output loss plus the weighted mean feature loss plus the weighted label loss."""
    if label_weight is not None:
        batch, labels = _split_labels(batch, step)
    try:
        with torch.no_grad():
            target = pick(run_model(teacher, batch)).detach()
        prediction = pick(run_model(student, batch))
    except MuscoError:
        raise
    except Exception as exc:  # the user's batch or model: one clear line, the cause chained
        raise ConfigError(f"distill: the models failed on step {step + 1}'s batch: {type(exc).__name__}: {exc}") \
            from exc
    _check_teacher_finite(target, "output", step)
    if prediction.shape != target.shape:
        raise ConfigError(f"distill: the student's output has shape {tuple(prediction.shape)}, the teacher's "
                          f"{tuple(target.shape)}; they must match")
    if temperature is None:
        loss = relative_mse(prediction, target)
    else:
        loss = softened_kl(prediction, target, temperature)
    if label_weight is not None:
        loss = loss + label_weight * _label_loss(prediction, labels, step)
    if names:
        teacher_taps, student_taps = taps
        feature_losses = []
        for name in names:
            expected, got = teacher_taps.values.get(name, []), student_taps.values.get(name, [])
            if not expected or not got:
                raise ConfigError(f"distill: features: module {name!r} did not run on step {step + 1}'s batch")
            if len(expected) != len(got):
                raise ConfigError(f"distill: features: module {name!r} ran {len(got)} time(s) in the student, "
                                  f"{len(expected)} in the teacher on step {step + 1}'s batch")
            calls = []
            for call, (teacher_value, student_value) in enumerate(zip(expected, got)):
                if teacher_value.shape != student_value.shape:
                    raise ConfigError(f"distill: features: {name!r} has shape {tuple(student_value.shape)} in the "
                                      f"student, {tuple(teacher_value.shape)} in the teacher")
                _check_teacher_finite(teacher_value, f"feature {name!r} (call {call + 1})", step)
                calls.append(relative_mse(student_value, teacher_value.detach()))
            feature_losses.append(torch.stack(calls).mean())  # a module called n times: its n calls alike
        loss = loss + feature_weight * torch.stack(feature_losses).mean()
        teacher_taps.values.clear()
        student_taps.values.clear()
    if not loss.requires_grad:
        raise ConfigError("distill: the matched output does not depend on the student's trainable parameters; "
                          "check output= and features=")
    if not torch.isfinite(loss):
        raise ConfigError(f"distill: the loss is not finite at step {step + 1}; lower lr")
    return loss
