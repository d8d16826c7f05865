"""Evaluation metrics against known answers, with tiny random backbones built locally."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttm_ray.config import ConfigError, from_dict
from ttm_ray.evaluation import tiny
from ttm_ray.evaluation.clipframe import ClipFrameConfig
from ttm_ray.evaluation.config import EvalItem, EvaluationConfig
from ttm_ray.evaluation.displacement import (
    Displacement,
    FlowConfig,
    LucasKanadeFlow,
    RaftFlow,
    raft_size,
)
from ttm_ray.evaluation.fvd import (
    FvdConfig,
    feature_stats,
    frechet_distance,
    fvd_from_features,
)
from ttm_ray.evaluation.report import (
    EvaluationResults,
    log_to_mlflow,
    to_csv,
    to_markdown,
    write_report,
)
from ttm_ray.evaluation.viclip import ViClip, ViClipConfig
from ttm_ray.evaluation.video import to_float, to_uint8, uniform_indices
from ttm_ray.evaluation.weights import WeightsNotFound


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_backbones")
    return {"clip": tiny.build_tiny_clip(root / "clip"),
            "xclip": tiny.build_tiny_xclip(root / "xclip"),
            "fvd": tiny.build_tiny_fvd_weights(root / "fvd"),
            "raft": tiny.build_tiny_raft_weights(root / "raft")}


def rand_video(seed: int, t: int = 6, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random texture ``[3, h, w]`` in [0, 1] (gradients everywhere, no aliasing)."""
    noise = torch.from_numpy(np.random.default_rng(seed).random((3, 1, h, w), np.float32))
    x = torch.arange(-6, 7, dtype=torch.float32)
    k = torch.exp(-x * x / 8)
    k = k / k.sum()
    noise = F.conv2d(F.pad(noise, (6, 6, 6, 6), mode="replicate"), k.view(1, 1, 1, -1))
    noise = F.conv2d(noise, k.view(1, 1, -1, 1))[:, 0]
    lo, hi = noise.amin(dim=(1, 2), keepdim=True), noise.amax(dim=(1, 2), keepdim=True)
    return (noise - lo) / (hi - lo)


def translating_video(kx: int, ky: int, frames: int = 5, h: int = 60, w: int = 90
                      ) -> torch.Tensor:
    """A window sliding over a texture: content moves by (-kx, -ky) pixels per frame."""
    canvas = texture(h + ky * frames + 20, w + kx * frames + 20)
    return torch.stack([canvas[:, 10 + ky * t:10 + ky * t + h, 10 + kx * t:10 + kx * t + w]
                        for t in range(frames)]).permute(0, 2, 3, 1)  # [T, H, W, 3]


# ----------------------------------------------------------------------------- Frechet
def test_frechet_distance_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
    (mu1, s1), (mu2, s2) = feature_stats(x), feature_stats(y)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_small_set_with_itself_is_zero() -> None:
    # 5 samples of 64-d features: a rank-4 covariance, where sqrtm of S1 S2 goes complex.
    feats = np.random.default_rng(2).normal(size=(5, 64)) * 10
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


# ----------------------------------------------------------------------------- FVD
def test_fvd_of_a_set_with_itself_is_zero_and_positive_otherwise(backbones) -> None:
    cfg = from_dict(FvdConfig, {"weights": str(backbones["fvd"]), "num_frames": 4, "size": 16})
    fvd = cfg.build("cpu")
    assert fvd.name == "R3D-18 (I3D stand-in)"
    generated = [rand_video(i, t=5) for i in range(3)]
    other = [v // 2 for v in (rand_video(10 + i, t=5) for i in range(3))]
    gen, ref = fvd.features(generated), fvd.features(other)
    assert gen.shape == (3, 512)
    different = fvd_from_features(gen, ref)
    assert different > 0
    assert fvd_from_features(gen, gen) <= 1e-9 * different
    assert fvd(generated[:2], other[:2]) > 0  # the set call: features of both, then distance
    with pytest.raises(ValueError, match=r"evaluation\.fvd\.weights: .* do not fit .*s3d"):
        FvdConfig(backbone="s3d", weights=str(backbones["fvd"])).build()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the detector is TorchScript
def test_i3d_torchscript_detector_gets_its_input_convention(tmp_path) -> None:
    class FakeI3D(torch.nn.Module):  # the call signature of StyleGAN-V's i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                    return_features: bool = False) -> torch.Tensor:
            flat = x.flatten(1)
            return torch.stack([flat.min(1).values, flat.max(1).values,
                                torch.full_like(flat[:, 0], float(x.shape[2]))], dim=1)

    file = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(FakeI3D()), str(file))
    fvd = FvdConfig(backbone="i3d_torchscript", weights=str(file), num_frames=4,
                    size=16).build()
    assert fvd.name.startswith("I3D")
    video = np.zeros((3, 20, 20, 3), np.uint8)
    video[1] = 255
    feats = fvd.features([video])
    assert feats.tolist() == [[-1.0, 1.0, 4.0]]  # [-1, 1] input, 4 frames


