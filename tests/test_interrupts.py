"""Ctrl-C inside code where Python can only print an exception and go on (a finalizer, the import machinery's
lock callbacks): the interrupt is delivered once the code has left it, as a KeyboardInterrupt, with nothing printed."""

import os
import signal
import time

import pytest

from micronet_score import interrupts


class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # handled inside __del__, where an exception would be "ignored"
        time.sleep(0.2)


def test_ctrl_c_inside_a_finalizer_is_raised_after_it(capfd):
    previous = signal.getsignal(signal.SIGINT)
    try:
        interrupts.install()
        with interrupts.raising(), pytest.raises(KeyboardInterrupt):
            Finalized()  # dropped at once: its __del__ runs here
            time.sleep(2)  # the interrupt, asked again, arrives here
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "Exception ignored" not in capfd.readouterr().err
