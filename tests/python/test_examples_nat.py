# SPDX-License-Identifier: Apache-2.0
"""examples/nat.py on the CPU: the NAT/DiNAT model's shapes and sizes, and one timed
inference and training step with the CPU backends (its CI run)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("nat_example", ROOT / "examples" / "nat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


nat = load_example()


def test_sizes_are_the_papers():
    """Parameter counts of NAT-Mini/Tiny/Small/Base: 20M, 28M, 51M, 90M (NAT paper)."""
    for name, millions in (("nat-mini", 20), ("nat-tiny", 28)):
        model = nat.NAT(nat.CONFIGS[name])
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.5)
    assert nat.NAT(nat.CONFIGS["dinat-tiny"]).dilations[:3] == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9]


def test_forward_and_backward_shapes():
    c = nat.CONFIGS["dinat-ci"]
    model = nat.NAT(c)
    assert model.dilations == [[1, 2], [1]]
    x = torch.randn(3, 3, c.image, c.image, requires_grad=True)
    y = model(x)
    assert y.shape == (3, c.classes)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_one_step_on_the_cpu(tmp_path):
    out = tmp_path / "nat.json"
    results = nat.main(["--model", "dinat-ci", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0",
                        "--backends", "cpu,reference", "--json", str(out)])
    assert [r["backend"] for r in results] == ["cpu", "reference"]
    for r in results:
        assert r["inference_images_per_s"] > 0 and r["train_images_per_s"] > 0
        assert math.isfinite(r["train_loss"]) and r["train_hours_300_epochs"] > 0
    assert json.loads(out.read_text()) == results


def test_segmentation_resolution_configs():
    # 512x512 images: 128x128 tokens at stage 1, DiNAT's dilations 18, 9, 4, 2.
    c = nat.CONFIGS["dinat-tiny-512"]
    assert c.image // 4 == 128 and c.dilated
    assert [max(d) for d in nat.NAT(c).dilations] == [18, 9, 4, 2]


def test_one_compiled_step_on_the_cpu():
    results = nat.main(["--model", "dinat-ci", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0",
                        "--backends", "cpu", "--compile", "both"])
    assert [(r["backend"], r["compiled"]) for r in results] == [("cpu", False), ("cpu", True)]
    for r in results:
        assert r["inference_images_per_s"] > 0 and r["train_images_per_s"] > 0 and math.isfinite(r["train_loss"])


def test_use_backend_reaches_every_layer():
    """A backend that cannot run on CPU tensors fails every pass with nbhd's reason."""
    results = nat.run("nat-ci", ["naive"], "cpu", "float32", batch=1, steps=1, warmup=0, rpb=True)
    assert "inference_error" in results[0] and "train_error" in results[0]
    model = nat.NAT(nat.CONFIGS["nat-ci"])
    x = torch.randn(1, 3, 32, 32)
    with nat.use_backend("reference"):
        a = model(x)
    b = model(x)  # restored afterwards: nbhd's own choice (the cpu backend)
    assert torch.allclose(a, b, atol=1e-5)
