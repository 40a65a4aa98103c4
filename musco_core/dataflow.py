"""What a model's data flow shows, for rewrites that must be exact (:mod:`musco_core.inference`): a forward pass
on the example input observed through module hooks and a ``TorchFunctionMode`` (which module called which, who
read each output and each parameter), and ``torch.fx`` traces, trusted only where they agree with that pass or,
without one, hold nothing computed while tracing."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import logging
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .stats import call_example
from .surgery import memory_neighbours, why_not_replaceable
from .timing import call_arguments, first_input, fresh_copy, tensors_in

log = logging.getLogger(__name__)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (*CONVS, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Model classes whose trace was reported untrusted at INFO; later copies log it at DEBUG (a latency budget
#: with ``form: optimized`` deploys several copies of the same model per step).
_UNTRACEABLE_REPORTED: set[type] = set()


def torch_class(module: nn.Module, types: tuple[type, ...]) -> type | None:
    """The class of ``types`` that ``module`` is an instance of (the first in its MRO), or None."""
    return next((klass for klass in type(module).__mro__ if klass in types), None)


def is_stock(module: nn.Module, types: tuple[type, ...]) -> bool:
    """A module of one of ``types`` that computes just what that torch class computes with its parameters: the
    rule a layer passes before it is factorized (:func:`~musco_core.surgery.why_not_replaceable`: no computation
    of its own, such as a ``_conv_forward`` that standardizes the weight, no hooks, no parametrization)."""
    base = torch_class(module, types)
    return base is not None and why_not_replaceable(module, base) is None


def own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))


def shared_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters and buffers that several modules of ``model`` hold, or whose memory another's overlaps
    (tied weights, also as distinct Parameters over one storage, see :func:`~musco_core.surgery.memory_neighbours`):
    folding into one holder would change the others, and replacing it would cut it off from them."""
    tensors = [tensor for module in model.modules() for tensor in own_tensors(module)]
    return {id(tensor) for tensor, others in zip(tensors, memory_neighbours(tensors)) if others}


def holds_shared(module: nn.Module, shared: set[int]) -> bool:
    return any(id(tensor) in shared for tensor in own_tensors(module))


@attrs.define(eq=False)
class Call:
    """One call of a module in an observed pass: the call that made it (None for the model's own), the calls whose
    output is its input (:func:`first_input`; a layer's and the containers' that returned it as theirs), the
    shapes, a weak reference to its output, and the ids of the modules in whose calls a torch function read that
    output."""

    module: nn.Module
    parent: Call | None
    sources: list[Call]
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None = None
    output: weakref.ref | None = None
    readers: set[int] = attrs.Factory(set)

    def output_kept(self) -> bool:
        """True when its output outlived the pass: returned, stored, or held by another tensor (a view)."""
        return self.output is not None and self.output() is not None


class ObservedPass(TorchFunctionMode):
    """A forward pass on the example input, observed through hooks on every module and every torch function
    called: each module's calls in order (:class:`Call`), the calls of the modules a trace keeps whole
    (``leaf_calls``, as ids, leaving out those made inside another such module: see :class:`StockTracer`), and for
    each parameter and buffer the ids of the modules in whose calls it was read. Only weak references to outputs
    are kept, so that an output still alive after the pass was kept by the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.calls: dict[int, list[Call]] = {}
        self.leaf_calls: list[int] = []
        self.tensor_readers: dict[int, set[int]] = {id(t): set() for m in model.modules() for t in own_tensors(m)}
        self._leaves = {id(m) for m in model.modules() if StockTracer().is_leaf_module(m, "")}
        self._stack: list[Call] = []
        self._outputs: dict[int, list[Call]] = {}
        self._in_hook = False

    @property
    def shapes(self) -> dict[int, tuple]:
        """{id(module): (input shape, output shape)} of each module's first call (None where not a tensor)."""
        return {key: (calls[0].input_shape, calls[0].output_shape) for key, calls in self.calls.items()}

    def reads_only_own(self, module: nn.Module) -> bool:
        """True when the pass read the module's parameters and buffers in its own calls only."""
        return all(self.tensor_readers.get(id(t), set()) <= {id(module)} for t in own_tensors(module))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._stack and not self._in_hook:
            reader = id(self._stack[-1].module)
            for tensor in tensors_in((args, kwargs)):
                for producer in self._producers(tensor):
                    producer.readers.add(reader)
                if id(tensor) in self.tensor_readers:
                    self.tensor_readers[id(tensor)].add(reader)
        return func(*args, **kwargs)

    def _producers(self, tensor: torch.Tensor) -> list[Call]:
        """The calls that returned ``tensor`` (a container returns its last layer's output as its own)."""
        return [call for call in self._outputs.get(id(tensor), []) if call.output() is tensor]

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._in_hook = True  # the hook's own look at the input is no read by the model
        try:
            first = first_input(module, args, kwargs)
            first = first if isinstance(first, torch.Tensor) else None
            call = Call(module, self._stack[-1] if self._stack else None,
                         [] if first is None else self._producers(first),
                         None if first is None else tuple(first.shape))
            self.calls.setdefault(id(module), []).append(call)
            # the model's own call is no call_module in a trace, whatever its class
            if self._stack and id(module) in self._leaves and not any(id(c.module) in self._leaves
                                                                      for c in self._stack[1:]):
                self.leaf_calls.append(id(module))
            self._stack.append(call)
        finally:
            self._in_hook = False

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._in_hook = True
        try:
            call = self._stack.pop()
            if isinstance(output, torch.Tensor):
                call.output, call.output_shape = weakref.ref(output), tuple(output.shape)
                self._outputs[id(output)] = [*self._producers(output), call]
        finally:
            self._in_hook = False


