"""Shared test configuration."""

from __future__ import annotations

import signal

import sigpoll

# Tests create pollers in the main thread, which blocks the poller's signals there; every
# thread pytest or a test starts afterwards inherits that.  Blocking up front as well keeps
# the order of tests from mattering.
signal.pthread_sigmask(signal.SIG_BLOCK, {sigpoll.DEFAULT_SIGNAL, signal.SIGIO})
