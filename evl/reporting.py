"""Training progress where users look for it: TensorBoard and Weights & Biases (``--report_to``).

``metrics.jsonl`` stays the run's record (:class:`evl.train.MetricsLog`); the reporters mirror
its events at the same steps, under dashboard names (:data:`SCALARS`). Both packages are optional
and imported only when asked for: :func:`check_reporting` refuses a missing one before anything
is built. Only rank 0 reports. A resumed run continues the same curves: TensorBoard writes to
``<output_dir>/tensorboard`` again, W&B resumes the run whose id ``<output_dir>/wandb_run_id``
holds. A reporter that fails mid-run is warned about once and turned off; it never costs a step
or a checkpoint.
"""

from __future__ import annotations

import importlib
import json
import logging
import os

from .cli import SetupError

log = logging.getLogger("evl.reporting")

# --report_to name -> (module imported, package installed)
REPORTERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
# metrics.jsonl keys -> the reporters' names for them
SCALARS = {"loss": "train/loss", "lr": "train/lr", "clips_per_s": "train/clips_per_s",
           "data_wait": "train/data_wait", "top1": "val/top1", "top5": "val/top5"}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
WANDB_PROJECT = "fast-evl"  # when WANDB_PROJECT is not set


def parse_report_to(text: str) -> tuple[str, ...]:
    """``--report_to``: comma-separated names of :data:`REPORTERS` (open_clip's convention);
    ``none`` or nothing for none. Raises ``ValueError`` naming an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"unknown reporter {', '.join(unknown)}: choose from {', '.join(REPORTERS)} "
                         "(comma-separated), or none")
    return tuple(dict.fromkeys(names))


def check_reporting(names, output_dir: str | None) -> None:
    """Raises :class:`SetupError` (one line) when a reporter's package cannot be imported, or
    TensorBoard has no ``output_dir`` to write to."""
    for name in names:
        module, package = REPORTERS[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            raise SetupError(f"--report_to {name} needs the {package} package (pip install {package})") from None
        except Exception as e:  # installed but broken (a protobuf it does not support, ...)
            raise SetupError(f"--report_to {name}: importing {package} failed ({type(e).__name__}: {e})") from None
    if "tensorboard" in names and not output_dir:
        raise SetupError(f"--report_to tensorboard needs --output_dir: its event files go to "
                         f"<output_dir>/{TENSORBOARD_DIR}")


class TensorBoardReporter:
    """Scalars in ``log_dir``, the same directory for every run of a training directory."""

    name = "tensorboard"

    def __init__(self, log_dir: str, start_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step marks where this run starts. TensorBoard's Python reader drops what earlier
        # runs here logged after it (the steps a resume repeats; everything, for a run that
        # starts over); its data server (--load_fast) keeps the last value of each step instead.
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1)
        self.where = log_dir
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), start_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a dashboard open on a live run sees each step as it is logged

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per training run, configured by W&B's own environment (``WANDB_MODE``,
    ``WANDB_DIR``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ...). Defaults where it is silent: project
    :data:`WANDB_PROJECT`, the run named after ``output_dir``, its files under ``output_dir``. A
    resumed run (``start_step`` > 0) resumes the W&B run whose id ``output_dir`` holds; one that
    starts from step 0 is a new W&B run. Charts are against ``step``, the training step: a resume
    that repeats steps after its checkpoint logs them again rather than being dropped by W&B."""

    name = "wandb"

    def __init__(self, output_dir: str | None, start_step: int, config: dict):
        import wandb

        id_path = os.path.join(output_dir, WANDB_ID_FILE) if output_dir else None
        kwargs = dict(config=config)
        if not os.environ.get("WANDB_PROJECT"):
            kwargs["project"] = WANDB_PROJECT
        if output_dir and not os.environ.get("WANDB_NAME"):
            kwargs["name"] = os.path.basename(os.path.abspath(output_dir))
        if output_dir and not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = output_dir
        run_id = _read_id(id_path) if id_path and start_step > 0 else None
        if run_id and not os.environ.get("WANDB_RUN_ID"):
            kwargs.update(id=run_id, resume="allow", allow_val_change=True)
        self.run = wandb.init(**kwargs)
        try:
            sync_dir = os.path.dirname(self.run.dir)  # the run's directory; run.dir is its files/
            self.where = (f"run {self.run.id}, offline in {sync_dir} (upload: wandb sync {sync_dir})"
                          if self.run.offline else f"run {self.run.id}, {self.run.url}")
            if id_path:
                from pipelines.files import atomic_write

                atomic_write(id_path, (self.run.id + "\n").encode(), what="W&B run id",
                             keeps="checkpoints written so far are untouched")
            self.run.define_metric("step")
            for group in sorted({k.split("/")[0] for k in SCALARS.values()}):
                self.run.define_metric(f"{group}/*", step_metric="step")
        except BaseException:
            self.run.finish(exit_code=1)
            raise

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _read_id(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


class Reporting:
    """The run's reporters, guarded: a failure is a warning, and that reporter is off from then
    on. A context manager: leaving it closes them (W&B marks the run failed when the block raised)."""

    def __init__(self, reporters: list | None = None):
        self.reporters = list(reporters or [])

    @classmethod
    def start(cls, names, *, output_dir: str | None, start_step: int, config: dict) -> "Reporting":
        """The reporters ``names`` asks for, started; raises :class:`SetupError` for one that does
        not start (nothing is left running then)."""
        started = cls()
        for name in names:
            try:
                if name == "tensorboard":
                    started.reporters.append(
                        TensorBoardReporter(os.path.join(output_dir, TENSORBOARD_DIR), start_step, config))
                else:
                    started.reporters.append(WandbReporter(output_dir, start_step, config))
            except Exception as e:
                started.close(failed=True)
                hint = ("; log in (wandb login) or set WANDB_MODE=offline to log locally" if name == "wandb" else "")
                raise SetupError(f"--report_to {name} could not start ({type(e).__name__}: {e}){hint}") from e
        return started

    def describe(self) -> str:
        """Where each reporter writes, in one line."""
        return "; ".join(f"{r.name}: {r.where}" for r in self.reporters)

    def log(self, step: int, event: dict) -> None:
        """The values of a ``metrics.jsonl`` event that :data:`SCALARS` names, at ``step``."""
        scalars = {SCALARS[k]: float(v) for k, v in event.items() if k in SCALARS}
        if not scalars:
            return
        for reporter in list(self.reporters):
            try:
                reporter.log(step, scalars)
            except Exception as e:
                self._drop(reporter, e, f"at step {step}")

    def close(self, failed: bool = False) -> None:
        for reporter in list(self.reporters):
            try:
                reporter.close(failed)
            except Exception as e:
                log.warning("--report_to %s: closing failed (%s: %s)", reporter.name, type(e).__name__, e)
        self.reporters = []

    def _drop(self, reporter, error: Exception, where: str) -> None:
        log.warning("--report_to %s failed %s (%s: %s); it is off for the rest of this run (metrics.jsonl and "
                    "the checkpoints go on)", reporter.name, where, type(error).__name__, error)
        self.reporters.remove(reporter)
        try:
            reporter.close(failed=True)
        except Exception:
            pass  # already reported: the reporter is broken

    def __enter__(self) -> "Reporting":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
