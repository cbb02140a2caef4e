"""The training console: the per-interval line for logs that are files, the bar's throttle, and
Megatron-Core's known noise kept out of stderr unless asked for."""

import io
import re
from pathlib import Path

from megatron_qk.config.loader import load_config
from megatron_qk.training.console import StepLog, format_step_line
from megatron_qk.training.sinks import ProgressBar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FileStream(io.StringIO):
    """A stream that is not a terminal (a SLURM log), counting what tqdm writes."""

    def isatty(self) -> bool:
        return False


def _record(step: int, loss: float) -> dict:
    return {
        "kind": "train",
        "step": step,
        "tokens": step * 512,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "step_seconds": 1.0,
        "tokens_per_second": 512.0,
        "tflops_per_gpu": 0.25,
        "mfu": 0.125,
        "peak_memory_gib": 1.5,
    }


def _drawn_lines(stream: FileStream) -> list[str]:
    # On a terminal tqdm writes '\r' + the bar for every draw; in a file every draw is a line.
    return [x for x in re.split("[\r\n]", stream.getvalue()) if "step" in x]


def test_bar_in_a_file_redraws_once_per_30_seconds_with_the_counted_steps_loss():
    clock, stream = FakeClock(), FileStream()
    bar = ProgressBar(True, total=200, initial=0, desc="arm", clock=clock, stream=stream)
    assert bar.interval == 30.0
    for step in range(1, 201):
        clock.now += 1.0  # one second per step: 200 s in all
        bar.update(_record(step, loss=float(step)))
    bar.close()
    lines = stream.getvalue().splitlines()
    # One whole line per 30 s of the 200 (steps 30, 60, ..., 180), one at the close.
    assert len(lines) == 6 + 1, lines
    assert "\r" not in stream.getvalue()
    for line in lines:
        count = int(re.search(r"(\d+)/200", line).group(1))
        assert f"loss={count:.4f}" in line, line  # the loss of the step the bar counts
        assert "mfu=12.5%" in line
    assert re.search(r"\b30/200", lines[0]) and re.search(r"\b200/200", lines[-1])


def test_bar_on_a_terminal_redraws_every_half_second_of_the_clock():
    class Terminal(FileStream):
        def isatty(self) -> bool:
            return True

    clock, stream = FakeClock(), Terminal()
    bar = ProgressBar(True, total=10, initial=0, desc="arm", clock=clock, stream=stream)
    for step in range(1, 11):
        clock.now += 0.25
        bar.update(_record(step, loss=1.0))
    assert len(_drawn_lines(stream)) == 1 + 5  # opening draw, then every second update


def test_step_line_has_megatron_lms_fields_and_an_eta():
    clock = FakeClock()
    stream = FileStream()
    log = StepLog(True, total=100, end_step=100, start_step=10, clock=clock, stream=stream)
    clock.now += 20.0  # 10 steps in 20 s: 2 s per step, 80 steps to go
    log.print(_record(20, loss=3.25))
    line = stream.getvalue()
    for part in (
        "step 20/100 (20.0%)",
        "tokens 10.24K",
        "loss 3.2500",
        "lr 1.000e-03",
        "grad norm 0.500",
        "1000.0 ms/step",
        "512 tok/s",
        "0.25 TFLOP/s/GPU",
        "MFU 12.5%",
        "peak mem 1.50 GiB",
        "ETA 0:02:40",
    ):
        assert part in line, (part, line)
    assert format_step_line(_record(1, 1.0), 4, None).startswith("step 1/4 (25.0%)")


def test_step_lines_are_wanted_in_a_file_or_with_the_bar_off():
    class Terminal(FileStream):
        def isatty(self) -> bool:
            return True

    assert StepLog.wanted(progress_bar=True, stream=FileStream())
    assert StepLog.wanted(progress_bar=False, stream=Terminal())
    assert not StepLog.wanted(progress_bar=True, stream=Terminal())


def test_training_with_the_bar_off_prints_a_line_every_log_interval(tmp_path: Path, capfd):
    from megatron_qk.training.entry import train_from_config

    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / 'run'}",
            "training.train_steps=4",
            "training.eval_interval=0",
            "training.log_interval=2",
            "diagnostics.enabled=false",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train_from_config(cfg)
    err = capfd.readouterr().err
    steps = re.findall(r"\] step (\d+)/4 \(", err)
    assert steps == ["2", "4"], err[-3000:]
    line = next(x for x in err.splitlines() if "] step 4/4" in x)
    for field in ("loss ", "lr ", "ms/step", "tok/s", "TFLOP/s/GPU", "MFU ", "peak mem", "ETA"):
        assert field in line, (field, line)
