"""Quick plain-PyTorch measurements that chose the setting of jobs/self_distillation.yaml
(issue 22 item 3): an initial MAE on the source digits, probed by 5 nearest neighbours, then
further pre-training, self-distillation and fine-tuning on the target digits, one process.
Not the engine: the job is what the results table reports; this only picks its settings.

    python scripts/self_distillation_explore.py probe --steps 1600 --every 200 --save /tmp/initial.pt
    python scripts/self_distillation_explore.py probe --init runs/self-distillation/initial/export/model.safetensors
    python scripts/self_distillation_explore.py finetune --init random --ft-steps 100 --ft-lr 2e-3
    # does further pre-training over-fit? the held-out MAE every 100 steps, then the fine-tunings
    python scripts/self_distillation_explore.py chain --init runs/self-distillation/initial/export/model.safetensors \
        --target fewshot/train --labelled fewshot/train --no-augment --further-steps 2000 --every 100 \
        --ft-steps 300 --ft-lr 2e-3

Reads the job's shards (data/selfdist/*, packed by scripts/self_distillation.sh); ``--target``
and ``--labelled`` name other splits packed the same way (``--max-per-class 20`` into
data/selfdist/labelled, say).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining

from distill_engine.families.masking import _sin_cos_table

CONFIG = Path("jobs/configs/digits_vit_mae")
torch.set_num_threads(1)


def load_split(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for tar_path in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name[:-4]
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
                labels.append(int(tar.extractfile(members[key + ".cls"]).read()))
    return torch.stack(images), torch.tensor(labels)


def test_view(images: torch.Tensor) -> torch.Tensor:
    return (F.interpolate(images, size=24, mode="bilinear", align_corners=False) - 0.5) / 0.5


def train_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1, ratio 0.9-1.1) to 24 px, as the job's view."""
    out = []
    h, w = images.shape[-2:]
    for image in images:
        scale = 0.6 + 0.4 * torch.rand((), generator=generator).item()
        ratio = math.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * torch.rand((), generator=generator).item())
        ch = min(h, max(1, round(math.sqrt(scale * h * w / ratio))))
        cw = min(w, max(1, round(math.sqrt(scale * h * w * ratio))))
        top = int(torch.randint(0, h - ch + 1, (), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        crop = image[:, top:top + ch, left:left + cw].unsqueeze(0)
        out.append(F.interpolate(crop, size=24, mode="bilinear", align_corners=False)[0])
    return (torch.stack(out) - 0.5) / 0.5


def mae_model(seed: int, **overrides) -> ViTMAEForPreTraining:
    config = ViTMAEConfig.from_pretrained(CONFIG, **overrides)
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(config)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.copy_(_sin_cos_table(config.hidden_size, 36))
        model.decoder.decoder_pos_embed.copy_(_sin_cos_table(config.decoder_hidden_size, 36))
    return model


def batches(n: int, batch: int, generator: torch.Generator):
    batch = min(batch, n)  # a split smaller than a batch: every step sees all of it
    while True:
        for chunk in torch.randperm(n, generator=generator).split(batch):
            if len(chunk) == batch:
                yield chunk


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t)


def pretrain(model, images, steps, lr, seed, mask_ratio=0.75, teacher=None, weight=1.0,
             batch=64, heldout=None, every=0, on_log=None, augment=True):
    model.config.mask_ratio = mask_ratio
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = batches(len(images), batch, generator)
    log = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 0, "linear")
        x = train_view(images[next(order)], generator) if augment else test_view(images[next(order)])
        noise = torch.rand(x.shape[0], 36, generator=generator)
        loss = model(pixel_values=x, noise=noise).loss
        total = loss
        hidden = torch.zeros(())
        if teacher is not None:
            model.config.mask_ratio = 0.0
            s = model.vit(pixel_values=x, noise=torch.arange(36.0).expand(x.shape[0], 36)).last_hidden_state[:, 0]
            with torch.no_grad():
                teacher.config.mask_ratio = 0.0
                t = teacher.vit(pixel_values=x, noise=torch.arange(36.0).expand(x.shape[0], 36)).last_hidden_state[:, 0]
            model.config.mask_ratio = mask_ratio
            hidden = ((s - t) ** 2).sum() / x.shape[0]
            total = loss + weight * hidden
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if every and (step + 1) % every == 0:
            row = {"step": step + 1, "mae": round(loss.item(), 4), "hidden": round(hidden.item(), 4)}
            if heldout is not None:
                row["heldout_mae"] = round(heldout_mae(model, heldout, mask_ratio), 4)
                model.train()
            if on_log is not None:
                row.update(on_log(model))
                model.config.mask_ratio = mask_ratio
                model.train()
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


@torch.no_grad()
def heldout_mae(model, images, mask_ratio=0.75):
    model.eval()
    model.config.mask_ratio = mask_ratio
    generator = torch.Generator().manual_seed(1234)   # the same masks every time
    x = test_view(images)
    noise = torch.rand(x.shape[0], 36, generator=generator)
    return model(pixel_values=x, noise=noise).loss.item()


@torch.no_grad()
def features(model, images):
    model.eval()
    model.config.mask_ratio = 0.0
    x = test_view(images)
    out = model.vit(pixel_values=x, noise=torch.arange(36.0).expand(x.shape[0], 36)).last_hidden_state
    return out[:, 0], out[:, 1:].mean(1)


