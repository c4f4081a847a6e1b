"""Isomorphic auxiliary branches (KSL paper §3.1, Figure 4).

An auxiliary branch attached at the *input* of stage ``tap`` is a copy of that stage, of every later
stage and of the head -- the same structure as the rest of the main branch ("isomorphic"), so every
branch yields logits and an embedding the consensus losses can compare.

Initialisation (``init``): ``"reinit"`` (default, the paper's KSL-scratch) draws the copies afresh --
branches that start from the main branch's weights agree at the first step, and from scratch that
leaves the consensus terms nothing to distil. ``"copy"`` starts every branch as an exact copy of the
stages it repeats: the choice when the trunk is pretrained (e.g. ImageNet weights), where a fresh
head and upper stages would throw that pretraining away in every branch; the branches then diverge
through their own BN statistics, data-order noise and the different depths at which they tap.

Two implementations, one call (:func:`with_isomorphic_branches`):

- :class:`IsomorphicNet` for this package's backbones (``.stem``, ``.stages`` ModuleDict, ``.head``);
  taps are stage names, ``None`` means ``model.default_taps``.
- :class:`TracedIsomorphicNet` for any other ``nn.Module`` whose train-mode forward returns
  ``(logits, embedding)`` -- e.g. torchreid's models built with ``loss="triplet"``; taps are dotted
  submodule names. See its docstring for how the forward is followed.

Only the stem and the stages before a tap are shared. At inference the branches are dropped:
eval mode runs the main branch alone, and :meth:`IsomorphicNet.main_branch` returns the plain base
model (the very same module, so its parameters, count, FLOPs and outputs are the base model's).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Set, Tuple, Union, cast

import torch
from torch import nn

from .head import init_weights

# How a branch's weights start: fresh ("reinit"), a copy of the main branch's ("copy"), or a callable(branch).
Init = Union[Literal["reinit", "copy"], Callable[[nn.Module], object]]

# A net's output: the main branch's embedding in eval mode, (logits, embedding) per branch in train mode.
BranchOutputs = Union[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]

__all__ = ["IsomorphicNet", "TracedIsomorphicNet", "AuxiliaryBranch", "with_isomorphic_branches"]


class AuxiliaryBranch(nn.Module):
    """Copies of the stages from the tap on, plus a copy of the head."""

    def __init__(self, tap: str, stages: nn.ModuleDict, head: nn.Module):
        super().__init__()
        self.tap = tap
        self.stages = stages
        self.head = head

    def forward(self, x: torch.Tensor) -> Any:
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


class IsomorphicNet(nn.Module):
    """A base model plus one isomorphic auxiliary branch per tap.

    Train mode: ``net(x) -> [(logits, emb), ...]``, the main branch first, then one entry per tap in
    the order the taps were given. Eval mode: ``net(x) -> emb`` of the main branch.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] | str | None = None, init: Init = "reinit") -> None:
        super().__init__()
        _check_init(init)
        for attr in ("stem", "stages", "head"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must be a backbone with .stem, .stages and .head (see "
                    f"ksl_ops.models.build_backbone); {type(model).__name__} has no .{attr}")
        if not isinstance(model.stages, nn.ModuleDict):
            raise TypeError("model.stages must be an nn.ModuleDict of named stages")
        stage_names = list(model.stages.keys())
        if taps is None:
            taps = getattr(model, "default_taps", None)
            if taps is None:
                raise ValueError(f"model has no default_taps; pass taps= a list of stage names "
                                 f"from {stage_names}")
        if isinstance(taps, str):
            taps = [taps]
        taps = list(taps)
        bad = [t for t in taps if not isinstance(t, str) or t not in model.stages]
        if bad:
            raise ValueError(f"taps {bad!r} are not stages of {type(model).__name__}; "
                             f"valid stage names: {stage_names}")
        dupes = sorted({t for t in taps if taps.count(t) > 1})
        if dupes:
            raise ValueError(f"taps must be distinct, {dupes!r} given more than once "
                             f"(valid stage names: {stage_names})")

        self.base: Any = model
        self.taps = taps
        reinit = init if callable(init) else getattr(model, "init_weights", init_weights)
        branches = []
        for tap in taps:
            later = stage_names[stage_names.index(tap):]
            stages = nn.ModuleDict({name: copy.deepcopy(model.stages[name]) for name in later})
            branch = AuxiliaryBranch(tap, stages, copy.deepcopy(cast(nn.Module, model.head)))
            if init != "copy":
                reinit(branch)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)

    @property
    def num_branches(self) -> int:
        """B: the main branch plus one per tap."""
        return 1 + len(self.branches)

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def feature_dim(self) -> int:
        return self.base.feature_dim

    def main_branch(self) -> nn.Module:
        """The plain base model (shares every parameter with this net; no branch attached)."""
        return self.base

    def forward(self, x: torch.Tensor) -> BranchOutputs:
        if not self.training:
            return self.base(x)
        base = self.base
        x = base.stem(x)
        tapped: Dict[str, torch.Tensor] = {}
        for name, stage in base.stages.items():
            tapped[name] = x  # the input of this stage: what a branch tapping here consumes
            x = stage(x)
        outputs = [base.head(x)]
        for branch in self.branches:
            outputs.append(branch(tapped[cast(AuxiliaryBranch, branch).tap]))
        return outputs




