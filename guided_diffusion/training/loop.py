"""The training-loop skeleton both trainers share, and its plumbing (CSV log, run-folder claim).

:func:`run_training` owns what does not depend on the model: stop at ``max_steps`` or the
``max_minutes`` deadline, Ctrl-C/SIGTERM at a step boundary (save, print how to resume, exit 130/143),
log rows every ``log_interval`` steps, at every checkpoint and at the end (after each row the task may
ask to stop: early stopping), periodic and final saves
(no second save of a step already saved), and a stop with a clear message when the loss or the
weights become non-finite (the last good checkpoint is kept). A trainer supplies a :class:`TrainingTask`:
its step, its log row, its save, its finiteness check and, optionally, a reason to stop early.
"""
import csv
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

from guided_diffusion.core.atomic import lock_folder, remove_stale_temporaries
from guided_diffusion.core.errors import SettingError, literal


class TrainingDiverged(SettingError):
    """The loss or the weights became NaN/inf; nothing after the last good checkpoint was saved."""


@dataclass
class LoopSettings:
    """When to stop, log and save; ``resume_flag`` and ``divergence_hint`` word the messages."""

    max_steps: Optional[int]  # None: no end (only a deadline or a signal stops the run)
    save_interval: int
    log_interval: int
    max_minutes: Optional[float] = None
    description: str = "training"
    resume_flag: str = "--resume_checkpoint"
    learning_rate: float = 0.0


class TrainingTask:
    """What a trainer supplies to :func:`run_training` (override every method)."""

    step = 0
    last_saved_step = None
    last_saved_path = None

    def train_step(self):
        """One optimizer step; return its loss (a float, the same on every rank)."""
        raise NotImplementedError

    def write_log(self, seconds):
        """Write one row of the CSV log summarizing the steps since the previous row (rank 0)."""
        raise NotImplementedError

    def save(self):
        """Write a checkpoint of the current step; return its path."""
        raise NotImplementedError

    def is_finite(self):
        """True when the weights hold no NaN/inf (checked before every save)."""
        raise NotImplementedError

    def progress_postfix(self):
        return {}

    def stop_reason(self):
        """Why training should end now (checked after each log row), or None to go on: early stopping."""
        return None


def run_training(task, settings, context, progress=True):
    """Train ``task`` until ``settings.max_steps``, the deadline or a signal; return the last checkpoint path."""
    started = time.monotonic()
    deadline = started + 60 * settings.max_minutes if settings.max_minutes else None
    bar = tqdm(total=settings.max_steps, initial=task.step, desc=settings.description, unit="step",
               disable=not (progress and context.is_main))
    with StopAtStepBoundary() as stop:  # Ctrl-C/SIGTERM: finish the step, save, exit 130/143
        while settings.max_steps is None or task.step < settings.max_steps:
            loss = task.train_step()
            bar.update(1)
            if context.any(not math.isfinite(loss)):
                bar.close()
                raise _diverged(task, settings, f"the loss is {loss}")
            out_of_time = deadline is not None and context.any(time.monotonic() >= deadline)
            interrupted = context.any(stop.requested)
            at_save = task.step % settings.save_interval == 0
            final = task.step == settings.max_steps or out_of_time or interrupted
            logged = task.step % settings.log_interval == 0 or at_save or final
            if logged:
                bar.set_postfix(task.progress_postfix())
                task.write_log(round(time.monotonic() - started, 2))
            if at_save:
                _save(task, settings, context)
            reason = task.stop_reason() if logged else None
            if context.any(reason is not None) and not interrupted:
                if context.is_main:
                    bar.write(f"stopping at step {task.step}: {reason}")
                break
            if interrupted:
                path = _save_if_unsaved(task, settings, context)
                bar.close()
                if context.is_main:
                    print(f"interrupted: saved {path}; resume with {settings.resume_flag} {path}", flush=True)
                raise SystemExit(stop.exit_code if stop.requested else 130)
            if out_of_time:
                if context.is_main:
                    bar.write(f"--max_minutes {settings.max_minutes} reached at step {task.step}")
                break
    bar.close()
    return _save_if_unsaved(task, settings, context)


