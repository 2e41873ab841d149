"""Dense task vectors beyond causal LMs: a sequence classifier (head excluded) and a ViT.

Finetunes are real optimizer steps; the expectation is the formula θ0 + Σ c_i (θ_i − θ0), computed
here from the checkpoints with safetensors' own loader and a plain transformers forward pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_taskarith import BaseModel, TaskVector


def _steps(model, batch: dict, labels: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """A tiny LlamaForSequenceClassification base (2 labels) and two finetunes: one keeps the 2-label
    head, one was re-headed to 3 labels (its ``score`` cannot join τ and must be excluded)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, num_labels=2, pad_token_id=0)
    base = LlamaForSequenceClassification(cfg)
    base.save_pretrained(root / "base")
    ids = torch.randint(1, 40, (6, 8))
    out = {"base": root / "base"}
    for name, labels in (("ft2", 2), ("ft3", 3)):
        torch.manual_seed(len(name) + labels)
        model = LlamaForSequenceClassification.from_pretrained(root / "base", num_labels=labels, ignore_mismatched_sizes=True)
        _steps(model, {"input_ids": ids}, torch.randint(0, labels, (6,)))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_sequence_classifier_task_vector_with_head_excluded(classifiers, tmp_path):
    base_dir, ft2, ft3 = classifiers["base"], classifiers["ft2"], classifiers["ft3"]
    base = BaseModel(base_dir)
    merged = base + 0.5 * TaskVector.from_models(base, ft2) + 0.25 * TaskVector.from_models(base, ft3, exclude=[r"^score\."])
    folder = merged.save_pretrained(tmp_path / "out", dtype="float32", progress=False)

    b, a, c, got = _tensors(base_dir), _tensors(ft2), _tensors(ft3), _tensors(folder)
    assert set(got) == set(b)
    for name in b:
        want = b[name] + 0.5 * (a[name] - b[name])
        if not name.startswith("score."):
            want = want + 0.25 * (c[name] - b[name])
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7, msg=name)

    # the in-memory model is the config's own class and classifies like the saved folder
    from transformers import AutoModelForSequenceClassification

    model = merged.to_model()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.randint(1, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_head_with_another_shape_needs_exclude(classifiers, tmp_path):
    from hf_taskarith import TaskArithError

    base = BaseModel(classifiers["base"])
    with pytest.raises(TaskArithError, match="score"):
        (base + TaskVector.from_models(base, classifiers["ft3"])).save_pretrained(tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_vit_task_vector_reproduces_the_finetune(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "base")
    model = ViTForImageClassification.from_pretrained(tmp_path / "base")
    _steps(model, {"pixel_values": torch.randn(4, 3, 8, 8)}, torch.tensor([0, 1, 2, 1]))
    model.save_pretrained(tmp_path / "ft")

    base = BaseModel(tmp_path / "base")
    folder = (base + TaskVector.from_models(base, tmp_path / "ft")).save_pretrained(tmp_path / "out", dtype="float32", progress=False)
    want = _tensors(tmp_path / "ft")
    got = _tensors(folder)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            ViTForImageClassification.from_pretrained(folder)(pixel_values=pixels).logits, model(pixel_values=pixels).logits
        )
