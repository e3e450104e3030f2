"""The offline teacher artifact: ``makd teacher cache OBJECTIVE -o DIR``, read by
``teacher: {cache: DIR}``.

The build runs the objective's teacher once over the tokenised training rows, in row order
and in batches (no gradients, eval mode, the run's autocast), and stores per row what the
objective's capture plan needs from the teacher: its features at the mapped layers, the
module inputs that student matrices are applied to, and its logits, for language models
optionally as the top-k values, int32 ids and the log of the remaining mass
(:func:`~.teacher_cache.row_entries`, the in-run cache's own storage). The directory::

    DIR/config.json                the teacher's transformers config
    DIR/tokenizer/                 a copy of the teacher's tokenizer files
    DIR/shard-00000.safetensors    rows [0, N), then [N, 2N), ... (each written atomically)
    DIR/build.json                 while building: the identity and the finished shards
    DIR/manifest.json              written last: identity hashes, shards, rows, scores

A killed build restarts from the first shard that ``build.json`` does not list with a
verified sha256; shards never depend on each other (each batch lies inside one shard), so
the result is byte-identical to an uninterrupted build. A run that reads the artifact builds
the teacher on the ``meta`` device (no weights), checks the manifest against the objective
(data, preprocessing, tokenizer, teacher, capture plan, every shard's sha256) before it
writes anything, and assembles each batch's teacher features from the memory-mapped shards
(:class:`TeacherArtifact`, the in-run cache's reading code), in any number of processes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ExitCode
from ..features import Feature
from ..objective.artifact import BUILD, CONFIG, MANIFEST, TOKENIZER
from .rundir import RunError, check_writable
from .teacher_cache import _DTYPES, StoredRows, row_entries

FORMAT = 1
SHARD = "shard-{:05d}.safetensors"
#: identity sections, in the order a mismatch is reported
SECTIONS = ("data", "preprocessing", "tokenizer", "teacher", "capture")
#: data-section keys that change only evaluation, never the tokenised training rows
_EVAL_ONLY = {
    "train",
    "validation",
    "validation_split",
    "validation_limit",
    "max_new_tokens",
    "extra_validation",
}
#: the files of a tokenizer (in a tokenizer or model directory)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
#: the weight files of a model directory that name the teacher
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


# -- hashes --------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenizer_files(directory: Path) -> dict[str, Path]:
    """The tokenizer files in ``directory`` by name."""
    return {n: directory / n for n in TOKENIZER_FILES if (directory / n).is_file()}


def _tokenizer_identity(ref: str | None, base_dir: Path, tokenizer: Any) -> dict[str, Any]:
    """``{"files": {name: sha256}}`` of the tokenizer that tokenised the rows: its local
    files, or (a hub id) what ``save_pretrained`` writes."""
    from ..objective.depths import DepthError, local_model_dir

    directory = None
    if ref is not None:
        with contextlib.suppress(DepthError):
            directory = local_model_dir(ref, base_dir)
    if directory is not None and tokenizer_files(directory):
        files = tokenizer_files(directory)
        return {"files": {n: sha256_file(p) for n, p in files.items()}}
    if tokenizer is None:
        return {"files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = tokenizer_files(Path(tmp))
        return {"files": {n: sha256_file(p) for n, p in files.items()}}


def _teacher_identity(spec: Any, base_dir: Path) -> dict[str, Any]:
    """What names the teacher's weights without loading them: the sha256 of a local model
    directory's config and weight files (a hub id by name), the inline config, and for a
    fine-tuned teacher its key in makd's teacher cache (:func:`.teacher.teacher_key`)."""
    from ..objective.depths import local_model_dir
    from .teacher import teacher_key

    t = spec.teacher
    out: dict[str, Any] = {}
    if t.model is not None:
        directory = local_model_dir(t.model, base_dir)
        if directory is None:
            out["model"] = {"hub": t.model}
        else:
            names = sorted(
                p.name
                for p in directory.iterdir()
                if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
            )
            out["model"] = {n: sha256_file(directory / n) for n in names}
    if t.config is not None:
        out["config"] = _sha_json(t.config)
    if t.finetune is not None:
        out["finetune"] = teacher_key(spec, base_dir)
    return out


def _data_identity(spec: Any, base_dir: Path) -> dict[str, Any]:
    from ..objective.depths import is_local_data

    data = spec.data
    ref = data.train
    if is_local_data(ref):
        path = (base_dir / Path(ref).expanduser()).resolve()
        return {"train": path.name, "sha256": sha256_file(path)}
    return {"hub": ref, "subset": data.subset, "split": data.train_split}