def knn(train_f, train_y, test_f, test_y, k=5):
    a, b = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    nearest = (b @ a.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[nearest], 5).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item()


def probe(model, labelled, holdout):
    (lc, lm), (hc, hm) = features(model, labelled[0]), features(model, holdout[0])
    return knn(lc, labelled[1], hc, holdout[1]), knn(lm, labelled[1], hm, holdout[1])


def finetune(encoder_state, labelled, holdout, steps, lr, seed, warmup=None, batch=64, wd=0.05,
             every=0):
    config = ViTMAEConfig.from_pretrained(CONFIG).to_dict()
    config.update(model_type="vit", num_labels=5)
    from transformers import ViTConfig
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**config))
    if encoder_state is not None:
        missing = model.load_state_dict({k: v for k, v in encoder_state.items() if k.startswith("vit.")}, strict=False)
        assert all(k.startswith("classifier") or "pooler" in k for k in missing.missing_keys), missing.missing_keys[:5]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999))
    warmup = steps // 10 if warmup is None else warmup  # the job: 10 % of the steps
    generator = torch.Generator().manual_seed(seed)
    order = batches(len(labelled[0]), batch, generator)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, "cosine")
        idx = next(order)
        logits = model(pixel_values=train_view(labelled[0][idx], generator)).logits
        loss = F.cross_entropy(logits, labelled[1][idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if every and (step + 1) % every == 0:
            print(f"  ft step {step + 1} loss {np.mean(losses[-every:]):.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=test_view(holdout[0])).logits.argmax(1) == holdout[1]).float().mean().item()
    return accuracy, losses


def load_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict saved by ``probe --save`` (torch) or a job's export (safetensors)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["probe", "finetune", "chain"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--mask", type=float, default=0.75)
    parser.add_argument("--norm-pix", type=int, default=1)
    parser.add_argument("--source", default="source")
    parser.add_argument("--init", default="random")
    parser.add_argument("--save", default=None)
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--further-steps", type=int, default=1000)
    parser.add_argument("--further-lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", default="fewshot/train",
                        help="the split (under data/selfdist) that fine-tuning trains on")
    parser.add_argument("--no-augment", action="store_true",
                        help="further pre-training and self-distillation see the images as they "
                             "are (resized), not random crops")
    parser.add_argument("--target", default="fewshot/train",
                        help="the split (under data/selfdist) that further pre-training and "
                             "self-distillation train on")
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    start = time.time()
    source = load_split(f"data/selfdist/{args.source}")
    target = load_split(f"data/selfdist/{args.target}")
    labelled = load_split(f"data/selfdist/{args.labelled}")
    holdout = load_split("data/selfdist/target/holdout")
    if args.what == "probe" and args.init.endswith(".safetensors"):  # an export of the job
        model = mae_model(0)
        model.load_state_dict(load_state(args.init))
        print(f"{args.init} probe (cls, mean):", probe(model, labelled, holdout))
    elif args.what == "probe":
        model = mae_model(0, norm_pix_loss=bool(args.norm_pix))
        print("random probe (cls, mean):", probe(model, labelled, holdout))
        pretrain(model, source[0], args.steps, args.lr, 0, args.mask, every=args.every,
                 heldout=target[0][:200],
                 on_log=lambda m: dict(zip(("knn_cls", "knn_mean"), probe(m, labelled, holdout))))
        print("trained probe (cls, mean):", probe(model, labelled, holdout),
              f"{time.time() - start:.0f} s")
        if args.save:
            torch.save(model.state_dict(), args.save)
    elif args.what == "finetune":
        state = None if args.init == "random" else load_state(args.init)
        acc, losses = finetune(state, labelled, holdout, args.ft_steps, args.ft_lr, args.seed, every=args.every)
        tail = losses[-max(1, len(losses) // 5):]
        print(f"finetune {args.init}: acc {acc:.4f}, last-20% loss mean {np.mean(tail):.4f} "
              f"min {min(tail):.4f} max {max(tail):.4f}, {time.time() - start:.0f} s")
    else:  # chain: further + selfdist from an initial, then the three fine-tunings
        initial = load_state(args.init)
        further = mae_model(0, norm_pix_loss=bool(args.norm_pix)); further.load_state_dict(initial)
        print("initial heldout mae", heldout_mae(further, holdout[0]))
        pretrain(further, target[0], args.further_steps, args.further_lr, 100 + args.seed,
                 args.mask, heldout=holdout[0], every=args.every, augment=not args.no_augment)
        student = mae_model(0, norm_pix_loss=bool(args.norm_pix)); student.load_state_dict(initial)
        further.eval()
        pretrain(student, target[0], args.further_steps, args.further_lr, 200 + args.seed,
                 args.mask, teacher=further, heldout=holdout[0], every=args.every,
                 augment=not args.no_augment)
        for name, state in (("initial", initial), ("further", further.state_dict()),
                            ("selfdist", student.state_dict())):
            acc, losses = finetune(state, labelled, holdout, args.ft_steps, args.ft_lr, args.seed)
            tail = losses[-max(1, len(losses) // 5):]
            print(f"{name}: acc {acc:.4f} last-20% loss {np.mean(tail):.4f} "
                  f"[{min(tail):.4f}, {max(tail):.4f}]", flush=True)
        print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