# ----------------------------------------------------------------------------- CLIPFrame
def test_clipframe_of_a_static_video_is_one(backbones) -> None:
    clipframe = ClipFrameConfig(path=str(backbones["clip"])).build("cpu")
    static = np.repeat(rand_video(0, t=1), 5, axis=0)
    assert clipframe(static) == pytest.approx(1.0, abs=1e-6)
    assert clipframe(rand_video(1)) < 1.0
    assert clipframe(rand_video(2, t=1)) is None  # no consecutive pair
    assert clipframe.name == "CLIP (clip)"


# ----------------------------------------------------------------------------- AD
def test_ad_of_a_static_video_is_zero() -> None:
    ad = Displacement(LucasKanadeFlow())
    static = translating_video(0, 0, frames=4)
    assert ad(static) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(("kx", "ky"), [(2, 0), (1, 1), (3, 1)])
def test_ad_of_a_known_translation(kx: int, ky: int) -> None:
    ad = FlowConfig(backend="lucas_kanade", batch_size=2).build("cpu")
    video = translating_video(kx, ky)
    flow = ad.flows(video)
    assert flow.shape == (4, 2, 60, 90)
    assert float(flow[:, 0].mean()) == pytest.approx(-kx, abs=0.1)
    assert float(flow[:, 1].mean()) == pytest.approx(-ky, abs=0.1)
    assert ad(video) == pytest.approx(math.hypot(kx, ky), rel=0.05)


def test_raft_size_rule() -> None:
    assert raft_size(360, 640) == (360, 640)
    assert raft_size(270, 480) == (272, 480)
    assert raft_size(50, 70) == (128, 176)  # below RAFT's 128 px minimum: upscaled
    assert raft_size(720, 1280, short_side=256) == (256, 456)


def test_raft_flow_is_rescaled_to_input_pixels() -> None:
    class UnitFlow(torch.nn.Module):  # RAFT's interface; (1, 1) px at whatever size it runs
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int]] = []
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, a, b, num_flow_updates=12):
            self.seen.append(tuple(a.shape[-2:]))
            return [torch.ones(a.shape[0], 2, *a.shape[-2:])]

    model = UnitFlow()
    flow = RaftFlow(model, "unit")(torch.rand(2, 3, 50, 70), torch.rand(2, 3, 50, 70))
    assert model.seen == [(128, 176)]
    assert flow.shape == (2, 2, 50, 70)
    assert torch.allclose(flow[:, 0], torch.tensor(70 / 176))
    assert torch.allclose(flow[:, 1], torch.tensor(50 / 128))


def test_raft_loads_from_a_state_dict(backbones) -> None:
    ad = FlowConfig(backend="raft_small", weights=str(backbones["raft"]), iterations=2
                    ).build("cpu")
    assert ad.name == "RAFT-small"
    flow = ad.flows(rand_video(0, t=3, h=50, w=70))
    assert flow.shape == (2, 2, 50, 70) and torch.isfinite(flow).all()
    with pytest.raises(ValueError, match=r"evaluation\.flow\.weights: .* does not fit"):
        FlowConfig(backend="raft_large", weights=str(backbones["raft"])).build("cpu")


# ----------------------------------------------------------------------------- ViCLIP
def test_viclip_shapes_ranges_and_self_similarity(backbones) -> None:
    viclip = ViClipConfig(path=str(backbones["xclip"])).build("cpu")
    assert viclip.name == "X-CLIP (stand-in for ViCLIP): xclip"
    videos = [rand_video(i, t=7) for i in range(3)]
    assert viclip.encoder.encode_video(videos).shape == (3, 16)
    assert viclip.encoder.encode_text(["red ball", "a dog moves left", "cat"]).shape == (3, 16)
    text = viclip.text_similarity(videos, ["red ball", "a dog moves left", "cat"])
    assert text.shape == (3,) and np.all(np.abs(text) <= 1 + 1e-6)
    same = viclip.video_similarity(videos, videos)
    assert same == pytest.approx(np.ones(3), abs=1e-5)
    assert viclip.video_similarity(videos, videos[::-1])[0] < 1 - 1e-4


