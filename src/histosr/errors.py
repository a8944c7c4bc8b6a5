"""Errors a user can act on.

Everything histosr raises because of its input - data, files, parameters, configs, model
folders - is an :class:`InputError` (a ``ValueError``) whose message says what was expected
and how to fix it. The command line prints those as one line and exits with status 2; any
other exception is a bug in histosr, reported as such (status 1, ``HISTOSR_DEBUG=1`` shows
the traceback).
"""

from __future__ import annotations


class InputError(ValueError):
    """The input is wrong; the message says what was expected and how to fix it."""


__all__ = ["InputError"]
