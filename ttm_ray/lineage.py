"""One lineage in MLflow, recorded with MLflow's own objects and read back by
``ttm-ray lineage``.

The chain, and the MLflow feature that records each link:

* raw videos -> prep run: a dataset input (``mlflow.data`` MetaDataset, context ``source``)
  with the source's URI; tag ``ttm.source``.
* prep run -> dataset version: a dataset input with context ``output`` (MLflow has no run
  outputs for datasets; the context says the run produced it) whose source is the version's
  folder and whose digest is the manifest's; tags ``ttm.dataset_version``/``ttm.dataset_root``.
* dataset version -> encode run -> encoded version: the same two inputs (``source`` /
  ``output``); tags ``ttm.source_version``, ``ttm.dataset_version``.
* dataset (or encoded) version -> training run: a dataset input with context ``training``.
* training run -> export: a LoggedModel (``source_run_id`` = the run, logged as the run's
  model output) registered in the Model Registry as a model version (``run_id`` the training
  run, ``model_id`` the LoggedModel (also tag ``ttm.model_id``: the sqlite registry drops the
  field), source the export folder (a tracking server refuses local folders: there the
  LoggedModel's artifacts, and tag ``ttm.export`` names the folder), tags ``ttm.run_id``/
  ``ttm.dataset_version``/``ttm.config_hash``).
* model version -> evaluation run: the LoggedModel as a model input of the run
  (``LoggedModelInput``), plus tags ``ttm.model_version.<role>`` = ``name/version``.

Tags share one vocabulary (``ttm.*``, below); :func:`tag` also reads the older names
(``job``, ``dataset_version``, ``ttm.kind``) so runs logged before it still link.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from ttm_ray.dataset.versions import DatasetVersion

# ---------------------------------------------------------------------------- tag vocabulary
JOB = "ttm.job"  # prep | refilter | rebuild | encode | train | evaluate
KIND = "ttm.kind"  # the older name of ttm.job, still written: saved searches use it
DATASET_VERSION = "ttm.dataset_version"  # the version a run produced (prep, encode) or read
DATASET_ROOT = "ttm.dataset_root"
SOURCE = "ttm.source"  # prep: the raw-video source URI
SOURCE_VERSION = "ttm.source_version"  # encode: the dataset version it encoded
SOURCE_ROOT = "ttm.source_root"
ENCODED_VERSION = "ttm.encoded_version"  # train on an encoded version: <root>@<version>
CONFIG_HASH = "ttm.config_hash"
CODE_VERSION = "ttm.code_version"
RUN_ID = "ttm.run_id"  # model version: the training run
EXPORT = "ttm.export"  # model version: the export folder
STEP = "ttm.step"
MODEL_VERSION = "ttm.model_version"  # train: name/version; evaluate: ttm.model_version.<role>
MODEL_ID = "ttm.model_id"  # model version: its LoggedModel

#: Older tag names still read (prep and rebuild logged ``job``/``dataset_version``).
LEGACY = {JOB: (KIND, "job"), DATASET_VERSION: ("dataset_version",),
          DATASET_ROOT: ("dataset_root",), CODE_VERSION: ("code_version",)}

CONTEXT_SOURCE = "source"
CONTEXT_OUTPUT = "output"
CONTEXT_TRAINING = "training"
MODEL_TYPE = "ttm-export"
#: MLflow keeps a dataset digest in 36 characters.
DIGEST_CHARS = 32


def tag(tags: dict[str, str], key: str) -> str | None:
    """``key`` from a run's tags, else its older name (runs logged before the vocabulary)."""
    for name in (key, *LEGACY.get(key, ())):
        if tags.get(name):
            return tags[name]
    return None


def job_tags(job: str, **values: Any) -> dict[str, str]:
    """The ``ttm.*`` tags of a run of ``job`` (None values left out); ``ttm.kind`` too."""
    tags = {JOB: job, KIND: job}
    tags.update({f"ttm.{k}": str(v) for k, v in values.items() if v is not None})
    return tags


def client_for(tracking_uri: str) -> MlflowClient:
    """A client on ``tracking_uri`` whose Model Registry is the same store (sqlite included)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ---------------------------------------------------------------------------- datasets
def manifest_digest(manifest: dict[str, Any]) -> str:
    """A version's identity: the hash of its manifest (which hashes every file)."""
    text = json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def location_uri(location: str | Path) -> str:
    text = str(location)
    return text if "://" in text else Path(text).resolve().as_uri()


