"""The top level of the console scripts: a failure is one line naming the problem, exit code 2.

Every entry point (``metaplast-train``, ``metaplast-evaluate``, ``metaplast-bench``) ends a run
that cannot go on with one line on stderr, ``metaplast: error: <what, the value, what is
allowed>``, and exit code 2 (3: a run stopped by divergence) — also for what fails before the
run starts (Hydra composing the config, creating the output directory) and for what nobody
foresaw. The traceback is shown only with ``HYDRA_FULL_ERROR=1`` or the override ``verbose=true``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

log = logging.getLogger("metaplast")

#: Exit codes: bad input or a failure the run cannot recover from, and a run stopped by divergence.
EXIT_ERROR, EXIT_DIVERGED = 2, 3
#: Set by :func:`console` while it asks Hydra to re-raise (HYDRA_FULL_ERROR=1) rather than print.
_OURS = "METAPLAST_CONSOLE_FULL_ERROR"
TRUE = ("true", "1", "yes", "on")


def traceback_wanted(cfg: Any = None, argv: Sequence[str] | None = None) -> bool:
    """Whether the user asked for tracebacks: ``HYDRA_FULL_ERROR=1`` (their own, not :func:`console`'s),
    ``verbose=true`` in the config ``cfg`` or among the command-line overrides ``argv``."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_OURS):
        return True
    if cfg is not None:
        try:
            if cfg.get("verbose") is True:
                return True
        except Exception:  # an unreadable config cannot ask for anything
            pass
    for arg in argv or ():
        key, _, value = str(arg).lstrip("+~").partition("=")
        if key == "verbose" and value.strip().lower() in TRUE:
            return True
    return False


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe(error: BaseException) -> str:
    """One line naming what went wrong, the value and (where known) what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OSError) and not isinstance(error, (TimeoutError,)):
        where = error.filename or ""
        other = f" -> {error.filename2}" if error.filename2 else ""
        reason = error.strerror or _first_line(str(error)) or type(error).__name__
        if where:
            return (
                f"cannot use {str(where)!r}{other}: {reason}; allowed: an existing, writable directory "
                "with free space for outputs (hydra.run.dir, hydra.sweep.dir) and readable data files"
            )
        return f"{reason} ({type(error).__name__})"
    parts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # Hydra's message, then OmegaConf's cause
        seen.add(id(current))
        text = _first_line(str(current))
        if isinstance(current, OmegaConfBaseException):
            key = getattr(current, "full_key", None)
            if key and key not in text:
                text = f"{key}: {text}"
        if text and text not in parts:
            parts.append(text)
        current = current.__cause__ or (current.__context__ if not current.__suppress_context__ else None)
    message = "; ".join(parts) or type(error).__name__
    from hydra.errors import HydraException

    known = ("ConfigError", "DataError", "CheckpointError", "DivergenceError", "OutputError", "RunError")
    named = any(cls.__name__ in known for cls in type(error).__mro__)
    if not (named or isinstance(error, (HydraException, OmegaConfBaseException))):
        message = f"{type(error).__name__}: {message} (HYDRA_FULL_ERROR=1 or verbose=true shows where)"
    return message


def fail(error: BaseException, code: int | None = None, logged: bool = True) -> NoReturn:
    """Print ``error`` as one line (and log it, to the job's log file) and exit (``code``: 3 for
    divergence, else 2)."""
    from metaplast.safety import DivergenceError

    message = describe(error)
    if logged:
        log.error("%s", message)
    print(f"metaplast: error: {message}", file=sys.stderr, flush=True)
    if code is None:
        code = EXIT_DIVERGED if isinstance(error, DivergenceError) else EXIT_ERROR
    raise SystemExit(code) from None


def console(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """The console script around a ``@hydra.main`` function: what fails outside the task function
    (composing the config, an unusable output directory) is one line too, with exit code 2."""

    def main() -> Any:
        if traceback_wanted(argv=sys.argv[1:]):
            return hydra_main()
        previous = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a traceback
        os.environ[_OURS] = "1"
        try:
            return hydra_main()
        except KeyboardInterrupt:
            print("metaplast: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except Exception as error:  # before or around the job: no job log to write to
            fail(error, logged=False)
        finally:
            os.environ.pop(_OURS, None)
            if previous is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = previous

    main.__doc__ = hydra_main.__doc__
    main.__wrapped__ = hydra_main
    return main


#: Loggers of libraries whose INFO lines (Lightning's GPU/TPU lines and tips, W&B's banners) are noise
#: at metaplast's console; ``verbose=true`` shows them.
NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "wandb")
#: Modules whose Python warnings (deprecations such as Lightning's ``_pytree`` one) are hidden the same way.
NOISY_MODULES = (
    r"(lightning|lightning_fabric|pytorch_lightning|torch|torchvision|wandb|pydantic|hydra|omegaconf)(\.|$)"
)


def quiet_third_party(verbose: bool) -> None:
    """Third-party noise off (unless ``verbose``): INFO lines of Lightning and W&B, their deprecation
    warnings, W&B's banners and closing summary (``WANDB_SILENT``, unless set)."""
    import warnings

    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    os.environ.setdefault("WANDB_SILENT", "true")


def check_sweep_preset(command: str, group: str) -> None:
    """A preset with ``hydra.sweeper.params`` run without ``-m`` would run its first condition only:
    refuse, naming the ``-m`` command, unless every swept key is set on the command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    params = hydra.sweeper.get("params") or {}
    if hydra.mode == RunMode.MULTIRUN or not params:
        return
    given = {o.lstrip("+~").split("=", 1)[0] for o in hydra.overrides.task}
    left = [str(key) for key in params if str(key) not in given]
    if not left:
        return
    preset = hydra.runtime.choices.get(group)
    where = f"+{group}={preset}" if preset else "the config"
    swept = "; ".join(f"{key}: {params[key]}" for key in left)
    args = " ".join(hydra.overrides.task)
    from metaplast.run.config import ConfigError

    raise ConfigError(
        f"{where} sweeps {swept}, which needs -m (without it only the first condition would run); "
        f"allowed: python -m {command} -m {args}, or set {', '.join(left)} on the command line to run one"
    )