# --------------------------------------------------------------------------------------------------
# Any nn.Module: branches found by following one traced forward


_INITS = ("reinit", "copy")


def _check_init(init: object) -> None:
    if not (callable(init) or (isinstance(init, str) and init in _INITS)):
        raise ValueError(f"init must be 'reinit', 'copy' or a callable(branch) -> None, got {init!r}")


class _Replay(nn.Module):
    """Stands in, inside a branch, for a trunk module that runs before the branch's tap.

    It returns what that module returned in the main branch's forward of the same batch, so the
    branch runs the model's own forward on the shared trunk's features without holding (or
    recomputing) the trunk: it has no parameters.
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self._outputs: Optional[List[Any]] = None
        self._cursor = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outs = self._outputs
        if outs is None or self._cursor >= len(outs):
            raise RuntimeError(
                f"a branch called trunk module {self.name!r} more often than the main branch's forward did; "
                "TracedIsomorphicNet needs a forward that calls the same modules in the same order every time")
        out = outs[self._cursor]
        self._cursor += 1
        return out

    def extra_repr(self) -> str:
        return f"replays {self.name!r} of the main branch"


def _first_tensor(x: object) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return None


def _pair(out: object, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, embedding) from a train-mode forward's output, or a TypeError that says what to build."""
    if (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in out)):
        return out[0], out[1]
    got = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
           else f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    raise TypeError(
        f"with_isomorphic_branches needs a model whose train-mode forward returns (logits [N, K], embedding "
        f"[N, D]); {type(model).__name__}'s returned {got}. For torchreid models build them with loss='triplet' "
        f"(torchreid models.build_model(name, num_classes, loss='triplet')); with loss='softmax' they return "
        f"the logits only")


