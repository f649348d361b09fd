"""Snapshots of the main screen after one exchange. Update them with: pytest tests/tui --snapshot-update"""
import pytest

pytest.importorskip("pytest_textual_snapshot")  # the snap_compare fixture comes from this plugin

from tui_helpers import GIB, FixedProbe, Scripted, exchange  # noqa: E402

from hybridmoe import GenerationConfig  # noqa: E402
from hybridmoe_tui.app import ChatApp  # noqa: E402
from hybridmoe_tui.chat import PromptInput  # noqa: E402
from hybridmoe_tui.probe import GpuReading  # noqa: E402


def app_after_exchange(snap_compare, size, gpus=()):
    app = ChatApp(Scripted(), config=GenerationConfig(temperature=0, seed=0), probe=FixedProbe(gpus))

    async def run_before(pilot):
        app.query_one(PromptInput).cursor_blink = False  # a blinking cursor would make the picture timing-dependent
        await exchange(pilot, "What does json.dumps do?")

    return snap_compare(app, terminal_size=size, run_before=run_before)


def test_main_screen_80x24(snap_compare):
    assert app_after_exchange(snap_compare, (80, 24))


def test_main_screen_120x40_with_gpus(snap_compare):
    gpus = (GpuReading(0, "RTX 6000 Ada", 31 * GIB, 48 * GIB, 87),
            GpuReading(1, "RTX 6000 Ada", 29 * GIB, 48 * GIB, 64))
    assert app_after_exchange(snap_compare, (120, 40), gpus)
