"""Contrastive pretraining of a tiny open_clip model, so the offline suites have a backbone with
real zero-shot ability (docs/protocols.md#the-offline-suites): images from offline datasets, captions from their class names
and templates ("a photo of the digit seven."). The result is an ordinary open_clip checkpoint
(safetensors), cached by everything that produced it, then loaded like any pretrained weights."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.backbones import load_backbone
from bench.codehash import code_digest
from bench.config import DataCfg, PretrainCfg
from bench.data import load_task
from bench.device import CPU, Runtime
from bench.integrity import intact_safetensors
from bench.locks import locked_compute
from bench.progress import progress_bar
from negmerge import save_state


def pretrained_checkpoint(
    model_name: str, cfg: PretrainCfg, data: DataCfg, cache: Path, progress: bool = True, runtime: Runtime = CPU
) -> Path:
    """Path of the pretrained checkpoint, training it first if it is not cached."""
    spec = {"model": model_name, "pretrain": cfg.model_dump(), "split_seed": data.split_seed}
    spec["code"] = code_digest("bench.pretrain")
    if runtime.precision != "fp32":
        spec["precision"] = runtime.precision  # fp32 keeps its key: the same bits as before
    spec |= runtime.key()  # device kind, compile, deterministic (a plain CPU run: none)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / "backbones" / f"{model_name}-{key}.safetensors"
    return locked_compute(
        path, lambda: _intact(path), lambda: _pretrain(model_name, cfg, data, path, progress, runtime)
    )[0]


def _intact(path: Path) -> Path | None:
    return path if path.is_file() and intact_safetensors(path) else None


def _pretrain(model_name: str, cfg: PretrainCfg, data: DataCfg, path: Path, progress: bool, runtime: Runtime) -> Path:
    backbone = load_backbone(model_name, None, seed=cfg.seed)
    model = backbone.model.to(runtime.device)
    images, caption_ids, captions = [], [], []
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, fraction in cfg.datasets.items():
        task = load_task(
            name, val_fraction=data.val_fraction, val_max=data.val_max, split_seed=data.split_seed, roots=data.roots
        )
        n = max(1, int(round(len(task.train) * fraction)))
        idx = torch.randperm(len(task.train), generator=gen)[:n]
        offset = len(captions)
        for cls in task.classnames:
            captions.append([t.replace("{c}", cls) for t in task.templates])
        images.append(task.train.images[idx])
        caption_ids.append(task.train.labels[idx] + offset)
    x_all, c_all = torch.cat(images), torch.cat(caption_ids)
    n_templates = max(len(c) for c in captions)
    tokens = torch.stack([backbone.tokenizer([c[i % len(c)] for i in range(n_templates)]) for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (cfg.steps - warmup)))
        ),
    )
    scaler = runtime.grad_scaler()  # fp16: loss scaling (a disabled scaler passes through)
    model.train()
    for _ in progress_bar(range(cfg.steps), desc=f"pretrain {model_name}", enabled=progress, leave=True):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
        cap = c_all[idx]
        # one caption per distinct class in the batch: duplicates of a class are not negatives
        classes, inverse = torch.unique(cap, return_inverse=True)
        which = torch.randint(n_templates, (len(classes),), generator=gen)
        with runtime.autocast():
            img = F.normalize(model.encode_image(backbone.to_input(runtime.to(x_all[idx]))), dim=-1)
            txt = F.normalize(model.encode_text(runtime.to(tokens[classes, which])), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T  # (B, n_classes_in_batch)
            loss = F.cross_entropy(logits, runtime.to(inverse))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    save_state({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    return path
