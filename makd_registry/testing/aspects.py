"""Helpers for testing aspect plugins (re-exported by :mod:`makd_registry.testing`).

Third-party aspect authors can use these in their own test suites::

    from makd_registry.testing import registry_with, resolve

    def test_my_aspect_validates():
        registry = registry_with(MyAspect)
        resolved = resolve('''
        teacher: {config: {num_hidden_layers: 4}}
        student: {config: {num_hidden_layers: 2}}
        objective: {type: my_aspect, layers: uniform}
        ''', registry)
        assert resolved.root.pairs == ((0, 1), (1, 3))
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import hookimpl
from ..aspect import Aspect
from ..errors import Diagnostic, ObjectiveError
from ..features import Feature, ModelInfo
from ..objective import ResolvedObjective, resolve_text
from ..plugins import MakdPluginManager, make_plugin_manager, make_registry
from ..registry import AspectRegistry


def plugin_for(*aspects: type[Aspect], name: str = "test-plugin") -> Any:
    """A plugin object whose ``makd_register_aspects`` registers ``aspects``."""

    @hookimpl
    def makd_register_aspects(register: Any) -> None:
        for cls in aspects:
            register(cls)

    return SimpleNamespace(__name__=name, makd_register_aspects=makd_register_aspects)


def plugin_manager(*plugins: Any, entrypoints: bool = False) -> MakdPluginManager:
    """A fresh manager with the built-ins and ``plugins``; no entry points by default."""
    return make_plugin_manager(plugins, entrypoints=entrypoints)


def registry_with(
    *aspects: type[Aspect], plugins: Iterable[Any] = (), entrypoints: bool = False
) -> AspectRegistry:
    """A registry with the built-in aspects plus ``aspects`` (as one test plugin)."""
    extra = list(plugins)
    if aspects:
        extra.append(plugin_for(*aspects))
    return make_registry(plugin_manager(*extra, entrypoints=entrypoints))


def resolve(
    text: str, registry: AspectRegistry, *, file: str = "test.yaml", base_dir: Path | None = None
) -> ResolvedObjective:
    """Validate and resolve objective YAML text (dedented) against ``registry``."""
    return resolve_text(textwrap.dedent(text), file, registry, base_dir=base_dir)


def diagnostics(text: str, registry: AspectRegistry, **kwargs: Any) -> list[Diagnostic]:
    """The diagnostics objective YAML text produces; ``AssertionError`` if it is valid."""
    try:
        resolve(text, registry, **kwargs)
    except ObjectiveError as exc:
        return exc.diagnostics
    raise AssertionError("the objective was expected to be invalid, but it validated")


# -- property checks for aspects ------------------------------------------------------------

#: token axes of each feature kind (for padding perturbations and gradient checks)
_TOKEN_AXES = {
    Feature.EMBEDDINGS: (1,),
    Feature.HIDDEN: (1,),
    Feature.ATTENTION_PROBS: (2, 3),
    Feature.ATTENTION_QUERY: (2,),
    Feature.ATTENTION_KEY: (2,),
    Feature.ATTENTION_VALUE: (2,),
    Feature.LOGITS: (1,),
    Feature.GENERATED: (1,),
}


def _head_dim(info: ModelInfo) -> int:
    return info.head_dim or info.hidden_size // info.num_heads


def feature_shape(feature: Feature, info: ModelInfo, batch: int, seq: int) -> tuple[int, ...]:
    """The shape of ``feature`` for a model described by ``info``."""
    d, h, hkv = _head_dim(info), info.num_heads, info.num_kv_heads or info.num_heads
    inter = info.intermediate_size or 4 * info.hidden_size
    classify = info.num_labels is not None and not info.is_decoder
    shapes = {
        Feature.EMBEDDINGS: (batch, seq, info.hidden_size),
        Feature.HIDDEN: (batch, seq, info.hidden_size),
        Feature.ATTENTION_PROBS: (batch, h, seq, seq),
        Feature.ATTENTION_QUERY: (batch, h, seq, d),
        Feature.ATTENTION_KEY: (batch, hkv, seq, d),
        Feature.ATTENTION_VALUE: (batch, hkv, seq, d),
        Feature.Q_PROJ: (batch, seq, h * d),
        Feature.K_PROJ: (batch, seq, hkv * d),
        Feature.V_PROJ: (batch, seq, hkv * d),
        Feature.O_PROJ: (batch, seq, info.hidden_size),
        Feature.FFN_INTERMEDIATE: (batch, seq, inter),
        Feature.FFN_GATE: (batch, seq, inter),
        Feature.FFN_UP: (batch, seq, inter),
        Feature.FFN_OUTPUT: (batch, seq, info.hidden_size),
        Feature.LOGITS: (batch, info.num_labels) if classify else (batch, seq, info.vocab_size),
        Feature.GENERATED: (batch,) if classify else (batch, seq),
    }
    return shapes[feature]


def _token_axes(feature: Feature, ndim: int) -> tuple[int, ...]:
    if feature in (Feature.LOGITS, Feature.GENERATED) and ndim < 2 + (feature is Feature.LOGITS):
        return ()  # per-example tensors have no token axis
    return _TOKEN_AXES.get(feature, (1,))


def make_feature_set(
    aspect: Aspect,
    teacher: ModelInfo,
    student: ModelInfo | None = None,
    *,
    batch: int = 3,
    seq: int = 6,
    seed: int = 0,
    causal: bool = False,
    equal: bool = False,
    lengths: Iterable[int] | None = None,
) -> Any:
    """Random features for everything ``aspect.requires()``, with right padding.

    ``equal=True`` gives the student exactly the teacher's tensors at each mapped pair
    (the models must then have the same shapes). ``lengths`` are the real lengths per row
    (default: a mix of full and padded rows).
    """
    import torch

    from ..features import FeatureSet

    student = student or teacher
    gen = torch.Generator().manual_seed(seed)
    lengths = list(lengths) if lengths is not None else [seq - (i % 3) for i in range(batch)]
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, : max(1, min(seq, length))] = 1

    def tensor(feature: Feature, info: ModelInfo) -> Any:
        shape = feature_shape(feature, info, batch, seq)
        if feature is Feature.GENERATED:
            high = info.num_labels if len(shape) == 1 else info.vocab_size
            out = torch.randint(0, high or 2, shape, generator=gen)
            if len(shape) == 2:
                out = torch.where(mask.bool(), out, -100)
            return out
        if feature is Feature.ATTENTION_PROBS:
            scores = torch.randn(shape, generator=gen)
            keep = mask.bool()[:, None, None, :]
            if causal:
                keep = keep & torch.ones(seq, seq, dtype=torch.bool).tril()
            return torch.softmax(scores.masked_fill(~keep, -1e9), dim=-1)
        return torch.randn(shape, generator=gen)

    teacher_features: dict[Any, Any] = {}
    student_features: dict[Any, Any] = {}
    on_teacher: dict[Any, Any] = {}
    requests = aspect.requires()
    for r in requests:
        if r.side == "teacher":
            teacher_features[(r.feature, r.layer)] = tensor(r.feature, teacher)
    pair_of = {s: t for s, t in aspect.pairs}
    for r in requests:
        if r.side != "student":
            continue
        key = (r.feature, r.layer)
        t_layer = r.teacher_input_layer if r.on_teacher_input else pair_of.get(r.layer)
        twin = (r.feature, t_layer if r.layer is not None else None)
        value = (
            teacher_features[twin].clone()
            if equal and twin in teacher_features
            else tensor(r.feature, student)
        )
        if r.on_teacher_input:
            on_teacher[(r.feature, r.layer, r.teacher_input_layer)] = value
        else:
            student_features[key] = value
    labels_shape = feature_shape(Feature.GENERATED, student, batch, seq)
    high = student.num_labels if len(labels_shape) == 1 else student.vocab_size
    labels = torch.randint(0, high or 2, labels_shape, generator=gen)
    return FeatureSet(
        teacher_features=teacher_features,
        student_features=student_features,
        student_on_teacher_input=on_teacher,
        attention_mask=mask,
        labels=labels,
        causal=causal,
        teacher_info=teacher,
        student_info=student,
    )


def _map_features(features: Any, fn: Any) -> Any:
    """A copy of ``features`` with ``fn(feature, tensor)`` applied to every tensor."""
    import dataclasses

    return dataclasses.replace(
        features,
        teacher_features={k: fn(k[0], v) for k, v in features.teacher_features.items()},
        student_features={k: fn(k[0], v) for k, v in features.student_features.items()},
        student_on_teacher_input={
            k: fn(k[0], v) for k, v in features.student_on_teacher_input.items()
        },
    )


def _padding_positions(feature: Feature, tensor: Any, mask: Any) -> Any:
    """Bool tensor of ``tensor``'s shape: True where some token axis is a padded position."""
    import torch

    pad = ~mask.bool()
    out = torch.zeros(tensor.shape, dtype=torch.bool)
    for axis in _token_axes(feature, tensor.dim()):
        view = [1] * tensor.dim()
        view[0], view[axis] = pad.shape[0], pad.shape[1]
        out = out | pad.reshape(view).expand(tensor.shape)
    return out