def rows_digest(rows: Any) -> str:
    """sha256 of the tokenised rows' model inputs, in row order."""
    digest = hashlib.sha256()
    columns = ("input_ids", "attention_mask", "token_type_ids")
    if hasattr(rows, "iter"):  # a datasets.Dataset: by column blocks
        present = [c for c in columns if c in rows.column_names]
        batches = rows.select_columns(present).iter(batch_size=1024)
        for batch in batches:
            for i in range(len(batch[present[0]])):
                for c in present:
                    digest.update(torch.tensor(batch[c][i], dtype=torch.int64).numpy().tobytes())
                    digest.update(b"|")
                digest.update(b"\n")
        return digest.hexdigest()
    for row in rows:
        for c in columns:
            if c in row:
                digest.update(torch.tensor(list(row[c]), dtype=torch.int64).numpy().tobytes())
                digest.update(b"|")
        digest.update(b"\n")
    return digest.hexdigest()


def _preprocessing_identity(spec: Any, rows: Any) -> dict[str, Any]:
    settings = spec.data.model_dump(mode="json", exclude=_EVAL_ONLY)
    return {"settings": settings, "rows": len(rows), "rows_sha256": rows_digest(rows)}


def logits_kind(task: str) -> str:
    """How the task's teacher logits are stored: per token, as QA spans, or per example."""
    return {"causal_lm": "token", "instruction": "token", "qa": "span"}.get(task, "example")


def capture_identity(
    capture: Any, *, top_k: int | None, dtype: str, task: str, head: str
) -> dict[str, Any]:
    side = capture.teacher
    return {
        "features": sorted([f.value, layer] for f, layer in side.features),
        "module_inputs": sorted([f.value, layer] for f, layer in side.module_inputs),
        "top_k": top_k,
        "dtype": dtype,
        "logits": logits_kind(task),
        "head": head,
    }


def _validation_identity(spec: Any, base_dir: Path) -> dict[str, Any]:
    """What the teacher's stored scores were measured on."""
    from ..objective.depths import is_local_data

    data = spec.data
    files = {}
    refs = {"validation": data.validation, **dict(getattr(data, "extra_validation", {}) or {})}
    for name, ref in refs.items():
        if ref is None:
            continue
        path = (base_dir / Path(ref).expanduser()).resolve()
        files[name] = sha256_file(path) if is_local_data(ref) and path.is_file() else ref
    settings = data.model_dump(mode="json", exclude={"train", "validation", "extra_validation"})
    return {"files": files, "settings": settings}


def identity_hashes(identity: dict[str, Any]) -> dict[str, str]:
    return {k: _sha_json(identity[k]) for k in SECTIONS if k in identity}


# -- what a mismatch says ------------------------------------------------------------------

_WORDS = {
    Feature.EMBEDDINGS: "embedding output",
    Feature.HIDDEN: "hidden states",
    Feature.ATTENTION_PROBS: "attention probabilities",
    Feature.ATTENTION_QUERY: "attention queries",
    Feature.ATTENTION_KEY: "attention keys",
    Feature.ATTENTION_VALUE: "attention values",
    Feature.Q_PROJ: "query projection outputs",
    Feature.K_PROJ: "key projection outputs",
    Feature.V_PROJ: "value projection outputs",
    Feature.O_PROJ: "attention output projection outputs",
    Feature.FFN_INTERMEDIATE: "FFN activations",
    Feature.FFN_GATE: "FFN gate projection outputs",
    Feature.FFN_UP: "FFN up projection outputs",
    Feature.FFN_OUTPUT: "FFN outputs",
    Feature.LOGITS: "logits",
}


def describe_feature(feature: Feature, layer: int | None, *, module_input: bool = False) -> str:
    """``hidden states of teacher layer 3``, ``the teacher's logits``, ``the input of the
    teacher's o_proj at layer 1``."""
    if module_input:
        return (
            f"the input of the teacher's {feature.value} module at layer {layer} (a student "
            "matrix applied to the teacher's input)"
        )
    words = _WORDS.get(feature, feature.value)
    return f"the teacher's {words}" if layer is None else f"{words} of teacher layer {layer}"


def _short(sha: Any) -> str:
    return str(sha)[:12] if isinstance(sha, str) else json.dumps(sha)


