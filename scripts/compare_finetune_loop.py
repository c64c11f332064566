"""One fine-tuning stage of a job, run by the engine and by a plain PyTorch loop side by side
on the very same batches, from the very same weights, step by step: the loss, the learning
rate and the gradient norm of each step, which tensors moved, and the held-out accuracy of
both at the end. A difference the engine makes shows up at the step where it starts.

    python scripts/compare_finetune_loop.py --spec jobs/self_distillation.yaml \\
        --stage finetune_initial [--set run_dir=runs/self-distillation] [--json out.json]

One process, one rank (the stage's global batch in one micro-batch). The plain loop is what
a reader would write from the spec: the model built by transformers from the stage's config,
the init file's encoder loaded by name (``load_state_dict(strict=False)``; the classifier
fresh), AdamW with no decay on 1-D tensors, linear warm-up then cosine (or linear) decay,
gradient clipping, ``F.cross_entropy``, the model in train mode, evaluated in eval mode on
the stage's held-out split with the engine's test view.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_one_rank() -> None:
    import socket
    import deepspeed
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")


def schedule_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over the peak: linear warm-up
    from 0, then cosine or linear decay to ``min_ratio``."""
    if warmup and step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def plain_model(plan, job_seed: int):
    """The model a reader builds: transformers' class from the stage's config, seeded as the
    engine seeds its student, the init file's matching tensors loaded by name."""
    from safetensors.torch import load_file
    recipe = plan.student
    torch.manual_seed(job_seed)
    model = recipe.family.create(recipe)  # the same transformers class and config
    if plan.student_init is not None:
        state = load_file(str(plan.student_init))
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape
                  and not k.startswith(("classifier.", "decoder."))}
        missing, _ = model.load_state_dict(usable, strict=False)
        print(f"plain: {len(usable)} tensors from {plan.student_init}; fresh: {sorted(missing)}")
    return model


def plain_optimizer(model, plan):
    opt = plan.spec.optimisation
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=plan.lr, betas=tuple(opt.betas), eps=opt.eps)


@torch.no_grad()
def accuracy(forward, plan, device) -> float:
    from data_shards import EvalStream
    from distill_engine.training.evaluation import test_views
    from distill_engine.modeling.inputs import model_inputs, to_model
    stage = plan.spec
    right = total = 0
    for batch in EvalStream(stage.data.eval, batch_size=128, rank=0, world_size=1,
                            views=test_views(stage.data.views), text=stage.data.text):
        logits = forward(to_model(model_inputs(batch, "student"), device, torch.float32))
        valid = batch["valid"]
        right += int((logits.argmax(-1).cpu()[valid] == batch["label"][valid]).sum())
        total += int(valid.sum())
    return right / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plain-pooling", choices=("model", "mean"), default="model",
                        help="the plain loop's classifier input: what the model does (a ViT "
                             "classifier: the CLS token), or the mean of the patch tokens "
                             "(MAE's fine-tuning)")
    args = parser.parse_args()

    init_one_rank()
    from distill_engine.tensors import first_tensor
    from distill_engine.modeling.inputs import model_inputs, to_model
    from distill_engine.planning.load import load_plan
    from distill_engine.training.models import StudentModel
    from distill_engine.training.trainer import StageTrainer
    probe = load_plan(args.spec, args.overrides, world_size=1)
    index = next(i for i, s in enumerate(probe.stages) if s.spec.name == args.stage)
    global_batch = probe.stages[index].global_batch
    # One rank takes the stage's whole global batch per step, so both see the same samples.
    overrides = args.overrides + [f"stages.{index}.data.micro_batch_size={global_batch}"]
    job = load_plan(args.spec, overrides, world_size=1)
    plan = job.stages[index]
    trainer = StageTrainer(job, plan)
    trainer.setup()
    assert trainer.step == 0, "the stage has a checkpoint: give it another run_dir"
    engine, device = trainer.student, trainer.device
    model = engine.module.model

    plain = plain_model(plan, job.spec.seed).to(device).train()
    opt = plan.spec.optimisation
    optimizer = plain_optimizer(plain, plan)
    warmup = opt.warmup_steps
    start_engine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_plain = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    same_start = [k for k in start_plain if k in start_engine and torch.equal(start_plain[k], start_engine[k])]
    print(f"tensors equal at the start: {len(same_start)} of {len(start_plain)} "
          f"(differ: {sorted(set(start_plain) - set(same_start))})")
    print(f"engine trains {sum(p.requires_grad for p in model.parameters())} of "
          f"{sum(1 for _ in model.parameters())} tensors; model.training={model.training}; "
          f"dropout p={[m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)][:3]}")

    def plain_logits(inputs):
        if args.plain_pooling == "mean":  # MAE's fine-tuning: the mean of the patch tokens
            tokens = plain.vit(pixel_values=inputs).last_hidden_state
            return plain.classifier(tokens[:, 1:].mean(1))
        return first_tensor(plain(pixel_values=inputs) if torch.is_tensor(inputs) else plain(**inputs))

    # Each batch the engine draws is handed to the plain loop too.
    drawn = []

    def tee(batches):
        for batch in batches:
            drawn.append(batch)
            yield batch
    trainer.batches = tee(trainer.batches)
    rows = []
    for step in range(trainer.total_steps):
        engine_lr = engine.get_lr()[0]
        loss, _, _ = trainer.train_step()
        engine_norm = float(engine.get_global_grad_norm() or float("nan"))
        batch = to_model(drawn[-1], device, torch.float32)
        factor = schedule_factor(step, trainer.total_steps, warmup, opt.schedule, opt.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = plan.lr * factor
        logits = plain_logits(model_inputs(batch, "student"))
        plain_loss = F.cross_entropy(logits.float(), batch["label"])
        plain_loss.backward()
        plain_norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), opt.grad_clip or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"step": step + 1, "engine_loss": float(loss), "plain_loss": float(plain_loss),
                     "engine_lr": engine_lr, "plain_lr": plan.lr * factor,
                     "engine_grad_norm": engine_norm, "plain_grad_norm": plain_norm})
        r = rows[-1]
        print(f"step {r['step']:3d}  loss engine {r['engine_loss']:.4f} plain {r['plain_loss']:.4f}"
              f"  lr engine {r['engine_lr']:.3e} plain {r['plain_lr']:.3e}"
              f"  |g| engine {r['engine_grad_norm']:.3f} plain {r['plain_grad_norm']:.3f}")

    end_engine = model.state_dict()
    end_plain = plain.state_dict()
    unmoved = {"engine": sorted(k for k in start_engine if torch.equal(start_engine[k], end_engine[k])),
               "plain": sorted(k for k in start_plain if torch.equal(start_plain[k], end_plain[k]))}
    print(f"tensors that did not move: engine {unmoved['engine']}, plain {unmoved['plain']}")
    plain.eval()
    result = {
        "rows": rows, "unmoved": unmoved,
        "engine_accuracy": accuracy(lambda x: engine(StudentModel.output, x), plan, device),
        "plain_accuracy": accuracy(plain_logits, plan, device),
    }
    print(f"held-out accuracy: engine {100 * result['engine_accuracy']:.2f} %, "
          f"plain {100 * result['plain_accuracy']:.2f} %")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