def scripted_modules(model: nn.Module) -> list[str]:
    """The names of the TorchScript modules (``torch.jit.script`` or ``trace``) in ``model``, the root as ``''``:
    they take no hooks of their own, and their compiled code runs no torch function a mode can observe."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.jit.ScriptModule)]


def observe(model: nn.Module, example_input: Any) -> ObservedPass:
    """One pass of ``model`` on ``example_input``, observed (see :class:`ObservedPass`); TorchScript modules are
    not (their calls, and what they read, are missing from it)."""
    observed = ObservedPass(model)
    handles = [handle for module in model.modules() if not isinstance(module, torch.jit.ScriptModule)
               for handle in (module.register_forward_pre_hook(observed.before, with_kwargs=True),
                              module.register_forward_hook(observed.after))]
    try:
        with torch.no_grad(), observed:
            call_example(model, fresh_copy(example_input))
    finally:
        for handle in handles:
            handle.remove()
    return observed


class StockTracer(torch.fx.Tracer):
    """torch.fx's tracer, which also keeps whole (as one ``call_module``) a subclass of a torch layer or BatchNorm
    that computes just what its torch class does, instead of tracing into its forward."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or is_stock(m, (*LAYERS, *BATCHNORMS))


@attrs.frozen
class Traced:
    """A ``torch.fx`` graph of the model: the model's module each ``call_module`` node calls, the module whose
    forward made that call, and the ids of the modules whose parameters the graph reads directly."""

    graph: torch.fx.Graph
    modules: dict[torch.fx.Node, nn.Module]
    callers: dict[torch.fx.Node, nn.Module]
    read_directly: set[int]

    @classmethod
    def of(cls, model: nn.Module, graph: torch.fx.Graph) -> Traced:
        modules = {node: model.get_submodule(node.target) for node in graph.nodes if node.op == "call_module"}
        callers = {}
        for node in modules:  # nn_module_stack: the modules traced through to this call, ending with its own
            stack = list(node.meta.get("nn_module_stack", {}).values())
            callers[node] = model.get_submodule(stack[-2][0]) if len(stack) > 1 else model
        read_directly = {id(model.get_submodule(node.target.rpartition(".")[0]))
                         for node in graph.nodes if node.op == "get_attr"}
        return cls(graph, modules, callers, read_directly)

    @property
    def leaf_calls(self) -> list[int]:
        return [id(module) for module in self.modules.values()]


@attrs.frozen
class Evidence:
    """What the rewrites may rely on: the model's traces where they show its data flow (one per way the model may
    be called; None where they do not), and a pass on the example input (None without one)."""

    traces: list[Traced] | None
    observed: ObservedPass | None

    @property
    def shapes(self) -> dict[int, tuple]:
        return self.observed.shapes if self.observed is not None else {}