class _Trace:
    """One train-mode forward of ``model`` on ``x`` with every module's calls recorded.

    The model's state is left as it was: buffers (BN statistics), train/eval modes and the RNG.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, taps: Set[str]) -> None:
        self.calls: Dict[str, List[Tuple[int, int]]] = {}      # name -> [(pre index, post index)], in call order
        self.tap_out: Dict[str, Any] = {}  # tap -> its output (to check it reaches the head)
        modes = [(m, m.training) for m in model.modules()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        counter = [0]
        open_calls: Dict[str, List[int]] = {}
        handles = []

        def pre(mod: nn.Module, args: Any, name: str) -> None:
            open_calls.setdefault(name, []).append(counter[0])
            counter[0] += 1

        def post(mod: nn.Module, args: Any, out: Any, name: str) -> None:
            self.calls.setdefault(name, []).append((open_calls[name].pop(), counter[0]))
            counter[0] += 1
            if name in taps and name not in self.tap_out:
                self.tap_out[name] = out

        try:
            for name, m in model.named_modules():
                if not name:
                    continue
                handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: pre(mod, a, n)))
                handles.append(m.register_forward_hook(lambda mod, a, o, n=name: post(mod, a, o, n)))
            model.train()
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)
                out = model(x)
                logits, emb = _pair(out, model)
                self.reaches = {}
                for tap, t_out in self.tap_out.items():
                    t = _first_tensor(t_out)
                    ok = t is not None and t.requires_grad
                    if t is not None and ok:
                        for target in (logits, emb):
                            g = torch.autograd.grad(target.sum(), t, retain_graph=True, allow_unused=True)[0]
                            ok = ok and g is not None
                    self.reaches[tap] = ok
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.training = mode
        self.num_classes = int(logits.shape[-1])
        self.feature_dim = int(emb.shape[-1])
        self.tap_out = {}
        # the top-level-ish modules, in the order forward first calls them (for error messages)
        order = sorted(self.calls, key=lambda n: self.calls[n][0][0])
        self.call_order = [n for n in order if not any(n.startswith(o + ".") for o in order if o != n)]


class TracedIsomorphicNet(nn.Module):
    """Isomorphic branches on any model whose train-mode forward returns ``(logits, embedding)``.

    A branch tapping at submodule ``tap`` (a dotted name, e.g. ``"conv3"`` or ``"backbone.layer3"``)
    starts at that module's *input*: it holds a copy of ``tap`` and of every module the forward calls
    after it (later stages, pooling, neck, classifier), and runs the model's own ``forward`` -- so
    whatever the forward does between modules (reshapes, functional activations, the train/eval
    switch of the output) is the model's own code, unchanged.

    How the forward is followed (at construction): one train-mode forward on ``example_input`` with a
    hook on every submodule records when each is called (the model's buffers, modes and the RNG are
    restored afterwards). Each tap must be called exactly once, and its output must reach both the
    logits and the embedding. A branch is then a deep copy of the model in which

    - the modules that run entirely *before* the tap are replaced by parameter-free stand-ins that
      return the main branch's outputs of the same batch (the trunk is shared, not duplicated; its
      gradient collects every branch's);
    - the tap's input is set to the main branch's tap input (a forward pre-hook);
    - the tap and every module called after it are copies owned by the branch;
    - modules never called, and the parameters/buffers held directly by the tap's ancestors (e.g. the
      root), stay shared with the main branch.

    A module with parameters used both before and after a tap cannot be split and is refused.

    Train mode: ``net(x) -> [(logits, emb), ...]``, the main branch first, then one pair per tap in
    the order given. Eval mode: ``net(x)`` is ``model(x)`` (the same module, parameters, output and
    FLOPs); :meth:`main_branch` returns ``model`` itself.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] | str, init: Init = "reinit",
                 example_input: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        _check_init(init)
        if isinstance(taps, str):
            taps = [taps]
        taps = list(taps)
        modules = dict(model.named_modules())
        bad_type = [t for t in taps if not isinstance(t, str)]
        if bad_type:
            raise TypeError(f"taps must be submodule names (str), got {bad_type!r}")
        if example_input is None:
            p = next(iter(model.parameters()), None)
            example_input = torch.randn(2, 3, 256, 128, device=p.device if p is not None else None,
                                        dtype=p.dtype if p is not None and p.is_floating_point() else None)
        trace = _Trace(model, example_input, set(taps))
        order = trace.call_order
        cls = type(model).__name__
        bad = [t for t in taps if t == "" or t not in modules]
        if bad:
            raise ValueError(f"taps {bad!r} are not submodules of {cls}; pass the dotted names of modules its "
                             f"forward calls in sequence, e.g. from {order}")
        dupes = sorted({t for t in taps if taps.count(t) > 1})
        if dupes:
            raise ValueError(f"taps must be distinct, {dupes!r} given more than once")
        for t in taps:
            n = len(trace.calls.get(t, []))
            if n != 1:
                what = "never called by" if n == 0 else f"called {n} times by"
                raise ValueError(f"tap {t!r} is {what} {cls}'s train-mode forward; a tap must be a module called "
                                 f"exactly once, whose input starts a branch, e.g. one of {order}")
            if not trace.reaches.get(t, False):
                raise ValueError(f"the output of tap {t!r} does not reach both the logits and the embedding of "
                                 f"{cls}'s forward; pick a module on the path to the head, e.g. one of {order}")

        self.base = model
        self.taps = taps
        self.num_classes = trace.num_classes
        self.feature_dim = trace.feature_dim
        branches, replays = [], []
        for t in taps:
            branch, names, shared = self._build_branch(model, modules, trace, t)
            if init == "copy":
                pass
            elif callable(init):
                init(branch)
            else:
                _reinit(branch, shared)
            branches.append(branch)
            replays.append(names)
        self.branches = nn.ModuleList(branches)
        self._replay_names = sorted({n for names in replays for n in names})

    @staticmethod
    def _build_branch(model: nn.Module, modules: Dict[str, nn.Module], trace: _Trace,
                      tap: str) -> Tuple[nn.Module, List[str], List[torch.Tensor]]:
        """A deep copy of ``model`` holding its own copies of ``tap`` and what runs after it."""
        start = trace.calls[tap][0][0]
        memo: Dict[int, Any] = {}
        replayed: List[str] = []
        shared: List[torch.Tensor] = []

        def has_state(m: nn.Module) -> bool:
            return any(True for _ in m.parameters()) or any(True for _ in m.buffers())

        def share_direct(m: nn.Module) -> None:
            for v in list(m._parameters.values()) + list(m._buffers.values()):
                if v is not None:
                    memo[id(v)] = v
                    shared.append(v)

        def visit(name: str, m: nn.Module) -> None:
            prefix = name + "." if name else ""
            for child_name, child in m.named_children():
                full = prefix + child_name
                if full == tap:
                    continue
                sub = [c for n, cs in trace.calls.items() if n == full or n.startswith(full + ".") for c in cs]
                before = any(post < start for _, post in sub)
                after = any(pre > start for pre, _ in sub)
                spans = any(pre < start < post for pre, post in sub)
                own = trace.calls.get(full, [])
                if tap.startswith(full + "."):
                    share_direct(child)
                    visit(full, child)
                elif not sub:                       # never called: not part of any branch's computation
                    memo[id(child)] = child
                    shared.extend(list(child.parameters()) + list(child.buffers()))
                elif spans:
                    raise ValueError(f"module {full!r} runs around tap {tap!r} without containing it; "
                                     f"TracedIsomorphicNet cannot split its call -- tap a module that it calls "
                                     f"in sequence, or {full!r} itself")
                elif before and not after:
                    if own:
                        memo[id(child)] = _Replay(full)
                        replayed.append(full)
                    else:                           # a container whose members run before the tap
                        share_direct(child)
                        visit(full, child)
                elif after and not before:
                    pass                            # copied into the branch
                elif not has_state(child):
                    pass                            # stateless and used on both sides: a copy computes the same
                elif not own:
                    share_direct(child)
                    visit(full, child)
                else:
                    raise ValueError(f"module {full!r} (with parameters or buffers) is called both before and "
                                     f"after tap {tap!r}: the trunk would share it and the branch copy it. Tap a "
                                     f"module after its last use or before its first")

        share_direct(model)
        visit("", model)
        branch = copy.deepcopy(model, memo)
        return branch, replayed, shared

    @property
    def num_branches(self) -> int:
        """B: the main branch plus one per tap."""
        return 1 + len(self.branches)

    def main_branch(self) -> nn.Module:
        """The model itself (shares every parameter with this net; no branch attached)."""
        return self.base

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> BranchOutputs:
        if not self.training:
            return self.base(x, *args, **kwargs)
        recorded: Dict[str, List[Any]] = {n: [] for n in self._replay_names}
        tap_inputs: Dict[str, Any] = {}
        handles = []
        try:
            for n in self._replay_names:
                handles.append(self.base.get_submodule(n).register_forward_hook(
                    lambda m, a, o, n=n: recorded[n].append(o)))
            for t in self.taps:
                handles.append(self.base.get_submodule(t).register_forward_pre_hook(
                    lambda m, a, k, t=t: tap_inputs.__setitem__(t, (a, k)), with_kwargs=True))
            outputs = [_pair(self.base(x, *args, **kwargs), self.base)]
        finally:
            for h in handles:
                h.remove()
        for tap, branch in zip(self.taps, self.branches):
            if tap not in tap_inputs:
                raise RuntimeError(f"tap {tap!r} was not called by this forward of {type(self.base).__name__}; "
                                   f"its forward must call every tap on every batch")
            stand_ins = [m for m in branch.modules() if isinstance(m, _Replay)]
            for r in stand_ins:
                r._outputs, r._cursor = recorded[r.name], 0
            h = branch.get_submodule(tap).register_forward_pre_hook(
                lambda m, a, k, t=tap: tap_inputs[t], with_kwargs=True)
            try:
                outputs.append(_pair(branch(x, *args, **kwargs), self.base))
            finally:
                h.remove()
                for r in stand_ins:
                    r._outputs = None
        return outputs


