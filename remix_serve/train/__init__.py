"""remix-train: ReMix training (RLOO router estimator), the softmax and plain-LoRA baselines, reports.

Python API: `train(TrainArgs(base=..., data=..., out=...)) -> TrainResult`; the CLI is `remix_serve.train.cli`.
"""

from remix_serve.train.trainer import EvalResult, TrainArgs, TrainResult, evaluate, train

__all__ = ["EvalResult", "TrainArgs", "TrainResult", "evaluate", "train"]