def gather_evidence(model: nn.Module, example_input: Any) -> Evidence:
    """The model's traces and pass. A pass over TorchScript modules would not show what they read (a layer's output
    read by one, beside the BatchNorm that folds into the layer), so a model holding one has none: its rewrites
    are those made without an example input, then checked on it."""
    observed = None
    if example_input is not None:
        if scripted := scripted_modules(model):
            log.info("optimize_for_inference: %s TorchScript, whose reads a pass cannot observe: rewrites are chosen "
                     "as without an example input", ", ".join(repr(name) if name else "the model" for name in scripted))
        else:
            observed = observe(model, example_input)
    try:
        with warnings.catch_warnings():  # fx warns that it cannot assert a concrete argument's value
            warnings.simplefilter("ignore")
            # on copies: tracing runs the forward on proxies, which can leave attributes on the model
            concretes = _concrete_arguments(model, example_input)
            copies = [copy.deepcopy(model) for _ in concretes]
            graphs = [StockTracer().trace(traced, concrete) for traced, concrete in zip(copies, concretes)]
    except Exception as exc:  # noqa: BLE001 - any failure to trace means: no trace to rely on
        doubt = f"{type(exc).__name__}: {exc}"
    else:
        traces = [Traced.of(model, graph) for graph in graphs]
        doubt = _trace_doubt(model, traces, observed, copies)
        if doubt is None:
            return Evidence(traces, observed)
    level = logging.DEBUG if type(model) in _UNTRACEABLE_REPORTED else logging.INFO
    _UNTRACEABLE_REPORTED.add(type(model))
    log.log(level, "optimize_for_inference: the %s model cannot be traced by torch.fx faithfully (%s); %s",
            type(model).__name__, doubt,
            "no BatchNorm is folded, and only factorized layers are merged" if observed is None else
            "BatchNorms fold inside nn.Sequential containers only, and only factorized layers are merged, where the "
            "pass on the example input confirms the data flow")
    return Evidence(None, observed)


def _concrete_arguments(model: nn.Module, example_input: Any) -> list[dict[str, Any] | None]:
    """The ``concrete_args`` to trace the model with, one per way it may be called. A traced argument is a proxy
    (``skip is not None`` holds for it): an optional argument is left at its default as the example input leaves
    it; without one, it is traced both given and left at its default, since the model may be called either way."""
    signature = inspect.signature(model.forward)
    defaults = {name: parameter.default for name, parameter in signature.parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    if example_input is None:
        return [None, defaults] if defaults else [None]
    args, kwargs = call_arguments(example_input)
    passed = signature.bind(*args, **kwargs).arguments
    return [{name: value for name, value in defaults.items() if name not in passed} or None]


def _trace_doubt(model: nn.Module, traces: Sequence[Traced], observed: ObservedPass | None,
                 traced_copies: Sequence[nn.Module]) -> str | None:
    """Why the traces may not show the model's data flow, or None. With a pass, a trace must call the same modules
    in the same order (the pass then shows what the trace cannot: which branch of an ``isinstance``, what is read
    outside a module, what is kept after it). Without one, a trace must hold no tensor computed while tracing (a
    ``_tensor_constant``: computed from parameters, perhaps, which the graph then does not show), and the forward
    must have kept no traced value on the model (``self.features = y``: the graph shows no reader of it, though
    whoever reads the attribute after the call is one)."""
    if observed is not None:
        if any(trace.leaf_calls != observed.leaf_calls for trace in traces):
            return "its trace calls other modules, or in another order, than a pass on the example input"
        return None
    names = {name for name, _ in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                 model.named_buffers(remove_duplicate=False))}
    if any(node.op == "get_attr" and node.target not in names for trace in traces for node in trace.graph.nodes):
        return "its trace holds tensors computed while tracing, whose data flow it does not show"
    kept = [f"{name}.{attribute}" if name else attribute for traced in traced_copies
            for name, module in traced.named_modules() for attribute, value in vars(module).items()
            if any(isinstance(leaf, torch.fx.Proxy) for leaf in tree_leaves(value))]
    if kept:
        shown = ", ".join(list(dict.fromkeys(kept))[:3])
        return f"its forward keeps values on the model ({shown}), whose readers the trace does not show"
    return None


#: Ops that read values into Python or whose output's shape depends on the values: what follows may branch on them.
_DATA_READS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_PYTHON_READS = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__)
_ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided"}


