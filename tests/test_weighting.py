"""Weights are applied in one place: what explain reports is what training multiplies by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from makd_registry.explain import explain_dict
from makd_registry.features import FeatureSet
from makd_registry.models import make_architecture_registry
from makd_registry.objective import load_objective
from makd_registry.plugins import make_plugin_manager, make_registry
from makd_registry.weighting import effective_weights, weighted_loss

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "objectives").glob("*.yaml"))


def _registries():
    pm = make_plugin_manager(entrypoints=False)
    return make_registry(pm), make_architecture_registry(pm)


def _leaves(root):
    return [n for n in root.walk() if not n.children]


def _instrument(root, seed: int = 0):
    """Replace every leaf's loss by ``p_leaf · c_leaf``: the gradient of the total loss
    with respect to ``p_leaf`` is then ``c_leaf`` times the factor the leaf is trained with."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for leaf in _leaves(root):
        p = torch.ones((), requires_grad=True)
        c = float(torch.rand((), generator=gen)) + 0.5
        leaf.loss = lambda features, p=p, c=c: p * c
        params[leaf.path] = (p, c)
    return params


def _trained_factors(root, step: int) -> dict[str, float]:
    params = _instrument(root)
    total = weighted_loss(root, FeatureSet(step=step))
    if total.requires_grad:
        total.backward()
    return {path: (0.0 if p.grad is None else float(p.grad) / c) for path, (p, c) in params.items()}


def _explained(node: dict, out: dict[str, float]) -> dict[str, float]:
    out[node["path"]] = node["effective_weight"]
    for child in node.get("children", []):
        _explained(child, out)
    return out


def _stage_steps(root) -> list[tuple[int, set[str]]]:
    """One step inside each stage with the leaves active there (one step for no stages)."""
    if not hasattr(root, "boundaries"):
        return [(0, {leaf.path for leaf in _leaves(root)})]
    return [
        (start, {leaf.path for leaf in _leaves(child)})
        for (start, _), child in zip(root.boundaries(), root.children, strict=True)
    ]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("root_weight", [1.0, 3.0])
def test_explain_reports_the_factors_every_shipped_objective_trains_with(path, root_weight):
    registry, architectures = _registries()
    resolved = load_objective(
        path,
        registry,
        architectures=architectures,
        overrides=[f"objective.weight={root_weight}"],
    )
    explained = _explained(explain_dict(resolved)["objective"], {})
    assert explained == effective_weights(resolved.root)
    for step, active in _stage_steps(resolved.root):
        trained = _trained_factors(resolved.root, step)
        for leaf, factor in trained.items():
            expected = explained[leaf] if leaf in active else 0.0
            assert factor == pytest.approx(expected, rel=1e-6), (leaf, step)
        assert explained[resolved.root.path] == root_weight


NESTED = """\
teacher: {config: {model_type: bert, num_hidden_layers: 4, hidden_size: 32,
  num_attention_heads: 4, intermediate_size: 64}}
student: {config: {model_type: bert, num_hidden_layers: 2, hidden_size: 32,
  num_attention_heads: 4, intermediate_size: 64}}
objective:
  type: sum
  name: root
  weight: 2.0
  terms:
    - type: sum
      name: layerwise
      weight: 0.5
      layers: uniform
      terms:
        - {type: attention_kl, weight: 3.0}
        - {type: hidden_mse, weight: 0.25}
    - {type: logits_kd, name: logits, weight: 1.5}
    - {type: ce, weight: 0.7}
"""


def test_scaling_any_node_scales_its_share_of_the_loss_and_the_gradients(tmp_path):
    registry, architectures = _registries()
    file = tmp_path / "nested.yaml"
    file.write_text(NESTED)
    base = load_objective(file, registry, architectures=architectures)
    paths = [n.path for n in base.root.walk()]
    assert len(paths) == 6
    for node_path in paths:
        shares = {}
        for factor in (1.0, 3.0):
            resolved = load_objective(file, registry, architectures=architectures)
            node = next(n for n in resolved.root.walk() if n.path == node_path)
            node.config = node.config.model_copy(update={"weight": node.weight * factor})
            params = _instrument(resolved.root)
            total = weighted_loss(resolved.root, FeatureSet())
            total.backward()
            under = {leaf.path for leaf in _leaves(node)}
            shares[factor] = (
                float(total.detach()),
                {p: float(pc[0].grad) for p, pc in params.items()},
                under,
            )
        (t1, g1, under), (t3, g3, _) = shares[1.0], shares[3.0]
        # the node's share of the total: what its leaves contribute; with p = 1 each leaf
        # contributes exactly its gradient (factor · c · p)
        node_share = sum(g1[leaf] for leaf in under)
        assert t3 - t1 == pytest.approx(2.0 * node_share, rel=1e-6), node_path
        for leaf in g1:
            expected = g1[leaf] * (3.0 if leaf in under else 1.0)
            assert g3[leaf] == pytest.approx(expected, rel=1e-6), (node_path, leaf)


def test_the_root_weight_scales_the_trained_loss(tmp_path, monkeypatch):
    """``--set objective.weight=3`` triples the logged loss of step 1 (it was ignored)."""
    from test_engine import records, write_objective

    from makd_registry.cli import main

    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_objective(tmp_path, steps=1)
    losses = {}
    for weight in (1, 3):
        out = tmp_path / f"w{weight}"
        assert main(["run", str(path), "-o", str(out), "--set", f"objective.weight={weight}"]) == 0
        train = [r for r in records(out) if r["kind"] == "train"]
        losses[weight] = train[0]["loss"]
        assert train[0]["terms"]["tiny"] * weight == pytest.approx(train[0]["loss"], rel=1e-6)
    assert losses[3] == pytest.approx(3 * losses[1], rel=1e-6)
    summary = json.loads((tmp_path / "w3" / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(losses[3], rel=1e-6)
