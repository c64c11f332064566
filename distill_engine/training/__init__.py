"""One process of training a planned job: the engines, the step loop, evaluation,
checkpoints (resumable at any world size), export, progress and logs."""