def test_viclip_takes_any_video_text_encoder() -> None:
    class Fixed:  # the protocol without paired_text_similarity: plain cosine
        name = "fixed"

        def encode_video(self, videos):
            return torch.tensor([[1.0, 0.0]] * len(videos))

        def encode_text(self, texts):
            return torch.tensor([[1.0, 1.0]] * len(texts))

    assert ViClip(Fixed()).text_similarity([0], ["x"]) == pytest.approx([1 / math.sqrt(2)])
    with pytest.raises(TypeError, match="VideoTextEncoder"):
        ViClip(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- inputs
def test_input_convention() -> None:
    floats = np.full((2, 4, 4, 3), 0.5, np.float32)
    assert to_uint8(floats).dtype == np.uint8 and int(to_uint8(floats)[0, 0, 0, 0]) == 128
    x = to_float(torch.full((2, 4, 5, 3), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 4, 5) and float(x.max()) == 1.0
    with pytest.raises(ValueError, match="channel-first"):
        to_float(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(np.full((1, 4, 4, 3), -1.0))
    assert uniform_indices(10, 4) == [0, 3, 6, 9] and uniform_indices(2, 4) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- config
def test_missing_paths_name_the_key_and_the_fix(tmp_path) -> None:
    with pytest.raises(WeightsNotFound, match=r"evaluation\.clip\.path is not set: point it at "
                                              r"a CLIP model saved with save_pretrained"):
        EvaluationConfig(metrics=["clipframe"]).build()
    missing = tmp_path / "nope"
    with pytest.raises(WeightsNotFound, match=rf"evaluation\.clip\.path: folder {missing} not "
                                              r"found: point it at a CLIP model"):
        EvaluationConfig(metrics=["clipframe"], clip=ClipFrameConfig(path=str(missing))).build()
    with pytest.raises(WeightsNotFound, match=r"evaluation\.viclip\.path is not set.*X-CLIP"):
        EvaluationConfig(metrics=["viclip_v"]).build()
    with pytest.raises(WeightsNotFound, match=r"evaluation\.fvd\.weights: file .* not found.*"
                                              r"allow_random_init"):
        EvaluationConfig(metrics=["fvd"], fvd=FvdConfig(weights=str(missing))).build()
    with pytest.raises(WeightsNotFound, match=r"evaluation\.flow\.weights is not set"):
        EvaluationConfig(metrics=["ad"]).build()
    # Only the enabled metrics' backbones are required; random init only when asked for.
    assert EvaluationConfig(metrics=["ad"], flow=FlowConfig(backend="lucas_kanade")).build()
    ad = EvaluationConfig(metrics=["ad"], allow_random_init=True,
                          flow=FlowConfig(backend="raft_small")).build()
    assert ad.backbones == {"ad": "RAFT-small (random init)"}
    clip = EvaluationConfig(metrics=["clipframe"], allow_random_init=True).build()
    assert clip.backbones["clipframe"].endswith("(random init)")
    with pytest.raises(ConfigError, match=r"metrics\[0\]: expected one of"):
        from_dict(EvaluationConfig, {"metrics": ["fid"]})


def test_farneback_needs_opencv() -> None:
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="lucas_kanade"):
            FlowConfig(backend="farneback").build()
    else:
        ad = FlowConfig(backend="farneback").build()
        assert ad(translating_video(2, 0)) == pytest.approx(2.0, rel=0.2)


def test_evaluator_tables(backbones, tmp_path) -> None:
    cfg = from_dict(EvaluationConfig, {
        "device": "cpu", "video_batch_size": 3,
        "clip": {"path": str(backbones["clip"])},
        "viclip": {"path": str(backbones["xclip"])},
        "fvd": {"weights": str(backbones["fvd"]), "num_frames": 4, "size": 16},
        "flow": {"backend": "lucas_kanade"},
    })
    evaluator = cfg.build()
    moving = translating_video(2, 0, frames=4, h=40, w=48).numpy()
    items = [EvalItem(f"v{i}", moving if i % 2 else rand_video(i, t=4), rand_video(50 + i, t=4),
                      "red ball moves left", "single-object" if i < 2 else "multi-object")
             for i in range(4)]
    results = evaluator.evaluate(iter(items))
    assert list(results.subsets) == ["single-object", "multi-object", "all"]
    assert [v["n_videos"] for v in results.subsets.values()] == [2, 2, 4]
    assert all(v["fvd"] > 0 for v in results.subsets.values())
    assert results.per_video[1]["ad"] == pytest.approx(2.0, rel=0.05)
    assert results.subsets["all"]["ad"] == pytest.approx(
        np.mean([r["ad"] for r in results.per_video]))
    assert results.backbones["fvd"] == "R3D-18 (I3D stand-in)"
    assert results.backbones["ad"].startswith("Lucas-Kanade")
    md = to_markdown(results)
    assert "| Ours-UNet (paper) | 925.39 | 0.969 | 0.220 | 0.888 | 4.70 |" in md
    assert "ViCLIP-T/ViCLIP-V: X-CLIP (stand-in for ViCLIP)" in md
    paths = write_report(results, tmp_path)
    assert paths["per_video"].read_text().splitlines()[0] == (
        "video_id,subset,clipframe,viclip_t,viclip_v,ad")
    with pytest.raises(ValueError, match="v9: no caption, which viclip_t needs"):
        evaluator.evaluate([EvalItem("v9", rand_video(0), rand_video(1))])


# ----------------------------------------------------------------------------- report
def fixed_results(benchmark: str = "SA-V-128") -> EvaluationResults:
    metrics = ("fvd", "clipframe", "viclip_t", "viclip_v", "ad")
    return EvaluationResults(
        benchmark, metrics,
        subsets={"single-object": {"n_videos": 2, "fvd": 900.5, "clipframe": 0.97,
                                   "viclip_t": 0.2, "viclip_v": 0.9, "ad": 4.5},
                 "all": {"n_videos": 3, "fvd": None, "clipframe": 0.96, "viclip_t": 0.21,
                         "viclip_v": 0.89, "ad": 5.0}},
        backbones={"fvd": "R3D-18 (I3D stand-in)", "ad": "RAFT-large"})


def test_report_csv_and_markdown() -> None:
    lines = to_csv(fixed_results()).splitlines()
    assert lines == [
        "benchmark,subset,source,n_videos,fvd,clipframe,viclip_t,viclip_v,ad",
        "SA-V-128,single-object,this run,2,900.5,0.97,0.2,0.9,4.5",
        "SA-V-128,single-object,Ours-UNet (paper),,925.39,0.969,0.22,0.888,4.7",
        "SA-V-128,single-object,Ours-DiT (paper),,1216.83,0.945,0.226,0.86,7.22",
        "SA-V-128,all,this run,3,,0.96,0.21,0.89,5.0",
    ]
    md = to_markdown(fixed_results())
    assert "## single-object (2 videos)" in md and "## all (3 videos)" in md
    assert "| this run | 900.50 | 0.970 | 0.200 | 0.900 | 4.50 |" in md
    assert "| Ours-DiT (paper) | 1216.83 | 0.945 | 0.226 | 0.860 | 7.22 |" in md
    assert "| this run | – | 0.960 | 0.210 | 0.890 | 5.00 |" in md
    assert "Backbones: FVD: R3D-18 (I3D stand-in); AD: RAFT-large" in md
    assert "not comparable" in md
    other = to_markdown(fixed_results("image-animation-bench"))
    assert "paper" not in other and "Ours-UNet" not in to_csv(fixed_results("custom"))


def test_log_to_mlflow_with_module_or_client(tmp_path) -> None:
    calls: list[tuple] = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    paths = write_report(fixed_results(), tmp_path)
    logged = log_to_mlflow(fixed_results(), Recorder(), artifacts=[paths["csv"]])
    assert logged["eval/single-object/fvd"] == 900.5 and "eval/all/fvd" not in logged
    assert logged["eval/all/n_videos"] == 3.0
    names = [c[0] for c in calls]
    assert names == ["log_metrics", "set_tags", "log_artifact"]
    assert calls[1][1][0]["eval.backbone.fvd"] == "R3D-18 (I3D stand-in)"
    calls.clear()
    log_to_mlflow(fixed_results(), Recorder(), run_id="r1", step=3)
    assert {c[0] for c in calls} == {"log_metric", "set_tag"}
    assert ("log_metric", ("r1", "eval/single-object/ad", 4.5), {"step": 3}) in calls


def test_tiny_builders_are_deterministic(tmp_path) -> None:
    a = tiny.build_tiny_raft_weights(tmp_path / "a", seed=3)
    b = tiny.build_tiny_raft_weights(tmp_path / "b", seed=3)
    c = tiny.build_tiny_raft_weights(tmp_path / "c", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