def _storage_key(tensor: torch.Tensor) -> int:
    """Who holds ``tensor``'s memory: its views and in-place writes share the key (its id where it has no storage)."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(tensor)


class Dependence(TorchDispatchMode):
    """Which marked outputs the values of a pass were computed from: every op run inside gives its outputs, and the
    arguments it writes in place, the tags of its tensor arguments; :meth:`mark` tags a module's output.

    Tags follow memory (a view and its base share theirs) and are never taken away, so a tensor may carry more
    than it depends on, never less. A tagged value read into Python (``.item()``, ``if tensor:``, ``.tolist()``) or
    deciding a shape (``nonzero``) may steer what runs next: its tags are then held by everything after (see
    :meth:`of`). Memory allocated uninitialized (``torch.empty``) gets every tag given so far: an extension
    that writes it outside torch ops may fill it from any of them. Only the pass is seen, not a value a module
    kept from an earlier pass."""

    def __init__(self) -> None:
        super().__init__()
        self._bits: dict[str, int] = {}  # each tag a bit: a tensor's tags are one int
        self._tags: dict[int, int] = {}
        self._escaped = 0
        self._given = 0  # every tag given so far

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No: torch would wrap every op's call here in ``torch._dynamo.disable``, importing torch._dynamo (about a
        second of CPU) for a pass that compiles nothing."""
        return False

    def _names(self, bits: int) -> frozenset[str]:
        return frozenset(tag for tag, bit in self._bits.items() if bits & bit)

    def of(self, tensor: torch.Tensor) -> frozenset[str]:
        """The tags ``tensor`` may depend on: its own and the escaped ones."""
        return self._names(self._tags.get(_storage_key(tensor), 0) | self._escaped)

    def mark(self, value: Any, tag: str) -> None:
        bit = self._bits.setdefault(tag, 1 << len(self._bits))
        self._given |= bit
        for tensor in tensors_in(value):
            key = _storage_key(tensor)
            self._tags[key] = self._tags.get(key, 0) | bit

    def _tags_in(self, values: Sequence[Any]) -> int:
        tags = 0
        for tensor in _op_tensors(values):
            tags |= self._tags.get(_storage_key(tensor), 0)
        return tags

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if not self._tags:
            return output
        reads, writes, allocates = _op_facts(func)
        tags = self._given if allocates else self._tags_in((*args, *kwargs.values()))
        if tags:
            results = output if isinstance(output, (list, tuple)) else (output,)
            if reads or not all(isinstance(result, torch.Tensor) or result is None for result in results):
                self._escaped |= tags
            written = [args[index] if index < len(args) else kwargs.get(name) for index, name in writes]
            for tensor in _op_tensors((*results, *written)):
                key = _storage_key(tensor)
                self._tags[key] = self._tags.get(key, 0) | tags
        return output


def _op_tensors(values: Sequence[Any]) -> Iterator[torch.Tensor]:
    """The tensors among an op's arguments or results, each a tensor or a list of them (as ``cat`` takes); not
    :func:`~musco_core.timing.tensors_in`, which walks any nesting, on this path run for every op."""
    for value in values:
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(tensor, torch.Tensor):
                yield tensor


@functools.cache
def _op_facts(func: torch._ops.OpOverload) -> tuple[bool, tuple[tuple[int, str], ...], bool]:
    """Whether the op reads values into Python or shapes its output by them; (index, name) of the arguments it
    writes in place; whether it allocates uninitialized memory."""
    writes = tuple((index, argument.name) for index, argument in enumerate(func._schema.arguments)
                   if argument.alias_info is not None and argument.alias_info.is_write)
    return any(tag in func.tags for tag in _DATA_READS), writes, func._schema.name in _ALLOCATIONS


class _PythonReads(TorchFunctionMode):
    """Escapes into :class:`Dependence` the tags of tensors read into Python by calls no op dispatch sees."""

    def __init__(self, dependence: Dependence) -> None:
        super().__init__()
        self.dependence = dependence

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PYTHON_READS:
            self.dependence._escaped |= self.dependence._tags_in(args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def tracking_dependence(marked: Mapping[str, Sequence[nn.Module]]) -> Iterator[Dependence]:
    """Inside, a :class:`Dependence` over the ops run, the outputs and parameters (which the model may read outside
    the module's call) of each of ``marked``'s modules tagged with its key; the hooks are removed afterwards."""
    dependence = Dependence()
    for tag, modules in marked.items():
        for module in modules:
            dependence.mark(list(module.parameters()), tag)
    handles = [module.register_forward_hook(lambda _module, _args, output, tag=tag: dependence.mark(output, tag))
               for tag, modules in marked.items() for module in modules]
    try:
        with _PythonReads(dependence), dependence:
            yield dependence
    finally:
        for handle in handles:
            handle.remove()