def _save(task, settings, context):
    if context.any(not task.is_finite()):
        raise _diverged(task, settings, "the weights hold NaN or inf")
    task.last_saved_path = task.save()
    task.last_saved_step = task.step
    return task.last_saved_path


def _save_if_unsaved(task, settings, context):
    if task.last_saved_step == task.step and task.last_saved_path:
        return task.last_saved_path
    return _save(task, settings, context)


def _diverged(task, settings, what):
    if task.last_saved_path:
        kept = (f"the last good checkpoint {literal(task.last_saved_path)} (step {task.last_saved_step}) is kept; "
                f"lower {{lr}} (it is {settings.learning_rate:g}) and resume from it")
    else:
        kept = f"no checkpoint was saved; lower {{lr}} (it is {settings.learning_rate:g}) and start again"
    return TrainingDiverged(f"training diverged at step {task.step}: {what}; {kept}", "lr")


# ---- the CSV log ---------------------------------------------------------------------------------------
class CsvLogger:
    """``train_log.csv``: one header, one row per :meth:`write`.

    A run that starts at ``start_step`` keeps only the rows of steps up to it, so a resumed run does
    not repeat the rows of the steps done after its checkpoint (a fresh run, step 0, starts an empty log).
    Only the main rank writes (``enabled``).
    """

    def __init__(self, path, fields, start_step=0, enabled=True):
        self.path, self.fields, self.enabled = path, list(fields), enabled
        if enabled:
            self._keep_rows_through(start_step)

    def _keep_rows_through(self, step):
        kept = []
        if step > 0 and os.path.exists(self.path):
            with open(self.path, newline="") as stream:
                rows = list(csv.reader(stream))
            if rows and rows[0] == self.fields:
                kept = [row for row in rows[1:] if row and _step_of(row) is not None and _step_of(row) <= step]
        with open(self.path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(self.fields)
            writer.writerows(kept)

    def write(self, **row):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as stream:
            csv.writer(stream).writerow([row.get(field, "") for field in self.fields])


def _step_of(row):
    try:
        return int(float(row[0]))
    except (ValueError, IndexError):
        return None


# ---- the run folder ------------------------------------------------------------------------------------
class RunFolder:
    """An output folder claimed by one training run: an exclusive ``flock`` on the folder itself, held
    until the process exits (or :meth:`release`), so a second run into it is refused at once."""

    def __init__(self, path, descriptor):
        self.path, self._descriptor = path, descriptor

    def release(self):
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def claim_run_folder(folder, setting, checkpoint_files, resuming, overwrite, resume_setting, is_main=True):
    """Create and lock ``folder`` (removing the temporaries of killed runs in it); refuse it when another run
    holds it, or when it already holds
    checkpoints (``checkpoint_files(folder)``: their names) and this run neither resumes nor overwrites.
    With ``overwrite`` the old checkpoints are removed. Ranks other than the main one do nothing."""
    if not is_main:
        return RunFolder(folder, None)
    descriptor = lock_folder(folder)
    if descriptor is None:
        raise SettingError(f"{{{setting}}} {literal(folder)} is in use by another training run; wait for it to "
                           f"finish or choose another folder", setting) from None
    existing = sorted(checkpoint_files(folder))
    if existing and not resuming:
        if not overwrite:
            os.close(descriptor)
            raise SettingError(f"{{{setting}}} {literal(folder)} already holds checkpoints ({literal(existing[-1])}, "
                               f"{len(existing)} files); resume with {{{resume_setting}}}, choose another folder, "
                               f"or pass {{overwrite}} True to replace them", setting, resume_setting, "overwrite")
        for name in existing:
            os.remove(os.path.join(folder, name))
    remove_stale_temporaries(folder)  # of killed runs: with the lock held no other run is writing them
    return RunFolder(folder, descriptor)


class StopAtStepBoundary:
    """While active, Ctrl-C (SIGINT) or SIGTERM only sets :attr:`requested`; the training loop checks it
    between steps, saves a consistent checkpoint and exits with :attr:`exit_code` (130 or 143).

    A KeyboardInterrupt in the middle of a step would save weights of step N+1 with the counters of
    step N, so the resumed run would differ. A second signal stops at once (nothing more is saved;
    the last periodic checkpoint stays valid). Outside the main thread this is a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint after the current step "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + int(self.signum)