def _dataset_entity(uri: str, name: str, digest: str) -> Any:
    """An ``mlflow.data`` MetaDataset (metadata only: the rows stay where they are) as the
    entity ``log_inputs`` takes."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that it picked one
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    except MlflowException:  # a scheme MLflow has no source for: keep the URI as a URL
        source = HTTPDatasetSource(uri)
    return MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()


def version_dataset(version: DatasetVersion) -> Any:
    """A published (or encoded) dataset version as an MLflow dataset entity: name
    ``<root folder>@<version>``, source the version's folder, digest the manifest's."""
    name = f"{Path(str(version.root).rstrip('/')).name}@{version.name}"
    return _dataset_entity(version.uri, name, manifest_digest(version.manifest))


def source_dataset(source: str) -> Any:
    """The raw-video source of a prep run (a folder, manifest or URI) as a dataset entity;
    its digest names the location (the videos are not hashed: they can be terabytes)."""
    uri = location_uri(source)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:DIGEST_CHARS]
    return _dataset_entity(uri, f"raw-videos@{Path(uri.rstrip('/')).name}", digest)


def log_datasets(client: MlflowClient, run_id: str,
                 entries: Iterable[tuple[Any, str]]) -> None:
    """Log ``(dataset entity, context)`` pairs as the run's inputs, skipping those it already
    has (a resumed training run logs its version again on every submission)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.get_run(run_id)
    have = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    todo = [DatasetInput(dataset=ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for ds, context in entries if (ds.name, ds.digest) not in have]
    if todo:
        client.log_inputs(run_id, datasets=todo)


# ---------------------------------------------------------------------------- models
def default_model_name(family: str, stage: int) -> str:
    return f"ttm-{family}-stage{stage}"


@dataclass(frozen=True)
class RegisteredExport:
    name: str
    version: str
    model_id: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "model_id": self.model_id,
                "uri": f"models:/{self.ref}"}


def _registered_for(client: MlflowClient, run_id: str, export_uri: str
                    ) -> list[ModelVersion]:
    return [mv for mv in client.search_model_versions(f"run_id = '{run_id}'")
            if export_uri in (mv.source, mv.tags.get(EXPORT))]


def model_id_of(mv: ModelVersion) -> str | None:
    """The LoggedModel behind a model version: MLflow's own field where the registry keeps it
    (servers, Databricks), else our tag (the sqlite registry drops ``model_id``)."""
    return mv.model_id or mv.tags.get(MODEL_ID)


