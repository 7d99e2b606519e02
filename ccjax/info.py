r"""What this installation runs on: versions, devices and the inference kernel backends.

  python -m ccjax.info           # a few lines; the first answers "is the fast kernel in use?"
  python -m ccjax.info --json    # the same as one JSON object

The backends are those of :mod:`ccjax.inference.kernels` (``xla`` always; ``ffi-cpu``
where the C++ extension was built; ``pallas-gpu`` on a GPU); the default is what
:func:`ccjax.select_backend` picks (``$CCJAX_BACKEND`` if set) and what every run
reports. A backend that cannot run here is listed with the reason.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
from typing import Any
import warnings

import jax
import jaxlib

import ccjax
from ccjax.inference import kernels


# The fast backend of each JAX platform (the one a user expects to be in use there).
FAST_BACKEND = {backend.platform: backend.name for backend in kernels.REGISTRY
                if backend.platform is not None}


def _device_summary(devices) -> list[str]:
  """``["cpu x2", "gpu (NVIDIA H200) x1", ...]``: device kinds and how many of each."""
  counts = collections.Counter(
      device.platform if device.device_kind.lower() == device.platform
      else f"{device.platform} ({device.device_kind})" for device in devices)
  return [f"{kind} x{count}" for kind, count in counts.items()]


def unavailable_reasons(available: tuple[str, ...]) -> dict[str, str]:
  """Why each backend of :data:`ccjax.BACKENDS` that is not in ``available`` cannot run."""
  reasons = kernels.unavailable_reasons()
  return {name: reasons.get(name, "not available") for name in kernels.BACKENDS
          if name not in available}


def describe() -> dict[str, Any]:
  """This installation's versions, devices and kernel backends.

  Returns:
    ``{"ccjax", "jax", "jaxlib", "python", "platform", "devices": [str],
    "available_backends": [str], "default_backend": str | None, "default_error":
    str | None, "unavailable": {backend: reason}}``. ``default_backend`` is ``None``
    (and ``default_error`` says why) when ``$CCJAX_BACKEND`` names a backend that
    cannot run here.
  """
  with warnings.catch_warnings():  # the reason is reported below, not as a warning
    warnings.simplefilter("ignore", RuntimeWarning)
    available = kernels.available_backends()
    try:
      default, default_error = kernels.select_backend(), None
    except ValueError as error:
      default, default_error = None, str(error)
  return {
      "ccjax": ccjax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "python": platform.python_version(), "platform": jax.default_backend(),
      "devices": _device_summary(jax.devices()),
      "available_backends": list(available), "default_backend": default,
      "default_error": default_error, "unavailable": unavailable_reasons(available),
  }


def headline(info: dict[str, Any]) -> str:
  """One line: the backend every run will use, and whether it is a fast kernel."""
  default = info["default_backend"]
  if default is None:
    return f"kernel backend: none usable ({info['default_error']})"
  fast = FAST_BACKEND.get(info["platform"])
  if default != kernels.xla.BACKEND.name:
    return f"kernel backend: {default} (fast kernel in use)"
  if fast in info["available_backends"]:
    return (f"kernel backend: xla (forced by ${kernels.BACKEND_ENV}; the fast kernel {fast} "
            "is available)")
  if fast is None:
    return f"kernel backend: xla (no fast kernel for JAX platform {info['platform']})"
  return f"kernel backend: xla (fast kernel {fast} NOT in use: {info['unavailable'][fast]})"


def format_report(info: dict[str, Any]) -> str:
  """The human-readable report of :func:`describe`'s dict, headline first."""
  lines = [
      headline(info),
      f"versions: ccjax {info['ccjax']}, jax {info['jax']}, jaxlib {info['jaxlib']}, "
      f"python {info['python']}",
      f"devices: {', '.join(info['devices'])} (default JAX backend: {info['platform']})",
      f"backends: available {', '.join(info['available_backends'])}; default "
      f"{info['default_backend'] or 'none'}",
  ]
  lines += [f"  {name}: unavailable ({reason})" for name, reason in info["unavailable"].items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ccjax.info",
                                   description=__doc__.strip().splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  info = describe()
  print(json.dumps(info, sort_keys=True) if args.json else format_report(info))
  return 0 if info["default_backend"] is not None else 2


if __name__ == "__main__":
  sys.exit(main())