def _setting_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [
        f"data.{k}: {json.dumps(before.get(k))} → {json.dumps(after.get(k))}"
        for k in keys
        if before.get(k) != after.get(k)
    ]


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a stored identity and the current one, one sentence per
    section (the sections ``current`` has)."""
    out = []
    if "data" in current and stored.get("data") != current["data"]:
        a, b = stored.get("data") or {}, current["data"]
        if "sha256" in a and "sha256" in b:
            out.append(
                f"the training data differs: data.train {b.get('train')} has sha256 "
                f"{_short(b['sha256'])}, the cache was built from {a.get('train')} with "
                f"sha256 {_short(a['sha256'])}"
            )
        else:
            out.append(
                f"the training data differs: {json.dumps(a)} in the cache, {json.dumps(b)} now"
            )
    if "preprocessing" in current and stored.get("preprocessing") != current["preprocessing"]:
        a, b = stored.get("preprocessing") or {}, current["preprocessing"]
        changed = _setting_changes(a.get("settings") or {}, b.get("settings") or {})
        if changed:
            out.append("the preprocessing differs: " + "; ".join(changed))
        elif a.get("rows") != b.get("rows"):
            out.append(
                f"the preprocessing differs: {b.get('rows')} tokenised training rows now, "
                f"{a.get('rows')} in the cache"
            )
        else:
            out.append(
                "the tokenised training rows differ from the cache's with the same settings "
                "(the tokenisation changed: another makd, transformers or tokenizers version)"
            )
    if "tokenizer" in current and stored.get("tokenizer") != current["tokenizer"]:
        a, b = stored.get("tokenizer") or {}, current["tokenizer"]
        fa, fb = a.get("files") or {}, b.get("files") or {}
        names = sorted(n for n in set(fa) | set(fb) if fa.get(n) != fb.get(n))
        out.append(
            f"the tokenizer differs from the one the cache was built with: its files "
            f"{', '.join(names)} differ"
        )
    if "teacher" in current and stored.get("teacher") != current["teacher"]:
        a, b = stored.get("teacher") or {}, current["teacher"]
        parts = []
        for key, what in (
            ("model", "teacher.model (its config and weight files)"),
            ("config", "teacher.config"),
            (
                "finetune",
                "the fine-tuned teacher (teacher.finetune, the data and training "
                "settings its own training depends on)",
            ),
        ):
            if a.get(key) != b.get(key):
                if key == "model" and isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                    files = sorted(
                        n for n in set(a[key]) | set(b[key]) if a[key].get(n) != b[key].get(n)
                    )
                    what += f": {', '.join(files)} differ"
                elif a.get(key) is None or b.get(key) is None:
                    what += " is given in one and not the other"
                parts.append(what)
        out.append("the teacher differs: " + "; ".join(parts or ["its identity"]))
    if "capture" in current and stored.get("capture") != current["capture"]:
        a, b = stored.get("capture") or {}, current["capture"]
        changed = [
            f"{k}: {json.dumps(a.get(k))} → {json.dumps(b.get(k))}"
            for k in ("top_k", "dtype", "logits", "head")
            if a.get(k) != b.get(k)
        ]
        for key, what in (("features", "features"), ("module_inputs", "module inputs")):
            gone = [x for x in a.get(key, []) if x not in b.get(key, [])]
            new = [x for x in b.get(key, []) if x not in a.get(key, [])]
            if gone or new:
                show = ", ".join(f"{f}@{layer}" if layer is not None else f for f, layer in new)
                changed.append(
                    f"teacher {what}: {len(new)} more ({show or 'none'}), {len(gone)} fewer"
                )
        out.append("the capture plan differs: " + "; ".join(changed))
    return out


# -- reading -------------------------------------------------------------------------------


class ArtifactProblem(Exception):
    """A teacher artifact that cannot be used: ``message`` and the exit code it maps to."""

    def __init__(self, message: str, code: ExitCode = ExitCode.INVALID_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactProblem(f"cannot read {what} {path}: {exc}", ExitCode.DATA) from None


class TeacherArtifact(StoredRows):
    """A finished artifact, read-only: its manifest, and its rows read back as features
    (each shard memory-mapped with ``safe_open`` when first needed)."""

    #: shards kept open at once (each a memory map)
    OPEN_SHARDS = 32

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        capture = manifest["identity"]["capture"]
        self.top_k = capture.get("top_k")
        self.logits = capture.get("logits", "example")
        self.shards = list(manifest["shards"])
        self._starts = [int(s["first_row"]) for s in self.shards]
        self._open: OrderedDict[int, Any] = OrderedDict()

    @classmethod
    def open(cls, directory: Path, *, resume_command: str = "") -> TeacherArtifact:
        """The artifact in ``directory``; an :class:`ArtifactProblem` when there is none,
        it is incomplete, or of another format."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactProblem(
                f"teacher artifact {directory} does not exist: build it with 'makd teacher "
                f"cache OBJECTIVE -o {directory}'",
                ExitCode.MODEL,
            )
        if not (directory / MANIFEST).is_file():
            if (directory / BUILD).is_file():
                build = _read_json(directory / BUILD, "the build state")
                done, total = len(build.get("shards", [])), build.get("shard_count", "?")
                command = build.get("command") or resume_command
                raise ArtifactProblem(
                    f"the teacher artifact {directory} is incomplete ({done} of {total} shards "
                    f"built, no {MANIFEST}): run '{command}' to finish it"
                )
            raise ArtifactProblem(
                f"{directory} is not a teacher artifact: it has no {MANIFEST} (build one with "
                "'makd teacher cache OBJECTIVE -o DIR')"
            )
        manifest = _read_json(directory / MANIFEST, "the manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise ArtifactProblem(
                f"{directory / MANIFEST}: format {got!r}, this makd reads format {FORMAT}: "
                "build the artifact again with this makd"
            )
        return cls(directory, manifest)

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    def verify(self) -> list[str]:
        """Every shard the manifest lists is present with its sha256 (missing and damaged
        shards named)."""
        problems = []
        for shard in self.shards:
            path = self.directory / shard["file"]
            rows = f"rows {shard['first_row']}..{shard['first_row'] + shard['rows'] - 1}"
            if not path.is_file():
                problems.append(f"shard {shard['file']} ({rows}) is missing")
            elif path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                problems.append(
                    f"shard {shard['file']} ({rows}) is damaged: its sha256 is not the "
                    "manifest's; build the artifact again (makd teacher cache ... --overwrite)"
                )
        return problems

    def missing(self, capture: Any) -> list[str]:
        """What the objective's capture plan needs from the teacher that the artifact lacks."""
        stored = self.identity["capture"]
        have = {(f, layer) for f, layer in stored["features"]}
        have_inputs = {(f, layer) for f, layer in stored["module_inputs"]}
        out = [
            describe_feature(f, layer)
            for f, layer in sorted(capture.teacher.features, key=str)
            if (f.value, layer) not in have
        ]
        out += [
            describe_feature(f, layer, module_input=True)
            for f, layer in sorted(capture.teacher.module_inputs, key=str)
            if (f.value, layer) not in have_inputs
        ]
        return out

    def tensor(self, name: str, index: int) -> torch.Tensor:
        i = bisect.bisect_right(self._starts, index) - 1
        handle = self._open.get(i)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / self.shards[i]["file"]), "pt", device="cpu")
            self._open[i] = handle
            if len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return handle.get_tensor(name)


