"""Stop signals become a flag between steps; the previous handlers come back."""

from __future__ import annotations

import os
import signal
import time

from modlm.training.signals import StopSignal


def test_stop_signal_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