def register_export(tracking_uri: str, run_id: str, export_dir: str | Path, name: str,
                    info: dict[str, Any]) -> RegisteredExport:
    """Register an export folder as a version of registered model ``name``: a LoggedModel of
    the training run (its model output, with the small config files as artifacts), promoted to
    a model version whose source is the folder. The weights are not copied: a 4B export is
    ~16 GB and already sits in durable storage. Registering the same run's same step again
    (a rerun of a finished run) returns the existing version."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    uri = location_uri(export_dir)
    step = str(info.get("step"))
    for mv in _registered_for(client, run_id, uri):
        if mv.tags.get(STEP) == step:
            return RegisteredExport(mv.name, str(mv.version), model_id_of(mv))
    tags = {RUN_ID: run_id, EXPORT: uri, STEP: step,
            DATASET_VERSION: str(info.get("dataset_version")),
            CONFIG_HASH: str(info.get("config_hash")),
            CODE_VERSION: str(info.get("code_version"))}
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags=tags, model_type=MODEL_TYPE)
    _log_export_configs(client, model.model_id, Path(export_dir))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(info.get("step") or 0))])
    _ensure_registered_model(client, name)
    # Source: the export folder, so `models:/NAME/N` downloads the weights themselves (a
    # `models:/<model_id>` source would resolve to the LoggedModel's config files only).
    tags[MODEL_ID] = model.model_id
    description = f"export of run {info.get('run_name')} at step {step}"
    try:
        mv = client.create_model_version(name, source=uri, run_id=run_id, tags=tags,
                                         model_id=model.model_id, description=description)
    except MlflowException as exc:
        # A tracking server refuses local folders outside its artifact store: fall back to
        # the LoggedModel's artifacts (the configs); tag ttm.export still names the weights.
        if exc.error_code != "INVALID_PARAMETER_VALUE" or not uri.startswith("file:"):
            raise
        mv = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                         tags=tags, model_id=model.model_id,
                                         description=description)
    client.set_tag(run_id, MODEL_VERSION, f"{name}/{mv.version}")
    return RegisteredExport(name, str(mv.version), model.model_id)


def _log_export_configs(client: MlflowClient, model_id: str, export_dir: Path) -> None:
    """The export's YAML/JSON files (not its weights) as the LoggedModel's artifacts."""
    import tempfile
    from shutil import copy2

    files = [p for p in export_dir.glob("*") if p.suffix in (".yaml", ".json")]
    if not files:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            copy2(path, tmp)
        client.log_model_artifacts(model_id, tmp)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="ttm-ray exports (ttm-ray "
                                                             "lineage shows each version's "
                                                             "chain)")
        except MlflowException:  # another job registered it between our two calls
            client.get_registered_model(name)


def find_registered_export(client: MlflowClient, export_dir: str | Path
                           ) -> ModelVersion | None:
    """The newest model version registered for ``export_dir`` (its export.json names the
    training run), or None when it was never registered."""
    from ttm_ray.models.export import INFO

    info_path = Path(str(export_dir)) / INFO
    run_id = None
    if info_path.is_file():
        run_id = json.loads(info_path.read_text()).get("mlflow_run_id")
    if not run_id:
        return None
    found = _registered_for(client, run_id, location_uri(export_dir))
    return max(found, key=lambda mv: int(mv.version)) if found else None


def log_scored_models(exports: dict[str, str | Path]) -> dict[str, str]:
    """In the active MLflow run (an evaluation): each scored export's registered model version
    as a model input (``LoggedModelInput``) and as tag ``ttm.model_version.<role>``. Exports
    that were never registered are tagged with their folder (``ttm.export.<role>``) only.
    Returns ``{role: name/version}`` of the registered ones."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    client = client_for(mlflow.get_tracking_uri())
    scored = {}
    for role, export in exports.items():
        mlflow.set_tag(f"{EXPORT}.{role}", location_uri(export))
        mv = find_registered_export(client, export)
        if mv is None:
            continue
        scored[role] = f"{mv.name}/{mv.version}"
        mlflow.set_tag(f"{MODEL_VERSION}.{role}", scored[role])
        if model_id_of(mv):
            mlflow.log_input(model=LoggedModelInput(model_id_of(mv)))
    return scored


# ---------------------------------------------------------------------------- the walk
class LineageError(LookupError):
    """Nothing in the store matches the query."""


@dataclass
class Chain:
    """One path through the lineage, upstream to downstream; steps are JSON-able dicts."""

    steps: list[dict[str, Any]] = field(default_factory=list)


def _all_experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _runs_tagged(client: MlflowClient, key: str, value: str) -> list[Run]:
    """Runs of every experiment whose tag ``key`` (or an older name of it) is ``value``."""
    experiments = _all_experiments(client)
    runs: dict[str, Run] = {}
    for name in (key, *LEGACY.get(key, ())):
        escaped = value.replace("'", "\\'")
        for run in client.search_runs(experiments, f"tags.`{name}` = '{escaped}'",
                                      max_results=5000):
            runs[run.info.run_id] = run
    return sorted(runs.values(), key=lambda r: r.info.start_time or 0)


def _job(run: Run) -> str | None:
    return tag(run.data.tags, JOB)


def _run_step(kind: str, run: Run, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "run_id": run.info.run_id, "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id, "status": run.info.status,
            **{k: v for k, v in extra.items() if v is not None}}


