"""Where a run's numbers go, on rank 0: RUN_DIR/metrics.jsonl always (one row per epoch), and the metric
loggers users already watch when ``train.py --log`` names them: TensorBoard (``torch.utils.tensorboard``,
events in RUN_DIR/tensorboard) and Weights & Biases (``wandb``, its files in RUN_DIR/wandb; offline with
WANDB_MODE=offline). Each epoch row (losses, lr, throughput, MFU, validation metrics) goes to every
logger at the run's optimizer step, every number of it; the progress values of the log steps (loss,
lr, throughput) go to the metric loggers under "step/". Both packages are optional: naming one that is
not installed is an error naming the pip extra.
"""
from __future__ import annotations

import importlib.util
import json
import os
from numbers import Number

LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}   # name: (module, extra)


def parse(spec: str | None) -> list[str]:
    """The logger names of a --log value ("tensorboard", "wandb", "tensorboard,wandb" or None). Raises
    ValueError for an unknown name, ImportError naming the pip extra for one whose package is missing."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"--log takes {' / '.join(LOGGERS)} (comma-separated), got {name!r}")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"--log {name} needs the {module} package: pip install 'crate-fast[{extra}]'")
    return names


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, Number) and not isinstance(v, bool)}


class RunLog:
    """The run's metrics.jsonl and metric loggers; every method does nothing on ranks other than 0.

    out: the run directory; names: parse(--log); config: the run's flags (W&B keeps them with the run);
    enabled: rank 0; every: optimizer steps between progress values (--log-every)."""

    def __init__(self, out: str, names: list[str], config: dict, enabled: bool, every: int = 10):
        self.path, self.enabled, self.every = os.path.join(out, "metrics.jsonl"), enabled, max(1, every)
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter  # optional: parse() checked it

            self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
        if "wandb" in names:
            import wandb  # optional: parse() checked it

            self.wandb = wandb.init(project="crate-fast", name=os.path.basename(os.path.abspath(out)), dir=out,
                                    config=config, resume="allow")

    def epoch(self, row: dict, title: str, summary: str, unit: str) -> None:
        """An epoch's row: appended to metrics.jsonl, its numbers to the loggers at row["step"], and one line
        printed: title, losses, the objective's summary, throughput (row[unit + "_per_s"]), time."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._log(_scalars(row), row["step"])
        print(f"{title}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  {summary}  "
              f"{row[f'{unit}_per_s']:.0f} {unit}/s  {row['time']:.1f}s", flush=True)

    def progress(self, step: int, samples: int, seconds: float, loss, lr: float, unit: str, flops: float | None = None,
                 peak: float | None = None) -> dict[str, str]:
        """At every `every`-th optimizer step (rank 0): the loss (a 0-dim tensor: its one host read), the
        throughput (samples of every rank in seconds, `unit`/s), lr and MFU (flops per sample / peak, when the
        GPU's peak is known) to the loggers under "step/"; returns them formatted for the progress line
        ({} at other steps)."""
        if not self.enabled or step % self.every:
            return {}
        rate = samples / seconds
        values = {"loss": float(loss), f"{unit}/s": rate, "lr": lr}
        if peak:
            values["mfu"] = rate * flops / peak
        self._log({f"step/{k}": v for k, v in values.items()}, step)
        return {k: f"{v:.3f}" if k == "loss" else f"{v:.2e}" if k == "lr" else f"{100 * v:.1f}%" if k == "mfu"
                else f"{v:.0f}" for k, v in values.items()}

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