# -- building ------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    output: Path | None = None
    top_k: int | None = None
    dtype: str = "float16"
    shard_rows: int = 1024
    batch_size: int | None = None
    overrides: tuple[str, ...] = ()
    overwrite: bool = False


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _shard_done(index: int) -> None:
    """Called after each shard is on disk (tests interrupt a build here)."""


class ArtifactBuild:
    """One ``makd teacher cache``: plan (everything checked, nothing written), then the
    teacher's pass shard by shard, then the manifest."""

    def __init__(self, path: str | Path, options: BuildOptions, console: Any) -> None:
        from .run import Run, RunOptions

        self.options = options
        self.console = console
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RunError("makd teacher cache runs in one process: start it without torchrun")
        self.run = Run(path, RunOptions(overrides=options.overrides, build_artifact=True), console)
        self.spec = self.run.spec
        spec = self.spec
        refuse = self.run._refuse
        if spec.teacher is None:
            refuse(("objective",), "makd teacher cache needs a 'teacher' section")
        if spec.teacher.model is None and spec.teacher.config is None:
            refuse(
                ("teacher", "cache"),
                "makd teacher cache runs the teacher, so it needs its weights: give "
                "teacher.model or teacher.config (teacher.cache alone reads an artifact)",
            )
        if options.output is not None:
            self.directory = Path(options.output)
        elif spec.teacher.cache is not None:
            from ..objective.artifact import artifact_dir

            self.directory = artifact_dir(spec.teacher.cache, self.run.base_dir)
        else:
            raise RunError("makd teacher cache: give the artifact directory with -o DIR")
        if options.dtype not in _DTYPES:
            raise RunError(f"--dtype must be one of {', '.join(_DTYPES)}, not {options.dtype!r}")
        if options.shard_rows < 1 or (options.batch_size is not None and options.batch_size < 1):
            raise RunError("--shard-rows and --batch-size must be at least 1")

    def command(self) -> str:
        import shlex

        args = ["makd", "teacher", "cache", str(self.run.path), "-o", str(self.directory)]
        if self.options.top_k:
            args += ["--top-k", str(self.options.top_k)]
        if self.options.dtype != "float16":
            args += ["--dtype", self.options.dtype]
        for key, default in (("shard_rows", 1024), ("batch_size", None)):
            value = getattr(self.options, key)
            if value != default:
                args += ["--" + key.replace("_", "-"), str(value)]
        for item in self.options.overrides:
            args += ["--set", item]
        return shlex.join(args)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    # -- plan --------------------------------------------------------------------------

    def _generated_nodes(self) -> list[Any]:
        from ..objective.build import SOURCE_PATH

        out = []
        for node in self.run.resolved.root.walk():
            if node.is_combinator:
                continue
            generated = any(r.feature is Feature.GENERATED for r in node.requires())
            if generated or any(
                r.kind == "teacher_targets" or self.run._transforms_batches(r.kind)
                for r in node.needs()
            ):
                out.append(getattr(node, SOURCE_PATH, ("objective",)))
        return out

    def plan(self) -> dict[str, Any]:
        """Check everything and compute the identity; write nothing."""
        from ..capture import CapturePlan
        from ..errors import ObjectiveError
        from ..models.build import default_head

        run, spec, options = self.run, self.spec, self.options
        source = run.resolved.source
        generated = self._generated_nodes()
        if generated:
            raise ObjectiveError(
                [
                    source.diagnostic(
                        where,
                        "this term needs sequences the teacher generates, or batches made "
                        "during training (e.g. the student's samples), which an artifact of "
                        "the teacher's outputs on the training rows cannot hold: leave it out "
                        "of the objective the artifact is built for",
                    )
                    for where in generated
                ]
            )
        capture = CapturePlan.from_requests(run.resolved.requires())
        if not capture.needs_teacher_forward:
            run._refuse(
                ("objective",),
                "this objective needs nothing from the teacher: there is nothing to cache",
            )
        task = spec.data.task
        if options.top_k is not None and logits_kind(task) != "token":
            raise RunError(
                f"--top-k keeps the k largest language-model logits per token; the teacher's "
                f"logits of task {task} are not per token: leave --top-k out"
            )
        teacher_tok, student_tok, data = run._load_inputs()
        teacher, adapter, cached, finetune, teacher_eval = run._initial_teacher(data)
        run._check_teacher_weights(teacher, capture)
        if options.top_k is not None:
            vocab = getattr(teacher.config, "vocab_size", None) or 0
            if options.top_k > vocab:
                raise RunError(
                    f"--top-k {options.top_k} exceeds the teacher's vocabulary ({vocab})"
                )
        head = default_head(task, spec.teacher, run.architectures)
        tokenizer = student_tok or teacher_tok
        identity = current_identity(
            spec,
            run.base_dir,
            data,
            tokenizer_ref=_data_tokenizer_ref(spec, student_tok, teacher_tok, None),
            tokenizer=tokenizer,
        )
        identity["teacher"] = _teacher_identity(spec, run.base_dir)
        identity["capture"] = capture_identity(
            capture, top_k=options.top_k, dtype=options.dtype, task=task, head=head
        )
        batch = options.batch_size or run.training.eval_batch_size or run.training.batch_size
        layout = {"shard_rows": options.shard_rows, "batch_size": batch}
        rows = len(data.train)
        state = self._check_directory(identity, layout)
        return {
            "teacher": teacher,
            "adapter": adapter,
            "cached": cached,
            "finetune": finetune,
            "teacher_eval": teacher_eval,
            "teacher_tokenizer": teacher_tok,
            "student_tokenizer": student_tok,
            "tokenizer": tokenizer,
            "data": data,
            "capture": capture,
            "identity": identity,
            "layout": layout,
            "rows": rows,
            "state": state,
        }

    def _check_directory(self, identity: dict[str, Any], layout: dict[str, Any]) -> Any:
        """``"done"`` (an identical finished artifact), the build state to resume, or None
        (a fresh build). Refuses a directory that holds something else."""
        directory = self.directory
        check_writable(directory)
        if not directory.is_dir() or not any(directory.iterdir()):
            return None
        overwrite = self.options.overwrite
        for name, what in ((MANIFEST, "a finished artifact"), (BUILD, "an unfinished build")):
            if not (directory / name).is_file():
                continue
            try:
                stored = json.loads((directory / name).read_text(encoding="utf-8"))
                stored_identity, stored_layout = stored["identity"], stored["layout"]
            except (OSError, ValueError, KeyError, TypeError):
                if overwrite:
                    return None
                raise RunError(f"{directory / name} cannot be read: pass --overwrite") from None
            diffs = differences(stored_identity, identity)
            if stored_layout != layout:
                diffs += [
                    f"--{k.replace('_', '-')} {stored_layout.get(k)} → {layout[k]}"
                    for k in sorted(layout)
                    if stored_layout.get(k) != layout[k]
                ]
            if not diffs:
                return "done" if name == MANIFEST else stored
            if overwrite:
                return None
            raise RunError(
                f"{directory} holds {what} of other inputs: " + "; ".join(diffs) + ". Pass "
                "--overwrite to replace it, or give -o another directory"
            )
        if overwrite:
            return None
        raise RunError(
            f"{directory} is not empty and holds no makd teacher artifact: give -o an empty "
            "or new directory (or --overwrite to replace its contents)"
        )

    # -- act ---------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        plan = self.plan()
        directory = self.directory
        if plan["state"] == "done":
            self.say(f"{directory} already holds this teacher artifact: nothing to do")
            return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        run = self.run
        from .run import Plan

        run_plan = Plan(
            teacher_tokenizer=plan["teacher_tokenizer"],
            student_tokenizer=plan["student_tokenizer"],
            data=plan["data"],
            teacher=plan["teacher"],
            teacher_adapter=plan["adapter"],
            teacher_cached=plan["cached"],
            models=None,
            capture=plan["capture"],
            resolved={},
            inputs={},
            memory_mb={},
            finetune=plan["finetune"],
            teacher_eval=plan["teacher_eval"],
        )
        # trained now (and cached) when it is not cached; then its scores are this data's
        teacher, scores = run._teacher(run_plan)
        run._prepare_teacher(teacher)
        state = plan["state"]
        if state is None:
            self._start(directory, plan, teacher)
            state = self._build_state(plan)
            _write_json(directory / BUILD, state)
        self._pass(directory, plan, teacher, state)
        if plan["cached"] or not scores:  # a cached teacher's record may be of other data
            scores = run._evaluate(teacher, plan["data"], plan["tokenizer"])
        manifest = self._manifest(plan, teacher, state, scores)
        _write_json(directory / MANIFEST, manifest)
        (directory / BUILD).unlink(missing_ok=True)
        per_token = manifest["bytes_per_token"]
        self.say(
            f"wrote the teacher artifact {directory}: {manifest['rows']} rows in "
            f"{len(manifest['shards'])} shards, {manifest['bytes'] / 2**20:.1f} MiB "
            f"({per_token:.0f} bytes per token)"
        )
        return manifest

    def _start(self, directory: Path, plan: dict[str, Any], teacher: Any) -> None:
        """A fresh directory: the teacher's config and tokenizer (with --overwrite the
        previous contents are removed first)."""
        if directory.is_dir() and any(directory.iterdir()):
            here = Path.cwd().resolve()
            target = directory.resolve()
            if target == here or target in here.parents or os.path.ismount(target):
                raise RunError(
                    f"--overwrite cannot replace {directory}: it is the working directory, "
                    "one of its parents, or a mount point"
                )
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_text(directory / CONFIG, teacher.config.to_json_string(use_diff=False))
        self._copy_tokenizer(directory / TOKENIZER, plan)

    def _copy_tokenizer(self, target: Path, plan: dict[str, Any]) -> None:
        """The teacher's tokenizer files, byte for byte when they are local (so that their
        sha256 is the one recorded), else as ``save_pretrained`` writes them."""
        from ..objective.depths import DepthError, local_model_dir

        spec, base = self.spec, self.run.base_dir
        tokenizer = plan["teacher_tokenizer"]
        ref = spec.teacher.tokenizer or spec.teacher.model
        if tokenizer is None:  # the teacher has none of its own: the rows' tokenizer
            tokenizer = plan["tokenizer"]
            ref = _data_tokenizer_ref(spec, plan["student_tokenizer"], None, None)
        if tokenizer is None:
            return
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        directory = None
        if ref is not None:
            with contextlib.suppress(DepthError):
                directory = local_model_dir(ref, base)
        files = tokenizer_files(directory) if directory is not None else {}
        if files:
            for name, path in files.items():
                shutil.copyfile(path, tmp / name)
        else:
            tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)

    def _build_state(self, plan: dict[str, Any]) -> dict[str, Any]:
        rows, shard_rows = plan["rows"], plan["layout"]["shard_rows"]
        return {
            "format": FORMAT,
            "command": self.command(),
            "identity": plan["identity"],
            "layout": plan["layout"],
            "rows": rows,
            "shard_count": -(-rows // shard_rows),
            "shards": [],
        }

    def _verified(self, directory: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
        """The finished shards of ``state`` whose files verify, up to the first that does
        not."""
        kept = []
        for shard in state["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                break
            kept.append(shard)
        return kept

    def _pass(
        self, directory: Path, plan: dict[str, Any], teacher: Any, state: dict[str, Any]
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        for leftover in directory.glob(".shard-*.tmp-*"):  # a shard a kill interrupted
            leftover.unlink(missing_ok=True)
        done = self._verified(directory, state)
        if len(done) != len(state["shards"]):
            state["shards"] = done
            _write_json(directory / BUILD, state)
        rows, shard_rows = plan["rows"], plan["layout"]["shard_rows"]
        count = state["shard_count"]
        if done:
            self.say(
                f"resuming the build of {directory} at shard {len(done)} of {count} "
                f"({len(done)} shards verified)"
            )
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        try:
            with progress:
                task = progress.add_task(
                    "teacher cache", total=rows, completed=len(done) * shard_rows
                )
                for index in range(len(done), count):
                    first = index * shard_rows
                    last = min(rows, first + shard_rows)
                    state["shards"].append(
                        self._shard(directory, index, first, last, plan, teacher, progress, task)
                    )
                    _write_json(directory / BUILD, state)
                    _shard_done(index)
        except KeyboardInterrupt:
            from .stopping import Interrupted

            raise Interrupted(
                f"interrupted after {len(state['shards'])} of {count} shards of {directory}; "
                f"continue with: {self.command()}"
            ) from None

    def _shard(
        self,
        directory: Path,
        index: int,
        first: int,
        last: int,
        plan: dict[str, Any],
        teacher: Any,
        progress: Any,
        task: Any,
    ) -> dict[str, Any]:
        from safetensors.torch import save_file

        from ..capture.extractor import model_inputs
        from ..capture.hooks import ModelCapture
        from ..data.collate import collate
        from .run import _pad_id

        run, data = self.run, plan["data"]
        adapter, capture = plan["adapter"], plan["capture"]
        info = adapter.model_info(teacher.config)
        options = self.options
        dtype = _DTYPES[options.dtype]
        logits = logits_kind(data.task)
        batch_size = plan["layout"]["batch_size"]
        pad = _pad_id(plan["tokenizer"])
        entries: dict[str, torch.Tensor] = {}
        tokens = 0
        with ModelCapture(teacher, adapter, info, capture.teacher) as cap:
            for start in range(first, last, batch_size):
                indices = list(range(start, min(last, start + batch_size)))
                rows = [data.train[i] for i in indices]
                batch = {k: v.to(run.device) for k, v in collate(rows, pad).items()}
                inputs = model_inputs(batch)
                with torch.no_grad(), run.autocast():
                    outputs = teacher(**inputs)
                    features = cap.features(outputs, inputs.get("attention_mask"))
                    module_inputs = cap.module_inputs()
                cap.clear()
                lengths = batch["attention_mask"].sum(-1).tolist()
                tokens += sum(lengths)
                entries.update(
                    row_entries(
                        indices,
                        lengths,
                        features,
                        module_inputs,
                        dtype=dtype,
                        top_k=options.top_k,
                        logits=logits,
                    )
                )
                progress.advance(task, len(indices))
        name = SHARD.format(index)
        tmp = directory / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        # one metadata entry: safetensors writes several in an arbitrary order
        rows = {"format": FORMAT, "first_row": first, "rows": last - first}
        metadata = {"makd": json.dumps(rows, sort_keys=True)}
        save_file(entries, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, directory / name)
        path = directory / name
        return {
            "file": name,
            "first_row": first,
            "rows": last - first,
            "tokens": tokens,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }

    def _manifest(
        self, plan: dict[str, Any], teacher: Any, state: dict[str, Any], scores: dict[str, float]
    ) -> dict[str, Any]:
        from ..models.students import parameter_counts

        shards = state["shards"]
        tokens = sum(s["tokens"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        identity = plan["identity"]
        run = self.run
        return {
            "format": FORMAT,
            "makd": __version__,
            "identity": identity,
            "hashes": identity_hashes(identity),
            "layout": plan["layout"],
            "rows": plan["rows"],
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": size / max(tokens, 1),
            "shards": shards,
            "teacher": {
                "model_type": getattr(teacher.config, "model_type", None),
                "class": type(teacher).__name__,
                "parameters": parameter_counts(teacher).total,
                "precision": "bf16 autocast" if run.bf16 else "fp32",
            },
            "teacher_eval": (
                {"scores": scores, "validation": _validation_identity(self.spec, run.base_dir)}
                if scores
                else None
            ),
        }


# -- the identity a run computes -----------------------------------------------------------


def _data_tokenizer_ref(
    spec: Any, student_tok: Any, teacher_tok: Any, artifact: Path | None
) -> str | None:
    """Where the tokenizer that tokenised the rows comes from (see ``load_tokenizers``)."""
    if student_tok is not None:
        return spec.student.tokenizer or spec.student.model
    if teacher_tok is not None:
        if spec.teacher.tokenizer or spec.teacher.model:
            return spec.teacher.tokenizer or spec.teacher.model
        return str(artifact / TOKENIZER) if artifact is not None else None
    return None


def current_identity(
    spec: Any, base_dir: Path, data: Any, *, tokenizer_ref: str | None, tokenizer: Any
) -> dict[str, Any]:
    """The data, preprocessing and tokenizer sections of the identity, as this objective
    and its data give them now."""
    return {
        "data": _data_identity(spec, base_dir),
        "preprocessing": _preprocessing_identity(spec, data.train),
        "tokenizer": _tokenizer_identity(tokenizer_ref, base_dir, tokenizer),
    }


def check_artifact(
    artifact: TeacherArtifact,
    spec: Any,
    base_dir: Path,
    data: Any,
    capture: Any,
    *,
    student_tok: Any,
    teacher_tok: Any,
    head: str,
) -> list[tuple[str, ExitCode]]:
    """Every reason ``artifact`` cannot serve this objective (empty: it can)."""
    identity = current_identity(
        spec,
        base_dir,
        data,
        tokenizer_ref=_data_tokenizer_ref(spec, student_tok, teacher_tok, artifact.directory),
        tokenizer=student_tok or teacher_tok,
    )
    if spec.teacher.model is not None or spec.teacher.config is not None:
        identity["teacher"] = _teacher_identity(spec, base_dir)
    out: list[tuple[str, ExitCode]] = [
        (f"{artifact.directory}: {d}", ExitCode.INVALID_INPUT)
        for d in differences(artifact.identity, identity)
    ]
    stored = artifact.identity["capture"]
    if stored.get("head") != head:
        out.append(
            (
                f"{artifact.directory} holds the outputs of a {stored.get('head')} teacher; this "
                f"objective's task needs a {head} one",
                ExitCode.INVALID_INPUT,
            )
        )
    for what in artifact.missing(capture):
        out.append(
            (
                f"the objective needs {what}, which the teacher artifact {artifact.directory} "
                "does not hold: build it from this objective (makd teacher cache)",
                ExitCode.INVALID_INPUT,
            )
        )
    out += [(f"{artifact.directory}: {p}", ExitCode.DATA) for p in artifact.verify()]
    return out


def stored_teacher_eval(artifact: TeacherArtifact, spec: Any, base_dir: Path) -> dict[str, float]:
    """The teacher's scores the build measured, when they were measured on this objective's
    validation data (else none)."""
    record = artifact.manifest.get("teacher_eval")
    if not record:
        return {}
    if record.get("validation") != _validation_identity(spec, base_dir):
        return {}
    return dict(record.get("scores") or {})
