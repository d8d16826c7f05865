"""``models_check``: every model folder and weights file a job config needs, and whether it is
there and is the right model.

What a config needs is read from the loaded config object (``getattr`` along the dotted field
names), so this module imports no job or pipeline code: the caller (``jobs/models_check.py``)
loads the file with its kind's class, exactly as the job would. The conditions mirror the jobs'
own (``PrepConfig.check_models``, ``ttm_ray.training.preflight.missing_paths``, the metrics an
evaluation enables): a model a run would not load is not listed.

Each need is checked with the one model-folder rule (:mod:`ttm_ray.model_folders`): a folder
holds ``config.json`` and weights; an engine's folder must hold an architecture that engine
serves; other folders must name one of the expected classes. URIs are resolved by the loaders
on the nodes that read them, so they are listed but not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ttm_ray.model_folders import (
    architectures,
    model_folder,
    read_config,
    servable_problem,
    weights_problem,
)

Form = Literal["folder", "file", "export", "any"]
Status = Literal["ok", "missing", "wrong", "unchecked"]

#: Where the known defaults come from: the last path component of a configured path -> the
#: Hugging Face repo (and, for single files, the file in it). Used only to say how to stage it.
HUB_SOURCES: dict[str, tuple[str, str | None]] = {
    "Qwen2.5-VL-7B-Instruct": ("Qwen/Qwen2.5-VL-7B-Instruct", None),
    "Llama-3.2-11B-Vision-Instruct": ("meta-llama/Llama-3.2-11B-Vision-Instruct", None),
    "Llama-3.1-8B-Instruct": ("meta-llama/Llama-3.1-8B-Instruct", None),
    "grounding-dino-base": ("IDEA-Research/grounding-dino-base", None),
    "sam2.1_hiera_large.pt": ("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
    "clip-vit-large-patch14": ("openai/clip-vit-large-patch14", None),
    "t5-v1_1-xxl": ("google/t5-v1_1-xxl", None),
    "animatediff-motion-adapter-v1-5-3": ("guoyww/animatediff-motion-adapter-v1-5-3", None),
    "stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", None),
}

TEXT_ENCODER_ARCHS = {
    "t5": frozenset({"T5EncoderModel", "T5ForConditionalGeneration", "UMT5EncoderModel"}),
    "clip": frozenset({"CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel"}),
}
CLIP_ARCHS = frozenset({"CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionModel"})


@dataclass(frozen=True)
class ModelNeed:
    """One model a config needs: the field that names it and what must be there."""

    config: str  # the config file
    field: str  # dotted key in it
    path: str | None
    what: str  # for people: "the caption VLM"
    form: Form = "folder"
    engine: str | None = None  # vllm / transformers: the folder must be servable by it
    archs: frozenset[str] = frozenset()  # else: config.json names one of these (empty: any)
    subfolders: tuple[str, ...] = ()  # pipeline folders: the component may sit in vae/ etc.


@dataclass(frozen=True)
class ModelReport:
    need: ModelNeed
    status: Status
    detail: str
    found: list[str] = field(default_factory=list)  # architectures in config.json
    stage: str = ""  # how to put it there

    def as_dict(self) -> dict[str, Any]:
        need = asdict(self.need)
        need["archs"] = sorted(self.need.archs)
        need["subfolders"] = list(self.need.subfolders)
        return {**need, "status": self.status, "detail": self.detail,
                "architectures": self.found, "stage": self.stage}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _engine_needs(cfg: Any, section: str, what: str) -> list[tuple[str, str | None, dict]]:
    engine = _get(cfg, f"{section}.engine")
    if engine.kind == "manifest":  # answers copied from the input: no model
        return []
    # ray_data_llm serves the folder with vLLM too (Ray Data LLM's processor): same check.
    serving = "vllm" if engine.kind == "ray_data_llm" else engine.kind
    return [(f"{section}.engine.model_path", engine.model_path,
             {"what": what, "engine": serving})]


def _mask_needs(cfg: Any, prefix: str) -> list[tuple[str, str | None, dict]]:
    """Grounding DINO + SAM2 when the masks come from them (``mask_source: sam2``)."""
    if _get(cfg, f"{prefix}mask_source") != "sam2":
        return []
    out = [(f"{prefix}ground.model_path", _get(cfg, f"{prefix}ground.model_path"),
            {"what": "Grounding DINO (boxes)",
             "archs": frozenset({"GroundingDinoForObjectDetection"})})]
    segment = _get(cfg, f"{prefix}segment")
    if not (segment.checkpoint is None and segment.allow_random_weights):
        out.append((f"{prefix}segment.checkpoint", segment.checkpoint,
                     {"what": f"SAM2 checkpoint for {segment.sam2_config}", "form": "file"}))
    return out


def _prep(cfg: Any) -> list[tuple[str, str | None, dict]]:
    out = _engine_needs(cfg, "caption", "caption VLM")
    out += _engine_needs(cfg, "prompts", "prompt LLM")
    out += _mask_needs(cfg, "")
    if cfg.score.enabled and cfg.score.temporal:
        out.append(("score.clip_model_path", cfg.score.clip_model_path,
                    {"what": "CLIP (temporal score)", "archs": CLIP_ARCHS}))
    return out


def _encoders(cfg: Any, need_text: bool, need_ae: bool) -> list[tuple[str, str | None, dict]]:
    enc = cfg.encoders
    out: list[tuple[str, str | None, dict]] = []
    if need_text:
        out.append(("encoders.text_encoder.path", enc.text_encoder.path,
                    {"what": f"{enc.text_encoder.kind} text encoder",
                     "archs": TEXT_ENCODER_ARCHS.get(enc.text_encoder.kind, frozenset()),
                     "subfolders": ("text_encoder",)}))
    ae = enc.autoencoder
    if need_ae and ae.kind != "pixel":
        cls = "AutoencoderKL" if ae.kind == "image_vae" else ae.class_name
        out.append(("encoders.autoencoder.path", ae.path,
                    {"what": f"{ae.kind} ({cls})", "archs": frozenset({cls}),
                     "subfolders": ("vae",)}))
    return out


def _train(cfg: Any) -> list[tuple[str, str | None, dict]]:
    # As training's preflight: an encoded run never builds the text encoder, and the
    # autoencoder only for previews.
    encoded = bool(cfg.data.encoded)
    out = _encoders(cfg, not encoded, not encoded or bool(cfg.logging.sample_every))
    model = cfg.model
    for key, what, archs, sub in (
            ("pretrained_unet", "SD1.5 UNet", frozenset({"UNet2DConditionModel"}), ("unet",)),
            ("motion_adapter", "AnimateDiff MotionAdapter", frozenset({"MotionAdapter"}), ())):
        if model.overrides.get(key):
            out.append((f"model.overrides.{key}", model.overrides[key],
                        {"what": what, "archs": archs, "subfolders": sub}))
    if model.init_from:
        out.append(("model.init_from", model.init_from,
                     {"what": "initial weights (.safetensors / .pt)", "form": "any"}))
    return out


def _encode(cfg: Any) -> list[tuple[str, str | None, dict]]:
    return _encoders(cfg, True, True)


def _generation(cfg: Any) -> list[tuple[str, str | None, dict]]:
    out: list[tuple[str, str | None, dict]] = []
    for stage in ("stage1", "stage2"):
        s = _get(cfg, f"generation.{stage}")
        out.append((f"generation.{stage}.export", s.export,
                    {"what": f"{stage} export (model.safetensors + model.yaml)",
                     "form": "export"}))
        # null: the paths recorded in the export (checked when the export is read).
        if s.text_encoder_path:
            out.append((f"generation.{stage}.text_encoder_path", s.text_encoder_path,
                        {"what": "text encoder", "subfolders": ("text_encoder",)}))
        if s.autoencoder_path:
            out.append((f"generation.{stage}.autoencoder_path", s.autoencoder_path,
                        {"what": "autoencoder", "subfolders": ("vae",)}))
    out += _engine_needs(cfg, "annotate.prompts", "prompt LLM")
    out += _mask_needs(cfg, "annotate.")
    return out


def _evaluate(cfg: Any) -> list[tuple[str, str | None, dict]]:
    out = _generation(cfg)
    ev, wanted = cfg.evaluation, set(cfg.evaluation.metrics)
    if ev.allow_random_init:  # tests only: backbones without weights are random
        return out
    if "clipframe" in wanted:
        out.append(("evaluation.clip.path", ev.clip.path, {"what": "CLIP (CLIPFrame)",
                                                           "archs": CLIP_ARCHS}))
    if wanted & {"viclip_t", "viclip_v"}:
        out.append(("evaluation.viclip.path", ev.viclip.path, {"what": "video-text model"}))
    if "fvd" in wanted:
        out.append(("evaluation.fvd.weights", ev.fvd.weights,
                    {"what": f"FVD backbone ({ev.fvd.backbone})", "form": "file"}))
    if "ad" in wanted and ev.flow.backend.startswith("raft"):  # the others need no weights
        out.append(("evaluation.flow.weights", ev.flow.weights,
                    {"what": f"optical flow ({ev.flow.backend})", "form": "file"}))
    return out


#: kind -> the needs of a loaded config of that kind (rebuild is a prep config plus a section).
NEEDS = {"prep": _prep, "rebuild": _prep, "train": _train, "encode": _encode,
         "generate": _generation, "evaluate": _evaluate}


def model_needs(kind: str, cfg: Any, config_file: str) -> list[ModelNeed]:
    """The models a loaded config of ``kind`` needs (ValueError for kinds that need none)."""
    if kind not in NEEDS:
        raise ValueError(f"kind {kind!r} loads no models; models check reads "
                         f"{', '.join(sorted(NEEDS))} configs")
    return [ModelNeed(config_file, key, path, **spec) for key, path, spec in NEEDS[kind](cfg)]


def stage_hint(need: ModelNeed) -> str:
    """How to put the model at its path, from a machine with Hugging Face hub access."""
    if not need.path:
        return f"set {need.field} in {need.config}"
    if "://" in need.path:
        return "resolved by the loader on the node that reads it"
    target = Path(need.path)
    if need.form == "export":
        return f"train the stage (its run exports here), or copy an export folder to {target}"
    if target.name in HUB_SOURCES:
        repo, file = HUB_SOURCES[target.name]
        get = (f"huggingface-cli download {repo} {file} --local-dir {target.parent}" if file
               else f"huggingface-cli download {repo} --local-dir {target}")
    elif target.parent.name in HUB_SOURCES:  # a component of a pipeline repo (.../sd15/vae)
        repo, _ = HUB_SOURCES[target.parent.name]
        get = (f"huggingface-cli download {repo} --include '{target.name}/*' "
               f"--local-dir {target.parent}")
    else:
        return f"copy {need.what} to {target} (no known hub source for {target.name!r})"
    return f"{get} (on a machine with hub access), then copy it to the same path on every node"


def check_need(need: ModelNeed) -> ModelReport:
    """Whether ``need`` is there and is the expected model."""
    hint = stage_hint(need)
    path = need.path
    if not path:
        return ModelReport(need, "missing", f"{need.field} is not set", stage=hint)
    if "://" in path:
        return ModelReport(need, "unchecked", "a URI: checked by the loader", stage=hint)
    target = Path(path).expanduser()
    if not target.exists():
        return ModelReport(need, "missing", f"{target} does not exist", stage=hint)
    if need.form == "file":
        if not target.is_file():
            return ModelReport(need, "wrong", f"{target} is a folder, expected a weights file",
                               stage=hint)
        return ModelReport(need, "ok", f"file, {target.stat().st_size} bytes")
    if need.form == "any":
        return ModelReport(need, "ok", "present")
    if need.form == "export":
        missing = [n for n in ("model.safetensors", "model.yaml") if not (target / n).is_file()]
        if missing:
            return ModelReport(need, "wrong", f"{target} has no {' nor '.join(missing)}",
                               stage=hint)
        return ModelReport(need, "ok", "export folder")
    problem = weights_problem(need.field, path, need.what, need.subfolders)
    if problem:
        return ModelReport(need, "wrong", problem, stage=hint)
    folder = model_folder(target, need.subfolders) or target
    found = architectures(read_config(folder))
    if need.engine:
        problem = servable_problem(need.field, str(folder), need.engine)
        if problem:
            return ModelReport(need, "wrong", problem, found, hint)
        return ModelReport(need, "ok", f"servable by {need.engine}", found)
    if need.archs and not set(found) & need.archs:
        return ModelReport(
            need, "wrong",
            f"{need.field}: {folder / 'config.json'} names {', '.join(found) or 'no class'}, "
            f"expected {' or '.join(sorted(need.archs))}: put {need.what} there or change "
            f"{need.field}", found, hint)
    return ModelReport(need, "ok", "model folder", found)


def check_models(needs: Iterable[ModelNeed]) -> list[ModelReport]:
    return [check_need(n) for n in needs]


def failed(reports: Iterable[ModelReport]) -> bool:
    return any(r.status in ("missing", "wrong") for r in reports)


def format_table(reports: list[ModelReport]) -> str:
    """One row per model (status, field, path, what), the problem and how to stage it below."""
    if not reports:
        return "no models needed"
    rows = [(r.status.upper(), f"{r.need.config}: {r.need.field}", r.need.path or "-",
             r.need.what + (f" [{', '.join(r.found)}]" if r.found else "")) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for r, row in zip(reports, rows, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
                     + "  " + row[3])
        if r.status in ("missing", "wrong"):
            lines.append(f"    problem: {r.detail}")
            lines.append(f"    stage:   {r.stage}")
    bad = sum(r.status in ("missing", "wrong") for r in reports)
    lines.append(f"{len(reports)} model(s), {bad} missing or wrong")
    return "\n".join(lines)


__all__ = ["HUB_SOURCES", "ModelNeed", "ModelReport", "check_models", "check_need", "failed",
           "format_table", "model_needs", "stage_hint"]
