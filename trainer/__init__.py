"""t2f.trainer: fits the mapper on pairs the generator makes itself (`t2f-train`: synth, fit, bank).

    from t2f.trainer import FitOptions, SynthOptions, TrainConfig, train
    train("runs/tiny", TrainConfig(generator="tiny", clip="tiny", synth=SynthOptions(samples=2000), fit=FitOptions(steps=300)))
"""

from .config import STAGES, BankOptions, FitOptions, SynthOptions, TrainConfig
from .run import RunError
from .stages import train

__all__ = ["STAGES", "BankOptions", "FitOptions", "RunError", "SynthOptions", "TrainConfig", "train"]