def _same_root(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return True  # older runs did not record the root: the version name decides
    return location_uri(a).rstrip("/") == location_uri(b).rstrip("/")


def _producers(client: MlflowClient, version: str, root: str | None) -> list[Run]:
    return [r for r in _runs_tagged(client, DATASET_VERSION, version)
            if _job(r) in ("prep", "refilter", "encode")
            and _same_root(tag(r.data.tags, DATASET_ROOT), root)]


def upstream(client: MlflowClient, version: str, root: str | None,
             depth: int = 0) -> list[dict[str, Any]]:
    """raw videos -> prep run -> dataset version (-> encode run -> encoded version)."""
    steps: list[dict[str, Any]] = []
    producers = _producers(client, version, root)
    run = producers[-1] if producers else None  # the newest run that published it
    if run is not None and _job(run) == "encode" and depth < 3:
        tags = run.data.tags
        steps += upstream(client, tags.get(SOURCE_VERSION, ""), tags.get(SOURCE_ROOT),
                          depth + 1)
    elif run is not None and run.data.tags.get(SOURCE):
        steps.append({"kind": "raw_videos", "source": run.data.tags[SOURCE]})
    if run is not None:
        steps.append(_run_step(_job(run) or "prep", run))
    digest = None
    if run is not None:  # the producer's output input (an encode run also has its source)
        digest = next((d.dataset.digest for d in run.inputs.dataset_inputs
                       if _context(d) == CONTEXT_OUTPUT), None)
    steps.append({"kind": "encoded_version" if run is not None and _job(run) == "encode"
                  else "dataset_version", "version": version, "root": root,
                  **({"digest": digest} if digest else {})})
    return steps


def _context(dataset_input: Any) -> str | None:
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), None)


def _evaluations(client: MlflowClient, mv: ModelVersion) -> list[dict[str, Any]]:
    """Evaluation runs with the version's LoggedModel as a model input (or, for a version
    without one, the ``ttm.model_version.<role>`` tag)."""
    ref = f"{mv.name}/{mv.version}"
    out = []
    for found in _runs_tagged(client, JOB, "evaluate"):
        run = client.get_run(found.info.run_id)  # search results leave model inputs out
        models = {m.model_id for m in run.inputs.model_inputs}
        roles = [k.rsplit(".", 1)[-1] for k, v in run.data.tags.items()
                 if k.startswith(f"{MODEL_VERSION}.") and v == ref]
        if model_id_of(mv) in models or roles:
            out.append(_run_step("evaluation", run, role=",".join(roles) or None))
    return out


def _model_step(mv: ModelVersion) -> dict[str, Any]:
    return {"kind": "model_version", "name": mv.name, "version": str(mv.version),
            "model_id": model_id_of(mv), "source": mv.source,
            "config_hash": mv.tags.get(CONFIG_HASH)}


def train_chains(client: MlflowClient, run: Run,
                 versions: list[ModelVersion] | None = None) -> list[Chain]:
    """The chains through one training run: upstream from its dataset input, downstream to
    its model versions (``versions``: only these) and their evaluations."""
    tags = run.data.tags
    encoded = tags.get(ENCODED_VERSION)
    version = tag(tags, DATASET_VERSION) or ""
    root = encoded.rsplit("@", 1)[0] if encoded else tag(tags, DATASET_ROOT)
    head = [*upstream(client, version, root), _run_step(
        "training", run, dataset_version=version, config_hash=tags.get(CONFIG_HASH),
        model=tags.get("ttm.model"))]
    if versions is None:
        versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    if not versions:
        return [Chain(head)]
    return [Chain([*head, _model_step(mv), {"kind": "evaluations",
                                             "runs": _evaluations(client, mv)}])
            for mv in sorted(versions, key=lambda m: (m.name, int(m.version)))]


def _model_versions(client: MlflowClient, query: str) -> list[ModelVersion] | None:
    """``models:/name/version``, ``name/version`` or a registered model name (all its
    versions); None when ``query`` names no registered model."""
    from mlflow.exceptions import MlflowException

    text = query.removeprefix("models:/")
    name, _, version = text.rpartition("/") if "/" in text else (text, "", "")
    try:
        if version:
            return [client.get_model_version(name, version)]
        return client.search_model_versions(f"name = '{text}'") or None
    except MlflowException:
        return None


def _is_train(run: Run) -> bool:
    return _job(run) == "train"


