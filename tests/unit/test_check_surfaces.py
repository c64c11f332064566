"""What ``--check`` and ``--plan`` must see before any rank starts on the newer surfaces
(MAE masks, text recipes without their data yet, tokenizers, the command line, run
directories): each hole is a one-paragraph problem at its YAML path or flag, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, check_in_process, write_spec


def problem_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line.removeprefix("  - ") for line in err.splitlines()[1:]]


# ---------------------------------------------------------------------------- 12. MAE masks

def mae_spec(tmp_path: Path, digits_shards: Path, mask_ratio: float) -> Path:
    stage = {"name": "mae", "objectives": [{"kind": "mae", "mask_ratio": mask_ratio}],
             "student": {"arch": f"hf:{ROOT / 'jobs' / 'configs' / 'digits_vit_mae'}",
                         "kwargs": {"task": "mae_pretraining"}, "dtype": "fp32"},
             "data": {"train": str(digits_shards / "train"), "micro_batch_size": 8,
                      "views": {"geometry": {"size": 24}}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    return write_spec(tmp_path / "mae.yaml", {"name": "m", "run_dir": str(tmp_path / "run"),
                                              "stages": [stage]})


def test_an_mae_mask_that_leaves_no_patch_is_refused_at_its_yaml_path(tmp_path, digits_shards):
    # 24 px in patches of 4: L = 36; ViTMAE keeps int(36 x (1 - ratio)) patches.
    for ratio in (0.9999, 0.98):
        code, out, err = check_in_process(mae_spec(tmp_path, digits_shards, ratio))
        assert code == 2, out + err
        assert problem_lines(err) == [
            f"stages[0].objectives[0].mask_ratio: mask_ratio {ratio} keeps int(36 x (1 - "
            f"{ratio})) = 0 of the student's 36 patches (ViTMAE keeps int(L x (1 - "
            f"mask_ratio))), so the encoder would see none; use at most 1 - 1/36 = 0.972222 "
            f"(MAE's is 0.75)"]
    code, out, err = check_in_process(mae_spec(tmp_path, digits_shards, 0.972222))  # keeps 1
    assert code == 0, err