def check_aspect_invariants(
    aspect: Aspect,
    teacher: ModelInfo,
    student: ModelInfo | None = None,
    *,
    zero_when_equal: bool = True,
    seed: int = 0,
    batch: int = 3,
    seq: int = 6,
    causal: bool = False,
    atol: float = 1e-5,
) -> None:
    """Assert the invariants every distillation loss should have; raise ``AssertionError``.

    Checked: the loss is a finite scalar ≥ 0; exactly 0 when the student's features equal
    the teacher's (``zero_when_equal``; needs same shapes and identity alignment);
    invariant to the content of padded positions and to the batch order; linear in its
    weight (through ``weighting.weighted_loss``); finite loss and gradients for extreme
    values (×1e4) and for fp16/bf16 inputs; padded positions of student features receive
    zero gradient.
    """
    import copy

    import torch

    student = student or teacher
    aspect.build(teacher, student)
    kwargs = dict(batch=batch, seq=seq, causal=causal)
    base = make_feature_set(aspect, teacher, student, seed=seed, **kwargs)
    name = aspect.path

    def value(features: Any) -> Any:
        out = aspect.loss(features)
        assert isinstance(out, torch.Tensor) and out.dim() == 0, f"{name}: loss is not a scalar"
        assert out.dtype == torch.float32, f"{name}: loss is {out.dtype}, not fp32"
        return out

    loss = value(base)
    assert torch.isfinite(loss), f"{name}: loss is not finite ({loss})"
    assert loss.item() >= -atol, f"{name}: loss is negative ({loss.item()})"

    if zero_when_equal:
        same = make_feature_set(aspect, teacher, student, seed=seed, equal=True, **kwargs)
        zero = value(same).item()
        assert abs(zero) <= atol, f"{name}: loss is {zero}, not 0, when student equals teacher"

    gen = torch.Generator().manual_seed(seed + 1)

    def scramble(feature: Feature, t: Any) -> Any:
        where = _padding_positions(feature, t, base.attention_mask)
        if not t.is_floating_point():
            noise = torch.randint(0, 2, t.shape, generator=gen)
            return torch.where(where, noise, t)
        return torch.where(where, torch.randn(t.shape, generator=gen) * 1e4, t)

    scrambled = value(_map_features(base, scramble))
    assert torch.allclose(scrambled, loss, rtol=1e-4, atol=atol), (
        f"{name}: padded content changed the loss ({loss.item()} → {scrambled.item()})"
    )

    perm = torch.randperm(batch, generator=gen)
    permuted = _map_features(base, lambda f, t: t[perm])
    permuted.attention_mask = base.attention_mask[perm]
    permuted.labels = base.labels[perm] if base.labels is not None else None
    permuted.loss_mask = base.loss_mask[perm] if base.loss_mask is not None else None
    reordered = value(permuted)
    assert torch.allclose(reordered, loss, rtol=1e-4, atol=atol), (
        f"{name}: batch order changed the loss ({loss.item()} → {reordered.item()})"
    )

    from ..weighting import weighted_loss

    child = copy.copy(aspect)
    child.config = aspect.config.model_copy(update={"weight": 2.5})
    total = weighted_loss(child, base)
    assert torch.allclose(total, 2.5 * loss, rtol=1e-5, atol=atol), (
        f"{name}: weight 2.5 gave {total.item()}, not 2.5 × {loss.item()}"
    )

    def grads(features: Any) -> tuple[Any, dict[Any, Any]]:
        leaves: dict[Any, Any] = {}

        def leaf(feature: Feature, t: Any) -> Any:
            if not t.is_floating_point():
                return t
            t = t.detach().clone().requires_grad_(True)
            leaves[id(t)] = (feature, t)
            return t

        features = _map_features(features, leaf)
        out = aspect.loss(features)
        out.backward()
        return out, leaves

    out, leaves = grads(base)
    for feature, t in leaves.values():
        if t.grad is None:
            continue
        assert torch.isfinite(t.grad).all(), f"{name}: non-finite gradient for {feature}"
        pad = _padding_positions(feature, t, base.attention_mask)
        assert (t.grad[pad] == 0).all(), f"{name}: padded {feature} positions get gradient"

    extreme = _map_features(
        base,
        lambda f, t: t * 1e4 if t.is_floating_point() and f is not Feature.ATTENTION_PROBS else t,
    )
    out, leaves = grads(extreme)
    assert torch.isfinite(out), f"{name}: loss not finite for extreme values"
    for feature, t in leaves.values():
        if t.grad is not None:
            assert torch.isfinite(t.grad).all(), (
                f"{name}: extreme values → non-finite {feature} grad"
            )

    for dtype in (torch.float16, torch.bfloat16):
        low = _map_features(base, lambda f, t, d=dtype: t.to(d) if t.is_floating_point() else t)
        out, leaves = grads(low)
        assert torch.isfinite(out) and out.dtype == torch.float32, f"{name}: {dtype} loss"
        for feature, t in leaves.values():
            if t.grad is not None:
                assert torch.isfinite(t.grad).all(), f"{name}: {dtype} → non-finite {feature} grad"
