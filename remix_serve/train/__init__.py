"""remix-train: ReMix training (RLOO router estimator), the softmax and plain-LoRA baselines, reports.

Python API: `train(TrainArgs(base=..., data=..., out=...)) -> TrainResult`; the CLI is `remix_serve.train.cli`.
Modules, in recipe order: args, data, loss (the RLOO estimator), evaluate, loop (`train`), report.
"""

from remix_serve.train.args import TrainArgs
from remix_serve.train.evaluate import EvalResult, evaluate
from remix_serve.train.loop import TrainResult, train

__all__ = ["EvalResult", "TrainArgs", "TrainResult", "evaluate", "train"]