def _reinit(branch: nn.Module, shared: List[torch.Tensor]) -> None:
    """Fresh weights for a branch's own modules: the model's ``_init_params()`` (torchreid's models)
    if it has one, else ``reset_parameters()`` of every module that has it. Tensors the branch shares
    with the main branch are left as they were."""
    saved = [(t, t.detach().clone()) for t in shared]
    shared_ids = {id(t) for t in shared}
    own_init = getattr(branch, "_init_params", None)
    if callable(own_init):
        own_init()
    else:
        for m in branch.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and not any(id(p) in shared_ids for p in m.parameters(recurse=False)):
                reset()
    with torch.no_grad():
        for t, value in saved:
            t.copy_(value)


def _is_ksl_backbone(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("stem", "stages", "head")) and isinstance(
        getattr(model, "stages", None), nn.ModuleDict)


def with_isomorphic_branches(model: nn.Module, taps: Iterable[str] | str | None = None, init: Init = "reinit",
                             example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """Attach one isomorphic auxiliary branch per tap to ``model``; a branch starts at a tap's input.

    - This package's backbones (``ksl_ops.models.build_backbone``): ``taps`` are stage names, ``None``
      uses ``model.default_taps`` (the paper's positions); returns an :class:`IsomorphicNet`.
    - Any other ``nn.Module`` whose train-mode forward returns ``(logits, embedding)`` and eval-mode
      forward the embedding (e.g. torchreid's models built with ``loss="triplet"``): ``taps`` are
      dotted submodule names, e.g. ``["conv3", "conv4"]`` for torchreid's OSNet and
      ``["layer3", "layer4"]`` for its ResNets; returns a :class:`TracedIsomorphicNet`.
      ``example_input`` is the tensor its forward is followed on once (default ``randn(2, 3, 256,
      128)``; pass a small one of your input size to make construction cheap).

    ``init``: ``"reinit"`` (fresh weights, the paper's from-scratch setting; the model's own
    ``_init_params`` if it has one, else each module's ``reset_parameters``), ``"copy"`` (each branch
    starts as an exact copy of the stages it repeats: all branches agree at step 0; use it when
    fine-tuning a pretrained trunk) or a callable applied to each branch. ``taps=[]`` gives B = 1.
    """
    _check_init(init)
    if _is_ksl_backbone(model):
        tap_list = [taps] if isinstance(taps, str) else (None if taps is None else list(taps))
        stages: Any = model.stages
        if tap_list is None or all(isinstance(t, str) and t in stages for t in tap_list) \
                or not all(isinstance(t, str) and "." in t for t in tap_list):
            return IsomorphicNet(model, taps, init=init)
    if taps is None:
        children = [n for n, _ in model.named_children()]
        raise TypeError(
            f"{type(model).__name__} is not a ksl_ops backbone (a model with .stem, .stages and .head, see "
            f"ksl_ops.models.build_backbone), so it has no default taps: pass taps=[...], the dotted names of "
            f"the submodules whose input starts a branch (e.g. ['conv3', 'conv4'] for torchreid's OSNet, "
            f"['layer3', 'layer4'] for its ResNets); its top-level submodules: {children}")
    return TracedIsomorphicNet(model, taps, init=init, example_input=example_input)
