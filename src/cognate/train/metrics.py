"""What a person watches during a run: console lines, a progress bar, metrics.jsonl, optional W&B and
TensorBoard, and PNG plots of the curves at the end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

CONSOLE_FIELDS = (
    ("step", "{:d}"),
    ("loss", "{:.4f}"),
    ("val_loss", "{:.4f}"),
    ("lr", "{:.2e}"),
    ("grad_norm", "{:.3f}"),
    ("tokens_per_s", "{:,.0f}"),
    ("mfu", "{:.2%}"),
    ("act_mean_steps", "{:.2f}"),
    ("act_var_steps", "{:.3f}"),
    ("eta", "{}"),
)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_line(row: dict) -> str:
    parts = []
    for name, fmt in CONSOLE_FIELDS:
        value = row.get(name)
        if value is not None:
            parts.append(f"{name} {fmt.format(value)}")
        if name == "val_loss":  # then what each refinement step adds: val_loss_step_1, val_loss_step_2, ...
            steps = sorted(
                (k for k in row if k.startswith("val_loss_step_")), key=lambda k: int(k.rsplit("_")[-1])
            )
            parts += [f"{k.removeprefix('val_loss_')} {row[k]:.4f}" for k in steps]
    return " | ".join(parts)


class MetricsLog:
    """Rows of metrics, one per logging interval, fanned out to every enabled sink. Only rank 0 makes one."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        config: dict,
        *,
        resume_step: int = 0,
        wandb_mode: str = "disabled",
        tensorboard: bool = False,
        progress: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows = truncate_after_step(self.path, resume_step)
        self._file = self.path.open("a")
        interactive = sys.stderr.isatty() if progress is None else progress
        self._bar = (
            tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)
            if interactive
            else None
        )
        self._tb = _tensorboard_writer(self.run_dir) if tensorboard else None
        self._wandb = _wandb_run(self.run_dir, config, wandb_mode) if wandb_mode != "disabled" else None

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        line = format_line(row)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(numeric, step=row["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        plot_curves(self.rows, self.run_dir / "curves.png")


def truncate_after_step(path: Path, step: int) -> list[dict]:
    """Rewrite a JSON-lines log keeping its rows up to `step`, and return them.

    A killed run may have logged past its last checkpoint; the resumed run logs those steps again. A kill in the
    middle of a write leaves a torn last line: it is dropped. A malformed line anywhere else is an error naming
    the file and line. The rewrite is atomic (a temporary file renamed over the log).
    """
    rows = []
    if path.exists() and step > 0:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as error:
                if number == len(lines):  # torn by a kill mid-write
                    break
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if row is not None and row.get("step", 0) <= step:
                rows.append(row)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("TensorBoard logging needs `pip install cognate[tensorboard]`") from e
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb_run(run_dir: Path, config: dict, mode: str):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("W&B logging needs `pip install cognate[wandb]`") from e
    return wandb.init(project="cognate", dir=str(run_dir), config=config, mode=mode, name=run_dir.name)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training/validation loss, learning rate, gradient norm and ACT variance against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "val_loss"), ("lr",), ("grad_norm",), ("act_var_steps",)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, names in zip(axes, panels):
        for name in names:
            points = [(r["tokens"], r[name]) for r in rows if r.get(name) is not None and "tokens" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if name == "val_loss" else None, label=name)
        ax.set_xlabel("tokens")
        ax.set_title(" / ".join(names))
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
