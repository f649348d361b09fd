"""hybridmoe: run huge Mixture-of-Experts LLMs on one workstation.

    import hybridmoe
    engine = hybridmoe.load("path/to/model", device="cuda")
    for event in engine.chat([{"role": "user", "content": "Hello"}], max_tokens=64):
        if isinstance(event, hybridmoe.Text):
            print(event.text, end="")
"""
from .engine.config import GenerationConfig
from .engine.conversation import Conversation
from .engine.events import Done, Error, Event, Notice, Progress, Stats, Text
from .errors import ConfigError, ContextOverflowError, EngineBusyError, HybridMoEError, ModelFileError
from .options import RunOptions

__version__ = "0.1.0"
__all__ = ["load", "Engine", "RunOptions", "GenerationConfig", "Conversation", "Event", "Text", "Stats", "Progress",
           "Notice", "Error", "Done", "HybridMoEError", "ConfigError", "ModelFileError", "ContextOverflowError",
           "EngineBusyError", "__version__"]


def __getattr__(name: str):
    # torch and the model code load on first use, so that `import hybridmoe` (and the CLI's start, where Ctrl-C
    # must not land in an import) stays light
    if name in ("load", "Engine"):
        from .engine import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'hybridmoe' has no attribute {name!r}")