def _version_names(client: MlflowClient, query: str) -> list[str]:
    """``query`` if runs name it as a version, else every version name ``<query>-...``:
    ``v0001`` -> ``v0001-20261207T101500`` (names carry their publish time; nobody types it;
    a dataset root and its encoded root may both have a v0001)."""
    experiments = _all_experiments(client)
    names: set[str] = set()
    for op, pattern in (("=", query), ("LIKE", f"{query}-%")):
        for key in (DATASET_VERSION, *LEGACY[DATASET_VERSION]):
            for run in client.search_runs(experiments, f"tags.`{key}` {op} '{pattern}'",
                                          max_results=1000):
                names.add(run.data.tags[key])
        if names:
            break
    return sorted(names)


def lineage(client: MlflowClient, query: str) -> list[Chain]:
    """Every chain through a registered model (version) or a dataset / encoded version
    (its full name or its ``vNNNN`` prefix)."""
    versions = _model_versions(client, query)
    if versions:
        chains = []
        for mv in versions:
            if not mv.run_id:
                chains.append(Chain([_model_step(mv)]))
                continue
            chains += train_chains(client, client.get_run(mv.run_id), [mv])
        return chains
    chains, seen = [], set()
    for name in _version_names(client, query.replace("'", "")):
        for chain in _version_chains(client, name):
            key = json.dumps(chain.steps, sort_keys=True, default=str)
            if key not in seen:  # v0001 may name a dataset and the version encoded from it
                seen.add(key)
                chains.append(chain)
    if not chains:
        raise LineageError(
            f"{query!r}: no registered model, model version or dataset version of that name "
            f"in {client.tracking_uri} (give a dataset version like v0001, a registered "
            "model like ttm-dit-stage1, or name/version)")
    return chains


def _version_chains(client: MlflowClient, name: str) -> list[Chain]:
    """The chains through dataset (or encoded) version ``name``: one per model version of
    each run trained on it (directly or through its encoded version), else its upstream."""
    trains = [r for r in _runs_tagged(client, DATASET_VERSION, name) if _is_train(r)]
    # Runs on versions encoded from this one name the encoded version; find them through
    # the encode runs that read it.
    for enc in _runs_tagged(client, SOURCE_VERSION, name):
        if _job(enc) == "encode":
            root = tag(enc.data.tags, DATASET_ROOT)
            trains += [r for r in _runs_tagged(client, DATASET_VERSION,
                                               tag(enc.data.tags, DATASET_VERSION) or "")
                       if _is_train(r) and _same_root(tag(r.data.tags, DATASET_ROOT), root)]
    chains = []
    for run in {r.info.run_id: r for r in trains}.values():
        chains += train_chains(client, run)
    if not chains:
        roots = {tag(r.data.tags, DATASET_ROOT) for r in _producers(client, name, None)}
        chains = [Chain(upstream(client, name, root)) for root in sorted(roots, key=str)]
    return chains


def format_chains(chains: list[Chain]) -> str:
    """Each chain as indented lines, upstream first."""
    blocks = []
    for i, chain in enumerate(chains, 1):
        lines = [f"chain {i}/{len(chains)}"]
        for depth, step in enumerate(chain.steps):
            lines.append(f"{'  ' * (depth + 1)}{_describe(step)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _describe(step: dict[str, Any]) -> str:
    kind = step["kind"]
    if kind == "raw_videos":
        return f"raw videos       {step['source']}"
    if kind in ("dataset_version", "encoded_version"):
        digest = f" (digest {step['digest'][:12]})" if step.get("digest") else ""
        return f"{kind.replace('_', ' '):<16} {step['version']} of {step['root']}{digest}"
    if kind == "model_version":
        return (f"model version    {step['name']}/{step['version']} (models:/{step['name']}/"
                f"{step['version']}, {step['source']})")
    if kind == "evaluations":
        runs = step["runs"]
        names = ", ".join(f"{r['run_name']} ({r['run_id']})" for r in runs)
        return f"evaluated by     {names or 'no evaluation run yet'}"
    return f"{kind + ' run':<16} {step['run_name']} ({step['run_id']}, {step['status']})"


__all__ = [
    "CONFIG_HASH",
    "DATASET_ROOT",
    "DATASET_VERSION",
    "ENCODED_VERSION",
    "JOB",
    "MODEL_VERSION",
    "LineageError",
    "RegisteredExport",
    "client_for",
    "default_model_name",
    "format_chains",
    "job_tags",
    "lineage",
    "log_datasets",
    "log_scored_models",
    "register_export",
    "source_dataset",
    "tag",
    "version_dataset",
]
