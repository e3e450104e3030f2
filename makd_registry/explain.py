"""``makd explain``: the resolved objective tree as text or JSON."""

from __future__ import annotations

from typing import Any

from rich.tree import Tree

from .aspect import Aspect
from .features import summarize
from .objective.resolve import ResolvedObjective
from .weighting import effective_weights


def _pairs(aspect: Aspect) -> str:
    return " ".join(f"{s}→{t}" for s, t in aspect.pairs)


def node_dict(aspect: Aspect, effective: dict[str, float] | None = None) -> dict[str, Any]:
    """One node (and its subtree) as plain data; ``effective`` maps each path to the factor
    its loss is trained with (:func:`~makd_registry.weighting.effective_weights`)."""
    if effective is None:
        effective = effective_weights(aspect)
    out: dict[str, Any] = {
        "name": aspect.display_name,
        "path": aspect.path,
        "type": aspect.name,
        "weight": aspect.weight,
        "effective_weight": effective[aspect.path],
    }
    layers = getattr(aspect.config, "layers", None)
    if layers is not None:
        out["mapping"] = layers.describe()
    if aspect.pairs:
        out["pairs"] = [list(p) for p in aspect.pairs]
    out.update(aspect.explain_info())
    if aspect.children:
        out["children"] = [node_dict(c, effective) for c in aspect.children]
    else:
        out["features"] = summarize(aspect.requires())
    return out


def explain_dict(resolved: ResolvedObjective) -> dict[str, Any]:
    return {
        "file": resolved.file,
        "teacher": _model_text(resolved, "teacher", resolved.teacher_layers),
        "student": _model_text(resolved, "student", resolved.student_layers),
        "objective": node_dict(resolved.root),
        "features": summarize(resolved.requires()),
    }


def _model_text(resolved: ResolvedObjective, side: str, layers: int | None) -> dict[str, Any]:
    spec = getattr(resolved.spec, side)
    source: str | None = None
    if spec is not None:
        if spec.model is not None:
            source = spec.model
        elif spec.config is not None:
            source = f"config (model_type={spec.config.get('model_type', '?')})"
        elif getattr(spec, "teacher_layers", None) is not None:
            source = f"teacher layers {spec.teacher_layers}"
        cache = getattr(spec, "cache", None)
        if cache is not None:  # a teacher artifact: its outputs, without its weights
            source = f"{source}, read from the artifact {cache}" if source else f"artifact {cache}"
    return {"source": source, "layers": layers}


def _fmt_weight(value: float) -> str:
    return f"{value:g}"


def explain_tree(resolved: ResolvedObjective) -> Tree:
    """A rich tree of the objective for the terminal."""
    data = explain_dict(resolved)

    def label(node: dict[str, Any]) -> str:
        text = f"[bold]{node['name']}[/bold] [dim]({node['type']})[/dim]"
        text += f"  weight {_fmt_weight(node['weight'])}"
        text += f"  effective {_fmt_weight(node['effective_weight'])}"
        if "steps" in node:
            text += "  steps " + ", ".join("rest" if s is None else str(s) for s in node["steps"])
        if "mapping" in node:
            text += f"  layers: {node['mapping']}"
        return text

    def add(tree: Tree, node: dict[str, Any]) -> None:
        branch = tree.add(label(node))
        if "pairs" in node:
            branch.add("pairs (student→teacher): " + " ".join(f"{s}→{t}" for s, t in node["pairs"]))
        if "features" in node:
            for side in ("teacher", "student"):
                if node["features"][side]:
                    branch.add(f"{side}: " + ", ".join(node["features"][side]))
        for child in node.get("children", []):
            add(branch, child)

    def model(side: str) -> str:
        info = data[side]
        if info["source"] is None:
            return f"{side}: (not given)"
        depth = "unknown depth" if info["layers"] is None else f"{info['layers']} layers"
        return f"{side}: {info['source']} — {depth}"

    root = Tree(f"[bold]{data['file']}[/bold]")
    root.add(model("teacher"))
    root.add(model("student"))
    objective = root.add("objective")
    add(objective, data["objective"])
    captured = root.add("features captured")
    for side in ("teacher", "student"):
        captured.add(f"{side}: " + (", ".join(data["features"][side]) or "none"))
    return root
