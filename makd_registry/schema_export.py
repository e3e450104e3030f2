"""JSON Schema of objective files, including the aspects of every installed plugin.

Each aspect's ``Config`` becomes a definition; an objective node is ``oneOf`` the aspects,
selected by the ``type`` constant, and child-node fields (``sum.terms``, a stage's
``objective``) refer back to that node definition, so editors using yaml-language-server
complete nested terms too.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .aspect import NODE_SCHEMA_MARKER
from .objective.sections import ObjectiveFile
from .registry import AspectRegistry

SCHEMA_ID = "https://makd.invalid/schema/objective.json"
NODE_DEF = "AspectNode"


def objective_json_schema(registry: AspectRegistry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an objective file for ``registry``'s aspects."""
    entries = list(registry)
    models = [(e.cls.Config, "validation") for e in entries] + [(ObjectiveFile, "validation")]
    refs, top = models_json_schema(models, ref_template="#/$defs/{model}")
    defs: dict[str, Any] = top.get("$defs", {})

    renames = _readable_names(entries, refs)
    variants = []
    for entry in entries:
        ref = renames.get(refs[(entry.cls.Config, "validation")]["$ref"])
        variants.append(
            {
                "title": entry.name,
                "description": entry.cls.summary(),
                "allOf": [
                    {"$ref": ref},
                    {"properties": {"type": {"const": entry.name}}, "required": ["type"]},
                ],
            }
        )
    defs[NODE_DEF] = {
        "description": "An objective node: an aspect selected by 'type'.",
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": [e.name for e in entries]}},
        "oneOf": variants,
    }
    root_ref = refs[(ObjectiveFile, "validation")]["$ref"]
    root_name = root_ref.rsplit("/", 1)[-1]
    root = defs.pop(root_name)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **root,
        "$defs": defs,
    }
    return _replace_markers(_rename_refs(schema, renames))


def _readable_names(entries: list[Any], refs: dict[Any, Any]) -> dict[str, str]:
    """``#/$defs/makd_plugins__matrix__MHAMatrix__Config`` → ``#/$defs/aspect.mha_matrix``."""
    owners: dict[str, list[str]] = {}
    for entry in entries:
        owners.setdefault(refs[(entry.cls.Config, "validation")]["$ref"], []).append(entry.name)
    return {
        ref: f"#/$defs/aspect.{names[0]}" if len(names) == 1 else ref
        for ref, names in owners.items()
    }


def _rename_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and value in renames:
                out[key] = renames[value]
            elif key == "$defs":
                out[key] = {
                    renames.get(f"#/$defs/{k}", f"#/$defs/{k}").rsplit("/", 1)[-1]: _rename_refs(
                        v, renames
                    )
                    for k, v in value.items()
                }
            else:
                out[key] = _rename_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rename_refs(v, renames) for v in node]
    return node


def _replace_markers(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("x-makd-node") is True and set(node) <= {
            *NODE_SCHEMA_MARKER,
            "description",
            "title",
            "default",
        }:
            out = {"$ref": f"#/$defs/{NODE_DEF}"}
            if "description" in node:
                out["description"] = node["description"]
            return out
        return {k: _replace_markers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_markers(v) for v in node]
    return node
