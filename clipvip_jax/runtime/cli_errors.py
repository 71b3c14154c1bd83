"""One way for every command to fail on bad input: a single sentence on stderr and exit status 2.

    def _run(argv): ...                       # raises UsageError("--index foo has no index.json") on bad input
    def main(argv=None) -> int:
      return run_cli(_run, argv, prog="python -m clipvip_jax.search")

    parser = ArgumentParser(prog=...)          # argparse, but a bad command line is one line too

Commands check their inputs up front and raise `UsageError`; errors that the library raises for bad input
(ValueError and its subclasses: ConversionError, ParamMismatchError; FileNotFoundError and other OS errors about
a path) are treated the same way, so a user never reads a traceback from deep inside JAX for a typo in a path.
Exit status 2 is what argparse uses for a bad command line, so scripts see one code for every usage error.
Set CLIPVIP_DEBUG=1 to get the full traceback instead (for bug reports).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (128 + SIGINT)
DEBUG_ENV = "CLIPVIP_DEBUG"


class UsageError(ValueError):
  """A bad input the user can fix; the message is one sentence naming the file, option or field at fault."""


# What counts as "the input was bad" rather than "the program has a bug": ValueError covers UsageError and the
# library's own input errors (ConversionError, ParamMismatchError, bad configs and records); OSError covers
# missing, unreadable and unwritable paths. Other exceptions (KeyError, TypeError, ...) are bugs: traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def one_sentence(error: BaseException) -> str:
  """The error's message on one line (multi-line messages joined), falling back to its type name."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    text = f"{error.filename}: {error.strerror}"
  else:
    text = str(error)
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return text or type(error).__name__


def fail(prog: str, message: str) -> None:
  """Print `prog: error: message` on stderr and exit with status 2 (raises SystemExit)."""
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose command-line errors are one line (`prog: error: ... (see --help)`, status 2) instead
  of the whole usage block followed by the error."""

  def error(self, message: str):
    fail(self.prog, f"{message} (see --help)")


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (a bad value is the parser's one-line error)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def non_negative_float(text: str) -> float:
  """argparse type: a number >= 0 (NaN refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
  """The options every command that reads a checkpoint takes beside its path (clipvip_jax.loading reads them)."""
  parser.add_argument("--config", help="the original's config JSON, for an original checkpoint file only")
  parser.add_argument("--step", help="training workdir only: a step number, 'latest' (default) or 'best'")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="allow an original checkpoint that needs full unpickling (only for files you trust)")


def quiet_library_logs() -> None:
  """Orbax and friends log through absl at WARNING for routine events ("Metadata file does not exist" when reading
  a checkpoint written without it); a command's user needs none of that between its own messages.

  A failed Orbax save or restore (a full disk, a damaged checkpoint) is also logged by each of Orbax's background
  threads with its traceback, and the TensorStore reads or writes still in flight when Orbax's event loop closes
  each print an "Event loop is closed" traceback: hundreds of lines around the one error the command reports
  itself, in one sentence. Both are dropped here (CLIPVIP_DEBUG=1 keeps them)."""
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrorFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxErrorFilter())
  if not isinstance(sys.unraisablehook, _ClosedLoopFilter):
    sys.unraisablehook = _ClosedLoopFilter(sys.unraisablehook)


class _OrbaxErrorFilter:
  """Drops Orbax's log records: its errors reach the caller as exceptions, which the command reports."""

  def filter(self, record) -> bool:
    return "/orbax/" not in record.pathname.replace("\\", "/")


class _ClosedLoopFilter:
  """An unraisable-exception hook that drops asyncio's "Event loop is closed" (TensorStore completing an I/O of an
  Orbax operation that has already failed) and hands everything else to the previous hook."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    self.previous(unraisable)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
            prog: str) -> int:
  """Runs `main(argv)` and returns its exit status (None counts as 0).

  An input error (see INPUT_ERRORS) prints one line `prog: error: <sentence>` on stderr and raises
  SystemExit(2); Ctrl-C prints `prog: interrupted` and raises SystemExit(130). Anything else is a bug and
  propagates with its traceback. With CLIPVIP_DEBUG=1 input errors propagate too.
  """
  try:
    status = main(argv)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED) from None
  except INPUT_ERRORS as e:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
      raise
    fail(prog, one_sentence(e))
  return 0 if status is None else int(status)
