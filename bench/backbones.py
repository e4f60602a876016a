"""open_clip backbones: by name + pretrained tag, a checkpoint path, ``local-dir:``, or a config
shipped with the suite (tiny, for offline runs). Same code path for all: tests drive it with tiny
random configs, papers with ViT-B-32/openai.

Only the image encoder (``model.visual``) is fine-tuned and edited; the text tower builds frozen
zero-shot heads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.device import normalisation
from bench.errors import BenchError

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_suite_configs() -> None:
    """Make the tiny configs shipped in bench/model_configs known to open_clip (once)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_backbones() -> list[str]:
    import open_clip

    register_suite_configs()
    return open_clip.list_models()


@dataclass
class Backbone:
    name: str
    pretrained: str | None
    model: torch.nn.Module  # open_clip CLIP
    tokenizer: object
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocess: object  # PIL -> tensor evaluation transform (for datasets of PIL images)
    train_preprocess: object = None  # open_clip's train transform (fine-tuning without RandAugment)
    _norm: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, std) tensors

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    def identity(self) -> str:
        """Content id of the starting weights: what the candidate pool's cache keys depend on.

        Architecture name and weight bytes only: ``pretrained`` can be a file path (the mini backbones
        live in the cache), and moving a cache must not invalidate what it holds.
        """
        h = hashlib.sha256(self.name.encode())
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            h.update(str(tuple(v.shape)).encode())
        return h.hexdigest()[:16]

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N,H,W) or (N,C,H,W) -> normalised float input of the model's size."""
        x = images.float().div_(255.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean, std = normalisation(self._norm, self.mean, self.std, x.device)
        return (x - mean) / std


def load_backbone(name: str, pretrained: str | None = None, seed: int = 0) -> Backbone:
    """Create an open_clip model. ``pretrained``: an open_clip tag, a checkpoint file, or None (random)."""
    import open_clip

    register_suite_configs()
    is_local_dir = name.startswith("local-dir:")
    if not is_local_dir and name not in open_clip.list_models():
        raise BenchError(f"backbone.name: unknown model {name!r}; `negmerge-bench list backbones` lists them")
    if is_local_dir and not Path(name.removeprefix("local-dir:")).is_dir():
        raise BenchError(f"backbone.name: folder {name.removeprefix('local-dir:')} does not exist")
    if pretrained and not is_local_dir:
        _check_weights_available(name, pretrained)
    torch.manual_seed(seed)
    try:
        model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if is_local_dir else pretrained, weights_only=True
        )
    except Exception as exc:
        raise BenchError(
            f"backbone {name!r} with pretrained={pretrained!r} could not be loaded ({type(exc).__name__}: {exc}). "
            "Give backbone.pretrained as a local checkpoint file, or a tag whose weights are already in the "
            "Hugging Face cache (run once online with NEGMERGE_ALLOW_DOWNLOAD=1)."
        ) from exc
    model.eval()
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(name)
    return Backbone(name, pretrained, model, tokenizer, int(size), mean, std, preprocess, train_preprocess)


def _check_weights_available(name: str, pretrained: str) -> None:
    """Fail fast, before any network timeout, when weights are neither a file nor cached offline."""
    import open_clip

    if Path(pretrained).suffix in {".pt", ".bin", ".pth", ".safetensors"} or os.sep in pretrained:
        if not Path(pretrained).is_file():
            raise BenchError(f"backbone.pretrained: checkpoint file {pretrained} does not exist")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BenchError(
            f"backbone.pretrained: {name!r} has no pretrained tag {pretrained!r}; known: {', '.join(tags) or 'none'}"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        hub = cfg.get("hf_hub", "")
        if hub:
            from huggingface_hub import try_to_load_from_cache

            repo = hub.rstrip("/")
            filenames = ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
            if not any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames):
                raise BenchError(
                    f"weights for {name}/{pretrained} are not in the local Hugging Face cache and downloads are off "
                    f"(HF_HUB_OFFLINE=1). Download them on a machine with internet (huggingface-cli download {repo}) "
                    "and copy the cache, or set backbone.pretrained to the checkpoint file, or set "
                    "NEGMERGE_ALLOW_DOWNLOAD=1 where downloads work."
                )


def visual_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """A detached copy of the image encoder's weights (theta_0)."""
    return {k: v.detach().clone() for k, v in backbone.visual.state_dict().items()}
